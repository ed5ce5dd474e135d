"""Grid resampling shared by the feature extractor and the anomaly maps.

PatchCore's feature pooling (3x3 average, stride 1, zero padding counted) and bilinear resizing with
``align_corners=False`` (the behaviour of ``torch.nn.functional.interpolate``) are re-implemented
here in numpy so that the runtime matches the reference without importing torch.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage


def axis_weights(
    n_out: int, n_in: int, offset: float = 0.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output sample: lower and upper source index and the upper weight (align_corners=False).

    ``offset`` (output samples): the source cells sit that far further along the axis than
    ``align_corners=False`` assumes (TF "SAME" padding), so the resampled map is shifted back.
    """
    if n_out < 1 or n_in < 1:
        raise ValueError(f"sizes must be positive, got n_out={n_out}, n_in={n_in}")
    src = (np.arange(n_out, dtype=np.float64) + 0.5 - offset) * (n_in / n_out) - 0.5
    src = np.clip(src, 0.0, n_in - 1)
    lo = np.floor(src).astype(np.int64)
    hi = np.minimum(lo + 1, n_in - 1)
    return lo, hi, (src - lo).astype(np.float32)


def bilinear_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) matrix that resizes a 1-D signal bilinearly with ``align_corners=False``."""
    lo, hi, frac = axis_weights(n_out, n_in)
    matrix = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(matrix, (rows, lo), 1.0 - frac)
    np.add.at(matrix, (rows, hi), frac)
    return matrix


def _resize_axis(grid: np.ndarray, n_out: int, axis: int, offset: float = 0.0) -> np.ndarray:
    # Two gathers and a blend: the interpolation matrix has two non-zeros per row, and small dense
    # products are slow on a busy CPU (BLAS threads), so the sparse form is used.
    lo, hi, frac = axis_weights(n_out, grid.shape[axis], offset)
    shape = [1] * grid.ndim
    shape[axis] = n_out
    frac = frac.reshape(shape)
    low = np.take(grid, lo, axis=axis)
    return low + (np.take(grid, hi, axis=axis) - low) * frac


def resize_bilinear(
    grid: np.ndarray, size: tuple[int, int], offset: tuple[float, float] = (0.0, 0.0)
) -> np.ndarray:
    """Resize the two leading spatial axes of ``grid`` (H, W, ...) to ``size`` = (h, w).

    ``offset`` = (dy, dx) in output pixels: where the grid's cells sit relative to the
    ``align_corners=False`` assumption (see ``geometry.cell_offsets``); edges are replicated.
    """
    grid = grid.astype(np.float32, copy=False)
    if grid.shape[:2] == tuple(size) and not any(offset):
        return grid
    rows = _resize_axis(grid, size[0], 0, offset[0])
    return _resize_axis(rows, size[1], 1, offset[1])


def avg_pool3x3(features: np.ndarray) -> np.ndarray:
    """PatchCore's local aggregation on (N, H, W, C): 3x3 mean, stride 1, zero padding counted."""
    return ndimage.uniform_filter(
        features.astype(np.float32, copy=False), size=(1, 3, 3, 1), mode="constant", cval=0.0
    )


def gaussian_smooth(heatmap: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur of a 2-D map (reflecting borders); ``sigma <= 0`` returns it unchanged."""
    if sigma <= 0:
        return heatmap.astype(np.float32, copy=False)
    # A kernel radius of 4 sigma, as anomalib's GaussianBlur2d uses.
    return ndimage.gaussian_filter(heatmap.astype(np.float32), sigma=sigma, truncate=4.0)
