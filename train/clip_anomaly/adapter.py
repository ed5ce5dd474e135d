"""The adapter from defect-focused features into a causal language model that writes the description.

Seed 002 feeds the focuser's output to a language model through linear layers plus learnable
embeddings concatenated to the LM's input. Here::

    v_b   = f'_b ⊙ p_a,b                     (focused features weighted by the abnormal map, per block)
    V     = AdaptiveAvgPool_{k×k}(mean_b v_b) (k*k visual tokens; a fixed pooling matrix)
    E_img = W_2 GELU(W_1 V)                   (the linear layers, C -> hidden -> LM width)
    input = [P ; E_img ; E_text(prompt) ; E_text(answer)]     (P: learnable embeddings)

The LM is frozen (as in seed 002's prompt adapter, ``train/model.py``); ``W_1, W_2, P`` train,
together with the focuser (``tddf.TextFocuser``). The training loss is eq. 14::

    L = α·L_C + β·(L_TDDF + λ·L_Sep) + γ·L_I

with L_C the LM's token cross-entropy on the answer (the description), L_TDDF / L_Sep from ``tddf``
and L_I the pixel cross-entropy of the abnormal map where masks exist (0 otherwise). The weights are
``LossWeights``; defaults α = β = γ = 1, λ = 0.1 are our choice (the paper's values are unknown here).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from train.clip_anomaly.tddf import (
    TextFocuser,
    patch_labels,
    pixel_loss,
    separation_loss,
    tddf_loss,
)
from train.clip_anomaly.vvclip import VVClipVision

IGNORE = -100
PROMPT = "Describe the defect in this part:"


@dataclass(frozen=True)
class LossWeights:
    alpha: float = 1.0  # L_C, the description
    beta: float = 1.0  # L_TDDF + λ L_Sep
    lam: float = 0.1  # λ, the separation term inside β
    gamma: float = 1.0  # L_I, pixels (only where masks exist)
    margin: float = 0.0  # L_Sep margin m


class DefectAdapter(nn.Module):
    """Linear layers and learnable embeddings that turn focused maps into LM input embeddings."""

    def __init__(self, dim: int, lm_width: int, grid: int = 2, hidden: int = 64, prompts: int = 4):
        super().__init__()
        self.grid = int(grid)
        self.project = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, lm_width))
        self.prompt = nn.Parameter(torch.randn(prompts, lm_width) * 0.02)

    def visual(self, focused: list[torch.Tensor], probability: torch.Tensor) -> torch.Tensor:
        """E_img: (N, k*k, lm_width) from per-block (N, h, w, C) features and (B, N, h, w) p_a."""
        weighted = torch.stack(
            [f * p.unsqueeze(-1) for f, p in zip(focused, probability, strict=True)]
        ).mean(0)
        n, h, w, c = weighted.shape
        pool = pooling_matrix(int(h), int(w), self.grid).to(weighted.dtype)  # (k*k, h*w)
        return self.project(pool @ weighted.reshape(n, h * w, c))

    def forward(self, focused: list[torch.Tensor], probability: torch.Tensor) -> torch.Tensor:
        """[P; E_img]: (N, prompts + k*k, lm_width); the exported graph outputs E_img only and the
        bundle carries P as fixed prompt embeddings."""
        visual = self.visual(focused, probability)
        prompt = self.prompt.unsqueeze(0).expand(visual.shape[0], -1, -1)
        return torch.cat([prompt, visual], dim=1)

    @property
    def image_tokens(self) -> int:
        return self.grid * self.grid


@functools.lru_cache(maxsize=16)
def pooling_matrix(height: int, width: int, grid: int) -> torch.Tensor:
    """k x k adaptive average pooling of an h x w map as a (k*k, h*w) matrix: the same numbers as
    ``adaptive_avg_pool2d``, and a graph the ONNX exporter handles at any batch size."""
    with torch.no_grad():
        basis = torch.eye(height * width).view(height * width, 1, height, width)
        pooled = nn.functional.adaptive_avg_pool2d(basis, grid)
    return pooled.reshape(height * width, grid * grid).T.contiguous()


class DescriptionModel(nn.Module):
    """VV-CLIP vision (frozen) + TDDF focuser + adapter + frozen causal LM."""

    def __init__(self, vision: VVClipVision, focuser: TextFocuser, adapter: DefectAdapter, lm):
        super().__init__()
        self.vision = vision.requires_grad_(False).eval()
        self.focuser = focuser
        self.adapter = adapter
        self.lm = lm.requires_grad_(False)

    def trainable(self) -> list[nn.Parameter]:
        return [
            p for p in [*self.focuser.parameters(), *self.adapter.parameters()] if p.requires_grad
        ]

    def features(self, pixels: torch.Tensor):
        with torch.no_grad():
            cls, maps = self.vision(pixels)
        return cls, maps

    def visual_embeddings(self, maps) -> tuple[torch.Tensor, torch.Tensor]:
        _, probability = self.focuser(maps)
        return self.adapter(self.focuser.focus(maps), probability), probability

    def lm_loss(self, prefix: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor):
        """L_C: the LM's cross-entropy of ``labels`` after the visual prefix."""
        table = self.lm.get_input_embeddings()
        embeds = torch.cat([prefix, table(ids.clamp(min=0))], dim=1)
        pad = labels.new_full((labels.shape[0], prefix.shape[1]), IGNORE)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        mask[:, prefix.shape[1] :] = (ids >= 0).long()
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, labels=torch.cat([pad, labels], 1))
        return out.loss

    def loss(self, batch: dict, weights: LossWeights) -> dict[str, torch.Tensor]:
        """Eq. 14 and its parts for a batch (see ``train.clip_anomaly.train.make_batch``)."""
        _, maps = self.features(batch["pixels"])
        prefix, probability = self.visual_embeddings(maps)
        labels = patch_labels(batch.get("masks"), batch["normal"], tuple(maps[0].shape[1:3]))
        parts = {
            "caption": self.lm_loss(prefix, batch["ids"], batch["labels"]),
            "tddf": tddf_loss(self.focuser, maps, labels),
            "sep": separation_loss(self.focuser, weights.margin),
            "pixel": prefix.sum() * 0.0,
        }
        if batch.get("masks") is not None:
            parts["pixel"] = pixel_loss(probability, batch["masks"])
        parts["total"] = (
            weights.alpha * parts["caption"]
            + weights.beta * (parts["tddf"] + weights.lam * parts["sep"])
            + weights.gamma * parts["pixel"]
        )
        return parts

    @torch.no_grad()
    def describe(
        self, pixels: torch.Tensor, prompt_ids: list[int], stop: set[int], limit: int = 48
    ):
        """Greedy decoding of one image's description; returns the new token ids."""
        _, maps = self.features(pixels.unsqueeze(0))
        prefix, _ = self.visual_embeddings(maps)
        table = self.lm.get_input_embeddings()
        embeds = torch.cat([prefix, table(torch.tensor([prompt_ids]))], dim=1)
        out = self.lm(inputs_embeds=embeds, use_cache=True)
        new: list[int] = []
        mask = torch.ones(1, embeds.shape[1], dtype=torch.long)
        for _ in range(limit):
            token = int(out.logits[0, -1].argmax())
            if token in stop:
                break
            new.append(token)
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            step = table(torch.tensor([[token]]))
            out = self.lm(
                inputs_embeds=step, attention_mask=mask, past_key_values=out.past_key_values
            )
        return new
