"""Watched-folder ingest: a file is queued only when it is complete.

watchdog's ``created``/``modified`` fire on half-written files, so they are never trusted on their own.
A file is ready on close-after-write, when it is the destination of a rename, or, when ``created``
came from a rename from outside (its mtime is older than the settle time; a fresh write has a fresh
mtime). A periodic rescan catches everything events missed (inotify overflow, files present at
start-up, network file systems with ``polling = true``): it queues files whose mtime has settled.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import threading
import time
from pathlib import Path

from watchdog.events import (
    FileClosedEvent,
    FileCreatedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from appliance.config import FolderSource
from appliance.store import Store

log = logging.getLogger(__name__)
TEMP_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload", ".filepart")


def is_candidate(path: str, patterns: list[str]) -> bool:
    """Pure: does this file name look like a finished image the source should take?"""
    name = os.path.basename(path)
    if not name or name.startswith(".") or name.lower().endswith(TEMP_SUFFIXES):
        return False
    lowered = name.lower()
    return any(fnmatch.fnmatch(lowered, pattern.lower()) for pattern in patterns)


def display_path(path: str) -> str:
    """A printable form of a path whose name may not be valid UTF-8 (cameras write odd names)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def fingerprint(path: str, stat: os.stat_result) -> str:
    return f"file:{display_path(path)}:{stat.st_size}:{stat.st_mtime_ns}"


class FolderWatcher(FileSystemEventHandler):
    """One watched folder: watchdog events plus a periodic rescan, feeding ``Store.enqueue``."""

    def __init__(self, source: FolderSource, store: Store, on_enqueued=None):
        self.source = source
        self.store = store
        self.on_enqueued = on_enqueued or (lambda: None)
        self.root = str(Path(source.path).resolve())
        self._pending: dict[str, float] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._observer = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self.source.polling:
            self._observer = PollingObserver(timeout=self.source.polling_interval_s)
        else:
            self._observer = Observer()
        self._observer.schedule(self, self.root, recursive=self.source.recursive)
        self._observer.start()
        self._thread = threading.Thread(
            target=self._housekeeping, name=f"rescan:{self.root}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._observer:
            self._observer.stop()
            self._observer.join(timeout=5)
        if self._thread:
            self._thread.join(timeout=5)

    # -- events -------------------------------------------------------------------------------
    def on_any_event(self, event) -> None:
        if event.is_directory:
            return
        if isinstance(event, FileClosedEvent):
            self._offer(_str(event.src_path), settled=True)
        elif isinstance(event, FileMovedEvent):
            self._offer(_str(event.dest_path), settled=True)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent):
            self._offer(_str(event.src_path), settled=False)

    def _offer(self, path: str, *, settled: bool) -> None:
        if not is_candidate(path, self.source.patterns):
            return
        if not self.source.recursive and os.path.dirname(path) != self.root:
            return
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            return
        if settled or time.time() - stat.st_mtime >= self.source.settle_s:
            self._enqueue(path, stat)
        else:
            with self._lock:
                self._pending[path] = time.monotonic() + self.source.settle_s

    def _enqueue(self, path: str, stat: os.stat_result) -> None:
        with self._lock:
            self._pending.pop(path, None)
        seq = self.store.enqueue(
            fingerprint=fingerprint(path, stat),
            source_kind="folder",
            line=self.source.line,
            camera=self.source.camera,
            path=path,
        )
        if seq is not None:
            log.debug("queued %s as #%s", path, seq)
            self.on_enqueued()

    # -- settle checks and rescans ------------------------------------------------------------
    def _housekeeping(self) -> None:
        self.rescan()
        next_rescan = time.monotonic() + self.source.rescan_interval_s
        while not self._stop.wait(0.25):
            self._check_pending()
            if time.monotonic() >= next_rescan:
                self.rescan()
                next_rescan = time.monotonic() + self.source.rescan_interval_s

    def _check_pending(self) -> None:
        now = time.monotonic()
        with self._lock:
            due = [p for p, at in self._pending.items() if at <= now]
        for path in due:
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                with self._lock:
                    self._pending.pop(path, None)
                continue
            if time.time() - stat.st_mtime >= self.source.settle_s:
                self._enqueue(path, stat)
            else:
                with self._lock:
                    self._pending[path] = now + self.source.settle_s

    def rescan(self) -> int:
        """Queue every settled candidate not yet recorded; returns how many were queued."""
        count = 0
        for path in self._walk():
            try:
                stat = os.stat(path)
            except FileNotFoundError:
                continue
            if time.time() - stat.st_mtime < self.source.settle_s:
                with self._lock:
                    self._pending.setdefault(path, time.monotonic() + self.source.settle_s)
                continue
            if not self.store.known(fingerprint(path, stat)):
                self._enqueue(path, stat)
                count += 1
        return count

    def _walk(self):
        if self.source.recursive:
            for directory, _dirs, files in os.walk(self.root):
                for name in files:
                    path = os.path.join(directory, name)
                    if is_candidate(path, self.source.patterns):
                        yield path
            return
        try:
            entries = list(os.scandir(self.root))
        except OSError as exc:
            log.error("cannot list %s: %s", self.root, exc)
            return
        for entry in entries:
            if entry.is_file(follow_symlinks=False) and is_candidate(
                entry.path, self.source.patterns
            ):
                yield entry.path


def _str(path) -> str:
    return os.fsdecode(path)
