"""Bundles: the directory of models and metadata that the daemon serves.

A bundle is a directory with ``manifest.json`` beside its model files. The manifest carries everything
the runtime needs (kind, taxonomy, report schema, preprocessing, thresholds, library versions) and the
sha256 and size of every file, so that a bundle whose files were changed, truncated or lost is refused
with a message saying which file and why, instead of being served with silently different answers.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from appliance import __version__
from appliance.schema import SCHEMA_VERSION, report_schema
from appliance.taxonomy import Taxonomy

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


class BundleError(Exception):
    """The bundle cannot be served; the message says which file or key and why."""


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict

    @property
    def id(self) -> str:
        return self.manifest["bundle_id"]

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def taxonomy(self) -> Taxonomy:
        return Taxonomy.from_dict(self.manifest["taxonomy"])

    def file(self, name: str) -> Path:
        """Absolute path of a file the manifest lists."""
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path}: manifest lists no file {name!r}")
        return self.path / name

    def section(self, name: str) -> dict:
        try:
            return self.manifest[name]
        except KeyError:
            raise BundleError(f"{self.path / MANIFEST}: missing section {name!r}") from None


def write_manifest(
    bundle_dir: Path, *, kind: str, taxonomy: Taxonomy, sections: dict, versions: dict | None = None
) -> Bundle:
    """Hash every file in ``bundle_dir`` and write the manifest last (atomically)."""
    bundle_dir = Path(bundle_dir)
    files = {}
    for path in sorted(p for p in bundle_dir.rglob("*") if p.is_file() and p.name != MANIFEST):
        rel = path.relative_to(bundle_dir).as_posix()
        files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    created = datetime.now(UTC).isoformat(timespec="seconds")
    manifest = {
        "format_version": FORMAT_VERSION,
        "bundle_id": f"{kind}-{created[:10]}-{uuid.uuid4().hex[:8]}",
        "kind": kind,
        "created_at": created,
        "taxonomy": taxonomy.to_dict(),
        "report_schema_version": SCHEMA_VERSION,
        "report_schema": report_schema(taxonomy),
        "versions": {
            "appliance": __version__,
            "python": platform.python_version(),
            **(versions or {}),
        },
        "files": files,
        **sections,
    }
    tmp = bundle_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, bundle_dir / MANIFEST)
    return Bundle(bundle_dir, manifest)


def amend_manifest(bundle_dir: Path, sections: dict) -> Bundle:
    """Add or replace manifest sections (and re-hash the files, e.g. a report written beside
    them), keeping the bundle's id, kind and creation time."""
    bundle = load_bundle(bundle_dir)
    manifest = {**bundle.manifest, **sections}
    files = {}
    for path in sorted(p for p in Path(bundle_dir).rglob("*") if p.is_file()):
        if path.name != MANIFEST and not path.name.endswith(".tmp"):
            rel = path.relative_to(bundle_dir).as_posix()
            files[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    manifest["files"] = files
    tmp = Path(bundle_dir) / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    os.replace(tmp, Path(bundle_dir) / MANIFEST)
    return Bundle(Path(bundle_dir), manifest)


def load_bundle(bundle_dir: Path, *, verify: bool = True) -> Bundle:
    """Read a bundle's manifest and (by default) check every file's size and sha256."""
    bundle_dir = Path(bundle_dir)
    manifest_path = bundle_dir / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{bundle_dir}: no {MANIFEST}; build one with `appliance enroll`")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{manifest_path}: unreadable manifest ({exc})") from exc
    for key in ("format_version", "bundle_id", "kind", "taxonomy", "files"):
        if key not in manifest:
            raise BundleError(f"{manifest_path}: missing key {key!r}")
    if manifest["format_version"] != FORMAT_VERSION:
        raise BundleError(
            f"{manifest_path}: format_version {manifest['format_version']!r}, "
            f"this appliance reads {FORMAT_VERSION}"
        )
    if verify:
        for problem in _file_problems(bundle_dir, manifest["files"]):
            raise BundleError(f"{bundle_dir}: {problem}; refusing to serve a modified bundle")
    return Bundle(bundle_dir, manifest)


def _file_problems(bundle_dir: Path, files: dict):
    for rel, meta in files.items():
        path = bundle_dir / rel
        if not path.is_file():
            yield f"file {rel} is missing"
        elif path.stat().st_size != meta["bytes"]:
            yield f"file {rel} has {path.stat().st_size} bytes, manifest says {meta['bytes']}"
        elif sha256_file(path) != meta["sha256"]:
            yield f"file {rel} sha256 differs from the manifest"
