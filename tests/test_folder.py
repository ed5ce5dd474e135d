"""Watched folders on the real file system: only complete files are queued, nothing is missed."""

import os
import time
from pathlib import Path

import pytest

from appliance.config import FolderSource
from appliance.sources.folder import FolderWatcher, is_candidate
from appliance.store import Store

PATTERNS = ["*.png", "*.jpg"]


def test_candidate_names():
    assert is_candidate("/a/b/img.PNG", PATTERNS)
    assert not is_candidate("/a/b/img.png.part", PATTERNS)
    assert not is_candidate("/a/b/.img.png", PATTERNS)
    assert not is_candidate("/a/b/img.tmp", PATTERNS)
    assert not is_candidate("/a/b/notes.txt", PATTERNS)


def queued(store: Store) -> list[str]:
    return sorted(os.path.basename(i.path) for i in store.next_batch(100))


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


@pytest.fixture
def watched(tmp_path):
    folder = tmp_path / "cam"
    folder.mkdir()
    store = Store(tmp_path / "q.sqlite3")
    watchers = []

    def start(**options) -> tuple[Path, Store]:
        source = FolderSource(
            path=folder, patterns=PATTERNS, settle_s=1.0, rescan_interval_s=3600, **options
        )
        watcher = FolderWatcher(source, store)
        watcher.start()
        watchers.append(watcher)
        time.sleep(0.3)
        return folder, store

    yield start
    for watcher in watchers:
        watcher.stop()


def test_half_written_file_waits_for_close(watched):
    folder, store = watched()
    with open(folder / "slow.png", "wb") as handle:
        handle.write(b"first half")
        handle.flush()
        time.sleep(0.6)
        assert queued(store) == []  # created/modified fired, but the file is still open
        handle.write(b"second half")
    assert wait_for(lambda: queued(store) == ["slow.png"])


def test_rename_into_folder_and_temp_names(watched, tmp_path):
    folder, store = watched()
    (folder / "a.png.part").write_bytes(b"x")
    time.sleep(0.3)
    assert queued(store) == []
    os.replace(folder / "a.png.part", folder / "a.png")
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(b"y")
    old = time.time() - 60
    os.utime(outside, (old, old))
    os.replace(
        outside, folder / "b.jpg"
    )  # arrives as `created` only: its old mtime shows it is done
    assert wait_for(lambda: queued(store) == ["a.png", "b.jpg"])


def test_rescan_picks_up_files_present_at_start(tmp_path, watched):
    folder = tmp_path / "cam"  # created by the fixture, filled before the watcher starts
    for name in ("early1.png", "early2.jpg", "skip.txt"):
        (folder / name).write_bytes(b"z")
        old = time.time() - 30
        os.utime(folder / name, (old, old))
    _, store = watched()
    assert wait_for(lambda: queued(store) == ["early1.png", "early2.jpg"])


def test_polling_observer_queues_settled_files(watched):
    folder, store = watched(polling=True, polling_interval_s=0.2)
    (folder / "nfs.png").write_bytes(b"remote")
    assert wait_for(lambda: queued(store) == ["nfs.png"], timeout=10)


def test_same_file_is_queued_once(watched):
    folder, store = watched()
    (folder / "once.png").write_bytes(b"1")
    assert wait_for(lambda: queued(store) == ["once.png"])
    time.sleep(1.5)
    assert queued(store) == ["once.png"]
