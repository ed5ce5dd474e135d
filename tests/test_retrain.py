"""`appliance retrain` on a tiny trained inspector: feedback → retrain → gate → promote → served.

Real parts throughout: a tiny inspector trained and exported with its checkpoint, the feedback
records file a technician's reviews produce, the retrain command as a subprocess, the registry, and
the daemon serving whatever is active.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("gguf")

from appliance.registry import BundleRegistry  # noqa: E402
from examples.tiny.make_data import make_dataset  # noqa: E402
from export.inspector_bundle import export_bundle  # noqa: E402
from train.data import Provenance, read_records, write_records  # noqa: E402
from train.recipe import parse_recipe  # noqa: E402
from train.retrain import RetrainError, RetrainSettings, assemble, gate  # noqa: E402
from train.sft import train_stage  # noqa: E402

from .conftest import REPO, report_files, wait_for, write_config  # noqa: E402
from .test_export_bundle import recipe_dict  # noqa: E402


def stamped(records, who: str = "tech", start: int = 0):
    """Records as feedback: reviewed by ``who``, one minute apart."""
    from dataclasses import replace

    return [
        replace(
            r,
            provenance=Provenance(
                source="feedback", who=who, when=f"2026-11-26T10:{start + i:02d}:00+00:00"
            ),
        )
        for i, r in enumerate(records)
    ]


def test_assemble_holds_out_the_newest_feedback_and_a_replay_share(tmp_path) -> None:
    records = read_records(make_dataset(tmp_path, per_kind=3))  # 12 records
    feedback, replay = stamped(records[:6]), records[6:]
    split = assemble(feedback, replay, RetrainSettings(holdout_fraction=0.34, replay_ratio=0.5))
    newest = sorted(feedback, key=lambda r: r.provenance.when)[-3:]
    assert all(r in split.holdout for r in newest)
    # 3 newest feedback (ceil(0.34 * 6)) and ceil(0.34 * 3) = 2 of the 3 replayed are held out
    assert split.counts == {"feedback": 6, "replay": 3, "train": 4, "holdout": 5}
    assert len(split.train) == 4 and len(split.holdout) == 5
    assert not set(map(id, split.train)) & set(map(id, split.holdout))
    again = assemble(feedback, replay, RetrainSettings(holdout_fraction=0.34, replay_ratio=0.5))
    assert [r.image for r in again.train] == [r.image for r in split.train]  # seeded
    with pytest.raises(RetrainError, match="at least 4"):
        assemble(feedback[:3], replay, RetrainSettings())


def test_gate_on_literals() -> None:
    old = {"map50": 0.5, "f1": 0.6, "schema_valid_rate": 1.0}
    assert gate(old, {"map50": 0.5, "f1": 0.7, "schema_valid_rate": 1.0}, {"map50": 0.0}) == (
        True,
        [],
    )
    passed, reasons = gate(old, {**old, "f1": 0.55}, {"f1": 0.01, "map50": 0.0})
    assert not passed and reasons == ["f1 fell 0.6000 → 0.5500 (allowed drop 0.01)"]
    assert gate(old, {**old, "f1": 0.55}, {"f1": 0.1})[0]
    assert not gate(old, {**old, "map50": None}, {"map50": 0.0})[0]
    with pytest.raises(ValueError, match=r"unknown gate metric\(s\) \['mAP'\]"):
        RetrainSettings(gate={"mAP": 0.0})


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A tiny trained inspector exported with its checkpoint, and the feedback of a technician."""
    root = tmp_path_factory.mktemp("served")
    records_file = make_dataset(root / "data", per_kind=2)
    recipe = parse_recipe(recipe_dict(records_file), records_file.parent)
    train_stage(recipe, "detect", root / "ckpt", progress=False)
    bundle = export_bundle(
        root / "ckpt", root / "bundle", quant="F32", max_tokens=160, with_checkpoint=True
    )
    return root, bundle.path, read_records(records_file)


def workspace(tmp_path: Path, bundle: Path, records, gate_drop: float) -> tuple[Path, Path]:
    config = write_config(tmp_path, bundle, port=None)
    # newest last: defect images are reviewed last, so the held-out set has defects to score
    ordered = sorted(records, key=lambda r: bool(r.objects))
    write_records(tmp_path / "state" / "feedback" / "records.jsonl", stamped(ordered))
    recipe = tmp_path / "retrain.toml"
    recipe.write_text(
        f"[retrain]\nsteps = 6\nmin_feedback = 4\nreplay_ratio = 0.5\n"
        f"[retrain.gate]\nmap50 = {gate_drop}\nf1 = {gate_drop}\nschema_valid_rate = 1.0\n"
    )
    return config, recipe


def retrain(config: Path, recipe: Path, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "appliance",
            "retrain",
            "--config",
            str(config),
            "--recipe",
            str(recipe),
        ],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=600,
        **kw,
    )


def bundle_id(path: Path) -> str:
    return json.loads((path / "manifest.json").read_text())["bundle_id"]


def served_ids(workspace: Path) -> list[str]:
    return [json.loads(p.read_text())["bundle"]["id"] for p in report_files(workspace)]


