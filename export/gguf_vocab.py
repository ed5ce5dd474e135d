"""The tokenizer inside a GGUF: copied from the base model's GGUF, or converted from Hugging Face.

llama.cpp tokenizes with the ``tokenizer.*`` keys of the model file, so they must reproduce the
training tokenizer id for id. When the base LM came from a GGUF, its keys are copied byte for byte
(nothing is re-derived). Otherwise the HF fast tokenizer's ``tokenizer.json`` is translated:

* byte-level BPE (SmolLM2, Qwen2, the tiny test tokenizer) becomes llama.cpp's ``gpt2`` model:
  tokens, token types, merges, and a ``tokenizer.ggml.pre`` naming the pre-split regex;
* SentencePiece-style BPE with byte fallback (Gemma) becomes the ``llama`` model, whose merge
  priority is the token score (here minus the merge rank).
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from export.gguf_arch import GGUFConversionError

TOKENIZER_PREFIX = "tokenizer."
# Added tokens that open SmolLM2's (StarCoder-style) vocabulary; llama.cpp pre-splits it as "smollm".
SMOLLM_MARKERS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<repo_name>")
QWEN2_REGEX_HEAD = "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|"


def copy_vocab_from_gguf(writer: gguf.GGUFWriter, source: Path) -> int:
    """Copy every ``tokenizer.*`` key of ``source`` exactly; returns the number of tokens."""
    reader = gguf.GGUFReader(source)
    n_tokens = 0
    for key, field in reader.fields.items():
        if not key.startswith(TOKENIZER_PREFIX):
            continue
        main = field.types[0]
        if main == gguf.GGUFValueType.ARRAY:
            sub = field.types[-1]
            if sub == gguf.GGUFValueType.STRING:  # raw bytes: no decode/encode round trip
                value = [bytes(field.parts[i]) for i in field.data]
            else:
                value = field.contents()
            writer.add_key_value(key, value, main, sub_type=sub)
        elif main == gguf.GGUFValueType.STRING:
            writer.add_key_value(key, bytes(field.parts[field.data[0]]), main)
        else:
            writer.add_key_value(key, field.contents(), main)
        if key == gguf.Keys.Tokenizer.LIST:
            n_tokens = len(field.data)
    if n_tokens == 0:
        raise GGUFConversionError(f"{source} has no {gguf.Keys.Tokenizer.LIST} to copy")
    return n_tokens


def write_vocab_from_hf(
    writer: gguf.GGUFWriter, tokenizer, *, n_vocab: int, default_pre: str
) -> None:
    """Translate a Hugging Face fast tokenizer into ``tokenizer.*`` keys for ``n_vocab`` rows."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise GGUFConversionError(
            f"{type(tokenizer).__name__} is not a fast (tokenizers-backed) tokenizer; "
            "load it with use_fast=True"
        )
    spec = json.loads(backend.to_str())
    model = spec["model"]
    if model.get("type") != "BPE":
        raise GGUFConversionError(
            f"tokenizer model {model.get('type')!r} is not supported for GGUF export; supported: "
            "byte-level BPE and SentencePiece-style BPE with byte fallback"
        )
    if len(tokenizer) > n_vocab:
        raise GGUFConversionError(
            f"the tokenizer has {len(tokenizer)} tokens but the model embeds only {n_vocab}"
        )
    tokens, types = _tokens_and_types(model["vocab"], spec.get("added_tokens", []), n_vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    if model.get("byte_fallback"):
        _write_spm(writer, tokens, types, merges, spec, tokenizer)
    else:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre_tokenizer_name(spec, default_pre))
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        # add_token_merges skips an empty list, but llama.cpp requires the key (the tiny
        # byte-level tokenizer has no merges at all).
        writer.add_key_value(
            gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.STRING
        )
    _write_special_ids(writer, tokenizer)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _tokens_and_types(vocab: dict, added: list, n_vocab: int) -> tuple[list[str], list[int]]:
    tokens = [f"[PAD{i}]" for i in range(n_vocab)]
    types = [gguf.TokenType.UNUSED] * n_vocab
    for text, i in vocab.items():
        tokens[i] = text
        types[i] = gguf.TokenType.NORMAL
    for entry in added:
        tokens[entry["id"]] = entry["content"]
        types[entry["id"]] = (
            gguf.TokenType.CONTROL if entry["special"] else gguf.TokenType.USER_DEFINED
        )
    return tokens, [int(t) for t in types]


def pre_tokenizer_name(spec: dict, default: str) -> str:
    """llama.cpp's name for the regex that splits text before BPE merges, from tokenizer.json."""
    added = [entry["content"] for entry in spec.get("added_tokens", [])]
    if tuple(added[: len(SMOLLM_MARKERS)]) == SMOLLM_MARKERS:
        return "smollm"
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    for step in steps:
        pattern = (step.get("pattern") or {}).get("Regex", "")
        if step.get("type") == "Split" and pattern.startswith(QWEN2_REGEX_HEAD):
            return "qwen2"
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"  # StarCoder-style: single digits, then the GPT-2 regex
    return default


def _write_spm(writer, tokens: list[str], types: list[int], merges: list[str], spec, tokenizer):
    """SentencePiece-style BPE: score = minus the rank of the merge that first builds the token."""
    rank_of = {}
    for rank, merge in enumerate(merges):
        rank_of.setdefault(merge.replace(" ", ""), rank)
    floor = -float(len(merges) + 1)
    scores = [-float(rank_of[t]) if t in rank_of else floor for t in tokens]
    for i, text in enumerate(tokens):
        if types[i] == gguf.TokenType.NORMAL and len(text) == 6 and text.startswith("<0x"):
            types[i] = int(gguf.TokenType.BYTE)
    if tokenizer.unk_token_id is not None:
        types[tokenizer.unk_token_id] = int(gguf.TokenType.UNKNOWN)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(_adds_space_prefix(spec))


def _adds_space_prefix(spec: dict) -> bool:
    text = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")])
    return '"Prepend"' in text or '"prepend_scheme": "always"' in text


def _write_special_ids(writer: gguf.GGUFWriter, tokenizer) -> None:
    for token_id, add in (
        (tokenizer.bos_token_id, writer.add_bos_token_id),
        (tokenizer.eos_token_id, writer.add_eos_token_id),
        (tokenizer.unk_token_id, writer.add_unk_token_id),
        (tokenizer.pad_token_id, writer.add_pad_token_id),
    ):
        if token_id is not None:
            add(int(token_id))
    # What the tokenizer adds around plain text, observed rather than read from config flags.
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    writer.add_add_bos_token(bos is not None and len(full) > len(bare) and full[0] == bos)
    writer.add_add_eos_token(eos is not None and len(full) > len(bare) and full[-1] == eos)
