"""Files on disk: atomic report files, quarantine, and the MQTT inbox.

Every write here is temp file → fsync → rename → fsync of the directory, so a crash leaves either the
old state or the new one, never a half-written report. Report file names derive from the report id and
the receipt, so re-processing after a crash overwrites the same file instead of adding a second one.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)
_SAFE = str.maketrans({c: "_" for c in '/\\:*?"<>| \t\n\r'})


def safe_name(text: str, limit: int = 64) -> str:
    """A string usable as one path component (line / camera names come from config or envelopes)."""
    cleaned = text.translate(_SAFE).encode("utf-8", "replace").decode("utf-8", "replace")
    return (cleaned.strip(".") or "_")[:limit]


def atomic_write(path: Path, data: bytes, *, sync_dir: bool = True) -> Path:
    """Temp file → fsync → rename; ``sync_dir=False`` when a later write to the same directory
    will fsync it (the rename becomes durable with that one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    if sync_dir:
        _fsync_dir(path.parent)
    return path


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    """Report files under ``[outbox] dir``: ``{line}/{camera}/{YYYY-MM-DD}/{name}.json``."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path_for(self, report: dict, *, received_at: float, unique: str | None = None) -> Path:
        source = report["source"]
        day = time.strftime("%Y-%m-%d", time.gmtime(received_at))
        name = report["id"] + (f"-{unique}" if unique else "")
        return (
            self.root
            / safe_name(source["line"])
            / safe_name(source["camera"])
            / day
            / (name + ".json")
        )

    def write(self, report: dict, path: Path) -> Path:
        return atomic_write(path, json.dumps(report, indent=2, ensure_ascii=False).encode("utf-8"))

    def write_bytes(self, path: Path, data: bytes, *, sync_dir: bool = True) -> Path:
        return atomic_write(path, data, sync_dir=sync_dir)


class Quarantine:
    """Inputs that could not be inspected, and reports that failed validation (a bug)."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def keep_input(
        self, *, name: str, data: bytes | None, source_path: Path | None, report: dict
    ) -> Path:
        """Move (or copy) the bad input beside its error report; returns the quarantine folder."""
        folder = self.root / "inputs" / time.strftime("%Y-%m-%d") / report["id"]
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / safe_name(name, 120)
        moved = False
        if source_path is not None and source_path.exists():
            try:
                shutil.move(str(source_path), target)
                moved = True
            except OSError as exc:
                log.warning(
                    "could not move %s into quarantine (%s); copying instead", source_path, exc
                )
        if not moved and data is not None:
            atomic_write(target, data)
        atomic_write(folder / "report.json", json.dumps(report, indent=2).encode())
        return folder

    def keep_invalid_report(self, report: dict, problems: list[str]) -> Path:
        path = (
            self.root / "invalid-reports" / f"{report.get('id', 'unknown')}-{time.time_ns()}.json"
        )
        body = {"problems": problems, "report": report}
        return atomic_write(path, json.dumps(body, indent=2, default=str).encode())


class Inbox:
    """MQTT image payloads persisted before the broker is acknowledged."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def store(self, key: str, data: bytes) -> Path:
        return atomic_write(self.root / f"{key}.bin", data)

    def remove(self, path: Path) -> None:
        Path(path).unlink(missing_ok=True)
