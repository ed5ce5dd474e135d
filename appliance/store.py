"""The durable queue and publish backlog, in SQLite (WAL).

An image counts as received only once its row is committed here; a report counts as published only
once the broker's PUBACK marked its row. After ``kill -9`` the daemon resumes from these tables: every
received image is processed, every report is (re)published. Each thread opens its own connection.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS images (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    source_kind TEXT NOT NULL,
    line TEXT NOT NULL,
    camera TEXT NOT NULL,
    path TEXT,
    topic TEXT,
    message_id TEXT,
    captured_at TEXT,
    fingerprint TEXT NOT NULL UNIQUE,
    received_at REAL NOT NULL,
    status TEXT NOT NULL DEFAULT 'queued',
    sha256 TEXT,
    report_id TEXT,
    attempts INTEGER NOT NULL DEFAULT 0,
    done_at REAL
);
CREATE INDEX IF NOT EXISTS images_status ON images(status, seq);
CREATE INDEX IF NOT EXISTS images_sha ON images(sha256);
CREATE TABLE IF NOT EXISTS reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    report_id TEXT NOT NULL,
    image_seq INTEGER NOT NULL UNIQUE,
    file TEXT NOT NULL,
    topic TEXT NOT NULL,
    verdict TEXT NOT NULL,
    error_code TEXT,
    created_at REAL NOT NULL,
    published_at REAL
);
CREATE INDEX IF NOT EXISTS reports_unpublished ON reports(published_at, seq);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class QueuedImage:
    seq: int
    source_kind: str
    line: str
    camera: str
    path: str | None
    topic: str | None
    message_id: str | None
    captured_at: str | None
    attempts: int
    received_at: float


@dataclass(frozen=True)
class PendingReport:
    seq: int
    report_id: str
    file: str
    topic: str


class Store:
    """Thread-safe facade: one SQLite connection per thread, all on the same WAL database."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._conn() as conn:
            conn.executescript(SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("PRAGMA busy_timeout=30000")
            self._local.conn = conn
        return _Tx(conn)

    # -- ingest -------------------------------------------------------------------------------
    def enqueue(
        self,
        *,
        fingerprint: str,
        source_kind: str,
        line: str,
        camera: str,
        path: str | None = None,
        topic: str | None = None,
        message_id: str | None = None,
        captured_at: str | None = None,
    ) -> int | None:
        """Record a received image; returns its seq, or None when this fingerprint was seen."""
        stored_path = os.fsencode(path) if path is not None and _has_surrogates(path) else path
        with self._conn() as conn:
            cur = conn.execute(
                "INSERT OR IGNORE INTO images (source_kind, line, camera, path, topic, message_id,"
                " captured_at, fingerprint, received_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (
                    source_kind,
                    line,
                    camera,
                    stored_path,
                    topic,
                    message_id,
                    captured_at,
                    fingerprint,
                    time.time(),
                ),
            )
            return cur.lastrowid if cur.rowcount else None

    def known(self, fingerprint: str) -> bool:
        with self._conn() as conn:
            row = conn.execute(
                "SELECT 1 FROM images WHERE fingerprint=?", (fingerprint,)
            ).fetchone()
        return row is not None

    def next_batch(self, limit: int) -> list[QueuedImage]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT seq, source_kind, line, camera, path, topic, message_id, captured_at, attempts,"
                " received_at"
                " FROM images WHERE status='queued' ORDER BY seq LIMIT ?",
                (limit,),
            ).fetchall()
        return [QueuedImage(*_decoded(row)) for row in rows]

    def mark_attempt(self, seq: int) -> None:
        with self._conn() as conn:
            conn.execute("UPDATE images SET attempts = attempts + 1 WHERE seq=?", (seq,))

    def report_for_content(self, sha256: str, report_id: str) -> bool:
        """True when an earlier image with this content already produced this report."""
        with self._conn() as conn:
            row = conn.execute(
                "SELECT 1 FROM images WHERE sha256=? AND report_id=? AND status='done' LIMIT 1",
                (sha256, report_id),
            ).fetchone()
        return row is not None

    def mark_attempts(self, seqs: list[int]) -> None:
        """Count one more processing attempt for each image (one transaction for the batch)."""
        with self._conn() as conn:
            conn.executemany(
                "UPDATE images SET attempts = attempts + 1 WHERE seq=?", [(s,) for s in seqs]
            )

    def finish(self, seq: int, **outcome) -> None:
        """Mark an image processed and (atomically with it) add its report to the publish backlog.

        ``outcome``: sha256, report_id, status ("done" | "duplicate"), report, file, topic.
        """
        self.finish_many([{"seq": seq, **outcome}])

    def finish_many(self, outcomes: list[dict]) -> None:
        """``finish`` for a whole batch in one transaction (one fsync instead of one per image)."""
        if not outcomes:
            return
        now = time.time()
        with self._conn() as conn:
            conn.execute("BEGIN IMMEDIATE")
            for out in outcomes:
                conn.execute(
                    "UPDATE images SET status=?, sha256=?, report_id=?, done_at=? WHERE seq=?",
                    (
                        out.get("status", "done"),
                        out["sha256"],
                        out.get("report_id"),
                        now,
                        out["seq"],
                    ),
                )
                report = out.get("report")
                if report is not None:
                    error = (report.get("error") or {}).get("code")
                    conn.execute(
                        "INSERT OR REPLACE INTO reports (report_id, image_seq, file, topic, verdict,"
                        " error_code, created_at) VALUES (?,?,?,?,?,?,?)",
                        (
                            report["id"],
                            out["seq"],
                            out["file"],
                            out["topic"],
                            report["verdict"],
                            error,
                            now,
                        ),
                    )
            conn.execute("COMMIT")

    # -- publish backlog ----------------------------------------------------------------------
    def unpublished(
        self, limit: int, exclude: set[int] | frozenset = frozenset()
    ) -> list[PendingReport]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT seq, report_id, file, topic FROM reports WHERE published_at IS NULL"
                " ORDER BY seq LIMIT ?",
                (limit + len(exclude),),
            ).fetchall()
        return [PendingReport(*r) for r in rows if r[0] not in exclude][:limit]

    def mark_published(self, seq: int) -> None:
        with self._conn() as conn:
            conn.execute("UPDATE reports SET published_at=? WHERE seq=?", (time.time(), seq))

    # -- counters and status ------------------------------------------------------------------
    def bump(self, name: str, by: int = 1) -> None:
        with self._conn() as conn:
            conn.execute(
                "INSERT INTO counters (name, value) VALUES (?, ?)"
                " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, by),
            )

    def stats(self, *, window_s: float = 300.0) -> dict:
        since = time.time() - window_s
        with self._conn() as conn:
            one = lambda sql, *a: conn.execute(sql, a).fetchone()[0]  # noqa: E731
            verdicts = dict(
                conn.execute("SELECT verdict, COUNT(*) FROM reports GROUP BY verdict").fetchall()
            )
            errors = dict(
                conn.execute(
                    "SELECT error_code, COUNT(*) FROM reports WHERE error_code IS NOT NULL"
                    " GROUP BY error_code"
                ).fetchall()
            )
            return {
                "queue_depth": one("SELECT COUNT(*) FROM images WHERE status='queued'"),
                "publish_backlog": one("SELECT COUNT(*) FROM reports WHERE published_at IS NULL"),
                "images_total": one("SELECT COUNT(*) FROM images"),
                "duplicates": one("SELECT COUNT(*) FROM images WHERE status='duplicate'"),
                "reports_total": one("SELECT COUNT(*) FROM reports"),
                "verdicts": verdicts,
                "error_codes": errors,
                "counters": dict(conn.execute("SELECT name, value FROM counters").fetchall()),
                "rate_window_s": window_s,
                "reports_per_min": one("SELECT COUNT(*) FROM reports WHERE created_at>=?", since)
                * 60.0
                / window_s,
                "published_per_min": one(
                    "SELECT COUNT(*) FROM reports WHERE published_at>=?", since
                )
                * 60.0
                / window_s,
            }

    def recent_reports(self, limit: int = 10) -> list[dict]:
        with self._conn() as conn:
            rows = conn.execute(
                "SELECT report_id, verdict, error_code, file, created_at, published_at FROM reports"
                " ORDER BY seq DESC LIMIT ?",
                (limit,),
            ).fetchall()
        keys = ("id", "verdict", "error_code", "file", "created_at", "published_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class _Tx:
    """Context manager giving the thread's connection; rolls back an open transaction on error."""

    def __init__(self, conn: sqlite3.Connection):
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        return self.conn

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and self.conn.in_transaction:
            self.conn.execute("ROLLBACK")


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _decoded(row: tuple) -> tuple:
    """Paths that were not valid UTF-8 are stored as BLOBs; give them back as os paths."""
    return tuple(os.fsdecode(v) if isinstance(v, bytes) else v for v in row)


def dumps(report: dict) -> str:
    return json.dumps(report, ensure_ascii=False, separators=(",", ":"), sort_keys=False)
