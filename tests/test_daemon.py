"""The daemon end to end: a real subprocess, real files, a real Mosquitto, real crashes."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from appliance.samples import make_sample
from appliance.schema import report_problems
from appliance.taxonomy import Taxonomy

from .conftest import (
    REPO,
    report_files,
    reports_by_source,
    save_png,
    wait_for,
    write_config,
)

TAXONOMY = Taxonomy(labels=("scratch", "crack", "spot"))
pytestmark = pytest.mark.slow


def publish(port: int, topic: str, payloads: list[bytes]) -> None:
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"cam-{time.time_ns()}")
    client.connect("127.0.0.1", port)
    client.loop_start()
    for payload in payloads:
        client.publish(topic, payload, qos=1).wait_for_publish(timeout=10)
    client.loop_stop()
    client.disconnect()


def drop_parts(folder, count: int, start: int = 0, pause: float = 0.0) -> list[str]:
    names = []
    for index in range(start, start + count):
        defect = ("scratch", "spot", None, "crack")[index % 4]
        name = f"part{index:03d}.png"
        save_png(make_sample(7000 + index, defect=defect).rgb, folder / name)
        names.append(name)
        time.sleep(pause)
    return names


def status_json(config) -> dict:
    run = subprocess.run(
        [sys.executable, "-m", "appliance", "status", "--config", str(config), "--json"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    return json.loads(run.stdout)


# Waits stay well inside this limit, so that a slow run fails with the daemon's log printed.
@pytest.mark.timeout(600)
def test_folder_and_mqtt_images_become_reports_on_disk_and_mqtt(
    tmp_path, broker, bundle_dir, subscriber_factory, daemons
):
    config = write_config(tmp_path, bundle_dir, port=broker.port, narrative="defective")
    sub = subscriber_factory(broker.port)
    daemon = daemons(config)
    names = drop_parts(tmp_path / "incoming", 2, start=2)  # one good part, one cracked
    png = (tmp_path / "incoming" / names[0]).read_bytes()
    other = make_sample(4242, defect="spot").rgb
    save_png(other, tmp_path / "mq.png")
    envelope = json.dumps(
        {
            "image_b64": base64.b64encode((tmp_path / "mq.png").read_bytes()).decode(),
            "line": "l7",
            "camera": "c7",
            "id": "msg-1",
        }
    ).encode()
    assert wait_for(lambda: "online" in sub.status, 60), daemon.log_text()
    publish(broker.port, "cams/a/image", [make_raw_png(4343), envelope])
    assert wait_for(lambda: len(report_files(tmp_path)) >= 4, 300), daemon.log_text()
    assert wait_for(lambda: len(sub.reports) >= 4, 60)
    reports = [json.loads(p.read_text()) for p in report_files(tmp_path)]
    assert len(reports) == 4 and all(report_problems(r, TAXONOMY) == [] for r in reports)
    by_kind = {r["source"]["kind"] for r in reports}
    assert by_kind == {"folder", "mqtt"}
    enveloped = [r for r in reports if r["source"]["message_id"] == "msg-1"]
    assert enveloped and enveloped[0]["source"]["line"] == "l7"
    defective = [r for r in reports if r["verdict"] == "defective"]
    assert defective and all(r["narrative"]["urgency"] for r in defective)
    heatmaps = {p.name for p in (tmp_path / "reports").rglob("*.heatmap.png")}
    assert {r["anomaly"]["heatmap"] for r in defective} == heatmaps
    assert {r["id"] for r in reports} == set(sub.reports)
    # the same content again, under another name: no second report
    (tmp_path / "incoming" / "copy.png").write_bytes(png)
    assert wait_for(lambda: status_json(config)["duplicates"] == 1, 30)
    assert len(report_files(tmp_path)) == 4
    assert wait_for(lambda: sub.stats, 10) and "queue_depth" in sub.stats[-1]
    assert daemon.stop() == 0
    assert wait_for(lambda: sub.status[-1] == "offline", 10)


def make_raw_png(seed: int) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(make_sample(seed).rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def test_kill9_midstream_then_restart_loses_nothing(
    tmp_path, broker, bundle_dir, subscriber_factory, daemons
):
    config = write_config(tmp_path, bundle_dir, port=broker.port)
    sub = subscriber_factory(broker.port)
    daemon = daemons(config)
    names = drop_parts(tmp_path / "incoming", 8, pause=0.05)
    assert wait_for(lambda: len(report_files(tmp_path)) >= 2, 120), daemon.log_text()
    daemon.kill9()
    assert wait_for(lambda: "offline" in sub.status, 15)  # the Last Will
    names += drop_parts(tmp_path / "incoming", 6, start=8)  # arrive while the daemon is down
    daemon = daemons(config)
    assert wait_for(lambda: len(report_files(tmp_path)) >= len(names), 180), daemon.log_text()
    time.sleep(2)
    per_image = reports_by_source(tmp_path)
    assert sorted(per_image) == sorted(names)
    assert all(len(found) == 1 for found in per_image.values()), per_image.keys()
    ids = {found[0]["id"] for found in per_image.values()}
    assert wait_for(lambda: ids <= set(sub.reports), 60), ids - set(sub.reports)
    assert sub.status[-1] == "online"


def test_broker_outage_backlog_drains_after_it_returns(
    tmp_path, broker, bundle_dir, subscriber_factory, daemons
):
    config = write_config(tmp_path, bundle_dir, port=broker.port)
    sub = subscriber_factory(broker.port)
    daemon = daemons(config)
    names = drop_parts(tmp_path / "incoming", 3)
    assert wait_for(lambda: len(sub.reports) >= 3, 120), daemon.log_text()
    # The subscriber's copy can arrive before the daemon has handled its PUBACK: wait for that too.
    assert wait_for(lambda: status_json(config)["publish_backlog"] == 0, 60)
    broker.stop()
    names += drop_parts(tmp_path / "incoming", 5, start=3)
    assert wait_for(lambda: len(report_files(tmp_path)) >= 8, 120), daemon.log_text()
    assert status_json(config)["publish_backlog"] == 5
    broker.start()
    ids = {json.loads(p.read_text())["id"] for p in report_files(tmp_path)}
    assert wait_for(lambda: ids <= set(sub.reports), 90), daemon.log_text()
    assert wait_for(lambda: status_json(config)["publish_backlog"] == 0, 30)
    assert daemon.alive()


BAD_FILES = {
    "zero.jpg": (b"", "empty_file"),
    "text.jpg": (b"this is a text file with an image name\n", "not_an_image"),
    "random.png": (bytes(range(256)) * 16, "not_an_image"),
}


def test_bad_input_gets_error_reports_quarantine_and_the_daemon_goes_on(
    tmp_path, broker, bundle_dir, subscriber_factory, daemons
):
    import io

    from PIL import Image

    config = write_config(
        tmp_path, bundle_dir, port=broker.port, extra="[ingest]\nmax_image_pixels = 50000000\n"
    )
    sub = subscriber_factory(broker.port)
    daemon = daemons(config)
    incoming = tmp_path / "incoming"
    buffer = io.BytesIO()
    Image.fromarray(make_sample(1).rgb).save(buffer, format="JPEG")
    files = dict(BAD_FILES)
    files["truncated.jpg"] = (buffer.getvalue()[: len(buffer.getvalue()) // 2], "truncated_image")
    bomb = io.BytesIO()
    Image.new("1", (10000, 10000)).save(bomb, format="PNG")
    files["bomb.png"] = (bomb.getvalue(), "decompression_bomb")
    for name, (data, _code) in files.items():
        (incoming / name).write_bytes(data)
    weird = os.fsencode(str(incoming)) + b"/caf\xe9-\xff.png"  # not valid UTF-8
    with open(weird, "wb") as handle:
        handle.write(make_raw_png(77))
    assert wait_for(lambda: "online" in sub.status, 30)
    publish(
        broker.port,
        "cams/x/image",
        [b"x" * 40_000_000, b'{"image_b64": "@@@"}', b'{"image_b64": 5}', b"{not json"],
    )
    drop_parts(incoming, 1, start=50)  # a good image after all that
    expected = len(files) + 1 + 4 + 1
    assert wait_for(lambda: len(report_files(tmp_path)) >= expected, 180), daemon.log_text()
    reports = [json.loads(p.read_text()) for p in report_files(tmp_path)]
    assert all(report_problems(r, TAXONOMY) == [] for r in reports)
    codes = sorted(r["error"]["code"] for r in reports if r["verdict"] == "error")
    wanted = sorted(
        [c for _, c in files.values()]
        + ["payload_too_large", "bad_base64", "bad_envelope", "bad_envelope"]
    )
    assert codes == wanted
    named = reports_by_source(tmp_path)
    assert named["part050.png"][0]["verdict"] in ("ok", "defective")
    assert any("caf" in key and r[0]["verdict"] != "error" for key, r in named.items())
    quarantined = {
        p.name
        for p in (tmp_path / "state" / "quarantine").rglob("*")
        if p.is_file() and p.name != "report.json"
    }
    assert set(files) <= quarantined
    assert not any((incoming / name).exists() for name in files)  # moved, not copied
    assert daemon.alive()
    assert wait_for(lambda: len(sub.reports) >= expected, 60)


def test_signal_handler_does_not_deadlock_when_it_interrupts_an_event_wait():
    """CI once hung on SIGTERM: the handler ran while the main thread held `wake`'s lock inside
    `Event.wait`, and its `Event.set` waited on that same lock forever. Reproduce that moment in
    a thread: hold the lock, run the handler in the same thread; it must return, and the events
    must be set once the lock is released."""
    import signal
    import threading

    from appliance.daemon import stop_on_signal

    stop, wake = threading.Event(), threading.Event()
    handler = stop_on_signal(stop, wake)

    def interrupted_wait() -> None:
        with wake._cond:  # what Event.wait holds when the signal lands
            handler(signal.SIGTERM, None)

    thread = threading.Thread(target=interrupted_wait, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive(), "the signal handler blocked on the lock its own thread holds"
    assert stop.wait(5) and wake.wait(5)
