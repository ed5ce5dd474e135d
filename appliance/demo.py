"""``appliance demo``: the main job end to end on the embedded default, in a temporary workspace.

Enrolls the default bundle from procedurally drawn good parts, starts a local Mosquitto (when one is
installed), starts the daemon as a real subprocess, drops good and defective parts (and one corrupt
file) into the watched folder the way a camera does (write ``.part``, then rename), and shows each
report as it arrives on disk and on MQTT.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from PIL import Image

from appliance.daemon_process import DaemonProcess
from appliance.localbroker import LocalBroker, find_mosquitto
from appliance.samples import DEFECT_KINDS, make_sample

NORMAL_SHOTS = 8


def write_config(workspace: Path, *, mqtt_port: int | None) -> Path:
    mqtt = (
        f'[mqtt]\nenabled = true\nhost = "127.0.0.1"\nport = {mqtt_port}\n'
        'topic_prefix = "demo"\nclient_id = "appliance-demo"\nstats_interval_s = 5\n'
        if mqtt_port
        else "[mqtt]\nenabled = false\n"
    )
    text = f"""# written by `appliance demo`
[state]
dir = "state"

[[sources.folder]]
path = "incoming"
line = "demo_line"
camera = "cam1"
rescan_interval_s = 5
settle_s = 0.5

[outbox]
dir = "reports"

{mqtt}
[taxonomy]
labels = ["scratch", "crack", "spot"]

[taxonomy.attributes]
severity = ["minor", "major"]

[model]
bundle = "bundle"
providers = ["cpu"]
narrative = "defective"
"""
    path = workspace / "config.toml"
    path.write_text(text)
    return path


def _save(rgb, path: Path) -> None:
    tmp = path.with_name(path.name + ".part")
    Image.fromarray(rgb).save(tmp, format="PNG")
    os.replace(tmp, path)


def enroll_default(workspace: Path) -> Path:
    normal = workspace / "normal"
    normal.mkdir(parents=True, exist_ok=True)
    for seed in range(NORMAL_SHOTS):
        _save(make_sample(1000 + seed).rgb, normal / f"good_{seed:02d}.png")
    bundle = workspace / "bundle"
    if not (bundle / "manifest.json").exists():
        print(f"enrolling the default bundle from {NORMAL_SHOTS} normal images ...", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "appliance",
                "enroll",
                "--normal",
                str(normal),
                "--out",
                str(bundle),
                "--config",
                str(workspace / "config.toml"),
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return bundle


class ReportListener:
    def __init__(self, port: int):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.received: dict[str, dict] = {}
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id="demo-listener")
        self.client.on_connect = lambda c, *a: c.subscribe("demo/reports/#", qos=1)
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client, userdata, message) -> None:
        report = json.loads(message.payload)
        self.received[report["id"]] = report

    def stop(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def _drop_parts(incoming: Path, count: int) -> list[str]:
    names = []
    for index in range(count):
        defect = None if index % 2 == 0 else DEFECT_KINDS[(index // 2) % len(DEFECT_KINDS)]
        name = f"part_{index:03d}_{defect or 'good'}.png"
        _save(make_sample(5000 + index, defect=defect).rgb, incoming / name)
        names.append(name)
        time.sleep(0.2)
    (incoming / "part_999_corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    return [*names, "part_999_corrupt.jpg"]


def _report_files(workspace: Path) -> list[Path]:
    return sorted(p for p in (workspace / "reports").rglob("*.json"))


def run_demo(workspace: Path | None, *, count: int = 6, timeout: float = 240.0) -> int:
    workspace = Path(workspace or tempfile.mkdtemp(prefix="appliance-demo-")).resolve()
    for stale in ("incoming", "reports", "state", "mosquitto"):  # a rerun starts afresh
        shutil.rmtree(workspace / stale, ignore_errors=True)
    (workspace / "incoming").mkdir(parents=True, exist_ok=True)
    broker = None
    if find_mosquitto():
        broker = LocalBroker(workspace / "mosquitto").start()
        print(f"local Mosquitto on 127.0.0.1:{broker.port}")
    else:
        print("mosquitto is not installed: reports go to disk only")
    config = write_config(workspace, mqtt_port=broker.port if broker else None)
    enroll_default(workspace)
    listener = ReportListener(broker.port) if broker else None
    daemon = DaemonProcess(config)
    try:
        return _watch(workspace, daemon, listener, count, timeout)
    finally:
        daemon.stop(timeout=30)
        if listener:
            listener.stop()
        if broker:
            broker.stop()
        print(f"workspace kept at {workspace} (daemon log: daemon.log)")


def _watch(workspace: Path, daemon, listener, count: int, timeout: float) -> int:
    expected = count + 1
    print(f"dropping {count} parts and one corrupt file into {workspace / 'incoming'} ...")
    threading.Thread(target=_drop_parts, args=(workspace / "incoming", count), daemon=True).start()
    shown: set[Path] = set()
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and daemon.alive():
        for path in _report_files(workspace):
            if path not in shown:
                shown.add(path)
                _show(json.loads(path.read_text()), listener)
        on_mqtt = len(listener.received) if listener else expected
        if len(shown) >= expected and on_mqtt >= expected:
            break
        time.sleep(0.5)
    on_mqtt = len(listener.received) if listener else None
    print(
        f"\n{len(shown)} report files on disk, {on_mqtt if listener else 'n/a'} on MQTT "
        f"(expected {expected})"
    )
    if not daemon.alive():
        print("the daemon exited early; see daemon.log")
        return 1
    return 0 if len(shown) >= expected and (on_mqtt is None or on_mqtt >= expected) else 1


def _show(report: dict, listener) -> None:
    name = Path(report["source"]["path"] or "?").name
    line = f"{name:<28} {report['verdict']:<9}"
    if report["verdict"] == "error":
        line += f" {report['error']['code']}: {report['error']['message'][:60]}"
    else:
        boxes = ", ".join(f"{d['label']}@{[int(v) for v in d['bbox']]}" for d in report["defects"])
        line += (
            f" score {report['anomaly']['score']:.3f}/{report['anomaly']['threshold']:.3f} {boxes}"
        )
        if report["narrative"]:
            line += f"\n{'':<38}{report['narrative']['urgency']}: {report['narrative']['summary']}"
    print(line, flush=True)
