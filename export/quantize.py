"""Quantize an f16/f32 GGUF with llama.cpp's own quantizer, and say where it could not.

The factory PC runs the narrative LM at Q4_K_M or Q8_0; the quantizer is llama.cpp's
(``llama_model_quantize`` in llama-cpp-python), called in this process. K-quants pack rows in
super-blocks of 256 values, so a tensor whose rows are not a multiple of 256 (every tensor of a
tiny test model, a few of real ones) silently gets another type from llama.cpp. The result lists
each such tensor, read back from the written file, so nobody ships a "Q4_K_M" that is not.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path

import gguf

T = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class QuantType:
    """One supported quantization: llama.cpp's ftype name and the tensor types it intends."""

    ftype_name: str  # LLAMA_FTYPE_* constant in llama_cpp
    primary: gguf.GGMLQuantizationType
    by_design: frozenset[gguf.GGMLQuantizationType]  # types the mix uses on purpose


QTYPES: dict[str, QuantType] = {
    "Q4_K_M": QuantType("LLAMA_FTYPE_MOSTLY_Q4_K_M", T.Q4_K, frozenset({T.Q4_K, T.Q6_K})),
    "Q5_K_M": QuantType("LLAMA_FTYPE_MOSTLY_Q5_K_M", T.Q5_K, frozenset({T.Q5_K, T.Q6_K})),
    "Q8_0": QuantType("LLAMA_FTYPE_MOSTLY_Q8_0", T.Q8_0, frozenset({T.Q8_0})),
    "F16": QuantType("LLAMA_FTYPE_MOSTLY_F16", T.F16, frozenset({T.F16})),
}

# llama.cpp's substitutes when a K-quant does not fit the row length, mapped back to the wish.
_FALLBACK_OF = {T.Q5_0: T.Q4_K, T.Q5_1: T.Q5_K, T.Q8_0: T.Q6_K}


class QuantizeError(RuntimeError):
    """llama.cpp could not quantize the file."""


@dataclass(frozen=True)
class TensorFallback:
    """A weight stored in another type than the quantization asked for."""

    name: str
    wanted: str
    got: str


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    qtype: str
    size_bytes: int
    fallbacks: tuple[TensorFallback, ...]


def quantize_gguf(src: Path, dst: Path, qtype: str, *, n_threads: int = 0) -> QuantizeResult:
    """Quantize GGUF ``src`` to ``dst`` as ``qtype`` (one of ``QTYPES``); returns what was written."""
    if qtype not in QTYPES:
        raise QuantizeError(
            f"quantization {qtype!r} is not supported; use one of {', '.join(QTYPES)}"
        )
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise QuantizeError(
            f"cannot quantize {src}: no such file (convert the model to GGUF first)"
        )
    spec = QTYPES[qtype]
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, spec.ftype_name)
    params.nthread = n_threads
    dst.parent.mkdir(parents=True, exist_ok=True)
    part = dst.with_name(f".{dst.name}.part")
    rc = llama_cpp.llama_model_quantize(os.fsencode(src), os.fsencode(part), ctypes.byref(params))
    if rc != 0:
        part.unlink(missing_ok=True)
        raise QuantizeError(
            f"llama.cpp failed to quantize {src} to {qtype} (return code {rc}); its log on stderr "
            "says why: is the source a valid f16/f32 GGUF of an architecture llama.cpp knows?"
        )
    os.replace(part, dst)
    return QuantizeResult(
        path=dst, qtype=qtype, size_bytes=dst.stat().st_size, fallbacks=find_fallbacks(dst, spec)
    )


def find_fallbacks(path: Path, spec: QuantType) -> tuple[TensorFallback, ...]:
    """Weights (2-D and up) of ``path`` whose type is not one the quantization intends."""
    out = []
    for tensor in gguf.GGUFReader(path).tensors:
        if len(tensor.shape) < 2 or tensor.tensor_type in spec.by_design:
            continue  # 1-D tensors (norms, biases) stay f32 by design
        wanted = _FALLBACK_OF.get(tensor.tensor_type, spec.primary)
        if wanted not in spec.by_design:
            wanted = spec.primary
        out.append(TensorFallback(tensor.name, wanted.name, tensor.tensor_type.name))
    return tuple(out)
