"""Fitting the trainable parts of the branch: focuser (W_b, δ) and adapter (W_1, W_2, P).

``build_branch`` assembles VV-CLIP, the text embeddings from the taxonomy, the focuser, the adapter
and a causal LM (the checkpoint's, or a tiny random Llama from ``train.model`` for tests). ``fit``
runs AdamW on eq. 14 (``adapter.DescriptionModel.loss``) and returns the loss history; the CLIP
towers and the LM stay frozen and their parameters are checked to be unchanged by the tests.
``fit_focuser`` trains the focuser alone on β·(L_TDDF + λ L_Sep) + γ·L_I for deployments without
descriptions (the few-shot detector does not need the LM).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from appliance.taxonomy import Taxonomy
from train.clip_anomaly.adapter import PROMPT, DefectAdapter, DescriptionModel, LossWeights
from train.clip_anomaly.tddf import (
    TextFocuser,
    patch_labels,
    pixel_loss,
    separation_loss,
    tddf_loss,
    text_embeddings,
)
from train.clip_anomaly.vvclip import VVClipVision

IGNORE = -100
DEFAULT_WEIGHTS = LossWeights()


@dataclass(frozen=True)
class Sample:
    """One training image: preprocessed pixels, normal or not, optional mask and description."""

    pixels: torch.Tensor  # (3, H, W)
    normal: bool
    mask: torch.Tensor | None = None  # (H, W) {0, 1}
    description: str = ""


def build_focuser(
    clip, tokenizer, taxonomy: Taxonomy, object_name: str, blocks: int, descriptions=()
) -> TextFocuser:
    states, labels = text_embeddings(clip, tokenizer, taxonomy, object_name, descriptions)
    return TextFocuser(states, labels, blocks)


def build_branch(
    clip,
    clip_tokenizer,
    taxonomy: Taxonomy,
    object_name: str,
    blocks: Sequence[int],
    lm,
    descriptions: Sequence[str] = (),
    seed: int = 0,
) -> DescriptionModel:
    vision = VVClipVision(clip.visual, blocks)
    focuser = build_focuser(clip, clip_tokenizer, taxonomy, object_name, len(blocks), descriptions)
    width = lm.get_input_embeddings().embedding_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        adapter = DefectAdapter(focuser.base_states.shape[-1], width)
    return DescriptionModel(vision, focuser, adapter, lm)


def answer_ids(tokenizer, description: str) -> tuple[list[int], list[int]]:
    """(input ids, labels) of prompt + description + EOS; only the description is learned."""
    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    answer = tokenizer(" " + description, add_special_tokens=False)["input_ids"]
    answer = [*answer, tokenizer.eos_token_id]
    return prompt + answer, [IGNORE] * len(prompt) + answer


def image_batch(samples: Sequence[Sample]) -> dict:
    """Stacked pixels, normal flags and masks (when every sample has one): the focuser's batch."""
    masks = None
    if all(s.mask is not None for s in samples):
        masks = torch.stack([s.mask.float() for s in samples])
    return {
        "pixels": torch.stack([s.pixels for s in samples]),
        "normal": torch.tensor([s.normal for s in samples]),
        "masks": masks,
    }


def make_batch(samples: Sequence[Sample], tokenizer) -> dict:
    """``image_batch`` plus the padded token ids and labels of the descriptions (eq. 14)."""
    pairs = [answer_ids(tokenizer, s.description or "no defect") for s in samples]
    length = max(len(ids) for ids, _ in pairs)
    ids = torch.full((len(samples), length), -1, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE, dtype=torch.long)
    for row, (seq, lab) in enumerate(pairs):
        ids[row, : len(seq)] = torch.tensor(seq)
        labels[row, : len(lab)] = torch.tensor(lab)
    return {**image_batch(samples), "ids": ids, "labels": labels}


def _cycle(batches: dict | Sequence[dict]) -> list[dict]:
    return [batches] if isinstance(batches, dict) else list(batches)


def fit(
    model: DescriptionModel,
    batches: dict | Sequence[dict],
    steps: int,
    weights: LossWeights = DEFAULT_WEIGHTS,
    lr: float = 3e-3,
) -> list[dict[str, float]]:
    """AdamW on eq. 14 for ``steps`` steps, cycling through ``batches`` (one batch: full-batch
    steps); the per-step loss parts. A progress bar with ETA shows on a terminal."""
    batches = _cycle(batches)
    optimiser = torch.optim.AdamW(model.trainable(), lr=lr, weight_decay=0.0)
    history = []
    model.adapter.train()
    for step in tqdm(range(steps), desc="adapter (eq. 14)", disable=None):
        parts = model.loss(batches[step % len(batches)], weights)
        optimiser.zero_grad()
        parts["total"].backward()
        optimiser.step()
        history.append({k: float(v.detach()) for k, v in parts.items()})
    model.adapter.eval()
    return history


def fit_focuser(
    vision: VVClipVision,
    focuser: TextFocuser,
    batches: dict | Sequence[dict],
    steps: int,
    weights: LossWeights = DEFAULT_WEIGHTS,
    lr: float = 3e-3,
) -> list[float]:
    """The focuser alone: β (L_TDDF + λ L_Sep) + γ L_I, cycling through ``batches``; the frozen
    CLIP features of each batch are computed once."""
    prepared = []
    for batch in _cycle(batches):
        with torch.no_grad():
            _, maps = vision(batch["pixels"])
        labels = patch_labels(batch.get("masks"), batch["normal"], tuple(maps[0].shape[1:3]))
        prepared.append((maps, labels, batch.get("masks")))
    optimiser = torch.optim.AdamW(focuser.parameters(), lr=lr, weight_decay=0.0)
    history = []
    for step in tqdm(range(steps), desc="focuser (eqs. 4-5)", disable=None):
        maps, labels, masks = prepared[step % len(prepared)]
        loss = weights.beta * (
            tddf_loss(focuser, maps, labels)
            + weights.lam * separation_loss(focuser, weights.margin)
        )
        if masks is not None:
            loss = loss + weights.gamma * pixel_loss(focuser(maps)[1], masks)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        history.append(float(loss.detach()))
    return history


def describe(model: DescriptionModel, tokenizer, pixels: torch.Tensor, limit: int = 48) -> str:
    """The generated description of one preprocessed image."""
    from train.tokenizer import stop_ids

    prompt = tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    new = model.describe(pixels, prompt, stop_ids(tokenizer), limit)
    return tokenizer.decode(new, skip_special_tokens=True).strip()
