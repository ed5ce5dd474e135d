"""Enrolment: a few normal images in, a served memory-bank bundle out.

Copies the backbone into the bundle, builds the memory bank from the normal images, calibrates the
thresholds on normal images only (the last ``holdout`` images when asked, otherwise leave-one-out
over the shots), and writes the manifest last, so an interrupted enrolment never leaves a bundle
that loads.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from PIL import Image, ImageOps, UnidentifiedImageError

from appliance.anomaly.calibrate import Thresholds, calibrate, held_out, leave_one_out
from appliance.anomaly.features import DEFAULT_LAYERS, FeatureExtractor, PatchFeatures
from appliance.anomaly.geometry import cell_offsets
from appliance.anomaly.memory import (
    LAYER_WEIGHTS,
    PROMPT_WEIGHT,
    REWEIGHT_NEIGHBORS,
    SCORE_SIGMA,
    MemoryBank,
    ScoringConfig,
)
from appliance.anomaly.preprocess import DEFAULT_SIZE, PIXEL_MEAN, PIXEL_STD, batch_to_working
from appliance.anomaly.settings import BUNDLE_KIND, AnomalySettings
from appliance.bundle import Bundle, write_manifest
from appliance.taxonomy import Taxonomy

BACKBONE_FILE = "backbone.onnx"
MEMORY_FILE = "memory.npz"
MAX_PATCHES = 16384  # per layer; 16 shots at 256x256 fit whole on the stride-8 grid
BATCH_SIZE = 8
# Shift heatmaps by the backbone's theoretical cell offsets (``geometry``)? Off: on Magnetic tile
# (docs/benchmarks.md) it lowered pixel AUROC, and a probe of the real backbone finds its s8
# responses centred where align_corners=False assumes, not 3.5 px down-right.
CORRECT_OFFSETS = False


NORMALS_DIR = "normals"  # the enrolled normal images, kept for re-enrolment


class EnrollError(ValueError):
    """Enrolment cannot go on; the message says which input and what to do."""


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image file as uint8 RGB, upright according to its EXIF orientation."""
    try:
        with Image.open(path) as image:
            upright = ImageOps.exif_transpose(image)
            return np.asarray(upright.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError:
        raise EnrollError(f"{path}: no such file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as exc:
        raise EnrollError(f"{path}: not a readable image ({exc}); remove it or re-save it") from exc


def extract_all(
    extractor: FeatureExtractor, images: Sequence[np.ndarray], size: tuple[int, int]
) -> PatchFeatures:
    """Features of all images, in backbone batches of ``BATCH_SIZE``."""
    parts = [
        extractor(batch_to_working(images[i : i + BATCH_SIZE], size)).layers
        for i in range(0, len(images), BATCH_SIZE)
    ]
    return PatchFeatures({name: np.concatenate([p[name] for p in parts]) for name in parts[0]})


def _check_inputs(normal_images: Sequence[Path], out_dir: Path, holdout: int) -> None:
    if len(normal_images) < 1:
        raise EnrollError(
            "enrolment needs at least 1 normal image (2 or more for a sound threshold)"
        )
    if not 0 <= holdout < len(normal_images):
        raise EnrollError(
            f"holdout={holdout} with {len(normal_images)} images; keep at least one image in "
            "the memory (holdout 0 calibrates by leave-one-out instead)"
        )
    if out_dir.exists() and any(out_dir.iterdir()):
        raise EnrollError(f"{out_dir}: not empty; enrol into a new directory")


def build_and_calibrate(
    features: PatchFeatures, names: Sequence[str], config: ScoringConfig, max_patches: int | None
) -> tuple[MemoryBank, Thresholds]:
    """Memory of the first ``len(names)`` images; thresholds from the rest, or leave-one-out."""
    kept = len(names)
    shots = {name: grid[:kept] for name, grid in features.layers.items()}
    bank = MemoryBank.from_features(names, shots, max_patches=max_patches)
    if kept < features.count:
        held = [features.image(i) for i in range(kept, features.count)]
        scored, method = held_out(bank, held, config)
    else:
        scored, method = leave_one_out(bank, config, max_patches)
    return bank, calibrate(scored, method)


def scoring_config(
    backbone_onnx: Path,
    layers: Sequence[str],
    size: tuple[int, int],
    prompt_weight: float = PROMPT_WEIGHT,
    correct_offsets: bool = CORRECT_OFFSETS,
    reweight_neighbors: int = REWEIGHT_NEIGHBORS,
    layer_weights: Mapping[str, float] = LAYER_WEIGHTS,
    score_sigma: float | None = SCORE_SIGMA,
) -> ScoringConfig:
    """The scoring a bundle of this backbone, layers and size is enrolled and served with
    (``layer_weights`` of layers not enrolled are dropped)."""
    offsets = cell_offsets(backbone_onnx, layers, size) if correct_offsets else {}
    return ScoringConfig(
        working_size=size,
        prompt_weight=prompt_weight,
        cell_offsets=offsets,
        reweight_neighbors=reweight_neighbors,
        layer_weights={k: float(w) for k, w in layer_weights.items() if k in layers},
        score_sigma=score_sigma,
    )


def bundle_settings(
    bank: MemoryBank, thresholds: Thresholds, config: ScoringConfig, max_patches: int | None
) -> AnomalySettings:
    return AnomalySettings(
        backbone=BACKBONE_FILE,
        memory=MEMORY_FILE,
        working_size=(int(config.working_size[0]), int(config.working_size[1])),
        layers=bank.layers,
        image_threshold=thresholds.image,
        pixel_threshold=thresholds.pixel,
        calibration=thresholds.to_dict()["calibration"],
        local_radius_px=config.local_radius_px,
        prompt_weight=config.prompt_weight,
        sigma=config.sigma,
        max_patches=max_patches,
        shots=bank.names,
        cell_offsets=dict(config.cell_offsets),
        reweight_neighbors=config.reweight_neighbors,
        layer_weights=dict(config.layer_weights),
        score_sigma=config.score_sigma,
    )


def preprocessing_section(size: tuple[int, int]) -> dict:
    return {
        "color": "RGB",
        "exif_transpose": True,
        "resize": "whole image, bilinear (Pillow)",
        "size_hw": list(size),
        "mean": PIXEL_MEAN,
        "std": PIXEL_STD,
        "layout": "NCHW",
        "input": "image",
    }


def enroll(
    normal_images: Sequence[Path],
    out_dir: Path,
    *,
    taxonomy: Taxonomy,
    backbone_onnx: Path,
    size: tuple[int, int] = DEFAULT_SIZE,
    layers: Sequence[str] = DEFAULT_LAYERS,
    holdout: int = 0,
    max_patches: int | None = MAX_PATCHES,
    prompt_weight: float = PROMPT_WEIGHT,
    correct_offsets: bool = CORRECT_OFFSETS,
    reweight_neighbors: int = REWEIGHT_NEIGHBORS,
    layer_weights: Mapping[str, float] = LAYER_WEIGHTS,
    score_sigma: float | None = SCORE_SIGMA,
    providers: Sequence[str] | None = None,
    keep_normals: bool = True,
) -> Bundle:
    """Build a memory-bank bundle in ``out_dir`` from normal images and return it.

    ``holdout``: how many of the last images calibrate the thresholds without entering the memory;
    0 (default, best for few shots) calibrates by leave-one-out over the shots instead.
    ``keep_normals`` copies the normal images into the bundle (``normals/``), so that
    ``appliance retrain`` can enroll again with them plus newly confirmed good parts.
    """
    paths = [Path(p) for p in normal_images]
    out_dir = Path(out_dir)
    _check_inputs(paths, out_dir, holdout)
    images = [load_rgb(p) for p in paths]
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(backbone_onnx, out_dir / BACKBONE_FILE)
    extractor = FeatureExtractor(out_dir / BACKBONE_FILE, layers, providers)
    features = extract_all(extractor, images, tuple(size))
    kept = len(paths) - holdout
    names = [p.name for p in paths[:kept]]
    config = scoring_config(
        out_dir / BACKBONE_FILE,
        layers,
        tuple(size),
        prompt_weight,
        correct_offsets,
        reweight_neighbors,
        layer_weights,
        score_sigma,
    )
    bank, thresholds = build_and_calibrate(features, names, config, max_patches)
    bank.save(out_dir / MEMORY_FILE)
    if keep_normals:
        (out_dir / NORMALS_DIR).mkdir(exist_ok=True)
        for index, path in enumerate(paths):
            name = re.sub(r"^\d{4}-", "", path.name)  # re-enrolment keeps one prefix
            shutil.copyfile(path, out_dir / NORMALS_DIR / f"{index:04d}-{name}")
    settings = bundle_settings(bank, thresholds, config, max_patches)
    sections = {"anomaly": settings.to_dict(), "preprocessing": preprocessing_section(size)}
    versions = {"onnxruntime": ort.__version__, "numpy": np.__version__}
    return write_manifest(
        out_dir, kind=BUNDLE_KIND, taxonomy=taxonomy, sections=sections, versions=versions
    )
