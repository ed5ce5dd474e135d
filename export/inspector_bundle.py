"""``appliance export``: a trained inspector checkpoint becomes a ``vlm`` bundle the daemon serves.

Steps (each exporter returns the path it wrote):

1. Load the checkpoint and merge LoRA into the language model (peft ``merge_and_unload``).
2. Vision (tower + pool + projector) → ONNX; parity torch vs ONNX Runtime on fixed probes.
3. Language model → GGUF (F32 or F16 reference, tokenizer and chat template embedded), then the
   requested quantization through llama.cpp; the tensors that fell back to another type are listed.
4. The served prompt as segments; the parity gate: transformers vs llama.cpp logits after the prompt
   (with a probe image's embeddings) and along transformers' greedy continuation, for the reference
   GGUF (strict) and for the served quantization (drift recorded, loose gate).
5. Optionally a TensorRT engine for the vision graph (``export.tensorrt``) where TensorRT and a GPU
   are present.
6. The manifest (taxonomy, schema, prompt, preprocessing, image-token count, parity numbers,
   versions, sha256 of every file), written last; the bundle directory appears atomically.

An export whose parity is beyond tolerance fails (``ExportError``) and leaves nothing at ``out``.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from appliance.bundle import Bundle, write_manifest
from export.formats import QUANT_TYPES
from export.language import (
    PROMPT_EMBEDDINGS,
    llama_logits,
    logit_drift,
    prompt_segments,
    serving_messages,
    transformers_greedy,
)
from export.vision import export_vision_onnx, probe_pixels, vision_parity

log = logging.getLogger(__name__)
VISION_FILE = "vision.onnx"
CHECKPOINT_DIR = "checkpoint"  # the training checkpoint inside a bundle (``with_checkpoint``)


class ExportError(RuntimeError):
    """The export cannot produce a bundle that answers as the checkpoint does."""


@dataclass(frozen=True)
class Tolerances:
    """Parity gates. Vision and the reference GGUF are compared relative to the output scale."""

    vision_rel: float = 1e-4
    reference_rel: dict | None = None  # per reference type: F32 1e-3, F16 2e-2
    quant_min_cosine: float = 0.90
    probe_tokens: int = 16

    def reference(self, qtype: str) -> float:
        return (self.reference_rel or {"F32": 1e-3, "F16": 2e-2})[qtype]


def _load(checkpoint: Path):
    from train.checkpoint import load_inspector

    model, tokenizer, meta = load_inspector(checkpoint, trainable=False)
    if hasattr(model.lm, "merge_and_unload"):
        model.lm = model.lm.merge_and_unload()
    return model.eval(), tokenizer, meta


def _source_gguf(meta: dict) -> Path | None:
    spec = meta["recipe"]["model"]["lm"]
    if spec.get("path") and spec.get("gguf_file"):
        return Path(spec["path"]) / spec["gguf_file"]
    return None


def _gate(name: str, numbers: dict, limit_rel: float) -> None:
    allowed = limit_rel * max(1.0, numbers["scale"])
    if numbers["max_abs_diff"] > allowed:
        raise ExportError(
            f"{name} parity failed: max abs diff {numbers['max_abs_diff']:.3g} > {allowed:.3g} "
            f"(tolerance {limit_rel:g} x output scale {numbers['scale']:.3g}); the exported "
            "model would not answer as the checkpoint does"
        )


def _normalisation(meta: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from train.recipe import recipe_from_json

    return recipe_from_json(meta["recipe"]).model.normalisation


def _stop_ids(tokenizer) -> set[int]:
    from train.tokenizer import stop_ids

    return stop_ids(tokenizer)


def export_language_model(
    model,
    tokenizer,
    work: Path,
    quant: str,
    segments: list[dict],
    probe: torch.Tensor,
    tol: Tolerances,
    source_gguf: Path | None = None,
):
    """``model.lm`` → GGUF in ``work`` with the parity gate; returns (served path, parity, quant).

    ``model`` has ``lm`` (a transformers causal LM) and ``prompt`` (the learned prompt embeddings
    when ``segments`` has an embeddings segment); ``probe`` is one image's embeddings. The reference
    GGUF (F32 or F16) must give transformers' logits along its greedy answer; a quantized one must
    stay within ``tol.quant_min_cosine`` of the reference."""
    from export.gguf_convert import convert_to_gguf

    reference_type = "F32" if quant == "F32" else "F16"
    reference = convert_to_gguf(
        model.lm,
        tokenizer,
        work / f"language_model.{reference_type}.gguf",
        outtype=reference_type.lower(),
        source_gguf=source_gguf,
    )
    tokens, hf_logits = transformers_greedy(
        model, segments, probe, _stop_ids(tokenizer), tol.probe_tokens
    )
    cont = tokens[: len(hf_logits) - 1]
    kv = "f32" if reference_type == "F32" else "f16"
    ref_logits = llama_logits(reference, segments, work, probe.numpy(), cont, kv)
    parity = {reference_type: logit_drift(hf_logits, ref_logits)}
    _gate(
        f"language model ({reference_type} GGUF vs transformers)",
        parity[reference_type],
        tol.reference(reference_type),
    )
    quantization = None
    served = reference
    if quant not in ("F32", "F16"):
        from export.quantize import quantize_gguf

        result = quantize_gguf(reference, work / f"language_model.{quant}.gguf", quant)
        quantization = {
            "type": quant,
            "bytes": result.size_bytes,
            "fallbacks": [asdict(f) for f in result.fallbacks],
        }
        drift = logit_drift(
            ref_logits, llama_logits(result.path, segments, work, probe.numpy(), cont)
        )
        parity[quant] = {**drift, "against": reference_type}
        if drift["min_cosine"] < tol.quant_min_cosine:
            raise ExportError(
                f"{quant} drifts too far from {reference_type}: min cosine "
                f"{drift['min_cosine']:.4f} < {tol.quant_min_cosine}; use a wider type"
            )
        reference.unlink()
        served = result.path
    return served, parity, quantization


def _tensorrt(work: Path, precision: str, input_size: tuple[int, int]) -> dict:
    """Build the engine where possible; else say why (the appliance's ONNX Runtime TensorRT
    provider then builds and caches engines on the factory PC at first start)."""
    from export.tensorrt import TensorRTUnavailable, build_vision_engine

    try:
        engine = build_vision_engine(work / VISION_FILE, work, precision, input_size)
    except TensorRTUnavailable as exc:
        log.warning("%s; the bundle carries ONNX only", exc)
        return {"precision": precision, "file": None, "not_built": str(exc)}
    return {"precision": precision, "file": engine.name}


def library_versions() -> dict:
    import importlib.metadata as md

    out = {}
    for name in (
        "torch",
        "transformers",
        "peft",
        "onnx",
        "onnxruntime-gpu",
        "gguf",
        "llama-cpp-python",
    ):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            continue
    return out


def export_bundle(
    checkpoint: Path,
    out: Path,
    *,
    quant: str = "Q8_0",
    tensorrt: str | None = None,
    max_tokens: int = 512,
    tolerances: Tolerances | None = None,
    with_checkpoint: bool = False,
) -> Bundle:
    """Export ``checkpoint`` into the bundle directory ``out`` (must not exist).

    ``with_checkpoint`` copies the checkpoint into the bundle (``checkpoint/``, hashed like every
    file) so that ``appliance retrain`` on the factory PC can continue training from it."""
    if quant not in QUANT_TYPES:
        raise ExportError(f"--quant {quant!r} is not one of {', '.join(QUANT_TYPES)}")
    out, tol = Path(out), tolerances or Tolerances()
    if out.exists():
        raise ExportError(f"{out} exists; choose a new bundle directory")
    work = out.with_name(f".{out.name}.partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        if with_checkpoint:
            shutil.copytree(checkpoint, work / CHECKPOINT_DIR, ignore=shutil.ignore_patterns(".*"))
        bundle = _export_into(Path(checkpoint), work, quant, tensorrt, max_tokens, tol)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    work.rename(out)
    return Bundle(out, bundle.manifest)


def _export_into(checkpoint, work, quant, tensorrt, max_tokens, tol) -> Bundle:
    from appliance.taxonomy import Taxonomy

    torch.manual_seed(0)
    model, tokenizer, meta = _load(checkpoint)
    input_size = tuple(meta["input_size"])
    image_tokens = int(meta["image_tokens"])
    log.info("vision → ONNX")
    export_vision_onnx(model, input_size, work / VISION_FILE)
    pixels = probe_pixels(input_size)
    vision = vision_parity(model, work / VISION_FILE, pixels)
    _gate("vision (ONNX vs torch)", vision, tol.vision_rel)
    prompt_adapter = model.prompt is not None
    if prompt_adapter:
        np.save(work / PROMPT_EMBEDDINGS, model.prompt.detach().float().numpy())
    taxonomy = Taxonomy.from_dict(meta["taxonomy"])
    messages, envelope = serving_messages(meta["stage"], taxonomy, input_size)
    segments = prompt_segments(tokenizer, messages, image_tokens, prompt_adapter=prompt_adapter)
    with torch.no_grad():
        probe = model.encode_images(torch.from_numpy(pixels[:1]))[0]
    log.info("language model → GGUF (%s)", quant)
    served, parity, quantization = export_language_model(
        model, tokenizer, work, quant, segments, probe, tol, _source_gguf(meta)
    )
    engines = {}
    if tensorrt:
        engines["tensorrt"] = _tensorrt(work, tensorrt, input_size)
    section = {
        "vision": VISION_FILE,
        "language_model": served.name,
        "quantization": quant,
        "image_tokens": image_tokens,
        "n_embd": int(model.lm.get_input_embeddings().embedding_dim),
        "preprocess": {
            "input_size": list(input_size),
            # per RGB channel, from the recipe in the checkpoint's meta (the vision tower's own)
            "mean": list(_normalisation(meta)[0]),
            "std": list(_normalisation(meta)[1]),
            "resize": "bilinear (PIL)",
            "channels": "RGB",
            "layout": "NCHW",
        },
        "prompt": {
            "messages": messages,
            "envelope": envelope,
            "chat_template": tokenizer.chat_template,
            "segments": segments,
        },
        "max_tokens": max_tokens,
        # f32 bundles are the identity reference: an f16 KV cache alone moves logits by ~1e-2.
        "kv_cache_type": "f32" if quant == "F32" else "f16",
        "n_ctx": min(4096, int(getattr(model.lm.config, "max_position_embeddings", 4096))),
        "engines": engines,
    }
    export = {
        "checkpoint": str(checkpoint),
        "stage": meta["stage"],
        "step": meta["step"],
        "recipe_digest": meta["recipe_digest"],
        "adapter": meta["adapter"],
        "quantization": quantization,
    }
    return write_manifest(
        work,
        kind="vlm",
        taxonomy=taxonomy,
        sections={"vlm": section, "export": export, "parity": {"vision": vision, **parity}},
        versions=library_versions(),
    )


def summary(bundle: Bundle) -> str:
    parity = bundle.manifest["parity"]
    return json.dumps(
        {
            "bundle": str(bundle.path),
            "id": bundle.id,
            "language_model": bundle.manifest["vlm"]["language_model"],
            "parity": parity,
        },
        indent=2,
    )
