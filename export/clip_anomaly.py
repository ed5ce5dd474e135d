"""The CLIP anomaly branch as an ONNX graph and a ``clip-anomaly`` bundle.

``export_graph`` traces ``train.clip_anomaly.net.ClipAnomalyNet``: the VV-CLIP global and local
paths, the TDDF focuser maps (text embeddings baked in as constants, so the runtime needs no text
encoder), and, in few-shot mode, the self-prompted multi-scale memory distances with the memory as
graph inputs. ``parity`` runs the graph in ONNX Runtime against torch and returns the largest
absolute difference per output. ``write_bundle`` enrols the normal shots (their CLS and local
features become ``memory.npz``), calibrates thresholds on them with the runtime's own heatmap
function, and writes the manifest (kind ``clip-anomaly``) with everything the runtime needs:
input size, mean / std, blocks, mode, label names, thresholds, versions.

With a ``Describer`` (the trained adapter's language model and tokenizer), the graph also outputs the
adapter's image embeddings and the bundle carries the description half of seed 002: the adapter's
learnable prompt embeddings, the frozen language model as GGUF (``export.inspector_bundle``'s
converter and parity gate, the same as trained inspectors), and the prompt as segments
``[P] [image] [prompt tokens]`` exactly as ``DescriptionModel.describe`` feeds it. The runtime then
writes the description with llama.cpp, greedy, token for token as transformers does.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from appliance.anomaly.clip_branch import BUNDLE_KIND, GRAPH, MEMORY, ClipSettings
from appliance.anomaly.clip_enroll import NORMALS_DIR, calibrate, save_normals
from appliance.bundle import Bundle, write_manifest
from appliance.taxonomy import Taxonomy
from export.formats import QUANT_TYPES
from export.inspector_bundle import ExportError, Tolerances, export_language_model, library_versions
from export.vision import probe_pixels
from train.clip_anomaly.net import ClipAnomalyNet

OPSET = 17
ZERO_SHOT_THRESHOLD = 0.5  # score scale is a probability-like [0, 1] when no normals calibrate it
DESCRIPTION_PROMPT = "description_prompt.npy"
GRAPH_TOLERANCE = 1e-3  # largest |torch - ONNX Runtime| of any graph output at export


@dataclass(frozen=True)
class Describer:
    """The description half: the (frozen) LM the adapter was trained into, and how to ship it."""

    lm: object  # transformers causal LM
    tokenizer: object  # its transformers tokenizer
    quant: str = "F16"  # F32 | F16 | Q8_0 | Q4_K_M | ... (``export.formats.QUANT_TYPES``)
    max_tokens: int = 48
    source_gguf: Path | None = None  # the GGUF the LM was loaded from, for its tokenizer keys


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
    for name in net.output_names:
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
            output_names=list(net.output_names),
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
    got = session.run(list(net.output_names), feeds)
    out = {}
    for name, ref, value in zip(net.output_names, expected, got, strict=True):
        if name == "prompt":
            out[name] = float(np.sum(ref.numpy() != value))
        else:
            out[name] = float(np.max(np.abs(ref.numpy() - value))) if value.size else 0.0
    return out


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
    describer: Describer | None = None,
) -> Bundle:
    """Export, enrol, calibrate and write a ``clip-anomaly`` bundle at ``out_dir`` (must not
    exist; the directory appears whole, or not at all when a step or a parity gate fails)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise ExportError(f"{out_dir} exists; choose a new bundle directory")
    if few_shot and (shots is None or shots.shape[0] == 0):
        raise ValueError("few-shot mode needs at least one normal shot; use few_shot=False")
    if describer is not None and net.adapter is None:
        raise ValueError("a describer needs the net's adapter: ClipAnomalyNet(..., adapter=...)")
    work = out_dir.with_name(f".{out_dir.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        bundle = _write_into(
            work, net, taxonomy, object_name, mean, std, shots, shot_names, few_shot, sigma,
            describer,
        )  # fmt: skip
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    work.rename(out_dir)
    return Bundle(out_dir, bundle.manifest)


