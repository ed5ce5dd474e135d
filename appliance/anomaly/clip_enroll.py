"""The few-shot memory and thresholds of a ``clip-anomaly`` bundle, with ONNX Runtime only.

The exported graph takes the memory as inputs and outputs each image's normalised CLS and local
features, which *are* the memory of a normal shot. So enrolment needs no torch: run the graph on the
normal images, stack their ``cls`` / ``local`` outputs (``memory.npz``), and calibrate the
thresholds with the graph itself — leave-one-out over the shots when there are two or more (each
shot scored against the memory of the others), else the shots against themselves — by the same
rules as ``appliance enroll`` (``calibrate.image_threshold`` / ``pixel_threshold``).

``export/clip_anomaly.py`` calibrates a new bundle through ``calibrate``; ``reenroll`` is what
``appliance retrain`` does for a ``clip-anomaly`` bundle: its kept normal shots (``normals/``, saved
at the model's input size, so re-reading them gives the very same input) plus confirmed good parts
become the new memory, and everything else of the bundle (graph, description model) is carried over
unchanged.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from appliance.anomaly.calibrate import image_threshold, pixel_threshold
from appliance.anomaly.clip_branch import (
    BUNDLE_KIND,
    MEMORY,
    ClipSettings,
    heatmap_from,
    preprocess,
)
from appliance.bundle import MANIFEST, Bundle, BundleError, write_manifest

NORMALS_DIR = "normals"  # the shots at the input size, kept for re-enrolment


def _run(session, batch: np.ndarray, memory: dict | None, names: Sequence[str]) -> list:
    feeds = {"image": batch}
    if memory is not None:
        feeds |= memory
    return session.run(list(names), feeds)


def encode(session, batch: np.ndarray) -> dict[str, np.ndarray]:
    """The memory of normal images: ``memory_cls`` (S, C) and ``memory_blocks`` (B, S, P, C)."""
    inputs = {i.name: i.shape for i in session.get_inputs()}
    if "memory_cls" not in inputs:
        raise BundleError("the graph is zero-shot (exported without memory inputs): no memory")
    channels = int(inputs["memory_cls"][1])
    blocks, _, patches, _ = inputs["memory_blocks"]
    placeholder = {  # any memory will do: cls and local do not depend on it
        "memory_cls": np.zeros((1, channels), np.float32),
        "memory_blocks": np.zeros((int(blocks), 1, int(patches), channels), np.float32),
    }
    cls, local = _run(session, batch, placeholder, ["cls", "local"])
    return {"memory_cls": cls.astype(np.float32), "memory_blocks": local.astype(np.float32)}


def calibrate(
    session, batch: np.ndarray, settings: ClipSettings, memory: dict | None = None
) -> dict:
    """Thresholds from the shots in ``batch``: leave-one-out against ``memory`` (the shots' own,
    in shot order) when there are 2+ shots, else the shots themselves; zero-shot without memory."""
    count = batch.shape[0]
    scores, maps = [], []
    for index in range(count):
        feeds = None
        if memory is not None:
            keep = [i for i in range(count) if i != index] or [index]
            feeds = {
                "memory_cls": memory["memory_cls"][keep],
                "memory_blocks": memory["memory_blocks"][:, keep],
            }
        score, anomaly = _run(session, batch[index : index + 1], feeds, ["score", "anomaly"])
        scores.append(float(score[0]))
        maps.append(heatmap_from(anomaly[0], settings.input_size, settings.sigma))
    method = "leave-one-out" if memory is not None and count > 1 else "self"
    image, image_rule = image_threshold(scores)
    pixel, pixel_rule = pixel_threshold(maps)
    return {
        "image_threshold": image,
        "pixel_threshold": min(pixel, image),
        "calibration": {"method": method, "image_rule": image_rule, "pixel_rule": pixel_rule},
    }


def save_normals(folder: Path, images: Sequence[np.ndarray], names: Sequence[str]) -> list[str]:
    """The shots as PNG (lossless) under ``folder``, ``NNNN-`` prefixed so that sorting the folder
    gives the shot order; returns the file names."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for index, (rgb, name) in enumerate(zip(images, names, strict=True)):
        stem = re.sub(r"^\d{4}-", "", Path(name).stem)  # re-enrolment keeps one prefix
        file = f"{index:04d}-{stem}.png"
        Image.fromarray(np.asarray(rgb, np.uint8)).save(folder / file)
        written.append(file)
    return written


