"""The bundle registry: install, promote, rollback, and the daemon switching or pausing live."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from appliance.registry import BundleRegistry, RegistryError
from appliance.samples import make_sample

from .conftest import REPO, report_files, save_png, wait_for, write_config


@pytest.fixture(scope="module")
def second_bundle(tmp_path_factory) -> Path:
    """Another real memory-bank bundle (other normal images, so another id)."""
    root = tmp_path_factory.mktemp("bundle2")
    normal = root / "normal"
    normal.mkdir()
    for seed in range(4):
        save_png(make_sample(300 + seed).rgb, normal / f"good{seed}.png")
    out = root / "bundle"
    subprocess.run(
        [sys.executable, "-m", "appliance", "enroll", "--normal", str(normal), "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    return out


def bundle_id(path: Path) -> str:
    return json.loads((path / "manifest.json").read_text())["bundle_id"]


def test_install_promote_rollback_and_history(tmp_path, bundle_dir, second_bundle) -> None:
    registry = BundleRegistry(tmp_path)
    assert registry.active_path() is None and registry.entries() == []
    first = registry.install(bundle_dir)
    registry.promote(first.id, by="ana", reason="first deploy")
    second = registry.install(second_bundle)
    assert registry.install(second_bundle).id == second.id  # idempotent
    registry.promote(second.id, by="ben", reason="retrain")
    assert registry.active_id() == second.id
    assert [e.active for e in registry.entries()].count(True) == 1
    assert registry.rollback(by="ana") == first.id
    assert [h["reason"] for h in registry.history()] == ["first deploy", "retrain", "rollback"]
    with pytest.raises(RegistryError, match="no installed bundle 'nope'"):
        registry.rollback("nope", by="ana")
    (registry.root / second.id / "manifest.json").write_text("{}")
    with pytest.raises(RegistryError, match="cannot promote"):
        registry.promote(second.id, by="ana", reason="x")
    assert registry.active_id() == first.id


def test_a_pause_of_a_dead_process_is_ignored(tmp_path) -> None:
    registry = BundleRegistry(tmp_path)
    registry.request_pause("retrain")
    assert registry.pause_requested()["pid"] == os.getpid()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    (registry.control / "pause").write_text(json.dumps({"pid": child.pid, "reason": "retrain"}))
    assert registry.pause_requested() is not None
    child.kill()
    child.wait()
    assert registry.pause_requested() is None
    registry.release_pause()
    assert registry.pause_requested() is None


def _drop(workspace: Path, name: str, seed: int) -> None:
    save_png(make_sample(seed, defect="scratch").rgb, workspace / "incoming" / f".{name}.part")
    os.replace(workspace / "incoming" / f".{name}.part", workspace / "incoming" / name)


def _bundle_of(workspace: Path, name: str) -> str | None:
    for path in report_files(workspace):
        report = json.loads(path.read_text())
        if report["source"]["path"] and Path(report["source"]["path"]).name == name:
            return report["bundle"]["id"]
    return None


def test_daemon_switches_on_promotion_and_pauses_for_retraining(
    tmp_path, bundle_dir, second_bundle, daemons
) -> None:
    config = write_config(tmp_path, bundle_dir, port=None)
    daemon = daemons(config)
    _drop(tmp_path, "a.png", 1)
    assert wait_for(lambda: _bundle_of(tmp_path, "a.png"), 120), daemon.log_text()
    assert _bundle_of(tmp_path, "a.png") == bundle_id(bundle_dir)

    cli = [sys.executable, "-m", "appliance", "bundles"]
    run = subprocess.run(
        [*cli, "install", str(second_bundle), "--promote", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert f"active: {bundle_id(second_bundle)}" in run.stdout
    time.sleep(2.5)  # the daemon looks at the registry every second
    _drop(tmp_path, "b.png", 2)
    assert wait_for(lambda: _bundle_of(tmp_path, "b.png"), 60), daemon.log_text()
    assert _bundle_of(tmp_path, "b.png") == bundle_id(second_bundle)

    # A live pause: the daemon unloads, images queue, nothing is lost; released → processed.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        control = tmp_path / "state" / "control"
        control.mkdir(parents=True, exist_ok=True)
        (control / "pause").write_text(json.dumps({"pid": holder.pid, "reason": "retrain"}))
        assert wait_for(lambda: "pausing inspection" in daemon.log_text(), 30)
        _drop(tmp_path, "c.png", 3)
        time.sleep(3)
        assert _bundle_of(tmp_path, "c.png") is None
        holder.kill()  # the retrain dies with kill -9: inspection resumes by itself
        holder.wait()
        assert wait_for(lambda: _bundle_of(tmp_path, "c.png"), 60), daemon.log_text()
    finally:
        holder.kill()
    run = subprocess.run(
        [*cli, "rollback", "--config", str(config)], capture_output=True, text=True, cwd=REPO
    )
    assert run.returncode == 0 and bundle_id(bundle_dir) in run.stdout
    time.sleep(2.5)
    _drop(tmp_path, "d.png", 4)
    assert wait_for(lambda: _bundle_of(tmp_path, "d.png"), 60), daemon.log_text()
    assert _bundle_of(tmp_path, "d.png") == bundle_id(bundle_dir)
    listing = subprocess.run(
        [*cli, "list", "--config", str(config)], capture_output=True, text=True, cwd=REPO
    ).stdout
    assert f"* {bundle_id(bundle_dir)}" in listing and bundle_id(second_bundle) in listing
