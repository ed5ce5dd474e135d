"""What each supported architecture needs to become a GGUF llama.cpp can run.

``gguf_convert`` is the same for every model: metadata, vocabulary, then one tensor after another.
What differs is here, one small ``ArchSpec`` per architecture: the hyperparameter keys llama.cpp
reads for it, and the per-tensor rewrites that turn a Hugging Face weight into the layout llama.cpp
computes with (llama's rotary permutation of q/k, Gemma's ``1 + w`` RMSNorm scale). The details
follow llama.cpp's own ``convert_hf_to_gguf.py`` and its model loader (``llama-model.cpp``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import gguf
import numpy as np


class GGUFConversionError(ValueError):
    """The model (architecture, hyperparameter, tensor or tokenizer) cannot be written as GGUF."""


def _get(config, name: str, arch: str):
    value = getattr(config, name, None)
    if value is None:
        raise GGUFConversionError(f"{arch}: the model config has no {name!r}, which GGUF needs")
    return value


def head_dim(config) -> int:
    explicit = getattr(config, "head_dim", None)
    return int(explicit or config.hidden_size // config.num_attention_heads)


def _rope_theta(params: dict, arch: str, where: str) -> float:
    kind = params.get("rope_type", "default")
    if kind not in ("default", "linear"):
        raise GGUFConversionError(
            f"{arch}: rope type {kind!r} ({where}) is not supported by this exporter; "
            "supported: default, linear"
        )
    return float(params["rope_theta"])


def _write_linear_scaling(writer: gguf.GGUFWriter, params: dict) -> None:
    if params.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(params["factor"]))


def write_common(writer: gguf.GGUFWriter, config, arch: str) -> None:
    """The keys every llama-style decoder shares."""
    writer.add_context_length(int(_get(config, "max_position_embeddings", arch)))
    writer.add_embedding_length(int(_get(config, "hidden_size", arch)))
    writer.add_block_count(int(_get(config, "num_hidden_layers", arch)))
    writer.add_feed_forward_length(int(_get(config, "intermediate_size", arch)))
    writer.add_head_count(int(_get(config, "num_attention_heads", arch)))
    writer.add_head_count_kv(
        int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    )
    writer.add_layer_norm_rms_eps(float(_get(config, "rms_norm_eps", arch)))
    writer.add_vocab_size(int(_get(config, "vocab_size", arch)))
    writer.add_rope_dimension_count(head_dim(config))
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))


def _write_llama(writer: gguf.GGUFWriter, config) -> None:
    write_common(writer, config, "llama")
    rope = dict(_get(config, "rope_parameters", "llama"))
    writer.add_rope_freq_base(_rope_theta(rope, "llama", "rope_parameters"))
    _write_linear_scaling(writer, rope)


def _write_qwen2(writer: gguf.GGUFWriter, config) -> None:
    if getattr(config, "use_sliding_window", False):
        raise GGUFConversionError("qwen2: use_sliding_window=True is not supported by llama.cpp")
    _write_llama(writer, config)


# llama.cpp hard-codes Gemma 3's layer pattern: five sliding-window layers, then one global.
GEMMA3_SWA_PERIOD = 6
GEMMA3_SWA_ROPE_BASE = 10000.0


def _write_gemma3(writer: gguf.GGUFWriter, config) -> None:
    write_common(writer, config, "gemma3")
    rope = dict(_get(config, "rope_parameters", "gemma3"))
    full = rope.get("full_attention", rope)
    local = rope.get("sliding_attention", {"rope_theta": GEMMA3_SWA_ROPE_BASE})
    writer.add_rope_freq_base(_rope_theta(full, "gemma3", "full_attention"))
    _write_linear_scaling(writer, full)
    if _rope_theta(local, "gemma3", "sliding_attention") != GEMMA3_SWA_ROPE_BASE or (
        local.get("rope_type", "default") != "default"
    ):
        raise GGUFConversionError(
            f"gemma3: llama.cpp fixes the sliding-window rope to theta {GEMMA3_SWA_ROPE_BASE:g} "
            f"without scaling; this model has {local}"
        )
    writer.add_rope_freq_base_swa(GEMMA3_SWA_ROPE_BASE)
    expected = [
        "full_attention" if (i + 1) % GEMMA3_SWA_PERIOD == 0 else "sliding_attention"
        for i in range(config.num_hidden_layers)
    ]
    if list(getattr(config, "layer_types", expected)) != expected:
        raise GGUFConversionError(
            f"gemma3: llama.cpp expects layer_types {expected} (one global layer in "
            f"{GEMMA3_SWA_PERIOD}), the model has {config.layer_types}"
        )
    writer.add_sliding_window(int(_get(config, "sliding_window", "gemma3")))
    _check_gemma3_attention_scale(config)
    if getattr(config, "attn_logit_softcapping", None) is not None:
        raise GGUFConversionError("gemma3: attn_logit_softcapping is not supported by llama.cpp")
    if (softcap := getattr(config, "final_logit_softcapping", None)) is not None:
        writer.add_final_logit_softcapping(float(softcap))


def _check_gemma3_attention_scale(config) -> None:
    """llama.cpp scales queries by 1/sqrt(head_dim), or 1/sqrt(hidden/heads) for the 62-layer 27B."""
    if config.num_hidden_layers == 62:
        used = config.hidden_size // config.num_attention_heads
    else:
        used = head_dim(config)
    if int(config.query_pre_attn_scalar) != used:
        raise GGUFConversionError(
            f"gemma3: query_pre_attn_scalar={config.query_pre_attn_scalar} but llama.cpp scales "
            f"queries by 1/sqrt({used}); set query_pre_attn_scalar={used} in the config"
        )


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's rotate-half q/k rows to GGUF's interleaved pairs (llama.cpp's llama permutation)."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _llama_tensor(hf_name: str, data: np.ndarray, config) -> np.ndarray:
    if hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_rotary(data, config.num_attention_heads)
    if hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_rotary(data, config.num_key_value_heads or config.num_attention_heads)
    return data


def _plain_tensor(hf_name: str, data: np.ndarray, config) -> np.ndarray:
    return data


def _gemma3_tensor(hf_name: str, data: np.ndarray, config) -> np.ndarray:
    # Gemma3RMSNorm computes x * (1 + w); llama.cpp's RMSNorm multiplies by the stored weight.
    if hf_name.endswith("norm.weight"):
        return data + np.float32(1.0)
    return data


@dataclass(frozen=True)
class ArchSpec:
    """How one Hugging Face architecture maps onto a llama.cpp architecture."""

    gguf_arch: gguf.MODEL_ARCH
    write_hparams: Callable[[gguf.GGUFWriter, object], None]
    transform: Callable[[str, np.ndarray, object], np.ndarray]
    default_pre: str  # tokenizer.ggml.pre when the tokenizer fingerprint says nothing better

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.gguf_arch]


# Keyed by the Hugging Face ``config.model_type``.
SUPPORTED_ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec(gguf.MODEL_ARCH.LLAMA, _write_llama, _llama_tensor, "default"),
    "qwen2": ArchSpec(gguf.MODEL_ARCH.QWEN2, _write_qwen2, _plain_tensor, "qwen2"),
    "gemma3_text": ArchSpec(gguf.MODEL_ARCH.GEMMA3, _write_gemma3, _gemma3_tensor, "default"),
}


def arch_spec(config) -> ArchSpec:
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_ARCHS:
        raise GGUFConversionError(
            f"architecture {model_type!r} is not supported for GGUF export; "
            f"supported: {', '.join(sorted(SUPPORTED_ARCHS))}"
        )
    return SUPPORTED_ARCHS[model_type]
