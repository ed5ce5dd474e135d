"""Decision thresholds from normal images only (no defective examples exist at enrolment).

Where the normal images come from:

* ``holdout``: images kept out of the memory, scored against the full bank (unbiased);
* ``leave-one-out``: each shot scored against a bank of the other shots. Its scores are a little
  higher than a deployed image's (the bank has one shot fewer), so thresholds err towards fewer
  false alarms;
* ``self-excluded``: one shot only; each patch is compared with the same image's patches outside the
  self-prompt window. A rough stand-in: enrol at least two images for a threshold you can trust.

The rules (also returned as text, so the bundle manifest records how each number was made):

* image threshold = max(normal image scores) * ``image_margin`` (default 1.05); with few shots, a
  mean + k*std rule is too noisy, and the maximum is the conservative choice;
* pixel threshold = the ``pixel_percentile`` (default 99.9th) percentile of all normal pixels *
  ``pixel_margin`` (default 1.0), capped at the image threshold so that an anomalous image always
  has at least one pixel above it to draw a region around.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from appliance.anomaly.memory import MemoryBank, Scored, ScoringConfig

IMAGE_MARGIN = 1.05
PIXEL_PERCENTILE = 99.9
PIXEL_MARGIN = 1.0


@dataclass(frozen=True)
class Thresholds:
    image: float
    pixel: float
    method: str
    image_rule: str
    pixel_rule: str
    normal_scores: tuple[float, ...]

    def to_dict(self) -> dict:
        return {
            "image_threshold": self.image,
            "pixel_threshold": self.pixel,
            "calibration": {
                "method": self.method,
                "image_rule": self.image_rule,
                "pixel_rule": self.pixel_rule,
                "normal_scores": list(self.normal_scores),
            },
        }


def image_threshold(scores: Sequence[float], margin: float = IMAGE_MARGIN) -> tuple[float, str]:
    """(threshold, rule) = max(normal scores) * margin."""
    if len(scores) == 0:
        raise ValueError("no normal scores to calibrate the image threshold on")
    return float(max(scores)) * margin, f"max(normal image scores) * {margin:g}"


def pixel_threshold(
    maps: Sequence[np.ndarray], percentile: float = PIXEL_PERCENTILE, margin: float = PIXEL_MARGIN
) -> tuple[float, str]:
    """(threshold, rule) = percentile of all normal heatmap pixels * margin."""
    if len(maps) == 0:
        raise ValueError("no normal heatmaps to calibrate the pixel threshold on")
    pixels = np.concatenate([np.ravel(m) for m in maps])
    value = float(np.percentile(pixels, percentile)) * margin
    return value, f"percentile {percentile:g} of normal pixels * {margin:g}"


def leave_one_out(
    bank: MemoryBank, config: ScoringConfig, max_patches: int | None = None
) -> tuple[list[Scored], str]:
    """Score each shot against the others (one shot: against itself away from each patch)."""
    if len(bank) == 1:
        return [bank.self_score(0, config)], "self-excluded"
    scored = []
    for index in range(len(bank)):
        grids = {layer: grid[index] for layer, grid in bank.shots.items()}
        scored.append(bank.without(index, max_patches=max_patches).score(grids, config))
    return scored, "leave-one-out"


def held_out(
    bank: MemoryBank, grids: Sequence[dict[str, np.ndarray]], config: ScoringConfig
) -> tuple[list[Scored], str]:
    """Score held-out normal images (per-layer grids) against the full bank."""
    return [bank.score(g, config) for g in grids], "holdout"


def calibrate(
    scored: Sequence[Scored],
    method: str,
    *,
    image_margin: float = IMAGE_MARGIN,
    pixel_percentile: float = PIXEL_PERCENTILE,
    pixel_margin: float = PIXEL_MARGIN,
) -> Thresholds:
    """Image and pixel thresholds from scored normal images, with the rules that made them."""
    scores = [s.score for s in scored]
    image, image_rule = image_threshold(scores, image_margin)
    pixel, pixel_rule = pixel_threshold([s.heatmap for s in scored], pixel_percentile, pixel_margin)
    if pixel > image:
        pixel, pixel_rule = image, pixel_rule + ", capped at the image threshold"
    return Thresholds(image, pixel, method, image_rule, pixel_rule, tuple(scores))
