"""Building inspection reports: pure functions from inspection results to schema-shaped dicts.

The daemon, ``appliance inspect`` and the tests all build reports here, so every report in the field
has the same shape; ``appliance.schema.report_problems`` checks them before they leave.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime

from appliance.schema import SCHEMA_VERSION


@dataclass(frozen=True)
class Source:
    kind: str  # folder | mqtt | cli
    line: str
    camera: str
    path: str | None = None
    topic: str | None = None
    message_id: str | None = None
    captured_at: str | None = None

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "line": self.line,
            "camera": self.camera,
            "path": self.path,
            "topic": self.topic,
            "message_id": self.message_id,
            "captured_at": self.captured_at,
        }


@dataclass
class Inspection:
    """What the inspector found in one decoded image."""

    defects: list[dict] = field(default_factory=list)
    anomaly: dict | None = None
    narrative: dict | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    heatmap_png: bytes | None = None
    # (error code, message) when this image could not be inspected though its batch was
    error: tuple[str, str] | None = None


def report_id(image_sha256: str, bundle_id: str) -> str:
    """Same image content + same bundle → same id (consumers dedupe on it)."""
    return hashlib.sha256(f"{image_sha256}:{bundle_id}".encode()).hexdigest()[:32]


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _base(source: Source, image: dict, bundle: dict, created_at: str | None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "id": report_id(image["sha256"], bundle["id"]),
        "created_at": created_at or now_iso(),
        "source": source.to_dict(),
        "image": image,
        "bundle": bundle,
    }


def inspection_report(
    *,
    source: Source,
    image: dict,
    bundle: dict,
    inspection: Inspection,
    created_at: str | None = None,
) -> dict:
    report = _base(source, image, bundle, created_at)
    report.update(
        verdict="defective" if inspection.defects else "ok",
        defects=inspection.defects,
        anomaly=inspection.anomaly,
        narrative=inspection.narrative,
        timings_ms={k: round(float(v), 3) for k, v in inspection.timings_ms.items()},
        error=None,
    )
    return report


def error_report(
    *,
    source: Source,
    image_sha256: str,
    bundle: dict,
    code: str,
    message: str,
    timings_ms: dict[str, float] | None = None,
    created_at: str | None = None,
) -> dict:
    image = {"sha256": image_sha256, "width": None, "height": None, "format": None, "mode": None}
    report = _base(source, image, bundle, created_at)
    report.update(
        verdict="error",
        defects=[],
        anomaly=None,
        narrative=None,
        timings_ms={k: round(float(v), 3) for k, v in (timings_ms or {}).items()},
        error={"code": code, "message": message[:2000]},
    )
    return report


def image_info(sha256: str, width: int, height: int, fmt: str | None, mode: str | None) -> dict:
    return {"sha256": sha256, "width": width, "height": height, "format": fmt, "mode": mode}
