"""The daemon as a child process (``python -m appliance run``), for the demo, tests and benchmarks.

They all need the same thing: start the real daemon on a config, log to ``daemon.log`` beside it,
kill it hard or stop it cleanly, and read its log or resident size. Not used by the daemon itself.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path


class DaemonProcess:
    """``python -m appliance run --config CONFIG``, logging to ``daemon.log`` in CONFIG's folder."""

    def __init__(self, config: Path):
        self.config = Path(config)
        self.log_path = self.config.parent / "daemon.log"
        self.log = open(self.log_path, "ab")  # noqa: SIM115 - lives with the process
        self.process = subprocess.Popen(
            [sys.executable, "-m", "appliance", "run", "--config", str(self.config)],
            stdout=self.log,
            stderr=self.log,
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise RuntimeError(f"the daemon exited; see {self.log_path}")
            if "appliance ready" in self.log_text():
                return
            time.sleep(0.2)
        raise TimeoutError(f"the daemon was not ready in {timeout}s; see {self.log_path}")

    def rss_kib(self) -> int:
        """VmRSS of the daemon process, from /proc."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
        raise RuntimeError(f"no VmRSS for pid {self.pid}")

    def kill9(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM (the daemon finishes its batch and says offline), SIGKILL after ``timeout``."""
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()
        return self.process.returncode
