"""Tokenizers for the inspector: the LM's own, or a tiny byte-level one built in code.

Tests and the tiny example build their language model from a config, with no download, so they
need a tokenizer made from nothing: every byte is one token (the byte-level alphabet, no merges),
plus a few chat markers as special tokens and a minimal chat template. It can encode any text,
so targets with digits, braces and quotes round-trip exactly.
"""

from __future__ import annotations

from pathlib import Path

from train.recipe import LanguageModel

TINY_SPECIALS = ("<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>")
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_tokenizer():
    """A byte-level tokenizer (256 byte tokens + chat specials) with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    core = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(TINY_SPECIALS))
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<|pad|>", eos_token="<|end|>"
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    return tokenizer


def build_tokenizer(spec: LanguageModel, local_dir: Path | None = None):
    """The tokenizer saved in a checkpoint (``local_dir``), the LM's own, or the tiny one."""
    if local_dir is None and spec.is_random:
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    source = local_dir or spec.path
    gguf = {"gguf_file": spec.gguf_file} if spec.gguf_file and local_dir is None else {}
    tokenizer = AutoTokenizer.from_pretrained(source, **gguf)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise ValueError(
            f"the tokenizer at {source} has no chat template; use an instruct model or add one "
            "to its tokenizer_config.json"
        )
    return tokenizer


def stop_ids(tokenizer) -> set[int]:
    """Token ids that end an answer: the EOS and, for the tiny tokenizer, the end-of-turn marker."""
    ids = {tokenizer.eos_token_id}
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    if isinstance(end, int) and end != tokenizer.unk_token_id:
        ids.add(end)
    return {i for i in ids if i is not None}