def reenroll(bundle: Bundle, new_normals: Sequence[Path], out: Path) -> Bundle:
    """A copy of ``bundle`` at ``out`` whose memory is its kept shots plus ``new_normals``."""
    from appliance.anomaly.enroll import EnrollError, load_rgb
    from appliance.backends.onnxrt import create_session

    if bundle.kind != BUNDLE_KIND:
        raise BundleError(f"{bundle.path}: kind {bundle.kind!r}, expected {BUNDLE_KIND!r}")
    settings = ClipSettings.from_dict(bundle.section("clip_anomaly"))
    if settings.mode != "few-shot":
        raise EnrollError("a zero-shot bundle has no memory to extend; build a few-shot one")
    kept = sorted((bundle.path / NORMALS_DIR).glob("*.png"))
    if not kept:
        raise EnrollError(f"{bundle.path} keeps no normal shots ({NORMALS_DIR}/); rebuild it")
    if not new_normals:
        raise EnrollError("no new good parts to add to the memory")
    paths = [*kept, *new_normals]
    size = settings.input_size
    images = [_at_input_size(load_rgb(p), size) for p in paths]
    batch = preprocess(images, size, settings.mean, settings.std)
    session = create_session(bundle.file(settings.graph), ["CPUExecutionProvider"])
    memory = encode(session, batch)
    out = Path(out)
    if out.exists():
        raise EnrollError(f"{out} exists; choose a new bundle directory")
    work = out.with_name(f".{out.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    try:
        _copy_models(bundle, work)
        names = [*_kept_names(settings, kept), *(p.name for p in new_normals)]
        save_normals(work / NORMALS_DIR, images, names)
        with open(work / MEMORY, "wb") as handle:
            np.savez(handle, cls=memory["memory_cls"], blocks=memory["memory_blocks"])
        values = settings.to_dict() | calibrate(session, batch, settings, memory)
        values["shots"] = names
        sections = {k: v for k, v in bundle.manifest.items() if k in ("parity",)}
        sections["clip_anomaly"] = ClipSettings.from_dict(values).to_dict()
        sections["enrolment"] = {
            "parent": bundle.id,
            "shots": len(paths),
            "added": len(new_normals),
        }
        written = write_manifest(
            work,
            kind=BUNDLE_KIND,
            taxonomy=bundle.taxonomy,
            sections=sections,
            versions=dict(bundle.manifest.get("versions", {})),
        )
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    work.rename(out)
    return Bundle(out, written.manifest)


def _kept_names(settings: ClipSettings, kept: list[Path]) -> list[str]:
    """The kept shots' names as reports show them (``nearest_normal``), in shot order."""
    if len(settings.shots) == len(kept):
        return list(settings.shots)
    return [re.sub(r"^\d{4}-", "", p.name) for p in kept]


def _at_input_size(rgb: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The image as the graph sees it before normalisation (PIL bilinear to ``size``)."""
    from PIL import Image

    height, width = size
    if rgb.shape[:2] == (height, width):
        return rgb
    resized = Image.fromarray(rgb).resize((width, height), Image.Resampling.BILINEAR)
    return np.asarray(resized, np.uint8)


def _copy_models(bundle: Bundle, work: Path) -> None:
    """Every file of the bundle except its memory, shots and manifest (hashes are checked)."""
    work.mkdir(parents=True)
    for name in bundle.manifest["files"]:
        if name in (MEMORY, MANIFEST) or name.startswith(f"{NORMALS_DIR}/"):
            continue
        target = work / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(bundle.file(name), target)
