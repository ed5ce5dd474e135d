"""A small colour PNG of an anomaly heatmap, for the report's optional heatmap file.

The colour scale is fixed relative to the image threshold (0 -> blue, threshold -> green-yellow,
twice the threshold or more -> red) so that heatmaps of different images can be compared by eye. The
PNG keeps the original image's aspect ratio with its longer side at most ``max_side`` pixels.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from appliance.anomaly.detector import AnomalyResult

MAX_SIDE = 256
# A jet-like ramp: blue, cyan, green, yellow, red at 0, 0.25, 0.5, 0.75, 1.
_STOPS = np.array([0.0, 0.25, 0.5, 0.75, 1.0])
_COLOURS = np.array([[0, 0, 255], [0, 255, 255], [0, 255, 0], [255, 255, 0], [255, 0, 0]], float)


def colourise(values: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (clipped) -> uint8 (h, w, 3) colours."""
    clipped = np.clip(values, 0.0, 1.0)
    channels = [np.interp(clipped, _STOPS, _COLOURS[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=-1)).astype(np.uint8)


def png_size(original_size: tuple[int, int], max_side: int = MAX_SIDE) -> tuple[int, int]:
    """(width, height) for Pillow: the original (height, width) scaled to fit ``max_side``."""
    height, width = original_size
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(width * scale)), max(1, round(height * scale))


def heatmap_png(
    result: AnomalyResult, original_size: tuple[int, int], max_side: int = MAX_SIDE
) -> bytes:
    """PNG bytes of ``result.heatmap``; ``original_size`` is the original (height, width)."""
    reference = (
        2.0 * result.threshold if result.threshold > 0 else float(result.heatmap.max()) or 1.0
    )
    image = Image.fromarray(colourise(result.heatmap / reference), mode="RGB")
    image = image.resize(png_size(original_size, max_side), resample=Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)  # fast: zlib level 9 cost 0.5 s per image
    return buffer.getvalue()
