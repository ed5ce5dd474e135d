"""The inspector's vision half as ONNX: pixels → projected image embeddings, and its parity check.

The graph is ``vision tower → k x k adaptive pool → projector`` (``Inspector.encode_images``), so the
runtime gets exactly the ``k*k`` embeddings per image that the language model saw in training. The
batch dimension is dynamic; the input size is fixed by the recipe and recorded in the manifest.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

INPUT = "pixels"
OUTPUT = "image_embeddings"
OPSET = 17


class VisionGraph(nn.Module):
    """``Inspector.encode_images`` for one fixed input size, with the adaptive pool written as a
    fixed pooling matrix: the same numbers, and a graph every exporter and runtime handles (the
    TorchScript exporter cannot export an adaptive pool behind TF "SAME" padding)."""

    def __init__(self, inspector: nn.Module, input_size: tuple[int, int]) -> None:
        super().__init__()
        self.inspector = inspector
        width, height = input_size
        with torch.no_grad():
            _, _, h, w = inspector.vision(torch.zeros(1, 3, height, width)).shape
            basis = torch.eye(h * w).view(h * w, 1, h, w)
            pool = nn.functional.adaptive_avg_pool2d(basis, inspector.image_grid)
        self.register_buffer("pool", pool.reshape(h * w, -1))

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.inspector.vision(pixels).flatten(2) @ self.pool  # B x C x k*k
        return self.inspector.projector(features.transpose(1, 2))


def export_vision_onnx(inspector: nn.Module, input_size: tuple[int, int], out: Path) -> Path:
    """Write the vision graph for inputs of ``input_size`` (width, height); returns ``out``."""
    width, height = input_size
    graph = VisionGraph(inspector, input_size).eval()
    example = torch.zeros(2, 3, height, width)
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter: fast, and exact for these plain conv/pool/linear graphs.
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            graph,
            (example,),
            str(out),
            dynamo=False,
            input_names=[INPUT],
            output_names=[OUTPUT],
            dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}},
            opset_version=OPSET,
        )
    return Path(out)


def probe_pixels(input_size: tuple[int, int], n: int = 4, seed: int = 0) -> np.ndarray:
    """Fixed probe inputs in the model's normalised range (-1..1)."""
    width, height = input_size
    rng = np.random.default_rng(seed)
    return rng.uniform(-1.0, 1.0, size=(n, 3, height, width)).astype(np.float32)


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Max abs diff, the reference's scale, and the worst per-row cosine similarity."""
    ref = reference.reshape(reference.shape[0], -1).astype(np.float64)
    got = candidate.reshape(candidate.shape[0], -1).astype(np.float64)
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-12)
    return {
        "max_abs_diff": float(np.abs(ref - got).max()),
        "scale": float(np.abs(ref).max()),
        "min_cosine": float(cos.min()),
    }


def vision_parity(inspector: nn.Module, onnx_path: Path, pixels: np.ndarray) -> dict:
    """torch vs ONNX Runtime (CPU) on ``pixels``."""
    import onnxruntime as ort

    with torch.no_grad():
        reference = inspector.encode_images(torch.from_numpy(pixels)).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {INPUT: pixels})
    return {**compare(reference, got), "probes": int(pixels.shape[0])}
