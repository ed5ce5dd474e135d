"""Nearest-neighbour distance maths for the memory bank, in plain float32 numpy.

Three distances to "normal", all Euclidean between patch embeddings:

* ``nn_distance``: every test patch to its nearest patch anywhere in the bank (PatchCore). It is
  computed as |q|^2 - 2 q.b + |b|^2 with matrix products over bounded chunks, so memory stays at
  ``chunk_elements`` floats whatever the bank size.
* ``local_distance``: every test patch to the nearest patch of a reference image within a small
  window around the same position (the self-prompt: the best-matching normal says what *should* be
  here).
* ``self_excluded_nn``: every patch of one image to the nearest patch of the same image outside a
  window around itself, a stand-in for "another normal image" when only one shot exists.

``greedy_coreset`` is PatchCore's k-center subsampling for banks that grow too large.
"""

from __future__ import annotations

import numpy as np

DEFAULT_CHUNK_ELEMENTS = 1 << 22  # 16 MiB of float32 distances per matrix block
QUERY_CHUNK = 4096


def nn_distance(
    queries: np.ndarray, bank: np.ndarray, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
) -> np.ndarray:
    """(P,) distance from each row of ``queries`` (P, C) to its nearest row of ``bank`` (M, C)."""
    if bank.shape[0] == 0:
        raise ValueError("the memory bank is empty; enrol at least one normal image")
    if queries.shape[1] != bank.shape[1]:
        raise ValueError(f"feature sizes differ: queries {queries.shape}, bank {bank.shape}")
    queries = queries.astype(np.float32, copy=False)
    bank = bank.astype(np.float32, copy=False)
    bank_sq = np.einsum("mc,mc->m", bank, bank)
    best = np.empty(queries.shape[0], dtype=np.float32)
    for q0 in range(0, queries.shape[0], QUERY_CHUNK):
        block = queries[q0 : q0 + QUERY_CHUNK]
        best[q0 : q0 + len(block)] = _block_min_sq(block, bank, bank_sq, chunk_elements)
    return np.sqrt(np.maximum(best, 0.0))


def _block_min_sq(
    queries: np.ndarray, bank: np.ndarray, bank_sq: np.ndarray, chunk_elements: int
) -> np.ndarray:
    # min over b of |b|^2 - 2 q.b, then + |q|^2: two passes over each block instead of four.
    scaled = -2.0 * queries
    best = np.full(queries.shape[0], np.inf, dtype=np.float32)
    rows = max(1, chunk_elements // max(1, queries.shape[0]))
    for m0 in range(0, bank.shape[0], rows):
        d2 = scaled @ bank[m0 : m0 + rows].T
        d2 += bank_sq[None, m0 : m0 + rows]
        np.minimum(best, d2.min(axis=1), out=best)
    return best + np.einsum("pc,pc->p", queries, queries)


def local_distance(query: np.ndarray, references: np.ndarray, radius: int) -> np.ndarray:
    """Position-aware distance of ``query`` (h, w, C) to each reference (S, h, w, C) -> (S, h, w).

    For every position, the nearest reference patch within a (2r+1)^2 window around the same
    position (the window is clipped at the borders). ``radius`` 0 compares aligned patches only.
    """
    if references.shape[1:] != query.shape:
        raise ValueError(f"grid shapes differ: query {query.shape}, references {references.shape}")
    h, w = query.shape[:2]
    pad = ((0, 0), (radius, radius), (radius, radius), (0, 0))
    padded = np.pad(references.astype(np.float32, copy=False), pad, mode="edge")
    best = np.full(references.shape[:3], np.inf, dtype=np.float32)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            diff = padded[:, dy : dy + h, dx : dx + w] - query[None]
            np.minimum(best, np.einsum("shwc,shwc->shw", diff, diff), out=best)
    return np.sqrt(best)


def self_excluded_nn(grid: np.ndarray, radius: int) -> np.ndarray:
    """(h, w) distance of each patch of ``grid`` to its nearest patch outside its own window."""
    h, w, c = grid.shape
    flat = grid.reshape(-1, c).astype(np.float32, copy=False)
    sq = np.einsum("pc,pc->p", flat, flat)
    d2 = sq[:, None] - 2.0 * (flat @ flat.T) + sq[None, :]
    ys, xs = np.divmod(np.arange(h * w), w)
    near = (np.abs(ys[:, None] - ys[None, :]) <= radius) & (
        np.abs(xs[:, None] - xs[None, :]) <= radius
    )
    d2[near] = np.inf
    best = d2.min(axis=1)
    if not np.isfinite(best).all():
        raise ValueError(f"a {h}x{w} grid has no patch outside a radius of {radius}; lower it")
    return np.sqrt(np.maximum(best, 0.0)).reshape(h, w)


def greedy_coreset(
    features: np.ndarray, size: int, *, seed: int = 0, projection_dim: int = 128
) -> np.ndarray:
    """Indices of ``size`` rows chosen by greedy k-center (PatchCore), in selection order.

    Distances are measured after a random Gaussian projection to ``projection_dim`` dimensions, as
    PatchCore does, which keeps them approximately (Johnson-Lindenstrauss) and the loop cheap.
    """
    count = features.shape[0]
    if size >= count:
        return np.arange(count)
    if size < 1:
        raise ValueError(f"coreset size must be at least 1, got {size}")
    rng = np.random.default_rng(seed)
    points = features.astype(np.float32, copy=False)
    if points.shape[1] > projection_dim:
        projection = rng.normal(size=(points.shape[1], projection_dim)).astype(np.float32)
        points = points @ (projection / np.sqrt(projection_dim))
    chosen = np.empty(size, dtype=np.int64)
    chosen[0] = rng.integers(count)
    min_sq = np.sum((points - points[chosen[0]]) ** 2, axis=1)
    for i in range(1, size):
        chosen[i] = int(np.argmax(min_sq))
        np.minimum(min_sq, np.sum((points - points[chosen[i]]) ** 2, axis=1), out=min_sq)
    return chosen
