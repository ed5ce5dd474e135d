"""The serving benchmark's random GGUF models: same tensor types as llama.cpp's quantizer, loadable.

The GPU benchmark (bench/serve_gpu.py) measures 3B/7B-shaped models written straight in Q4_K_M,
Q8_0 or F16 by bench/gguf_random.py; its memory-bandwidth limit is only right if those files have
the tensor types and sizes a real export has. Checked here on small shapes with the same structure.
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from bench.gguf_random import (
    SHAPES,
    Shape,
    bytes_per_token,
    tensor_types,
    use_more_bits,
    weight_bytes,
    write_random_gguf,
)
from export.quantize import quantize_gguf

# 16 layers so that every branch of use_more_bits shows; GQA 4 and a tied head, like the 3B.
SMALL = Shape(hidden=256, layers=16, heads=4, kv_heads=1, intermediate=512, vocab=512, tied=True)


def file_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in GGUFReader(path).tensors}


def test_use_more_bits_on_literals():
    # layers // 8 = 3 of 28: layers 0-2 and 25-27, then every third from layer 5
    chosen = [i for i in range(28) if use_more_bits(i, 28)]
    assert chosen == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 24, 25, 26, 27]


@pytest.mark.parametrize("tied", [True, False])
def test_q4_k_m_types_equal_llama_cpp_quantizer(tmp_path, tied):
    shape = Shape(**{**SMALL.__dict__, "tied": tied})
    f16 = write_random_gguf(tmp_path / "f16.gguf", shape, "F16")
    assert file_types(f16) == tensor_types(shape, "F16")
    quantize_gguf(f16, tmp_path / "q.gguf", "Q4_K_M")
    assert file_types(tmp_path / "q.gguf") == tensor_types(shape, "Q4_K_M")


@pytest.mark.parametrize("file_type", ["Q4_K_M", "Q8_0", "F16"])
def test_written_files_have_the_predicted_size_and_decode(tmp_path, file_type):
    from llama_cpp import Llama

    path = write_random_gguf(tmp_path / "m.gguf", SMALL, file_type)
    assert file_types(path) == tensor_types(SMALL, file_type)
    data = sum(int(t.n_bytes) for t in GGUFReader(path).tensors)
    assert data == weight_bytes(SMALL, file_type)
    llm = Llama(str(path), n_ctx=64, n_threads=2, verbose=False)
    llm.eval([1, 300, 301, 302])
    for _ in range(3):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        assert 0 <= token < SMALL.vocab
        llm.eval([token])
    assert llm.n_tokens == 7
    llm.close()


def test_bytes_per_token_counts_the_head_once():
    tied, untied = SMALL, Shape(**{**SMALL.__dict__, "tied": False})
    head = 256 * 512 * 34 // 32  # Q8_0
    assert weight_bytes(untied, "Q8_0") - weight_bytes(tied, "Q8_0") == head
    # untied: the embedding is looked up (one row), the separate head is read whole
    assert bytes_per_token(untied, "Q8_0") - bytes_per_token(tied, "Q8_0") == 256 * 34 // 32
    assert bytes_per_token(tied, "F16") == weight_bytes(tied, "F16")


def test_real_shapes_sizes():
    # Q8_0 is exact by its block format; Q4_K_M of the 7B is near the published 4.68 GB file.
    assert weight_bytes(SHAPES["7b"], "F16") / 1e9 == pytest.approx(15.23, abs=0.01)
    assert weight_bytes(SHAPES["7b"], "Q4_K_M") / 1e9 == pytest.approx(4.68, abs=0.05)
    assert weight_bytes(SHAPES["3b"], "Q4_K_M") / 1e9 == pytest.approx(2.10, abs=0.2)
    with pytest.raises(ValueError, match="file type"):
        tensor_types(SMALL, "Q2_K")


def test_serve_gpu_measures_one_model_in_its_own_process(tmp_path):
    # The GPU benchmark's per-model step, run here on the CPU build: it must work before a lent
    # GPU machine's minutes are spent on it.
    from bench.serve_gpu import child

    path = write_random_gguf(tmp_path / "m.gguf", SMALL, "Q8_0")
    result = child(path, prompt=16, tokens=4)
    assert (result["prompt"], result["tokens"]) == (16, 4)
    assert result["prefill_s"] > 0 and result["decode_s"] > 0 and result["load_s"] > 0
