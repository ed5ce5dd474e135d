"""Write a trained (LoRA-merged) Hugging Face causal LM as a GGUF file llama.cpp loads.

The runtime runs the narrative LM with llama.cpp, which reads only GGUF. llama.cpp's own
``convert_hf_to_gguf.py`` is a script, not a library, so this module rebuilds the part the
appliance needs on the ``gguf`` package: hyperparameters and tensor rewrites per architecture
(``export.gguf_arch``), the tokenizer (``export.gguf_vocab``), and every weight under its GGUF
name. A weight that has no GGUF name is an error, never silently dropped: a missing tensor would
make llama.cpp refuse the file or, worse, compute something else.

Quantized types (Q4_K_M, ...) come afterwards from ``export.quantize`` on the f16/f32 file.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import gguf
import numpy as np

from export.gguf_arch import SUPPORTED_ARCHS, ArchSpec, GGUFConversionError, arch_spec
from export.gguf_vocab import copy_vocab_from_gguf, write_vocab_from_hf

__all__ = ["OUTTYPES", "SUPPORTED_ARCHS", "GGUFConversionError", "convert_to_gguf"]

# outtype -> (numpy dtype of 2-D weights, general.file_type). 1-D tensors (norms, biases) stay f32.
OUTTYPES: dict[str, tuple[np.dtype, gguf.LlamaFileType]] = {
    "f32": (np.dtype(np.float32), gguf.LlamaFileType.ALL_F32),
    "f16": (np.dtype(np.float16), gguf.LlamaFileType.MOSTLY_F16),
}


class _Writer(gguf.GGUFWriter):
    """A GGUFWriter that can write an empty typed array.

    The format allows it and llama.cpp needs it (a byte-level vocabulary without merges still
    requires the ``tokenizer.ggml.merges`` key); gguf-py refuses empty arrays.
    """

    def _pack_val(self, val, vtype, add_vtype, sub_type=None) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def convert_to_gguf(
    model,
    tokenizer,
    out_path: Path,
    *,
    outtype: str = "f16",
    source_gguf: Path | None = None,
    name: str = "inspector",
) -> Path:
    """Write ``model`` (a transformers PreTrainedModel) and its tokenizer to ``out_path``.

    ``source_gguf`` is the GGUF the base LM was loaded from, if any: its tokenizer keys are copied
    verbatim instead of being converted from ``tokenizer``. Returns the path written.
    """
    if outtype not in OUTTYPES:
        raise GGUFConversionError(f"outtype {outtype!r} is not one of {', '.join(OUTTYPES)}")
    config = model.config
    spec = arch_spec(config)
    out_path = Path(out_path)
    tensors = list(gguf_tensors(model, spec, OUTTYPES[outtype][0]))
    n_vocab = int(config.vocab_size)

    part = out_path.with_name(f".{out_path.name}.part")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    writer = _Writer(part, spec.name)
    try:
        writer.add_type(gguf.GGUFType.MODEL)
        writer.add_name(name)
        writer.add_file_type(OUTTYPES[outtype][1])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        spec.write_hparams(writer, config)
        if source_gguf is not None:
            n_tokens = copy_vocab_from_gguf(writer, Path(source_gguf))
            if n_tokens != n_vocab:
                raise GGUFConversionError(
                    f"{source_gguf} has {n_tokens} tokens but the model embeds {n_vocab}; "
                    "pass the GGUF the model was actually trained from, or source_gguf=None"
                )
        else:
            write_vocab_from_hf(writer, tokenizer, n_vocab=n_vocab, default_pre=spec.default_pre)
        for gguf_name, data in tensors:
            writer.add_tensor(gguf_name, data)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(part, out_path)
    return out_path


def gguf_tensors(model, spec: ArchSpec, dtype: np.dtype) -> Iterator[tuple[str, np.ndarray]]:
    """Every weight of ``model`` as (GGUF name, array in GGUF layout and output dtype)."""
    import torch

    config = model.config
    name_map = gguf.get_tensor_name_map(spec.gguf_arch, int(config.num_hidden_layers))
    state = model.state_dict()
    embedding = state.get("model.embed_tokens.weight")
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and embedding is not None and torch.equal(tensor, embedding):
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise GGUFConversionError(
                f"{spec.name}: tensor {hf_name!r} {tuple(tensor.shape)} has no GGUF name; "
                "the export would lose it (is the LoRA merged and the model a plain causal LM?)"
            )
        data = tensor.detach().to(device="cpu", dtype=torch.float32).numpy()
        data = spec.transform(hf_name, data, config)
        yield gguf_name, data.astype(dtype if data.ndim >= 2 else np.float32)
