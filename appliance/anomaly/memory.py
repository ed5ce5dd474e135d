"""The memory of normal appearance and how a test image is scored against it.

PatchCore keeps the patch embeddings of normal images and calls a test patch anomalous when it is
far from every one of them. This bank improves on that with two ideas (seed 002, MSSPMM):

* **Multi-scale.** Each backbone depth keeps its own patches and gives its own distance map. Maps
  are divided by the layer's spread (root mean squared distance of its normal patches to their mean,
  so that depths with larger activations do not dominate), upsampled to the working size and
  averaged with per-layer weights (``ScoringConfig.layer_weights``; by default the stride-16 map
  counts twice, ``LAYER_WEIGHTS``). The upsampling puts each cell where the backbone really
  centres it (``ScoringConfig.cell_offsets`` from ``geometry``: TF "SAME" padding sits stride-8
  cells 3.5 px and stride-16 cells 7.5 px down-right of the ``align_corners=False`` assumption).
* **Self-prompt.** The normal shot that best matches the test image (lowest mean position-aware
  distance on the coarsest layer) is a prompt of what the image should look like. Each layer's map
  is ``(1 - w) * global + w * local``: the global nearest-neighbour distance, and the distance to
  that shot's patches within ``local_radius_px`` of the same place, which catches patches that are
  normal somewhere but wrong here (a part in the wrong position, a missing feature).

The heatmap is the fused map Gaussian-smoothed with sigma 4 px, as anomalib does. The image score is
the maximum of the same fused map smoothed with ``ScoringConfig.score_sigma`` (2 px by default,
``SCORE_SIGMA``): the smoothing already averages over a few dozen pixels, so the maximum is stable,
whereas a top-k mean dilutes small defects, which are the common case on a production line; the
narrower kernel keeps more of a small defect's peak. Like PatchCore, that maximum is then
re-weighted (``ScoringConfig.reweight_neighbors``, ``patchcore_weight``): each layer's patch under
the peak is weighted by how isolated its nearest memory patch is among its neighbours, and the
maximum is multiplied by the mean weight over layers (the heatmap itself is left as it is). The bank saves to ``.npz`` (no
pickle).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from appliance.anomaly.distance import (
    DEFAULT_CHUNK_ELEMENTS,
    greedy_coreset,
    local_distance,
    nn_distance,
    self_excluded_nn,
)
from appliance.anomaly.resample import gaussian_smooth, resize_bilinear

NPZ_FORMAT = 1
# Weight of the self-prompt term. On magnetic tile (unaligned texture, k = 1..16) 0.25 was neutral to
# slightly better than 0 and 0.5 slightly worse; aligned parts are where the positional term helps.
PROMPT_WEIGHT = 0.25
# PatchCore's image-score re-weighting with anomalib's num_neighbors (``patchcore_weight``). On
# magnetic tile (k = 1, 2, 4, 16, 3 seeds each) it never lowered image AUROC (+0.000 to +0.003,
# +0.001 on average); pixel AUROC cannot change (the heatmap is not re-weighted).
REWEIGHT_NEIGHBORS = 9
# The coarse (stride-16) map counts twice in the fused heatmap, and the image score is taken from
# the fused map smoothed with sigma 2 px instead of the heatmap's 4. Chosen on a split of Magnetic
# tile disjoint in normal images from the reporting set (bench/anomaly_quality.py); on the
# reporting set (5 seeds) it raised mean image AUROC by +0.007 to +0.013 at every k, pixel AUROC
# moved -0.003 to +0.003, and it leads PatchCore on both at every k (docs/benchmarks.md).
# Bundles enrolled before these keys score as before (weights 1, sigma 4).
LAYER_WEIGHTS = {"s16": 2.0}
SCORE_SIGMA = 2.0


@dataclass(frozen=True)
class ScoringConfig:
    working_size: tuple[int, int] = (256, 256)
    local_radius_px: int = 16
    prompt_weight: float = PROMPT_WEIGHT
    sigma: float = 4.0
    chunk_elements: int = DEFAULT_CHUNK_ELEMENTS
    # layer -> (dy, dx) px: where its cells sit vs. align_corners=False (``geometry.cell_offsets``)
    cell_offsets: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    # PatchCore's image-score re-weighting with this many memory neighbours (``patchcore_weight``);
    # 0: off, the image score is the heatmap maximum alone
    reweight_neighbors: int = REWEIGHT_NEIGHBORS
    # layer -> weight of its normalised map in the fused heatmap (a layer not named: 1)
    layer_weights: Mapping[str, float] = field(default_factory=lambda: dict(LAYER_WEIGHTS))
    # sigma (px) of the smoothing the image score is taken from; None: the heatmap's ``sigma``
    score_sigma: float | None = SCORE_SIGMA

    def weights(self, layers: Sequence[str]) -> list[float]:
        """The fusion weight of each layer (none recorded: 1, a plain mean)."""
        return [float(self.layer_weights.get(layer, 1.0)) for layer in layers]

    def offsets(self, layers: Sequence[str]) -> list[tuple[float, float]]:
        """The heatmap offset of each layer (none recorded: no shift)."""
        return [tuple(self.cell_offsets.get(layer, (0.0, 0.0))) for layer in layers]

    def radius(self, grid_height: int) -> int:
        """The self-prompt window radius in patches of a grid of this height (at least 1)."""
        stride = self.working_size[0] / grid_height
        return max(1, round(self.local_radius_px / stride))


@dataclass(frozen=True)
class Scored:
    heatmap: np.ndarray  # (H, W) float32 at the working size, smoothed
    score: float
    nearest: int  # index of the best-matching normal shot


def layer_spread(shots: np.ndarray) -> float:
    """Root mean squared distance of the (S, h, w, C) patches to their mean (never zero)."""
    flat = shots.reshape(-1, shots.shape[-1]).astype(np.float64)
    spread = float(np.sqrt(np.mean(np.sum((flat - flat.mean(axis=0)) ** 2, axis=1))))
    return spread if spread > 1e-12 else 1.0


def patchcore_weight(query: np.ndarray, bank: np.ndarray, num_neighbors: int) -> float:
    """PatchCore's image-score weight of the most anomalous test patch ``query`` (C,).

    ``m*`` is the query's nearest row of ``bank`` (M, C) and ``N`` the ``num_neighbors`` rows
    nearest to ``m*`` (``m*`` itself among them); the weight is ``1 - softmax(d(query, N))`` taken
    at ``m*``, i.e. ``1 - exp(d(query, m*)) / sum_n exp(d(query, n))`` (anomalib
    ``PatchcoreModel.compute_anomaly_score``). It lies in [1 - 1/|N|, 1): near 1 when ``m*`` is
    isolated in the bank (its neighbours are far from the query), lowest when they are as near
    to the query as ``m*``. Distances are the layer's raw ones, as anomalib's.
    """
    bank = bank.astype(np.float64, copy=False)
    to_query = np.sqrt(np.sum((bank - query.astype(np.float64)) ** 2, axis=1))
    nearest = int(np.argmin(to_query))
    to_nearest = np.sum((bank - bank[nearest]) ** 2, axis=1)
    # m* is 0 from itself, so it is first (stable sort: before any exact duplicate)
    support = np.argsort(to_nearest, kind="stable")[: min(num_neighbors, len(bank))]
    distances = to_query[support]
    exps = np.exp(distances - distances.max())  # the shift cancels in the ratio
    return float(1.0 - exps[0] / exps.sum())


def peak_cell(heatmap: np.ndarray, grid_shape: tuple[int, int]) -> tuple[int, int]:
    """The (row, col) of a (h, w) grid whose cell holds the heatmap's maximum (first if tied)."""
    y, x = np.unravel_index(int(np.argmax(heatmap)), heatmap.shape)
    return (
        min(grid_shape[0] - 1, y * grid_shape[0] // heatmap.shape[0]),
        min(grid_shape[1] - 1, x * grid_shape[1] // heatmap.shape[1]),
    )


def blend_maps(
    maps: Sequence[np.ndarray],
    size: tuple[int, int],
    offsets: Sequence[tuple[float, float]] | None = None,
    weights: Sequence[float] | None = None,
) -> np.ndarray:
    """Weighted mean (``sum w_l m_l / sum w_l``; default: plain mean) of per-layer distance maps
    upsampled (bilinear, cell offsets corrected) to ``size``."""
    offsets = offsets or [(0.0, 0.0)] * len(maps)
    weights = np.asarray(weights if weights is not None else [1.0] * len(maps), dtype=np.float64)
    if weights.shape != (len(maps),) or not np.all(weights >= 0) or weights.sum() <= 0:
        raise ValueError(f"layer weights {weights.tolist()}: one per map, >= 0, not all 0")
    upsampled = [resize_bilinear(m, size, o) for m, o in zip(maps, offsets, strict=True)]
    if np.all(weights == weights[0]):
        return np.mean(upsampled, axis=0).astype(np.float32, copy=False)
    fused = np.tensordot(weights / weights.sum(), np.stack(upsampled), axes=1)
    return fused.astype(np.float32)


def heatmap_and_score_map(
    maps: Sequence[np.ndarray], layers: Sequence[str], config: ScoringConfig
) -> tuple[np.ndarray, np.ndarray]:
    """The heatmap (smoothed with ``config.sigma``) and the map the image score is taken from
    (smoothed with ``config.score_sigma``; the heatmap itself when that is None or equal)."""
    blended = blend_maps(maps, config.working_size, config.offsets(layers), config.weights(layers))
    heatmap = gaussian_smooth(blended, config.sigma)
    if config.score_sigma is None or config.score_sigma == config.sigma:
        return heatmap, heatmap
    return heatmap, gaussian_smooth(blended, config.score_sigma)


class MemoryBank:
    """Per-layer pooled patches of the normal shots, plus the (optionally coreset) search bank."""

    def __init__(
        self,
        names: Sequence[str],
        shots: dict[str, np.ndarray],
        scales: dict[str, float],
        indices: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.names = tuple(names)
        self.shots = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in shots.items()}
        self.layers = tuple(self.shots)
        self.scales = {k: float(scales[k]) for k in self.layers}
        self.indices = dict(indices or {})
        for layer, grid in self.shots.items():
            if grid.ndim != 4 or grid.shape[0] != len(self.names):
                raise ValueError(
                    f"layer {layer}: expected ({len(self.names)}, h, w, C), got {grid.shape}"
                )
        self._banks = {layer: self._flat_bank(layer) for layer in self.layers}

    def _flat_bank(self, layer: str) -> np.ndarray:
        flat = self.shots[layer].reshape(-1, self.shots[layer].shape[-1])
        return flat[self.indices[layer]] if layer in self.indices else flat

    @classmethod
    def from_features(
        cls,
        names: Sequence[str],
        shots: dict[str, np.ndarray],
        *,
        max_patches: int | None = None,
        scales: dict[str, float] | None = None,
        seed: int = 0,
    ) -> MemoryBank:
        """Build from (S, h, w, C) grids per layer, finest first; coreset above ``max_patches``."""
        if not names:
            raise ValueError("a memory bank needs at least one normal image")
        scales = scales or {layer: layer_spread(grid) for layer, grid in shots.items()}
        indices = {}
        for layer, grid in shots.items():
            flat = grid.reshape(-1, grid.shape[-1])
            if max_patches is not None and flat.shape[0] > max_patches:
                indices[layer] = np.sort(greedy_coreset(flat, max_patches, seed=seed))
        return cls(names, shots, scales, indices)

    def __len__(self) -> int:
        return len(self.names)

    def bank(self, layer: str) -> np.ndarray:
        return self._banks[layer]

    def without(self, index: int, *, max_patches: int | None = None) -> MemoryBank:
        """The bank of every shot but ``index`` (same layer scales), for leave-one-out."""
        keep = [i for i in range(len(self)) if i != index]
        shots = {layer: grid[keep] for layer, grid in self.shots.items()}
        names = [self.names[i] for i in keep]
        return MemoryBank.from_features(names, shots, max_patches=max_patches, scales=self.scales)

    def _check(self, grids: dict[str, np.ndarray]) -> None:
        for layer in self.layers:
            if layer not in grids:
                raise ValueError(
                    f"features lack layer {layer!r}; the bank was built on {self.layers}"
                )
            if grids[layer].shape != self.shots[layer].shape[1:]:
                raise ValueError(
                    f"layer {layer}: test grid {grids[layer].shape} differs from the "
                    f"bank's {self.shots[layer].shape[1:]}; use the enrolled working size"
                )

    def nearest_shot(self, grids: dict[str, np.ndarray], config: ScoringConfig) -> int:
        """The self-prompt: the shot with the lowest mean local distance on the coarsest layer."""
        coarse = self.layers[-1]
        grid = grids[coarse]
        distances = local_distance(grid, self.shots[coarse], config.radius(grid.shape[0]))
        return int(np.argmin(distances.mean(axis=(1, 2))))

    def layer_map(
        self, layer: str, grid: np.ndarray, nearest: int, config: ScoringConfig
    ) -> np.ndarray:
        """One layer's (h, w) normalised distance map, global and self-prompt terms combined."""
        h, w, c = grid.shape
        global_map = nn_distance(grid.reshape(-1, c), self._banks[layer], config.chunk_elements)
        combined = global_map.reshape(h, w)
        if config.prompt_weight > 0:
            prompt = self.shots[layer][nearest : nearest + 1]
            local = local_distance(grid, prompt, config.radius(h))[0]
            combined = (1.0 - config.prompt_weight) * combined + config.prompt_weight * local
        return combined / self.scales[layer]

    def score(self, grids: dict[str, np.ndarray], config: ScoringConfig) -> Scored:
        """Heatmap, image score and self-prompt of one image's (h, w, C) grids per layer."""
        self._check(grids)
        nearest = self.nearest_shot(grids, config)
        maps = [self.layer_map(layer, grids[layer], nearest, config) for layer in self.layers]
        heatmap, score_map = heatmap_and_score_map(maps, self.layers, config)
        score = float(score_map.max())
        if config.reweight_neighbors > 0:
            score *= self._peak_weight(score_map, grids, config)
        return Scored(heatmap, score, nearest)

    def _peak_weight(
        self, score_map: np.ndarray, grids: dict[str, np.ndarray], config: ScoringConfig, own=False
    ) -> float:
        """Mean over layers of PatchCore's weight (``patchcore_weight``) of the patch under the
        maximum of ``score_map``, against the layer's bank (``own``: the image's own patches
        outside the self-prompt window, as ``self_score`` does)."""
        weights = []
        for layer in self.layers:
            grid = grids[layer]
            y, x = peak_cell(score_map, grid.shape[:2])
            if own:
                radius = max(0, min(config.radius(grid.shape[0]), (max(grid.shape[:2]) - 2) // 2))
                ys, xs = np.divmod(np.arange(grid.shape[0] * grid.shape[1]), grid.shape[1])
                outside = (np.abs(ys - y) > radius) | (np.abs(xs - x) > radius)
                bank = grid.reshape(-1, grid.shape[-1])[outside]
            else:
                bank = self._banks[layer]
            weights.append(patchcore_weight(grid[y, x], bank, config.reweight_neighbors))
        return float(np.mean(weights))

    def self_score(self, index: int, config: ScoringConfig) -> Scored:
        """Score shot ``index`` against its own patches away from each position (one shot only)."""
        maps = []
        for layer in self.layers:
            grid = self.shots[layer][index]
            # The window must leave some patch outside it, even on a small grid.
            radius = min(config.radius(grid.shape[0]), (max(grid.shape[:2]) - 2) // 2)
            maps.append(self_excluded_nn(grid, max(radius, 0)) / self.scales[layer])
        heatmap, score_map = heatmap_and_score_map(maps, self.layers, config)
        score = float(score_map.max())
        if config.reweight_neighbors > 0:
            own = {layer: grid[index] for layer, grid in self.shots.items()}
            score *= self._peak_weight(score_map, own, config, own=True)
        return Scored(heatmap, score, index)

    def save(self, path: Path) -> None:
        arrays = {
            "format": np.array(NPZ_FORMAT),
            "names": np.array(self.names, dtype=np.str_),
            "layers": np.array(self.layers, dtype=np.str_),
            "scales": np.array([self.scales[k] for k in self.layers], dtype=np.float64),
        }
        arrays.update({f"shots_{k}": v for k, v in self.shots.items()})
        arrays.update({f"index_{k}": v for k, v in self.indices.items()})
        with open(path, "wb") as handle:
            np.savez(handle, **arrays)

    @classmethod
    def load(cls, path: Path) -> MemoryBank:
        with np.load(path, allow_pickle=False) as data:
            if int(data["format"]) != NPZ_FORMAT:
                raise ValueError(
                    f"{path}: memory format {int(data['format'])}, "
                    f"this appliance reads {NPZ_FORMAT}; re-enrol"
                )
            layers = [str(k) for k in data["layers"]]
            shots = {k: data[f"shots_{k}"] for k in layers}
            indices = {k: data[f"index_{k}"] for k in layers if f"index_{k}" in data.files}
            scales = dict(zip(layers, data["scales"].tolist(), strict=True))
            names = [str(n) for n in data["names"]]
        return cls(names, shots, scales, indices)
