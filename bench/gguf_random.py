"""GGUF language models of a real shape with random weights, written straight in a quantized type.

Decode speed and memory depend on a model's shape and tensor types, not on its values, so the
serving benchmark needs 3B- and 7B-shaped Qwen2.5 models without downloading them and without
building a float model first (a random 7B in float32 is 30 GB and minutes of quantizing). The
tensors are written directly in the types llama.cpp's quantizer gives each tensor for a file type
(``tensor_types``, checked against ``llama_model_quantize`` in the tests), filled with valid blocks:
small scales, random quants. The vocabulary is a placeholder SentencePiece-style list (byte tokens
plus numbered pieces), enough for llama.cpp to load it; the benchmark feeds token ids.

Only numpy and ``gguf`` are needed (no torch, no llama.cpp), so it runs on a GPU machine as is;
the hyperparameter keys are written by the export's own ``write_common``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np

from export.gguf_arch import write_common

FILE_TYPES = ("Q4_K_M", "Q8_0", "F16")


@dataclass(frozen=True)
class Shape:
    """A Qwen2-style decoder (llama.cpp arch ``qwen2``)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    tied: bool  # the output head shares the token embedding

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


SHAPES = {  # Qwen2.5 configs
    "3b": Shape(2048, 36, 16, 2, 11008, 151936, tied=True),
    "7b": Shape(3584, 28, 28, 4, 18944, 152064, tied=False),
    "tiny": Shape(256, 4, 4, 1, 512, 1024, tied=False),  # smoke runs of the benchmark on a CPU
}


def tensors(shape: Shape) -> dict[str, tuple[int, ...]]:
    """Every tensor's ggml shape (ne0 = row length first), in file order."""
    h, kv, ff = shape.hidden, shape.kv_dim, shape.intermediate
    out = {"token_embd.weight": (h, shape.vocab)}
    for i in range(shape.layers):
        b = f"blk.{i}."
        out.update(
            {
                b + "attn_norm.weight": (h,),
                b + "attn_q.weight": (h, h),
                b + "attn_q.bias": (h,),
                b + "attn_k.weight": (h, kv),
                b + "attn_k.bias": (kv,),
                b + "attn_v.weight": (h, kv),
                b + "attn_v.bias": (kv,),
                b + "attn_output.weight": (h, h),
                b + "ffn_norm.weight": (h,),
                b + "ffn_gate.weight": (h, ff),
                b + "ffn_up.weight": (h, ff),
                b + "ffn_down.weight": (ff, h),
            }
        )
    out["output_norm.weight"] = (h,)
    if not shape.tied:
        out["output.weight"] = (h, shape.vocab)
    return out


def use_more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's choice of the layers that keep more bits in the _M K-quant mixes."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_types(shape: Shape, file_type: str) -> dict[str, str]:
    """The type llama.cpp's quantizer gives each tensor for ``file_type`` (1-D tensors stay F32).

    Q4_K_M: Q4_K, except Q6_K for the output head (the token embedding when tied) and for
    ``attn_v`` and ``ffn_down`` in the ``use_more_bits`` layers. Q8_0 and F16: every matrix.
    """
    if file_type not in FILE_TYPES:
        raise ValueError(f"file type {file_type!r}; expected one of {FILE_TYPES}")
    types = {}
    for name, dims in tensors(shape).items():
        if len(dims) == 1:
            types[name] = "F32"
        elif file_type != "Q4_K_M":
            types[name] = file_type
        elif name == "output.weight" or (shape.tied and name == "token_embd.weight"):
            types[name] = "Q6_K"
        elif name.endswith(("attn_v.weight", "ffn_down.weight")):
            layer = int(name.split(".")[1])
            types[name] = "Q6_K" if use_more_bits(layer, shape.layers) else "Q4_K"
        else:
            types[name] = "Q4_K"
    return types


def quant_size(type_name: str) -> tuple[int, int]:
    """(weights per block, bytes per block) of a ggml type, from gguf's own table."""
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


