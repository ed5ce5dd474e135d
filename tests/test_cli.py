"""The command line as a technician uses it: inspect, status, and a daemon under systemd's protocol."""

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from appliance.samples import make_sample
from appliance.schema import report_problems
from appliance.taxonomy import Taxonomy

from .conftest import REPO, save_png, wait_for, write_config


def run_cli(*args, check=True, env=None):
    return subprocess.run(
        [sys.executable, "-m", "appliance", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=check,
        env=env,
    )


def test_inspect_prints_one_valid_report_per_image_and_exits_zero(bundle_dir, tmp_path):
    good = save_png(make_sample(31).rgb, tmp_path / "good.png")
    bad = save_png(make_sample(32, defect="spot").rgb, tmp_path / "spot.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    run = run_cli(
        "inspect",
        "--bundle",
        bundle_dir,
        "--no-narrative",
        good,
        bad,
        tmp_path / "broken.jpg",
        tmp_path / "missing.png",
    )
    lines = run.stdout.strip().splitlines()
    assert run.returncode == 0 and len(lines) == 4
    reports = [json.loads(line) for line in lines]
    taxonomy = Taxonomy(labels=())
    assert all(report_problems(r, taxonomy) == [] for r in reports)
    assert [r["verdict"] for r in reports] == ["ok", "defective", "error", "error"]
    assert reports[2]["error"]["code"] == "not_an_image"
    assert reports[3]["error"]["code"] == "file_vanished"
    assert reports[1]["narrative"] is None
    x1, y1, x2, y2 = reports[1]["defects"][0]["bbox"]
    assert 0 <= x1 < x2 <= 320 and 0 <= y1 < y2 <= 240


def test_inspect_without_a_bundle_fails_clearly(tmp_path):
    run = run_cli("inspect", "--bundle", tmp_path, tmp_path / "x.png", check=False)
    assert run.returncode == 3 and "no manifest.json" in run.stderr


def test_status_reports_queue_backlog_and_errors(bundle_dir, tmp_path, daemons):
    config = write_config(tmp_path, bundle_dir, port=None)
    run = run_cli("status", "--config", config, check=False)
    assert run.returncode == 1 and "has not run" in run.stderr
    daemon = daemons(config)
    save_png(make_sample(40).rgb, tmp_path / "incoming" / "a.png")
    (tmp_path / "incoming" / "b.png").write_bytes(b"")
    assert wait_for(lambda: len(list((tmp_path / "reports").rglob("*.json"))) == 2, 120), (
        daemon.log_text()
    )
    status = json.loads(run_cli("status", "--config", config, "--json").stdout)
    assert status["reports_total"] == 2 and status["queue_depth"] == 0
    assert status["error_codes"] == {"empty_file": 1}
    assert status["publish_backlog"] == 2  # MQTT is disabled: nothing was published
    text = run_cli("status", "--config", config).stdout
    assert "queue depth      0" in text and "empty_file" in text


def test_daemon_speaks_systemd_notify_protocol(bundle_dir, tmp_path):
    config = write_config(tmp_path, bundle_dir, port=None)
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(1.0)
    env = {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000", "PATH": "/usr/bin:/bin"}
    log = tmp_path / "daemon.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "appliance", "run", "--config", str(config)],
        cwd=REPO,
        env=env,
        stderr=open(log, "w"),  # noqa: SIM115 - closed with the process
    )
    received: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and received.count("WATCHDOG=1") < 2:
            try:
                received.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:  # say where it hangs: the daemon dumps its stacks
            process.send_signal(signal.SIGUSR1)
            time.sleep(1)
            pytest.fail("the daemon did not stop on SIGTERM:\n" + log.read_text()[-6000:])
        while True:
            try:
                received.append(sock.recv(4096).decode())
            except TimeoutError:
                break
    finally:
        if process.poll() is None:
            process.kill()
        sock.close()
    assert received[0].startswith("READY=1")
    assert received.count("WATCHDOG=1") >= 2
    assert received[-1] == "STOPPING=1"
    assert process.returncode == 0
