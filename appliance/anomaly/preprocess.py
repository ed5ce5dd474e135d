"""Turn a decoded RGB image into the backbone's input, and map boxes back to the original image.

The whole image is resized (bilinear, Pillow) to the working size, without cropping or padding, and
normalised as (x - 127.5) / 127.5 as TF-Lite EfficientNet-Lite0 expects. Because the resize is a
pure scaling of each axis, a box in working pixels maps back by scaling each axis independently. All
sizes here are (height, width), the order of ``rgb.shape[:2]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

DEFAULT_SIZE = (256, 256)
PIXEL_MEAN = 127.5
PIXEL_STD = 127.5


def check_rgb(rgb: np.ndarray) -> None:
    """Raise ValueError unless ``rgb`` is a non-empty uint8 H x W x 3 array."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        raise ValueError(
            f"expected a uint8 numpy array, got {type(rgb).__name__} "
            f"{getattr(rgb, 'dtype', '')}; decode with Pillow and .convert('RGB')"
        )
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"expected an H x W x 3 RGB image, got shape {rgb.shape}")


def to_working(rgb: np.ndarray, size: tuple[int, int] = DEFAULT_SIZE) -> np.ndarray:
    """One RGB uint8 image -> normalised float32 (3, h, w) at the working ``size`` = (h, w)."""
    check_rgb(rgb)
    height, width = size
    image = Image.fromarray(rgb, mode="RGB")
    if image.size != (width, height):
        image = image.resize((width, height), resample=Image.Resampling.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    return np.ascontiguousarray(((pixels - PIXEL_MEAN) / PIXEL_STD).transpose(2, 0, 1))


def batch_to_working(
    images: Sequence[np.ndarray], size: tuple[int, int] = DEFAULT_SIZE
) -> np.ndarray:
    """Several RGB uint8 images (any sizes) -> float32 (N, 3, h, w) for one backbone call."""
    if len(images) == 0:
        raise ValueError("no images to preprocess")
    return np.stack([to_working(rgb, size) for rgb in images])


def box_to_original(
    box: Sequence[float], working_size: tuple[int, int], original_size: tuple[int, int]
) -> tuple[float, float, float, float]:
    """Map [x1, y1, x2, y2] (pixel edges) from working to original pixels, clamped to the image."""
    x1, y1, x2, y2 = (float(v) for v in box)
    sy = original_size[0] / working_size[0]
    sx = original_size[1] / working_size[1]
    height, width = float(original_size[0]), float(original_size[1])

    def clamp(value: float, upper: float) -> float:
        return min(max(value, 0.0), upper)

    return (
        clamp(x1 * sx, width),
        clamp(y1 * sy, height),
        clamp(x2 * sx, width),
        clamp(y2 * sy, height),
    )
