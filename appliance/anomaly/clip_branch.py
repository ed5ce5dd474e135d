"""Serving a ``clip-anomaly`` bundle: seed 002's text-driven few-shot branch on ONNX Runtime only.

The bundle (written by ``export/clip_anomaly.py``) holds one ONNX graph with the VV-CLIP local path,
the TDDF focuser maps (text embeddings baked in) and, in few-shot mode, the self-prompted
multi-scale memory distances, whose memory tensors (``memory.npz``: the normal shots' CLS and local
features) are fed as inputs. This module resizes and normalises the image as the manifest says,
runs the graph, turns the eq. 11 map (A ⊙ D, or D zero-shot) into a heatmap at the input size
(bilinear, Gaussian sigma), thresholds it and finds regions exactly like the memory-bank detector,
and names the defect: the taxonomy label the CLS feature reads as (when its probability reaches
``label_confidence``) becomes the defect label.

The description of an anomalous image comes from seed 002's adapter when the bundle carries one
(manifest ``clip_anomaly.description``): the graph's ``visual_tokens`` output goes, after the
adapter's learned prompt embeddings and before the prompt's tokens, into the bundle's GGUF language
model on llama.cpp (``backends.llamacpp_vlm.EmbeddingDecoder``), decoded greedily. Without one, the
description is the templated "{object} with {label}". It lands in the report's
``anomaly.description`` and feeds the narrative.
"""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
from PIL import Image

from appliance.anomaly.regions import Region, find_regions
from appliance.anomaly.resample import gaussian_smooth, resize_bilinear
from appliance.bundle import Bundle, BundleError
from appliance.schema import DESCRIPTION_MAX_LENGTH
from appliance.taxonomy import ANOMALY_LABEL

BUNDLE_KIND = "clip-anomaly"
GRAPH = "clip_anomaly.onnx"
MEMORY = "memory.npz"
MODES = ("few-shot", "zero-shot")
DESCRIPTION_KEYS = {
    "language_model",
    "quantization",
    "quantized",
    "image_tokens",
    "n_embd",
    "segments",
    "max_tokens",
    "kv_cache_type",
    "n_ctx",
}


@dataclass(frozen=True)
class ClipSettings:
    """The manifest's ``clip_anomaly`` section, read strictly (unknown or missing keys are errors)."""

    graph: str
    memory: str | None
    mode: str
    input_size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    blocks: tuple[int, ...]
    labels: tuple[str, ...]
    object_name: str
    image_threshold: float
    pixel_threshold: float
    calibration: dict
    sigma: float = 4.0
    shots: tuple[str, ...] = ()
    min_region_area: int = 16
    max_regions: int = 5
    label_confidence: float = 0.5
    description: dict | None = None  # the adapter + LM half (see the module docstring)

    def to_dict(self) -> dict:
        data = asdict(self)
        for key in ("input_size", "mean", "std", "blocks", "labels", "shots"):
            data[key] = list(data[key])
        return data

    @classmethod
    def from_dict(cls, data: dict) -> ClipSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise BundleError(f"clip_anomaly.{unknown[0]}: unknown key; allowed: {sorted(known)}")
        for f in fields(cls):
            if f.default is MISSING and f.default_factory is MISSING and f.name not in data:
                raise BundleError(f"clip_anomaly.{f.name}: missing; re-export the bundle")
        values = dict(data)
        for key in ("input_size", "mean", "std", "blocks", "labels", "shots"):
            values[key] = tuple(values.get(key, ()))
        settings = cls(**values)
        _check(settings)
        return settings


