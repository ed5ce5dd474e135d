"""The inspector's language half for llama.cpp: the served prompt and the logit parity probe.

The prompt is tokenised here, once, by the training tokenizer, and stored in the manifest as segments
(token ids, learned prompt embeddings, the image slot), so the runtime feeds llama.cpp exactly the
sequence transformers saw. The parity probe runs the same prompt with the same image embeddings
through transformers and through llama.cpp on the exported GGUF, and compares the logits after the
prompt and after each token of transformers' greedy continuation.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from appliance.taxonomy import Taxonomy
from train.model import IMAGE_ID, prompt_ids
from train.prompts import DETECTION_QUESTIONS, IMAGE_TOKEN, grpo_messages

SERVING_QUESTION = DETECTION_QUESTIONS[0]
PROMPT_EMBEDDINGS = "prompt_embeddings.npy"


def serving_messages(
    stage: str, taxonomy: Taxonomy, input_size: tuple[int, int]
) -> tuple[list[dict], str | None]:
    """The prompt the checkpoint was last trained on, and its answer envelope.

    detect/knowledge checkpoints answer the stage-1 question with bare target JSON; a GRPO
    checkpoint answers its own prompt with ``<think>...</think><answer>JSON</answer>``."""
    if stage == "grpo":
        return grpo_messages(taxonomy, input_size), "think-answer"
    return [{"role": "user", "content": f"{IMAGE_TOKEN}\n{SERVING_QUESTION}"}], None


def prompt_segments(
    tokenizer, messages: list[dict], image_tokens: int, *, prompt_adapter: bool
) -> list[dict]:
    """The served prompt as manifest segments: [embeddings], tokens, image slot, tokens."""
    ids = prompt_ids(tokenizer, messages, image_tokens)
    first = ids.index(IMAGE_ID)
    after = first + image_tokens
    if ids[first:after] != [IMAGE_ID] * image_tokens or IMAGE_ID in ids[after:]:
        raise ValueError("the serving prompt must hold exactly one image")
    segments: list[dict] = [{"embeddings": PROMPT_EMBEDDINGS}] if prompt_adapter else []
    segments += [{"tokens": ids[:first]}, {"image": True}, {"tokens": ids[after:]}]
    return [s for s in segments if s.get("tokens", True) != []]


def _embeddings(inspector, segments: list[dict], image: torch.Tensor) -> torch.Tensor:
    table = inspector.lm.get_input_embeddings()
    parts = []
    for segment in segments:
        if "tokens" in segment:
            parts.append(table(torch.tensor(segment["tokens"])))
        elif "embeddings" in segment:
            parts.append(inspector.prompt.detach().to(table.weight.dtype))
        else:
            parts.append(image.to(table.weight.dtype))
    return torch.cat(parts, 0)


@torch.no_grad()
def transformers_greedy(
    inspector, segments: list[dict], image: torch.Tensor, stop: set[int], max_tokens: int
) -> tuple[list[int], np.ndarray]:
    """transformers' greedy tokens for one image's embeddings, and the logits before each."""
    embeds = _embeddings(inspector, segments, image).unsqueeze(0)
    out = inspector.lm(inputs_embeds=embeds, use_cache=True)
    table, tokens, rows = inspector.lm.get_input_embeddings(), [], []
    for _ in range(max_tokens):
        logits = out.logits[0, -1].float()
        rows.append(logits.numpy())
        token = int(logits.argmax())
        if token in stop:
            break
        tokens.append(token)
        out = inspector.lm(
            inputs_embeds=table(torch.tensor([[token]])),
            past_key_values=out.past_key_values,
            use_cache=True,
        )
    return tokens, np.stack(rows)


def logit_drift(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """How far ``candidate`` logits are from ``reference`` (rows = positions)."""
    ref, got = reference.astype(np.float64), candidate.astype(np.float64)
    cos = (ref * got).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(got, axis=1) + 1e-12)
    return {
        "positions": int(ref.shape[0]),
        "max_abs_diff": float(np.abs(ref - got).max()),
        "scale": float(np.abs(ref).max()),
        "min_cosine": float(cos.min()),
        "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean()),
    }


def llama_logits(
    gguf: Path,
    segments: list[dict],
    bundle_dir: Path,
    image: np.ndarray,
    continuation: list[int],
    kv_cache_type: str = "f16",
) -> np.ndarray:
    """llama.cpp's logits on the same probe (the runtime's own decoder class)."""
    from appliance.backends.llamacpp_vlm import EmbeddingDecoder, Segment

    parts = []
    for segment in segments:
        if "tokens" in segment:
            parts.append(Segment(tokens=tuple(segment["tokens"])))
        elif "embeddings" in segment:
            parts.append(Segment(embeddings=np.load(bundle_dir / segment["embeddings"])))
        else:
            parts.append(Segment(image=True))
    n_ctx = len(continuation) + 1 + image.shape[0] + sum(s.length for s in parts if not s.image)
    decoder = EmbeddingDecoder(
        gguf,
        parts,
        image_tokens=int(image.shape[0]),
        gbnf=None,
        n_ctx=n_ctx,
        kv_cache_type=kv_cache_type,
    )
    try:
        return decoder.probe_logits(image.astype(np.float32), continuation)
    finally:
        decoder.close()
