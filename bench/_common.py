"""Shared plumbing for the daemon benchmarks: a bundle, a config, a daemon, a report subscriber.

The daemon benchmarks drive the real thing: ``python -m appliance run`` as a subprocess, a local
Mosquitto, images dropped into the watched folder the way cameras do (``.part`` then rename), and a
real MQTT client that notes when each report arrives.
"""

from __future__ import annotations

import io
import json
import os
import platform
import subprocess
import sys
import threading
import time
from pathlib import Path

from PIL import Image

from appliance.daemon_process import DaemonProcess  # noqa: F401 - re-exported for the scripts
from appliance.samples import DEFECT_KINDS, make_sample

REPO = Path(__file__).resolve().parent.parent
DOCS = REPO / "docs" / "benchmarks.md"
PREFIX = "bench"


def sample_rgb(index: int, *, height: int, width: int):
    """Image ``index`` of a benchmark set: even good, odd scratched, cracked or spotted."""
    defect = None if index % 2 == 0 else DEFECT_KINDS[(index // 2) % len(DEFECT_KINDS)]
    return make_sample(20_000 + index, defect=defect, height=height, width=width).rgb


def png_bytes(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="PNG")
    return buffer.getvalue()


def drop(folder: Path, name: str, data: bytes) -> float:
    """Write like a camera (temporary name, then rename); returns the wall time of the rename."""
    tmp = folder / f".{name}.part"
    tmp.write_bytes(data)
    os.replace(tmp, folder / name)
    return time.time()


def enroll(
    workdir: Path, *, height: int, width: int, shots: int = 6, working_size: int | None = None
) -> Path:
    """A memory-bank bundle enrolled on ``shots`` good parts of the given size.

    ``working_size`` is enrolment's ``--size`` (square working resolution); None keeps its default.
    """
    normal = workdir / "normal"
    normal.mkdir(parents=True, exist_ok=True)
    for seed in range(shots):
        rgb = make_sample(100 + seed, height=height, width=width).rgb
        (normal / f"good{seed}.png").write_bytes(png_bytes(rgb))
    out = workdir / "bundle"
    size = ["--size", str(working_size)] if working_size else []
    subprocess.run(
        [sys.executable, "-m", "appliance", "enroll", "--normal", str(normal), "--out", str(out)]
        + size,
        check=True,
        capture_output=True,
        cwd=REPO,
    )
    return out


def write_config(
    workspace: Path, bundle: Path, *, port: int, narrative: str, batch_size: int | None
) -> Path:
    """A daemon config: one watched folder, MQTT on the local broker, defaults everywhere else."""
    for name in ("incoming", "state", "reports"):
        (workspace / name).mkdir(parents=True, exist_ok=True)
    ingest = f"[ingest]\nbatch_size = {batch_size}\n" if batch_size else ""
    config = workspace / "config.toml"
    config.write_text(f"""
[state]
dir = "state"
[[sources.folder]]
path = "incoming"
line = "bench"
camera = "cam1"
[outbox]
dir = "reports"
[mqtt]
port = {port}
topic_prefix = "{PREFIX}"
client_id = "appliance-bench"
{ingest}
[taxonomy]
labels = ["scratch", "crack", "spot"]
[model]
bundle = "{bundle}"
providers = ["cpu"]
narrative = "{narrative}"
""")
    return config


class ReportSubscriber:
    """Notes the wall time each report reaches a real MQTT client, keyed by the file's name."""

    def __init__(self, port: int):
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion

        self.arrivals: dict[str, tuple[float, dict]] = {}
        self.count = 0
        self.changed = threading.Condition()
        self._subscribed = threading.Event()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-sub-{port}")
        self.client.on_connect = lambda c, *_: c.subscribe(f"{PREFIX}/reports/#", qos=1)
        self.client.on_subscribe = lambda *_: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port, keepalive=30)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise TimeoutError("the benchmark subscriber could not subscribe")

    def _on_message(self, client, userdata, message) -> None:
        arrived = time.time()
        report = json.loads(message.payload)
        name = Path(report["source"]["path"] or report["id"]).name
        with self.changed:
            if name not in self.arrivals:
                self.arrivals[name] = (arrived, report)
                self.count += 1
            self.changed.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: self.count >= count, timeout)

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def cpu_name() -> str:
    """CPU model from /proc/cpuinfo where available (platform.processor() is often empty)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass  # not Linux: keep platform's answer
    return platform.processor() or platform.machine()


def machine() -> str:
    return f"{cpu_name()}, nproc {os.cpu_count()}"


def load_average() -> str:
    return " / ".join(f"{v:.2f}" for v in os.getloadavg())


def replace_section(text: str, heading: str, body: str) -> str:
    """``text`` with the section under ``heading`` (up to the next ``## ``) set to ``body``."""
    section = f"{heading}\n\n{body.strip()}\n"
    start = text.find(heading + "\n")
    if start < 0:
        return (text.rstrip() + "\n\n" if text.strip() else "") + section
    end = text.find("\n## ", start + len(heading))
    rest = "" if end < 0 else "\n" + text[end + 1 :]
    return text[:start] + section + rest


def write_section(heading: str, body: str) -> None:
    """Replace (or append) one section of docs/benchmarks.md, re-reading the file just before."""
    DOCS.parent.mkdir(parents=True, exist_ok=True)
    current = DOCS.read_text() if DOCS.exists() else "# Benchmarks\n"
    DOCS.write_text(replace_section(current, heading, body))
    print(f"wrote the section {heading!r} of {DOCS}")
