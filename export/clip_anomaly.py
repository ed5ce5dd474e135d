"""The CLIP anomaly branch as an ONNX graph and a ``clip-anomaly`` bundle.

``export_graph`` traces ``train.clip_anomaly.net.ClipAnomalyNet``: the VV-CLIP global and local
paths, the TDDF focuser maps (text embeddings baked in as constants, so the runtime needs no text
encoder), and, in few-shot mode, the self-prompted multi-scale memory distances with the memory as
graph inputs. ``parity`` runs the graph in ONNX Runtime against torch and returns the largest
absolute difference per output. ``write_bundle`` enrols the normal shots (their CLS and local
features become ``memory.npz``), calibrates thresholds on them with the runtime's own heatmap
function, and writes the manifest (kind ``clip-anomaly``) with everything the runtime needs:
input size, mean / std, blocks, mode, label names, thresholds, versions.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from appliance.anomaly.calibrate import image_threshold, pixel_threshold
from appliance.anomaly.clip_branch import BUNDLE_KIND, GRAPH, MEMORY, ClipSettings, heatmap_from
from appliance.bundle import Bundle, write_manifest
from appliance.taxonomy import Taxonomy
from train.clip_anomaly.net import OUTPUTS, ClipAnomalyNet

OPSET = 17
ZERO_SHOT_THRESHOLD = 0.5  # score scale is a probability-like [0, 1] when no normals calibrate it


def _inputs(few_shot: bool) -> list[str]:
    return ["image", "memory_cls", "memory_blocks"] if few_shot else ["image"]


def export_graph(net: ClipAnomalyNet, path: Path, few_shot: bool = True) -> Path:
    """Write the ONNX graph (dynamic batch and, few-shot, dynamic shot count); return its path."""
    net = net.eval()
    height, width = net.vision.image_size
    image = torch.zeros(2, 3, height, width)
    args: tuple = (image,)
    axes = {"image": {0: "batch"}}
    if few_shot:
        memory_cls, memory_blocks = net.enroll(torch.randn(2, 3, height, width))
        args = (image, memory_cls, memory_blocks)
        axes.update({"memory_cls": {0: "shots"}, "memory_blocks": {1: "shots"}})
    for name in OUTPUTS:
        axes[name] = {1: "batch"} if name == "local" else {0: "batch"}
    fastpath = torch.backends.mha.get_fastpath_enabled()
    # nn.MultiheadAttention's fused eval fast path has no ONNX symbolic; trace the plain ops
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        _trace(net, args, path, few_shot, axes)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return Path(path)


def _trace(net: ClipAnomalyNet, args: tuple, path: Path, few_shot: bool, axes: dict) -> None:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about shape-dependent Python values
        torch.onnx.export(
            net,
            args,
            str(path),
            dynamo=False,
            input_names=_inputs(few_shot),
            output_names=list(OUTPUTS),
            dynamic_axes=axes,
            opset_version=OPSET,
        )


def parity(
    net: ClipAnomalyNet,
    path: Path,
    image: torch.Tensor,
    memory: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> dict[str, float]:
    """Largest |torch − ONNX Runtime| per output (``prompt``: count of differing indices)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feeds = {"image": image.numpy()}
    with torch.no_grad():
        expected = net(image, *memory) if memory is not None else net(image)
    if memory is not None:
        feeds.update({"memory_cls": memory[0].numpy(), "memory_blocks": memory[1].numpy()})
    got = session.run(list(OUTPUTS), feeds)
    out = {}
    for name, ref, value in zip(OUTPUTS, expected, got, strict=True):
        if name == "prompt":
            out[name] = float(np.sum(ref.numpy() != value))
        else:
            out[name] = float(np.max(np.abs(ref.numpy() - value))) if value.size else 0.0
    return out


def _calibration(
    net: ClipAnomalyNet, shots: torch.Tensor, settings: ClipSettings, few_shot: bool
) -> dict:
    """Thresholds from the shots: leave-one-out (few-shot, 2+ shots), else the shots themselves."""
    scores, maps = [], []
    with torch.no_grad():
        for index in range(shots.shape[0]):
            keep = [i for i in range(shots.shape[0]) if i != index] or [index]
            image = shots[index : index + 1]
            out = net(image, *net.enroll(shots[keep])) if few_shot else net(image)
            scores.append(float(out[5][0]))
            maps.append(heatmap_from(out[4][0].numpy(), settings.input_size, settings.sigma))
    method = "leave-one-out" if few_shot and shots.shape[0] > 1 else "self"
    image, image_rule = image_threshold(scores)
    pixel, pixel_rule = pixel_threshold(maps)
    return {
        "image_threshold": image,
        "pixel_threshold": min(pixel, image),
        "calibration": {"method": method, "image_rule": image_rule, "pixel_rule": pixel_rule},
    }


def write_bundle(
    out_dir: Path,
    net: ClipAnomalyNet,
    *,
    taxonomy: Taxonomy,
    object_name: str,
    mean: Sequence[float],
    std: Sequence[float],
    shots: torch.Tensor | None = None,
    shot_names: Sequence[str] = (),
    few_shot: bool = True,
    sigma: float = 4.0,
) -> Bundle:
    """Export, enrol, calibrate and write a ``clip-anomaly`` bundle in ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if few_shot and (shots is None or shots.shape[0] == 0):
        raise ValueError("few-shot mode needs at least one normal shot; use few_shot=False")
    export_graph(net, out_dir / GRAPH, few_shot)
    settings = ClipSettings(
        graph=GRAPH,
        memory=MEMORY if few_shot else None,
        mode="few-shot" if few_shot else "zero-shot",
        input_size=tuple(net.vision.image_size),
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
        blocks=tuple(net.vision.blocks),
        labels=tuple(taxonomy.labels),
        object_name=object_name,
        image_threshold=ZERO_SHOT_THRESHOLD,
        pixel_threshold=ZERO_SHOT_THRESHOLD,
        calibration={"method": "default"},
        sigma=sigma,
        shots=tuple(shot_names),
    )
    if few_shot:
        memory_cls, memory_blocks = net.enroll(shots)
        with open(out_dir / MEMORY, "wb") as handle:
            np.savez(handle, cls=memory_cls.numpy(), blocks=memory_blocks.numpy())
    if shots is not None and shots.shape[0] > 0:
        values = settings.to_dict() | _calibration(net, shots, settings, few_shot)
        settings = ClipSettings.from_dict(values)
    import onnx
    import open_clip

    versions = {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "open_clip": open_clip.__version__,
    }
    return write_manifest(
        out_dir,
        kind=BUNDLE_KIND,
        taxonomy=taxonomy,
        sections={"clip_anomaly": settings.to_dict()},
        versions=versions,
    )
