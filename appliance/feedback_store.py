"""Feedback on disk: the history log, the inspection records, and the images they point at.

Everything lives under ``{state.dir}/feedback/``::

    log.jsonl        every feedback ever accepted, in arrival order (history; deduped by id)
    records.jsonl    one inspection record per report or imported image: the latest feedback wins
                     (latest ``when``; arrival order breaks ties). Same line format as
                     ``train/data/records.py``, so retraining reads it with ``read_records``
    images/          ``{sha256}.{ext}``: a copy of every image a record names, so none dangles
    received/        MQTT image payloads kept ``feedback.keep_mqtt_images_days`` for review (the
                     pipeline deletes its inbox copy once the report is out)

Order of writes: image, then the log line (fsync), then ``records.jsonl`` rewritten atomically from
the log, all under a file lock shared by the daemon and the ``appliance review`` command. A crash
leaves at most a torn last log line (never acknowledged, dropped at the next write) or a stale
records file (rebuilt at the next write).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from appliance.feedback import FeedbackError, check_feedback, feedback_id, feedback_record
from appliance.imaging import ImageRejected
from appliance.outbox import atomic_write
from appliance.report import now_iso
from appliance.sources.envelope import parse_payload
from appliance.taxonomy import Taxonomy

log = logging.getLogger(__name__)
MAX_FEEDBACK_BYTES = 1 << 20
_FORMAT_EXT = {"PNG": "png", "JPEG": "jpg", "BMP": "bmp", "TIFF": "tif", "WEBP": "webp"}


class ReportNotFound(FeedbackError):
    def __init__(self, report_id: str, outbox: Path):
        super().__init__(
            [f"report_id: no report {report_id} in {outbox} (`appliance review list` shows them)"]
        )


class ImageMissing(FeedbackError):
    def __init__(self, report: dict, tried: list[str]):
        super().__init__(
            [
                f"report_id: the image of report {report['id']} (sha256 "
                f"{report['image']['sha256'][:12]}...) is no longer on this machine (looked in "
                f"{', '.join(tried) or 'nothing'}); pass --image PATH, or keep MQTT images longer "
                "with feedback.keep_mqtt_images_days"
            ]
        )


@dataclass(frozen=True)
class Entry:
    """One history line: a feedback (or an imported image) and the record it made."""

    id: str
    key: str  # "report:{report id}" or "image:{sha256}": one record per key
    via: str  # cli | mqtt | import
    who: str | None
    when: str | None
    record: dict
    feedback: dict | None = None
    origin: str | None = None  # import: the data-set file

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "key": self.key,
            "via": self.via,
            "who": self.who,
            "when": self.when,
            "received_at": now_iso(),
            "feedback": self.feedback,
            "origin": self.origin,
            "record": self.record,
        }


class FeedbackStore:
    """``{state.dir}/feedback``: append entries, read the history, keep images."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.images = self.root / "images"
        self.log_path = self.root / "log.jsonl"
        self.records_path = self.root / "records.jsonl"
        self.images.mkdir(parents=True, exist_ok=True)

    @contextmanager
    def _locked(self) -> Iterator[None]:
        with open(self.root / ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def kept_image(self, sha256: str) -> str | None:
        """``images/{sha256}.{ext}`` (relative to the records file) when already kept."""
        for path in self.images.glob(f"{sha256}.*"):
            return path.relative_to(self.root).as_posix()
        return None

    def keep_image(self, data: bytes, ext: str) -> str:
        sha256 = hashlib.sha256(data).hexdigest()
        return self.kept_image(sha256) or (
            atomic_write(self.images / f"{sha256}.{ext}", data).relative_to(self.root).as_posix()
        )

    def history(self) -> list[dict]:
        """Every log entry in arrival order (a torn last line from a crash is skipped)."""
        return self._read_log()[0]

    def _read_log(self) -> tuple[list[dict], int]:
        """(entries, byte length of the complete lines)."""
        try:
            data = self.log_path.read_bytes()
        except FileNotFoundError:
            return [], 0
        complete = data.rfind(b"\n") + 1
        entries = []
        for number, line in enumerate(data[:complete].splitlines(), start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as exc:
                log.error("%s:%d: skipping a corrupt line (%s)", self.log_path, number, exc.msg)
        return entries, complete

    def add(self, entries: list[Entry]) -> list[bool]:
        """Append the entries not seen before (by id) and rebuild the records; True = added."""
        with self._locked():
            history, complete = self._read_log()
            seen = {entry["id"] for entry in history}
            added, lines = [], []
            for entry in entries:
                fresh = entry.id not in seen
                added.append(fresh)
                if fresh:
                    seen.add(entry.id)
                    body = entry.to_json()
                    history.append(body)
                    lines.append(json.dumps(body, ensure_ascii=False) + "\n")
            if lines:
                self._append(lines, complete)
            if lines or not self.records_path.exists():
                self._write_records(history)
        return added

    def _append(self, lines: list[str], complete: int) -> None:
        with open(self.log_path, "ab") as handle:
            if handle.tell() > complete:  # a torn line from a crash: never acknowledged
                handle.truncate(complete)
            handle.write("".join(lines).encode("utf-8"))
            handle.flush()
            os.fsync(handle.fileno())

    def _write_records(self, history: list[dict]) -> None:
        if not history:
            return
        atomic_write(self.records_path, "".join(records_lines(history)).encode("utf-8"))

    def latest(self) -> dict[str, dict]:
        """key → the entry that wins for it."""
        return latest_entries(self.history())


def _when_order(entry: dict) -> float:
    try:
        return datetime.fromisoformat(entry.get("when") or "").timestamp()
    except ValueError:
        return float("-inf")


def latest_entries(history: list[dict]) -> dict[str, dict]:
    """Per key, the entry with the latest ``when`` (the later arrival on a tie)."""
    best: dict[str, tuple[float, int, dict]] = {}
    for arrival, entry in enumerate(history):
        rank = (_when_order(entry), arrival, entry)
        if entry["key"] not in best or rank[:2] > best[entry["key"]][:2]:
            best[entry["key"]] = rank
    return {key: rank[2] for key, rank in best.items()}


def records_lines(history: list[dict]) -> list[str]:
    """The records file's lines, keys in order of first appearance."""
    winners = latest_entries(history)
    return [json.dumps(winners[key]["record"], ensure_ascii=False) + "\n" for key in winners]


def image_ext(report: dict) -> str:
    fmt = (report["image"].get("format") or "").upper()
    if fmt in _FORMAT_EXT:
        return _FORMAT_EXT[fmt]
    suffix = Path(report["source"].get("path") or "").suffix.lstrip(".").lower()
    return suffix or "img"


class ReportFinder:
    """Reports by id: the state database knows their files; the outbox is searched otherwise."""

    def __init__(self, db: Path, outbox: Path, received: Path | None = None):
        self.db = Path(db)
        self.outbox = Path(outbox)
        self.received = received

    def _query(self, sql: str, args: tuple) -> list[tuple]:
        if not self.db.is_file():
            return []
        conn = sqlite3.connect(self.db.absolute().as_uri() + "?mode=ro", uri=True, timeout=30)
        try:
            return conn.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            log.warning("cannot read %s (%s); searching the outbox instead", self.db, exc)
            return []
        finally:
            conn.close()

    def report(self, report_id: str) -> tuple[dict, Path]:
        rows = self._query(
            "SELECT file FROM reports WHERE report_id=? ORDER BY seq DESC", (report_id,)
        )
        candidates = [Path(os.fsdecode(row[0])) for row in rows]
        if not candidates and self.outbox.is_dir():
            candidates = sorted(self.outbox.rglob(f"{report_id}*.json"), reverse=True)
        for path in candidates:
            try:
                report = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(report, dict) and report.get("id") == report_id:
                return report, path
        raise ReportNotFound(report_id, self.outbox)

    def recent(self, limit: int) -> list[dict]:
        rows = self._query(
            "SELECT report_id, verdict, error_code, file, created_at FROM reports"
            " ORDER BY seq DESC LIMIT ?",
            (limit,),
        )
        keys = ("id", "verdict", "error_code", "file", "created_at")
        return [dict(zip(keys, row, strict=True)) for row in rows]

    def image_bytes(self, report: dict, given: Path | None = None) -> bytes:
        """The bytes whose sha256 the report names: ``given``, the source file, a kept payload."""
        want = report["image"]["sha256"]
        if given is not None:
            data = Path(given).read_bytes()
            if hashlib.sha256(data).hexdigest() != want:
                raise FeedbackError(
                    [f"image: {given} is not the image of report {report['id']} (sha256 differs)"]
                )
            return data
        tried = []
        for path in self._image_candidates(report):
            tried.append(str(path))
            data = _image_in(path)
            if data is not None and hashlib.sha256(data).hexdigest() == want:
                return data
        raise ImageMissing(report, tried)

    def _image_candidates(self, report: dict) -> list[Path]:
        paths = [report["source"]["path"]] if report["source"].get("path") else []
        rows = self._query(
            "SELECT path FROM images WHERE sha256=? ORDER BY seq DESC", (report["image"]["sha256"],)
        )
        for (path,) in rows:
            if path:
                paths.append(os.fsdecode(path))
                if self.received is not None:
                    paths.append(str(self.received / os.path.basename(os.fsdecode(path))))
        return [Path(p) for p in dict.fromkeys(paths)]


def _image_in(path: Path) -> bytes | None:
    """A file's image bytes (an MQTT payload is unwrapped from its envelope), or None."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if path.suffix == ".bin":
        try:
            return parse_payload(data, max_bytes=len(data) + 1).data
        except ImageRejected:
            return None
    return data


class ReceivedImages:
    """MQTT payloads kept for review: a hard link to the inbox file, pruned by age."""

    PRUNE_EVERY_S = 3600.0

    def __init__(self, root: Path, keep_days: float):
        self.root = Path(root)
        self.keep_s = keep_days * 86400.0
        self._next_prune = 0.0

    def keep(self, inbox_file: Path) -> None:
        if self.keep_s <= 0:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        target = self.root / Path(inbox_file).name
        try:
            os.link(inbox_file, target)
        except FileExistsError:
            pass
        except OSError:  # another file system, or links not allowed: copy
            try:
                shutil.copy2(inbox_file, target)
            except OSError as exc:  # review is a nicety: never hold up ingest for it
                log.warning("cannot keep %s for review (%s)", inbox_file, exc)
        if time.monotonic() >= self._next_prune:
            self._next_prune = time.monotonic() + self.PRUNE_EVERY_S
            self.prune()

    def prune(self, now: float | None = None) -> int:
        cutoff = (now or time.time()) - self.keep_s
        removed = 0
        for path in self.root.glob("*.bin") if self.root.is_dir() else []:
            try:
                if path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        return removed


class FeedbackService:
    """Feedback from the CLI or MQTT → checked, applied to its report, recorded with its image."""

    def __init__(self, store: FeedbackStore, finder: ReportFinder, taxonomy: Taxonomy):
        self.store = store
        self.finder = finder
        self.taxonomy = taxonomy

    @classmethod
    def open(cls, root: Path, db: Path, outbox: Path, taxonomy: Taxonomy) -> FeedbackService:
        """``root``: ``{state.dir}/feedback``; ``db``: the daemon's state database."""
        store = FeedbackStore(root)
        finder = ReportFinder(db, outbox, received=store.root / "received")
        return cls(store, finder, taxonomy)

    def submit(
        self, feedback: object, *, via: str, image: Path | None = None
    ) -> tuple[Entry, bool]:
        """Record one feedback; (entry, False) when its id was recorded before."""
        checked = check_feedback(feedback, self.taxonomy)
        report, _ = self.finder.report(checked["report_id"])
        kept = self.store.kept_image(report["image"]["sha256"])
        record = feedback_record(report, checked, kept or "images/pending")
        if kept is None:
            data = self.finder.image_bytes(report, given=image)
            record["image"] = self.store.keep_image(data, image_ext(report))
        entry = Entry(
            id=checked["id"],
            key=f"report:{report['id']}",
            via=via,
            who=checked["who"],
            when=checked["when"],
            record=record,
            feedback=checked,
        )
        (added,) = self.store.add([entry])
        return entry, added

    def handle_message(self, payload: bytes) -> dict:
        """An MQTT feedback message → the ack to publish. OSError propagates (leave it unacked)."""
        if len(payload) > MAX_FEEDBACK_BYTES:
            return _ack("rejected", None, [f"payload: {len(payload)} bytes exceeds 1 MiB"])
        try:
            feedback = json.loads(payload)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return _ack("rejected", None, [f"payload: not a JSON object ({exc})"])
        try:
            entry, added = self.submit(feedback, via="mqtt")
        except FeedbackError as exc:
            log.warning("feedback rejected: %s", exc)
            return _ack("rejected", feedback, exc.problems)
        log.info("feedback %s on report %s by %s recorded", entry.id, entry.key, entry.who)
        return {**_ack("accepted", entry.feedback, []), "duplicate": not added}


def _ack(status: str, feedback: object, problems: list[str]) -> dict:
    fields = feedback if isinstance(feedback, dict) else {}
    return {
        "status": status,
        "id": feedback_id(fields) if fields else None,
        "report_id": fields.get("report_id"),
        "reason": "; ".join(problems) if problems else None,
        "problems": problems,
    }