def _check(settings: ClipSettings) -> None:
    if settings.mode not in MODES:
        raise BundleError(f"clip_anomaly.mode: {settings.mode!r}; expected one of {MODES}")
    if settings.mode == "few-shot" and not settings.memory:
        raise BundleError("clip_anomaly.memory: few-shot mode needs a memory file; re-export")
    if len(settings.input_size) != 2 or min(settings.input_size) < 16:
        raise BundleError(f"clip_anomaly.input_size: {settings.input_size!r}; expected [h, w]")
    if len(settings.mean) != 3 or len(settings.std) != 3 or min(settings.std) <= 0:
        raise BundleError("clip_anomaly.mean/std: expected three channel values, std > 0")
    for name in ("image_threshold", "pixel_threshold"):
        if not getattr(settings, name) >= 0:
            raise BundleError(f"clip_anomaly.{name}: {getattr(settings, name)!r}; expected >= 0")
    if settings.description is not None:
        keys = set(settings.description)
        if keys != DESCRIPTION_KEYS:
            wrong = sorted(keys ^ DESCRIPTION_KEYS)[0]
            state = "unknown key" if wrong in keys else "missing"
            raise BundleError(f"clip_anomaly.description.{wrong}: {state}; re-export the bundle")


@dataclass(frozen=True)
class ClipResult:
    """Same fields as ``AnomalyResult`` (so the inspector and heatmap renderer take it), plus the
    defect label the text side reads and its one-line description."""

    score: float
    threshold: float
    is_anomalous: bool
    heatmap: np.ndarray = field(repr=False)
    regions: list[Region]
    nearest_normal: str | None
    timings_ms: dict[str, float]
    label: str = ANOMALY_LABEL
    description: str | None = None


def heatmap_from(anomaly: np.ndarray, size: tuple[int, int], sigma: float) -> np.ndarray:
    """The (h, w) eq. 11 map upsampled (bilinear) to ``size`` and Gaussian-smoothed."""
    return gaussian_smooth(resize_bilinear(anomaly, tuple(size)), sigma)


def preprocess(
    images: Sequence[np.ndarray],
    input_size: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
) -> np.ndarray:
    """RGB uint8 images -> (N, 3, H, W) float32, resized (bilinear) to ``input_size`` (h, w) and
    mean/std normalised."""
    height, width = input_size
    mean = np.asarray(mean, np.float32)
    std = np.asarray(std, np.float32)
    batch = []
    for rgb in images:
        image = (
            Image.fromarray(rgb).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        )
        batch.append((np.asarray(image, np.float32) / 255.0 - mean) / std)
    return np.ascontiguousarray(np.stack(batch).transpose(0, 3, 1, 2))


def describe(label: str, object_name: str) -> str:
    """The templated one-line description from the label the text side reads (no adapter)."""
    if label == ANOMALY_LABEL:
        return f"{object_name} with an unidentified defect"
    return f"{object_name} with {label.replace('_', ' ')}"


def clean_description(text: str) -> str:
    """A generated description made safe for a report: no control characters, single spaces,
    at most ``DESCRIPTION_MAX_LENGTH`` characters."""
    text = re.sub(r"[\x00-\x1f\x7f\ufffd]", " ", text)
    return " ".join(text.split())[:DESCRIPTION_MAX_LENGTH].strip()


