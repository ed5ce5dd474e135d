"""The SQLite queue and backlog: dedupe by fingerprint, atomic finish, publish bookkeeping."""

import os
import sqlite3

from appliance.store import Store

REPORT = {"id": "a" * 32, "verdict": "ok", "error": None}


def test_enqueue_is_idempotent_per_fingerprint(tmp_path):
    store = Store(tmp_path / "q.sqlite3")
    first = store.enqueue(fingerprint="f1", source_kind="folder", line="l", camera="c", path="/a")
    again = store.enqueue(fingerprint="f1", source_kind="folder", line="l", camera="c", path="/a")
    assert first == 1 and again is None
    assert [item.path for item in store.next_batch(10)] == ["/a"]


def test_finish_moves_image_out_of_queue_and_into_backlog(tmp_path):
    store = Store(tmp_path / "q.sqlite3")
    seq = store.enqueue(fingerprint="f1", source_kind="folder", line="l", camera="c", path="/a")
    store.finish(
        seq,
        sha256="s" * 64,
        report_id=REPORT["id"],
        report=REPORT,
        file="/r.json",
        topic="p/reports/l/c",
    )
    assert store.next_batch(10) == []
    [pending] = store.unpublished(10)
    assert (pending.report_id, pending.topic) == (REPORT["id"], "p/reports/l/c")
    assert store.report_for_content("s" * 64, REPORT["id"])
    store.mark_published(pending.seq)
    assert store.unpublished(10) == []
    stats = store.stats()
    assert stats["queue_depth"] == 0 and stats["publish_backlog"] == 0
    assert stats["verdicts"] == {"ok": 1}


def test_state_survives_reopening_and_uses_wal(tmp_path):
    path = tmp_path / "q.sqlite3"
    store = Store(path)
    store.enqueue(fingerprint="f1", source_kind="mqtt", line="l", camera="c", topic="t")
    store.close()
    reopened = Store(path)
    assert [i.topic for i in reopened.next_batch(5)] == ["t"]
    mode = sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_non_utf8_paths_round_trip(tmp_path):
    store = Store(tmp_path / "q.sqlite3")
    odd = os.fsdecode(b"/cams/bad\xffname.png")
    store.enqueue(fingerprint="odd", source_kind="folder", line="l", camera="c", path=odd)
    assert store.next_batch(1)[0].path == odd


def test_unpublished_skips_inflight(tmp_path):
    store = Store(tmp_path / "q.sqlite3")
    for n in range(3):
        seq = store.enqueue(fingerprint=f"f{n}", source_kind="folder", line="l", camera="c")
        store.finish(
            seq,
            sha256=str(n),
            report_id=str(n),
            report={**REPORT, "id": str(n)},
            file=f"/{n}",
            topic="t",
        )
    first = store.unpublished(2)
    rest = store.unpublished(2, exclude={p.seq for p in first})
    assert [p.report_id for p in first] == ["0", "1"] and [p.report_id for p in rest] == ["2"]
