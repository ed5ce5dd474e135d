"""The few-shot anomaly detector served from a memory-bank bundle.

It wires the pure pieces together: preprocess -> ONNX backbone -> memory-bank scoring -> thresholds
-> regions. Everything it needs (working size, layers, scoring parameters, thresholds, file names)
comes from the bundle's manifest, so a bundle scores the same wherever it is served.

Regions are reported only for anomalous images; when every component of an anomalous image is
smaller than ``min_region_area``, the components are taken whatever their size, so an anomalous
verdict always has at least one box to show.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from appliance.anomaly.features import FeatureExtractor
from appliance.anomaly.memory import MemoryBank
from appliance.anomaly.preprocess import batch_to_working
from appliance.anomaly.regions import Region, find_regions
from appliance.anomaly.settings import BUNDLE_KIND, AnomalySettings
from appliance.bundle import Bundle, BundleError


@dataclass(frozen=True)
class AnomalyResult:
    score: float
    threshold: float
    is_anomalous: bool
    heatmap: np.ndarray = field(repr=False)  # float32 (h, w) at the working size
    regions: list[Region]
    nearest_normal: str  # file name of the self-prompt normal shot
    timings_ms: dict[str, float]  # "preprocess", "vision", "anomaly"


class AnomalyDetector:
    """Scores RGB images against the normal shots of a memory-bank bundle."""

    def __init__(self, bundle: Bundle, providers: Sequence[str] | None = None) -> None:
        if bundle.kind != BUNDLE_KIND:
            raise BundleError(
                f"{bundle.path}: bundle kind is {bundle.kind!r}, the anomaly detector serves "
                f"{BUNDLE_KIND!r} bundles (made by `appliance enroll`)"
            )
        self.bundle = bundle
        self.settings = AnomalySettings.from_dict(bundle.section("anomaly"))
        self.scoring = self.settings.scoring()
        self.memory = MemoryBank.load(bundle.file(self.settings.memory))
        if set(self.memory.layers) != set(self.settings.layers):
            raise BundleError(
                f"{bundle.path}: memory layers {self.memory.layers} differ from anomaly.layers "
                f"{self.settings.layers}; re-enrol the bundle"
            )
        self.extractor = FeatureExtractor(
            bundle.file(self.settings.backbone), self.memory.layers, providers
        )

    def detect(self, rgb: np.ndarray) -> AnomalyResult:
        """Score one RGB uint8 H x W x 3 image."""
        return self.detect_batch([rgb])[0]

    def detect_batch(self, images: Sequence[np.ndarray]) -> list[AnomalyResult]:
        """Score several images with one backbone call; batch times are shared out equally."""
        start = time.perf_counter()
        batch = batch_to_working(images, self.settings.working_size)
        preprocessed = time.perf_counter()
        features = self.extractor(batch)
        extracted = time.perf_counter()
        shared = {
            "preprocess": (preprocessed - start) * 1000.0 / len(images),
            "vision": (extracted - preprocessed) * 1000.0 / len(images),
        }
        results = []
        for index, rgb in enumerate(images):
            began = time.perf_counter()
            result = self._judge(features.image(index), rgb.shape[:2])
            anomaly_ms = (time.perf_counter() - began) * 1000.0
            timings = {**shared, "anomaly": anomaly_ms}
            results.append(replace(result, timings_ms=timings))
        return results

    def _judge(self, grids: dict[str, np.ndarray], original_size: tuple[int, int]) -> AnomalyResult:
        scored = self.memory.score(grids, self.scoring)
        threshold = self.settings.image_threshold
        anomalous = scored.score > threshold
        regions = self._regions(scored.heatmap, original_size) if anomalous else []
        return AnomalyResult(
            score=scored.score,
            threshold=threshold,
            is_anomalous=anomalous,
            heatmap=scored.heatmap,
            regions=regions,
            nearest_normal=self.memory.names[scored.nearest],
            timings_ms={},
        )

    def _regions(self, heatmap: np.ndarray, original_size: tuple[int, int]) -> list[Region]:
        settings = self.settings
        options = {
            "score_reference": settings.image_threshold,
            "max_regions": settings.max_regions,
        }
        pixel = min(settings.pixel_threshold, settings.image_threshold)
        regions = find_regions(
            heatmap, pixel, original_size, min_area=settings.min_region_area, **options
        )
        return regions or find_regions(heatmap, pixel, original_size, min_area=1, **options)