def tensor_bytes(dims: tuple[int, ...], type_name: str) -> int:
    block, size = quant_size(type_name)
    if dims[0] % block:
        raise ValueError(f"rows of {dims[0]} are not a multiple of {type_name}'s block of {block}")
    return int(np.prod(dims)) // block * size


def weight_bytes(shape: Shape, file_type: str) -> int:
    """Bytes of all tensors of the model in ``file_type``."""
    types = tensor_types(shape, file_type)
    return sum(tensor_bytes(dims, types[name]) for name, dims in tensors(shape).items())


def bytes_per_token(shape: Shape, file_type: str) -> int:
    """Weight bytes one decoded token reads: every matrix once, except that the embedding is
    only looked up (one row) unless it is also the output head."""
    types = tensor_types(shape, file_type)
    total = 0
    for name, dims in tensors(shape).items():
        if name == "token_embd.weight" and not shape.tied:
            total += tensor_bytes((dims[0], 1), types[name])
        else:
            total += tensor_bytes(dims, types[name])
    return total


def random_blocks(type_name: str, dims: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Valid random data of a tensor: (rows, bytes per row) uint8 for block types.

    Block layouts (ggml): Q8_0 = d f16 + 32 int8; Q4_K = d f16, dmin f16, 12 bytes of packed
    6-bit scales/mins, 128 bytes of 4-bit quants; Q6_K = 128 low bits, 64 high bits, 16 int8
    scales, d f16 last."""
    if type_name == "F32":
        return np.ones(dims[::-1], dtype=np.float32)
    if type_name == "F16":
        return (rng.standard_normal(dims[::-1], dtype=np.float32) * 0.02).astype(np.float16)
    block, size = quant_size(type_name)
    rows, blocks = int(np.prod(dims[1:])), dims[0] // block
    data = rng.integers(0, 256, size=(rows, blocks, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(2e-4).tobytes(), dtype=np.uint8)
    if type_name == "Q6_K":
        data[..., 208:210] = scale
    else:
        data[..., 0:2] = scale  # d
        if type_name == "Q4_K":
            data[..., 2:4] = 0  # dmin
    return data.reshape(rows, blocks * size)


def hf_config(shape: Shape) -> SimpleNamespace:
    """The Hugging Face config fields ``export.gguf_arch.write_common`` reads, for ``shape``."""
    return SimpleNamespace(
        max_position_embeddings=32768,
        hidden_size=shape.hidden,
        num_hidden_layers=shape.layers,
        intermediate_size=shape.intermediate,
        num_attention_heads=shape.heads,
        num_key_value_heads=shape.kv_heads,
        rms_norm_eps=1e-6,
        vocab_size=shape.vocab,
    )


def _write_vocab(writer, vocab: int) -> None:
    pieces = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256))]
    pieces += [f"▁t{i}" for i in range(vocab - len(pieces))]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL]
    types += [gguf.TokenType.BYTE] * 256 + [gguf.TokenType.NORMAL] * (vocab - 259)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(pieces)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)


def write_random_gguf(path: Path, shape: Shape, file_type: str, *, seed: int = 0) -> Path:
    """Write a random ``shape`` model in ``file_type`` to ``path`` and return the path.

    Tensors of the same shape and type share one random block array (the values do not matter
    for speed), so memory stays at the largest distinct tensor while the file has full size.
    """
    rng = np.random.default_rng(seed)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_name(f"random qwen2 {shape.hidden}x{shape.layers} {file_type}")
    write_common(writer, hf_config(shape), "qwen2")  # the keys `appliance export` writes
    writer.add_rope_freq_base(1_000_000.0)
    _write_vocab(writer, shape.vocab)
    types = tensor_types(shape, file_type)
    pool: dict[tuple, np.ndarray] = {}
    for name, dims in tensors(shape).items():
        key = (types[name], dims)
        if key not in pool:
            pool[key] = random_blocks(types[name], dims, rng)
        bias = name.endswith(".bias")
        data = np.zeros(dims[::-1], dtype=np.float32) if bias else pool[key]
        raw = None if types[name] in ("F32", "F16") else gguf.GGMLQuantizationType[types[name]]
        writer.add_tensor(name, data, raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)