@pytest.mark.slow
def test_feedback_retrain_promote_serve_and_rollback(served, tmp_path, daemons) -> None:
    _, bundle, records = served
    config, recipe = workspace(tmp_path, bundle, records, gate_drop=1.0)  # any result passes
    run = retrain(config, recipe)
    assert run.returncode == 0, run.stderr[-3000:]
    registry = BundleRegistry(tmp_path / "state")
    new_id = registry.active_id()
    assert new_id and new_id != bundle_id(bundle) and f"promoted {new_id}" in run.stdout
    new_bundle = registry.active_path()
    manifest = json.loads((new_bundle / "manifest.json").read_text())
    summary = manifest["retrain"]["summary"]
    assert summary["parent"] == bundle_id(bundle) and summary["counts"]["feedback"] == len(records)
    assert (new_bundle / "retrain-report.md").is_file() and (new_bundle / "checkpoint").is_dir()
    report = (new_bundle / "retrain-report.md").read_text()
    assert "PROMOTED" in report and "| map50 |" in report and "Confusion" in report

    daemon = daemons(config)  # the daemon serves the promoted bundle
    from appliance.samples import make_sample

    from .conftest import save_png

    save_png(make_sample(7, defect="crack").rgb, tmp_path / "incoming" / "x.png")
    assert wait_for(lambda: served_ids(tmp_path), 120), daemon.log_text()
    assert served_ids(tmp_path) == [new_id]
    back = subprocess.run(
        [sys.executable, "-m", "appliance", "bundles", "rollback", "--config", str(config)],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert back.returncode == 0 and bundle_id(bundle) in back.stdout
    time.sleep(2.5)
    save_png(make_sample(8, defect="crack").rgb, tmp_path / "incoming" / "y.png")
    assert wait_for(lambda: len(served_ids(tmp_path)) == 2, 120), daemon.log_text()
    assert sorted(served_ids(tmp_path)) == sorted([new_id, bundle_id(bundle)])


@pytest.mark.slow
def test_a_failing_gate_keeps_the_served_bundle(served, tmp_path) -> None:
    _, bundle, records = served
    config, recipe = workspace(tmp_path, bundle, records, gate_drop=-2.0)  # must gain 2: never
    run = retrain(config, recipe)
    assert run.returncode == 1 and "kept the served bundle" in run.stdout, run.stderr[-2000:]
    assert "fell" in run.stdout  # a gated metric (f1 here) could not gain 2
    assert BundleRegistry(tmp_path / "state").active_id() is None  # nothing was promoted
    runs = list((tmp_path / "state" / "retrain").iterdir())
    assert len(runs) == 1 and "KEPT THE SERVED BUNDLE" in (runs[0] / "report.md").read_text()


@pytest.mark.slow
def test_kill9_during_retraining_leaves_the_served_bundle_and_the_queue(
    served, tmp_path, daemons
) -> None:
    _, bundle, records = served
    config, recipe = workspace(tmp_path, bundle, records, gate_drop=1.0)
    recipe.write_text(recipe.read_text().replace("steps = 6", "steps = 400"))
    daemon = daemons(config)
    daemon.wait_ready()
    process = subprocess.Popen(
        [sys.executable, "-m", "appliance", "retrain", "--config", str(config)]
        + ["--recipe", str(recipe)],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: "pausing inspection" in daemon.log_text(), 120)
        from appliance.samples import make_sample

        from .conftest import save_png

        save_png(make_sample(9).rgb, tmp_path / "incoming" / "queued.png")
        assert wait_for(lambda: list((tmp_path / "state" / "retrain").glob("*/train.jsonl")), 120)
        time.sleep(5)  # well inside the 400 training steps
        assert served_ids(tmp_path) == []  # paused: queued, not inspected
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
    finally:
        process.kill()
    assert BundleRegistry(tmp_path / "state").active_id() is None
    assert wait_for(lambda: served_ids(tmp_path) == [bundle_id(bundle)], 120), daemon.log_text()


def test_memory_bank_retrain_adds_confirmed_good_parts_to_the_memory(tmp_path, bundle_dir) -> None:
    """The few-shot bundle is enrolled again with its kept normals plus newly confirmed good
    parts; the gate compares image AUROC (and the rest) on the newest feedback."""
    from appliance.registry import BundleRegistry
    from appliance.samples import make_sample
    from appliance.taxonomy import Taxonomy
    from train.data import Obj, Record
    from train.retrain import run_retrain

    from .conftest import save_png

    records = []
    (tmp_path / "fb").mkdir()
    for i, defect in enumerate([None, None, None, "crack", None, "scratch", None, "spot"]):
        sample = make_sample(500 + i, defect=defect)
        path = save_png(sample.rgb, tmp_path / "fb" / f"p{i}.png")
        objects = (Obj(defect, tuple(float(v) for v in sample.box)),) if defect else ()
        records.append(Record(path, 320, 240, objects))
    write_records(tmp_path / "state" / "feedback" / "records.jsonl", stamped(records))
    taxonomy = Taxonomy(labels=("scratch", "crack", "spot"))
    settings = RetrainSettings(holdout_fraction=0.5, pause_daemon=False, gate={"image_auroc": 1.0})
    result = run_retrain(tmp_path / "state", bundle_dir, taxonomy, settings, by="tech")
    assert result.promoted, result.reasons
    new = BundleRegistry(tmp_path / "state").active_path()
    kept = sorted(p.name for p in (bundle_dir / "normals").iterdir())
    added = sorted(p.name for p in (new / "normals").iterdir())
    assert len(added) == len(kept) + 3  # p0-p2: the good parts of the older (training) half
    assert result.old["image_auroc"] is not None and result.new["image_auroc"] is not None
    assert "image_auroc" in (result.run_dir / "report.md").read_text()
