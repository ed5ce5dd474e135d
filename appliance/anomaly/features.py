"""Multi-scale patch embeddings from the ONNX backbone.

The backbone (EfficientNet-Lite0 exported by ``export/efficientnet_lite0.py``) takes ``image``
float32 [N, 3, H, W] and returns feature maps named after their stride (``s4``, ``s8``, ``s16``).
Each selected map is locally aggregated with PatchCore's 3x3 average pooling and kept per layer,
because the memory bank scores every depth separately (multi-scale) before fusing the distance maps.
``fuse`` also gives PatchCore's single concatenated embedding for callers that want it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from appliance.anomaly.resample import avg_pool3x3, resize_bilinear
from appliance.backends.onnxrt import create_session

INPUT_NAME = "image"
DEFAULT_LAYERS = ("s8", "s16")


@dataclass(frozen=True)
class PatchFeatures:
    """Pooled feature grids per layer, each (N, h, w, C), finest layer first."""

    layers: dict[str, np.ndarray]

    @property
    def count(self) -> int:
        return next(iter(self.layers.values())).shape[0]

    def image(self, index: int) -> dict[str, np.ndarray]:
        """The (h, w, C) grids of one image."""
        return {name: grid[index] for name, grid in self.layers.items()}

    def fused(self) -> np.ndarray:
        return fuse(self.layers)


def order_by_resolution(grids: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Same grids, finest spatial grid first (stable for equal sizes)."""
    return dict(sorted(grids.items(), key=lambda item: -item[1].shape[1] * item[1].shape[2]))


def pool_outputs(raw: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Backbone outputs (N, C, h, w) -> pooled (N, h, w, C) per layer, finest first."""
    pooled = {name: avg_pool3x3(np.transpose(out, (0, 2, 3, 1))) for name, out in raw.items()}
    return order_by_resolution(pooled)


def fuse(layers: dict[str, np.ndarray]) -> np.ndarray:
    """Upsample every (N, h, w, C) grid to the finest one (bilinear) and concatenate channels."""
    ordered = order_by_resolution(layers)
    finest = next(iter(ordered.values()))
    size = finest.shape[1:3]
    resized = [
        np.moveaxis(resize_bilinear(np.moveaxis(g, 0, 2), size), 2, 0) for g in ordered.values()
    ]
    return np.concatenate(resized, axis=-1)


class FeatureExtractor:
    """An ONNX Runtime session around the backbone, returning pooled multi-scale patch features."""

    def __init__(
        self,
        onnx_path: Path,
        layers: Sequence[str] = DEFAULT_LAYERS,
        providers: Sequence[str] | None = None,
    ) -> None:
        if not layers:
            raise ValueError("select at least one backbone layer, e.g. ('s8', 's16')")
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise FileNotFoundError(f"backbone {self.onnx_path} does not exist")
        self.layers = tuple(layers)
        self.session = create_session(self.onnx_path, list(providers or ["CPUExecutionProvider"]))
        self._check_io()

    def _check_io(self) -> None:
        inputs = [i.name for i in self.session.get_inputs()]
        outputs = {o.name for o in self.session.get_outputs()}
        if inputs != [INPUT_NAME]:
            raise ValueError(
                f"{self.onnx_path}: backbone inputs are {inputs}, expected [{INPUT_NAME!r}]; "
                "re-export it with export/efficientnet_lite0.py"
            )
        missing = [name for name in self.layers if name not in outputs]
        if missing:
            raise ValueError(
                f"{self.onnx_path}: backbone has no output(s) {missing}; it offers "
                f"{sorted(outputs)}, so choose layers among those"
            )

    def __call__(self, batch: np.ndarray) -> PatchFeatures:
        """Features of a preprocessed float32 batch (N, 3, H, W)."""
        if batch.ndim != 4 or batch.shape[1] != 3:
            raise ValueError(f"expected a (N, 3, H, W) batch, got shape {batch.shape}")
        outputs = self.session.run(
            list(self.layers), {INPUT_NAME: batch.astype(np.float32, copy=False)}
        )
        return PatchFeatures(pool_outputs(dict(zip(self.layers, outputs, strict=True))))
