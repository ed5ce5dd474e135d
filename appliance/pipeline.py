"""From a queued image to a report on disk and in the publish backlog.

Everything that can go wrong with one image (vanished file, bad payload, undecodable bytes, an
inference error, even a report that fails its own schema) ends here as a schema-valid report, with the
input kept in quarantine; nothing raised for one image stops the daemon.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from appliance.imaging import DecodedImage, ImageRejected, decode_image
from appliance.mqtt import report_topic
from appliance.outbox import Outbox, Quarantine
from appliance.report import (
    Source,
    error_report,
    image_info,
    inspection_report,
    report_id,
)
from appliance.schema import report_problems
from appliance.sources.envelope import parse_payload
from appliance.sources.folder import display_path
from appliance.store import QueuedImage, Store
from appliance.taxonomy import Taxonomy

log = logging.getLogger(__name__)
MAX_ATTEMPTS = 3  # an image that was being processed during this many crashes is given up on


@dataclass
class Loaded:
    """One queued image after reading (and, when it decodes, decoding) its bytes."""

    item: QueuedImage
    source: Source
    data: bytes | None = None
    sha256: str = ""
    decoded: DecodedImage | None = None
    rejected: ImageRejected | None = None
    timings_ms: dict = field(default_factory=dict)


class Pipeline:
    def __init__(
        self,
        *,
        store: Store,
        inspector,
        taxonomy: Taxonomy,
        outbox: Outbox,
        quarantine: Quarantine,
        topic_prefix: str,
        dedupe: bool = True,
        max_file_bytes: int = 64 << 20,
        max_image_pixels: int = 80_000_000,
        max_payload_bytes: int = 32 << 20,
        on_report=None,
    ):
        self.store = store
        self.inspector = inspector
        self.taxonomy = taxonomy
        self.outbox = outbox
        self.quarantine = quarantine
        self.topic_prefix = topic_prefix
        self.dedupe = dedupe
        self.max_file_bytes = max_file_bytes
        self.max_image_pixels = max_image_pixels
        self.max_payload_bytes = max_payload_bytes
        self.on_report = on_report or (lambda: None)

    def run_once(self, batch_size: int) -> int:
        """Process up to ``batch_size`` queued images; returns how many were taken."""
        items = self.store.next_batch(batch_size)
        if not items:
            return 0
        self.store.mark_attempts([item.seq for item in items])
        self._finished: list[dict] = []
        self._inbox_done: list[Loaded] = []
        self._batch_originals: list[Loaded] = []
        fresh = []
        for item in items:
            if item.attempts >= MAX_ATTEMPTS:
                entry = self._load_raw(item)
                self._finish_error(
                    entry,
                    "inference_failed",
                    f"processing this image was interrupted {item.attempts} times "
                    "(the daemon crashed or was killed); giving up on it",
                )
            else:
                fresh.append(item)
        loaded = [self._load(item) for item in fresh]
        todo = []
        for entry in loaded:
            if entry.rejected is None and self._is_duplicate(entry):
                continue
            if entry.rejected is not None:
                self._finish_error(entry, entry.rejected.code, entry.rejected.message)
            else:
                todo.append(entry)
        self._inspect(todo)
        self._commit_batch()
        return len(items)

    def _commit_batch(self) -> None:
        """One transaction for the batch's outcomes; inbox payloads go only after it commits."""
        self.store.finish_many(self._finished)
        if any(out.get("report") for out in self._finished):
            self.on_report()
        for entry in self._inbox_done:
            self._drop_inbox(entry)

    # -- loading ------------------------------------------------------------------------------
    def _load_raw(self, item: QueuedImage) -> Loaded:
        entry = Loaded(item=item, source=_source_of(item))
        try:
            entry.data = self._read(item)
        except ImageRejected:
            entry.data = b""
        entry.sha256 = hashlib.sha256(entry.data).hexdigest()
        return entry

    def _load(self, item: QueuedImage) -> Loaded:
        entry = Loaded(item=item, source=_source_of(item))
        started = time.perf_counter()
        try:
            entry.data = self._read(item)
            if item.source_kind == "mqtt":
                entry.data = self._unwrap(entry)
            entry.sha256 = hashlib.sha256(entry.data).hexdigest()
            entry.decoded = decode_image(entry.data, max_pixels=self.max_image_pixels)
        except ImageRejected as exc:
            entry.rejected = exc
        entry.timings_ms["decode"] = (time.perf_counter() - started) * 1000.0
        if not entry.sha256:
            entry.sha256 = hashlib.sha256(entry.data or b"").hexdigest()
        return entry

    def _read(self, item: QueuedImage) -> bytes:
        path = item.path
        try:
            size = os.path.getsize(path)
            if size > self.max_file_bytes:
                raise ImageRejected(
                    "payload_too_large" if item.source_kind == "mqtt" else "unsupported_image",
                    f"file of {size} bytes exceeds ingest.max_file_bytes = {self.max_file_bytes}",
                )
            with open(path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            raise ImageRejected(
                "file_vanished", "the file was deleted before it could be read"
            ) from None
        except OSError as exc:
            raise ImageRejected("unreadable_file", f"cannot read the file: {exc}") from None

    def _unwrap(self, entry: Loaded) -> bytes:
        message = parse_payload(entry.data, max_bytes=self.max_payload_bytes)
        entry.source = Source(
            kind="mqtt",
            line=message.line or entry.source.line,
            camera=message.camera or entry.source.camera,
            path=None,
            topic=entry.source.topic,
            message_id=message.message_id or entry.source.message_id,
            captured_at=message.captured_at or entry.source.captured_at,
        )
        return message.data

    def _is_duplicate(self, entry: Loaded) -> bool:
        if not self.dedupe:
            return False
        rid = report_id(entry.sha256, self.inspector.bundle_ref["id"])
        in_batch = any(out.get("report_id") == rid for out in self._finished) or any(
            e.sha256 == entry.sha256 for e in self._batch_originals
        )
        if not in_batch and not self.store.report_for_content(entry.sha256, rid):
            self._batch_originals.append(entry)
            return False
        log.info(
            "skipping %s: same content as an earlier image (report %s)",
            entry.source.path or entry.source.topic,
            rid,
        )
        self._finished.append(
            {"seq": entry.item.seq, "sha256": entry.sha256, "report_id": rid, "status": "duplicate"}
        )
        self._inbox_done.append(entry)
        return True

    # -- inspecting ---------------------------------------------------------------------------
    def _inspect(self, entries: list[Loaded]) -> None:
        if not entries:
            return
        contexts = [{"line": e.source.line, "camera": e.source.camera} for e in entries]
        try:
            inspections = self.inspector.inspect_batch([e.decoded for e in entries], contexts)
        except Exception as exc:  # noqa: BLE001 - one bad batch must not stop the daemon
            log.exception("inspection failed for a batch of %d; retrying one by one", len(entries))
            if len(entries) == 1:
                self._finish_error(entries[0], "inference_failed", f"{type(exc).__name__}: {exc}")
                return
            for entry in entries:
                self._inspect([entry])
            return
        for entry, inspection in zip(entries, inspections, strict=True):
            if inspection.error is not None:
                self._finish_error(entry, *inspection.error)
                continue
            inspection.timings_ms["decode"] = entry.timings_ms["decode"]
            inspection.timings_ms["total"] = sum(
                v for k, v in inspection.timings_ms.items() if k != "total"
            )
            image = image_info(
                entry.sha256,
                entry.decoded.width,
                entry.decoded.height,
                entry.decoded.format,
                entry.decoded.mode,
            )
            report = inspection_report(
                source=entry.source,
                image=image,
                bundle=self.inspector.bundle_ref,
                inspection=inspection,
            )
            self._emit(entry, report, heatmap=inspection.heatmap_png)

    # -- output -------------------------------------------------------------------------------
    def _finish_error(self, entry: Loaded, code: str, message: str) -> None:
        log.warning(
            "error report for %s: %s (%s)", entry.source.path or entry.source.topic, code, message
        )
        report = error_report(
            source=entry.source,
            image_sha256=entry.sha256,
            bundle=self.inspector.bundle_ref,
            code=code,
            message=message,
            timings_ms=entry.timings_ms,
        )
        folder = self.quarantine.keep_input(
            name=os.path.basename(entry.source.path or "") or f"{entry.sha256[:16]}.bin",
            data=entry.data,
            source_path=Path(entry.item.path) if entry.item.path else None,
            report=report,
        )
        self.store.bump(f"error:{code}")
        log.info("quarantined input in %s", folder)
        self._emit(entry, report, heatmap=None, quarantined=True)

    def _emit(
        self, entry: Loaded, report: dict, *, heatmap: bytes | None, quarantined: bool = False
    ) -> None:
        problems = report_problems(report, self.taxonomy)
        if problems:
            kept = self.quarantine.keep_invalid_report(report, problems)
            log.error(
                "BUG: report %s failed its schema (%s); kept in %s",
                report.get("id"),
                "; ".join(problems[:3]),
                kept,
            )
            self.store.bump("invalid_reports")
            report = error_report(
                source=entry.source,
                image_sha256=entry.sha256,
                bundle=self.inspector.bundle_ref,
                code="invalid_report",
                message=f"report failed validation, kept at {kept}",
            )
            heatmap = None
        unique = None if self.dedupe else str(entry.item.seq)
        path = self.outbox.path_for(report, received_at=entry.item.received_at, unique=unique)
        if heatmap is not None and report.get("anomaly"):
            heat_path = path.with_suffix(".heatmap.png")
            self.outbox.write_bytes(heat_path, heatmap, sync_dir=False)  # the report's fsyncs it
            report["anomaly"]["heatmap"] = heat_path.name
        self.outbox.write(report, path)
        topic = report_topic(
            self.topic_prefix, report["source"]["line"], report["source"]["camera"]
        )
        self._finished.append(
            {
                "seq": entry.item.seq,
                "sha256": entry.sha256,
                "report_id": report["id"],
                "report": report,
                "file": str(path),
                "topic": topic,
            }
        )
        if not quarantined:
            self._inbox_done.append(entry)

    def _drop_inbox(self, entry: Loaded) -> None:
        if entry.item.source_kind == "mqtt" and entry.item.path:
            Path(entry.item.path).unlink(missing_ok=True)


def _source_of(item: QueuedImage) -> Source:
    """The report's ``source`` as recorded at receipt (an MQTT envelope may refine it later)."""
    return Source(
        kind=item.source_kind,
        line=item.line,
        camera=item.camera,
        path=display_path(item.path) if item.path else None,
        topic=item.topic,
        message_id=item.message_id,
        captured_at=item.captured_at,
    )
