"""Shared fixtures: a real Mosquitto on a free loopback port, an enrolled bundle, daemon processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from appliance.daemon_process import DaemonProcess
from appliance.localbroker import LocalBroker, find_mosquitto
from appliance.samples import make_sample

REPO = Path(__file__).resolve().parents[1]


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def save_png(rgb, path: Path) -> Path:
    """Write like a camera does: a temporary name, then a rename into place."""
    tmp = path.with_name("." + path.name + ".part")
    Image.fromarray(rgb).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


@pytest.fixture
def broker(tmp_path):
    if find_mosquitto() is None:
        pytest.skip("mosquitto binary is absent (apt-get install mosquitto; CI installs it)")
    instance = LocalBroker(tmp_path / "broker").start()
    yield instance
    instance.stop()


@pytest.fixture(scope="session")
def bundle_dir(tmp_path_factory) -> Path:
    """A real memory-bank bundle: the EfficientNet-Lite0 backbone enrolled on 6 good parts."""
    root = tmp_path_factory.mktemp("bundle")
    normal = root / "normal"
    normal.mkdir()
    for seed in range(6):
        save_png(make_sample(100 + seed).rgb, normal / f"good{seed}.png")
    out = root / "bundle"
    subprocess.run(
        [sys.executable, "-m", "appliance", "enroll", "--normal", str(normal), "--out", str(out)],
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    return out


class Subscriber:
    """A real MQTT client collecting reports (deduped by id, as consumers must) and status."""

    def __init__(self, port: int, prefix: str):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.prefix = prefix
        self.reports: dict[str, dict] = {}
        self.messages = 0
        self.status: list[str] = []
        self.stats: list[dict] = []
        self.lock = threading.Lock()
        # A persistent session, as a consumer must have: the broker (persistence on) keeps the
        # subscription and queues QoS 1 reports across its own restart until we are back; with a
        # clean session, reports drained before we resubscribe would never reach us.
        self.client = paho.Client(
            CallbackAPIVersion.VERSION2, client_id=f"test-sub-{port}", clean_session=False
        )
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(0.2, 1)
        self.client.connect("127.0.0.1", port, keepalive=5)
        self.client.loop_start()

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        client.subscribe(f"{self.prefix}/#", qos=1)

    def _on_message(self, client, userdata, message):
        with self.lock:
            if message.topic == f"{self.prefix}/status":
                self.status.append(message.payload.decode())
            elif message.topic == f"{self.prefix}/stats":
                self.stats.append(json.loads(message.payload))
            elif message.topic.startswith(f"{self.prefix}/reports/"):
                report = json.loads(message.payload)
                self.reports[report["id"]] = report
                self.messages += 1

    def close(self):
        self.client.loop_stop()
        self.client.disconnect()


@pytest.fixture
def subscriber_factory():
    made = []

    def make(port: int, prefix: str = "t") -> Subscriber:
        sub = Subscriber(port, prefix)
        made.append(sub)
        return sub

    yield make
    for sub in made:
        sub.close()


def write_config(
    workspace: Path, bundle: Path, *, port: int | None, narrative: str = "never", extra: str = ""
) -> Path:
    for name in ("incoming", "state", "reports"):
        (workspace / name).mkdir(parents=True, exist_ok=True)
    mqtt = (
        f'[mqtt]\nport = {port}\ntopic_prefix = "t"\nclient_id = "appliance-test"\n'
        f"stats_interval_s = 1\nkeepalive_s = 5\n"
        if port
        else "[mqtt]\nenabled = false\n"
    )
    mqtt_source = (
        '[sources.mqtt]\ntopics = ["cams/+/image"]\nline = "mq"\ncamera = "c9"\n' if port else ""
    )
    config = workspace / "config.toml"
    config.write_text(f"""
[state]
dir = "state"
[[sources.folder]]
path = "incoming"
line = "l1"
camera = "c1"
settle_s = 0.3
rescan_interval_s = 2
{mqtt_source}
[outbox]
dir = "reports"
{mqtt}
[taxonomy]
labels = ["scratch", "crack", "spot"]
[model]
bundle = "{bundle}"
providers = ["cpu"]
narrative = "{narrative}"
n_threads = 2
{extra}
""")
    return config


@pytest.fixture
def daemons():
    started: list[DaemonProcess] = []

    def start(config: Path) -> DaemonProcess:
        daemon = DaemonProcess(config)
        started.append(daemon)
        return daemon

    yield start
    for daemon in started:
        daemon.stop()


def report_files(workspace: Path) -> list[Path]:
    return sorted(p for p in (workspace / "reports").rglob("*.json"))


def reports_by_source(workspace: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for path in report_files(workspace):
        report = json.loads(path.read_text())
        key = Path(report["source"]["path"]).name if report["source"]["path"] else report["id"]
        out.setdefault(key, []).append(report)
    return out