class ClipAnomalyDetector:
    """Scores RGB images with a ``clip-anomaly`` bundle; answers like ``AnomalyDetector``."""

    def __init__(
        self,
        bundle: Bundle,
        providers: Sequence[str] | None = None,
        *,
        n_threads: int | None = None,
        n_gpu_layers: int = 0,
    ) -> None:
        from appliance.backends.onnxrt import create_session

        if bundle.kind != BUNDLE_KIND:
            raise BundleError(f"{bundle.path}: kind {bundle.kind!r}, expected {BUNDLE_KIND!r}")
        self.bundle = bundle
        self.settings = ClipSettings.from_dict(bundle.section("clip_anomaly"))
        self.session = create_session(
            bundle.file(self.settings.graph), list(providers or ["CPUExecutionProvider"])
        )
        self.feeds: dict[str, np.ndarray] = {}
        if self.settings.mode == "few-shot":
            self.feeds = load_memory(bundle.file(self.settings.memory))
        self.describer = None
        if self.settings.description is not None:
            self.describer = open_describer(
                bundle, self.settings.description, n_threads, n_gpu_layers
            )

    def run(self, batch: np.ndarray) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        outputs = self.session.run(names, {"image": batch, **self.feeds})
        return dict(zip(names, outputs, strict=True))

    def detect(self, rgb: np.ndarray) -> ClipResult:
        return self.detect_batch([rgb])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[ClipResult]:
        start = time.perf_counter()
        s = self.settings
        batch = preprocess(images, s.input_size, s.mean, s.std)
        prepared = time.perf_counter()
        outputs = self.run(batch)
        ran = time.perf_counter()
        shared = {
            "preprocess": (prepared - start) * 1000.0 / len(images),
            "vision": (ran - prepared) * 1000.0 / len(images),
        }
        results = []
        for index, rgb in enumerate(images):
            began = time.perf_counter()
            result = self._judge(outputs, index, rgb.shape[:2])
            spent = (time.perf_counter() - began) * 1000.0
            timings = {**shared, **result.timings_ms}
            timings["anomaly"] = spent - timings.get("description", 0.0)
            results.append(ClipResult(**{**result.__dict__, "timings_ms": timings}))
        return results

    def _judge(self, outputs: dict, index: int, original_size: tuple[int, int]) -> ClipResult:
        s = self.settings
        heatmap = heatmap_from(outputs["anomaly"][index], s.input_size, s.sigma)
        score = float(outputs["score"][index])
        anomalous = score > s.image_threshold
        regions = []
        if anomalous:
            pixel = min(s.pixel_threshold, s.image_threshold)
            options = {"score_reference": s.image_threshold, "max_regions": s.max_regions}
            regions = find_regions(
                heatmap, pixel, original_size, min_area=s.min_region_area, **options
            )
            regions = regions or find_regions(heatmap, pixel, original_size, min_area=1, **options)
        label = self._label(outputs["labels"][index]) if anomalous else ANOMALY_LABEL
        prompt = int(outputs["prompt"][index])
        nearest = s.shots[prompt] if 0 <= prompt < len(s.shots) else None
        timings: dict[str, float] = {}
        description = None
        if anomalous:
            description = describe(label, s.object_name)
            if self.describer is not None:
                began = time.perf_counter()
                written = self.describe(outputs["visual_tokens"][index])
                timings["description"] = (time.perf_counter() - began) * 1000.0
                description = written or description
        return ClipResult(
            score=score,
            threshold=s.image_threshold,
            is_anomalous=anomalous,
            heatmap=heatmap,
            regions=regions,
            nearest_normal=nearest,
            timings_ms=timings,
            label=label,
            description=description,
        )

    def describe(self, visual_tokens: np.ndarray) -> str:
        """The adapter's description of one image's visual tokens: greedy, unconstrained."""
        section = self.settings.description
        generation = self.describer.generate(
            np.ascontiguousarray(visual_tokens, dtype=np.float32),
            int(section["max_tokens"]),
            constrained=False,
        )
        return clean_description(generation.text)

    def close(self) -> None:
        if self.describer is not None:
            self.describer.close()

    def _label(self, probabilities: np.ndarray) -> str:
        best = int(np.argmax(probabilities))
        if probabilities[best] < self.settings.label_confidence:
            return ANOMALY_LABEL
        return self.settings.labels[best]


def load_memory(path: Path) -> dict[str, np.ndarray]:
    """The graph's memory inputs from ``memory.npz`` (no pickle)."""
    with np.load(path, allow_pickle=False) as data:
        if set(data.files) != {"cls", "blocks"}:
            raise BundleError(f"{path}: expected arrays cls and blocks, found {data.files}")
        return {
            "memory_cls": data["cls"].astype(np.float32),
            "memory_blocks": data["blocks"].astype(np.float32),
        }


def open_describer(bundle: Bundle, section: dict, n_threads: int | None, n_gpu_layers: int):
    """The llama.cpp decoder of the adapter's description prompt ``[P] [image] [prompt]``."""
    from appliance.backends.llamacpp_vlm import EmbeddingDecoder
    from appliance.vlm import prompt_segments

    segments = prompt_segments(bundle, section["segments"])
    return EmbeddingDecoder(
        bundle.file(section["language_model"]),
        segments,
        image_tokens=int(section["image_tokens"]),
        gbnf=None,
        n_ctx=int(section["n_ctx"]),
        n_threads=n_threads,
        n_gpu_layers=n_gpu_layers,
        kv_cache_type=str(section["kv_cache_type"]),
    )
