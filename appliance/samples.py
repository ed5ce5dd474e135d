"""Procedural sample images: brushed-metal textures, with or without scratches, cracks and spots.

The repository ships no third-party images. The demo and the tests draw their parts here, seeded, so
the same call gives the same pixels on every machine; each defect comes with its true box.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

DEFECT_KINDS = ("scratch", "crack", "spot")


@dataclass(frozen=True)
class Sample:
    rgb: np.ndarray  # H x W x 3 uint8
    defect: str | None
    box: tuple[int, int, int, int] | None  # x1, y1, x2, y2 in pixels


def texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A brushed-metal surface: horizontal streaks, low-frequency shading, fine grain (float 0..1)."""
    streaks = ndimage.gaussian_filter(rng.normal(size=(height, width)), sigma=(0.6, 12.0))
    shading = ndimage.gaussian_filter(rng.normal(size=(height, width)), sigma=24.0)
    grain = rng.normal(scale=0.015, size=(height, width))
    base = 0.55 + 2.2 * streaks / (np.abs(streaks).max() + 1e-9) * 0.06
    base += shading / (np.abs(shading).max() + 1e-9) * 0.05 + grain
    return np.clip(base, 0, 1)


def _stamp(gray: np.ndarray, mask: np.ndarray, depth: float) -> tuple[int, int, int, int]:
    soft = np.clip(ndimage.gaussian_filter(mask.astype(float), 0.8) * 1.5, 0, 1)
    gray -= depth * soft
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _scratch(rng, h, w) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    x0, y0 = rng.uniform(0.15 * w, 0.45 * w), rng.uniform(0.2 * h, 0.8 * h)
    angle = rng.uniform(-0.6, 0.6)
    length = rng.uniform(0.3, 0.5) * w
    for t in np.linspace(0, length, int(length * 2)):
        x, y = int(x0 + t * np.cos(angle)), int(y0 + t * np.sin(angle))
        if 0 <= x < w and 0 <= y < h:
            mask[max(y - 1, 0) : y + 1, x] = True
    return mask


def _crack(rng, h, w) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    x, y = rng.uniform(0.3 * w, 0.7 * w), rng.uniform(0.2 * h, 0.4 * h)
    heading = np.pi / 2 + rng.uniform(-0.3, 0.3)
    for _ in range(int(0.45 * h)):
        heading += rng.normal(scale=0.25)
        x, y = x + np.cos(heading), y + np.sin(heading)
        xi, yi = int(x), int(y)
        if 0 <= xi < w - 1 and 0 <= yi < h - 1:
            mask[yi : yi + 2, xi : xi + 2] = True
    return mask


def _spot(rng, h, w) -> np.ndarray:
    cy, cx = rng.uniform(0.25 * h, 0.75 * h), rng.uniform(0.25 * w, 0.75 * w)
    ry, rx = rng.uniform(6, 14), rng.uniform(6, 14)
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0


_DRAW = {"scratch": (_scratch, 0.35), "crack": (_crack, 0.45), "spot": (_spot, 0.3)}


def make_sample(
    seed: int, *, defect: str | None = None, height: int = 240, width: int = 320
) -> Sample:
    """One part image; ``defect`` is None for a good part, else one of DEFECT_KINDS."""
    rng = np.random.default_rng(seed)
    gray = texture(rng, height, width)
    box = None
    if defect is not None:
        if defect not in _DRAW:
            raise ValueError(f"defect {defect!r} is not one of {DEFECT_KINDS}")
        draw, depth = _DRAW[defect]
        box = _stamp(gray, draw(rng, height, width), depth)
    tint = np.array([1.0, 0.98, 0.95])
    rgb = np.clip(gray[:, :, None] * tint * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Sample(rgb=rgb, defect=defect, box=box)