def _write_into(
    work, net, taxonomy, object_name, mean, std, shots, shot_names, few_shot, sigma, describer
) -> Bundle:
    net = net.eval()
    export_graph(net, work / GRAPH, few_shot)
    height, width = net.vision.image_size
    probe = torch.from_numpy(probe_pixels((width, height), n=2))
    memory = net.enroll(shots) if few_shot else None
    checks = {"graph": parity(net, work / GRAPH, probe, memory)}
    _gate_graph(checks["graph"])
    settings = ClipSettings(
        graph=GRAPH,
        memory=MEMORY if few_shot else None,
        mode="few-shot" if few_shot else "zero-shot",
        input_size=(height, width),
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
    if memory is not None:
        with open(work / MEMORY, "wb") as handle:
            np.savez(handle, cls=memory[0].numpy(), blocks=memory[1].numpy())
    values = settings.to_dict()
    if shots is not None and shots.shape[0] > 0:
        values |= _calibrate(work, shots, settings, memory)
        if few_shot:  # kept for `appliance retrain`, which enrolls them again with new good parts
            images = _shot_images(shots, mean, std)
            save_normals(work / NORMALS_DIR, images, _names(shot_names, images))
    if describer is not None:
        values["description"], checks["description"] = _description(net, describer, work, probe)
    settings = ClipSettings.from_dict(values)
    return write_manifest(
        work,
        kind=BUNDLE_KIND,
        taxonomy=taxonomy,
        sections={"clip_anomaly": settings.to_dict(), "parity": checks},
        versions=_versions(describer is not None),
    )


def _calibrate(work: Path, shots: torch.Tensor, settings: ClipSettings, memory) -> dict:
    """Thresholds through the exported graph itself (the runtime's numbers, no torch)."""
    from appliance.backends.onnxrt import create_session

    session = create_session(work / GRAPH, ["CPUExecutionProvider"])
    feeds = None
    if memory is not None:
        feeds = {"memory_cls": memory[0].numpy(), "memory_blocks": memory[1].numpy()}
    return calibrate(session, shots.numpy(), settings, feeds)


def _shot_images(shots: torch.Tensor, mean, std) -> np.ndarray:
    """The uint8 RGB images the shots were normalised from (exact: x = (rgb/255 - mean) / std)."""
    pixels = shots.permute(0, 2, 3, 1).numpy() * np.asarray(std) + np.asarray(mean)
    return np.clip(np.round(pixels * 255.0), 0, 255).astype(np.uint8)


def _names(names: Sequence[str], images: np.ndarray) -> list[str]:
    return list(names) if len(names) == len(images) else [f"shot{i}" for i in range(len(images))]


def _gate_graph(diffs: dict[str, float]) -> None:
    worst = max((v, k) for k, v in diffs.items() if k != "prompt")
    if diffs["prompt"] or worst[0] > GRAPH_TOLERANCE:
        raise ExportError(
            f"ONNX graph parity failed: {worst[1]} differs from torch by {worst[0]:.3g} "
            f"(tolerance {GRAPH_TOLERANCE:g}), {int(diffs['prompt'])} self-prompt choices differ"
        )


def _description(net: ClipAnomalyNet, describer: Describer, work: Path, probe: torch.Tensor):
    """The description half into ``work``: prompt embeddings, GGUF LM, prompt segments, parity."""
    from train.clip_anomaly.adapter import PROMPT

    if describer.quant not in QUANT_TYPES:
        raise ExportError(f"quant {describer.quant!r} is not one of {', '.join(QUANT_TYPES)}")
    adapter = net.adapter
    np.save(work / DESCRIPTION_PROMPT, adapter.prompt.detach().float().numpy())
    prompt_ids = list(describer.tokenizer(PROMPT, add_special_tokens=False)["input_ids"])
    segments = [{"embeddings": DESCRIPTION_PROMPT}, {"image": True}, {"tokens": prompt_ids}]
    with torch.no_grad():
        visual = net(probe[:1])[-1][0]
    holder = SimpleNamespace(lm=describer.lm, prompt=adapter.prompt)
    served, checks, quantization = export_language_model(
        holder,
        describer.tokenizer,
        work,
        describer.quant,
        segments,
        visual,
        Tolerances(),
        describer.source_gguf,
    )
    length = adapter.prompt.shape[0] + adapter.image_tokens + len(prompt_ids)
    limit = int(getattr(describer.lm.config, "max_position_embeddings", 4096))
    section = {
        "language_model": served.name,
        "quantization": describer.quant,
        "quantized": quantization,
        "image_tokens": adapter.image_tokens,
        "n_embd": int(visual.shape[-1]),
        "segments": segments,
        "max_tokens": describer.max_tokens,
        "kv_cache_type": "f32" if describer.quant == "F32" else "f16",
        "n_ctx": min(limit, 256 * -(-(length + describer.max_tokens + 1) // 256)),
    }
    return section, checks


def _versions(description: bool) -> dict:
    import onnx
    import open_clip

    versions = {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "open_clip": open_clip.__version__,
    }
    if description:
        versions |= library_versions()
    return versions
