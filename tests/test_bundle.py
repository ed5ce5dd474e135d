"""Bundles: the manifest hashes every file, and a modified bundle is refused with the reason."""

import json
import shutil

import pytest

from appliance.bundle import BundleError, load_bundle


@pytest.fixture
def bundle_copy(bundle_dir, tmp_path):
    target = tmp_path / "bundle"
    shutil.copytree(bundle_dir, target)
    return target


def test_enrolled_bundle_lists_every_file_with_hash(bundle_dir):
    bundle = load_bundle(bundle_dir)
    files = {
        p.relative_to(bundle_dir).as_posix()
        for p in bundle_dir.rglob("*")
        if p.is_file() and p.name != "manifest.json"
    }
    assert set(bundle.manifest["files"]) == files
    assert len([f for f in files if f.startswith("normals/")]) == 6  # kept for re-enrolment
    assert all(len(meta["sha256"]) == 64 for meta in bundle.manifest["files"].values())
    for key in ("taxonomy", "report_schema", "preprocessing", "anomaly", "versions"):
        assert key in bundle.manifest
    assert bundle.manifest["preprocessing"]["mean"] == 127.5


def test_modified_file_is_refused(bundle_copy):
    memory = bundle_copy / "memory.npz"
    data = bytearray(memory.read_bytes())
    data[len(data) // 2] ^= 0xFF
    memory.write_bytes(bytes(data))
    with pytest.raises(BundleError, match="memory.npz sha256 differs"):
        load_bundle(bundle_copy)


def test_truncated_and_missing_files_are_refused(bundle_copy):
    (bundle_copy / "backbone.onnx").write_bytes(b"short")
    with pytest.raises(BundleError, match="backbone.onnx has 5 bytes"):
        load_bundle(bundle_copy)
    (bundle_copy / "backbone.onnx").unlink()
    with pytest.raises(BundleError, match="backbone.onnx is missing"):
        load_bundle(bundle_copy)


def test_bad_manifest_is_refused(bundle_copy):
    manifest = bundle_copy / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 99
    manifest.write_text(json.dumps(data))
    with pytest.raises(BundleError, match="format_version 99"):
        load_bundle(bundle_copy)
    manifest.write_text("{not json")
    with pytest.raises(BundleError, match="unreadable manifest"):
        load_bundle(bundle_copy)
    manifest.unlink()
    with pytest.raises(BundleError, match="appliance enroll"):
        load_bundle(bundle_copy)
