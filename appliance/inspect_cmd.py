"""``appliance inspect IMAGE...``: reports for image files on stdout, one JSON object per line.

Bad images get ``error`` reports; the command still exits 0. It exits non-zero only when it cannot
inspect at all (no bundle, a bundle that fails its checks).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path

from appliance.bundle import BundleError, load_bundle
from appliance.config import load_config
from appliance.imaging import ImageRejected, decode_image
from appliance.report import Source, error_report, image_info, inspection_report
from appliance.schema import report_problems

BATCH = 8


def inspect_files(args) -> int:
    config = load_config(Path(args.config), check_paths=False) if args.config else None
    bundle_dir = args.bundle or (config.model.bundle if config else None)
    if not bundle_dir:
        print("inspect needs --bundle DIR (or --config with [model] bundle)", file=sys.stderr)
        return 2
    try:
        bundle = load_bundle(Path(bundle_dir))
        from appliance.inspector import open_inspector

        taxonomy = config.taxonomy_obj if config else bundle.taxonomy
        inspector = open_inspector(
            bundle,
            taxonomy=taxonomy,
            narrative="never"
            if args.no_narrative
            else (config.model.narrative if config else "defective"),
            heatmaps=False,
        )
    except BundleError as exc:
        print(f"cannot use the bundle: {exc}", file=sys.stderr)
        return 3
    paths = [Path(p) for p in args.images]
    for start in range(0, len(paths), BATCH):
        for report in inspect_paths(paths[start : start + BATCH], inspector, taxonomy):
            print(json.dumps(report, ensure_ascii=False), flush=True)
    inspector.close()
    return 0


def inspect_paths(paths: list[Path], inspector, taxonomy) -> list[dict]:
    """Reports for ``paths`` in order; decoding errors become error reports."""
    slots: list[dict | None] = []
    good = []
    for path in paths:
        source = Source(kind="cli", line="", camera="", path=str(path))
        started = time.perf_counter()
        try:
            data = path.read_bytes()
        except OSError as exc:
            code = "file_vanished" if isinstance(exc, FileNotFoundError) else "unreadable_file"
            slots.append(_error(source, b"", inspector, code, str(exc), taxonomy))
            continue
        sha = hashlib.sha256(data).hexdigest()
        try:
            decoded = decode_image(data)
        except ImageRejected as exc:
            slots.append(_error(source, data, inspector, exc.code, exc.message, taxonomy))
            continue
        decode_ms = (time.perf_counter() - started) * 1000.0
        good.append((len(slots), source, sha, decoded, decode_ms))
        slots.append(None)
    if good:
        inspections = inspector.inspect_batch(
            [g[3] for g in good], [{"line": "", "camera": ""} for _ in good]
        )
        for (index, source, sha, decoded, decode_ms), inspection in zip(
            good, inspections, strict=True
        ):
            if inspection.error is not None:  # this image only: the others keep their reports
                slots[index] = _error(source, b"", inspector, *inspection.error, taxonomy, sha)
                continue
            inspection.timings_ms["decode"] = decode_ms
            inspection.timings_ms["total"] = sum(inspection.timings_ms.values())
            image = image_info(sha, decoded.width, decoded.height, decoded.format, decoded.mode)
            report = inspection_report(
                source=source, image=image, bundle=inspector.bundle_ref, inspection=inspection
            )
            _check(report, taxonomy)
            slots[index] = report
    return slots


def _error(source, data, inspector, code, message, taxonomy, sha256: str | None = None) -> dict:
    report = error_report(
        source=source,
        image_sha256=sha256 or hashlib.sha256(data).hexdigest(),
        bundle=inspector.bundle_ref,
        code=code,
        message=message,
    )
    _check(report, taxonomy)
    return report


def _check(report: dict, taxonomy) -> None:
    problems = report_problems(report, taxonomy)
    if problems:
        raise RuntimeError(f"BUG: report {report['id']} fails its schema: {problems}")
