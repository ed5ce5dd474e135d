"""From an anomaly heatmap to scored boxes in the original image's pixels.

Pixels above the pixel threshold are grouped into 8-connected components; components smaller than
``min_area`` working pixels are dropped as noise. The backbone's receptive field and the Gaussian
smoothing spread a strong defect's response well beyond the defect, so a box spans only the
component's core: its pixels at or above ``core_fraction`` (default 0.5, "full width at half
maximum") of the component's peak, or above the pixel threshold where that is higher. Boxes are
mapped to the original image by the preprocessing's per-axis scaling (``box_to_original``), clamped.

Region score (in [0, 1]) = logistic(``steepness`` * (peak / reference - 1)), where ``peak`` is the
component's highest heatmap value and ``reference`` the image threshold: a region peaking exactly at
the image threshold scores 0.5, at 1.5x the threshold 0.88, at 2x 0.98; at the pixel threshold it
scores below 0.5 when that is lower. It is monotonic in the peak, so sorting by it ranks regions by
how anomalous they are, and it never saturates to exactly 0 or 1 for finite values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from appliance.anomaly.preprocess import box_to_original

MIN_AREA = 16
MAX_REGIONS = 5
CORE_FRACTION = 0.5
STEEPNESS = 4.0
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


@dataclass(frozen=True)
class Region:
    bbox: tuple[float, float, float, float]  # x1, y1, x2, y2 in original pixels
    score: float  # in [0, 1]


def region_score(peak: float, reference: float, steepness: float = STEEPNESS) -> float:
    """Logistic of the peak relative to the reference threshold (0.5 at the threshold)."""
    if reference <= 0:
        return 1.0 if peak > 0 else 0.5
    z = steepness * (peak / reference - 1.0)
    return 1.0 / (1.0 + math.exp(-min(max(z, -60.0), 60.0)))


def core_box(
    heat: np.ndarray, member: np.ndarray, floor: float, window: tuple[slice, slice]
) -> tuple[int, int, int, int]:
    """[x1, y1, x2, y2] pixel edges of the component's pixels at or above ``floor``."""
    core = member & (heat >= floor)
    if not core.any():
        core = member
    ys, xs = np.nonzero(core)
    y0, x0 = window[0].start, window[1].start
    return x0 + int(xs.min()), y0 + int(ys.min()), x0 + int(xs.max()) + 1, y0 + int(ys.max()) + 1


def find_regions(
    heatmap: np.ndarray,
    pixel_threshold: float,
    original_size: tuple[int, int],
    *,
    score_reference: float | None = None,
    min_area: int = MIN_AREA,
    max_regions: int = MAX_REGIONS,
    core_fraction: float = CORE_FRACTION,
) -> list[Region]:
    """Boxes around the components of ``heatmap > pixel_threshold``, best first.

    ``original_size`` is (height, width) of the original image; ``score_reference`` (default: the
    pixel threshold) is the value that scores 0.5. At most ``max_regions`` are returned.
    """
    reference = pixel_threshold if score_reference is None else score_reference
    labels, count = ndimage.label(heatmap > pixel_threshold, structure=_EIGHT_CONNECTED)
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    areas = ndimage.sum_labels(np.ones_like(heatmap), labels, index)
    peaks = ndimage.maximum(heatmap, labels, index)
    regions = []
    for label, window in enumerate(ndimage.find_objects(labels), start=1):
        if areas[label - 1] < min_area:
            continue
        peak = float(peaks[label - 1])
        floor = max(pixel_threshold, core_fraction * peak)
        box = core_box(heatmap[window], labels[window] == label, floor, window)
        bbox = box_to_original(box, heatmap.shape[:2], original_size)
        regions.append(Region(bbox, region_score(peak, reference)))
    regions.sort(key=lambda r: r.score, reverse=True)
    return regions[:max_regions]
