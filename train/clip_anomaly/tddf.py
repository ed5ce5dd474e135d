"""TDDF, the text-driven defect focuser: where do patches look more like "defect" than "normal"?

Text side. Normal and abnormal prompt ensembles are generated from the deployment's taxonomy
(``prompt_ensembles``: state phrases x templates; every taxonomy label gives abnormal states such as
"{object} with a scratch"), plus the per-image defect descriptions when the data has them (they join
the abnormal ensemble). Each ensemble is encoded by the frozen CLIP text encoder, every prompt
normalised, averaged and normalised again (``text_embeddings``): ``t_n`` and ``t_a``.

Image side. For a local patch feature ``f`` (from ``vvclip``, one map per memory block)::

    f'   = normalise(W_b f + f)              (trainable residual projection per block, W_b = 0 at init)
    d_n  = <f', t_n'>,  d_a = <f', t_a'>     (t' = normalise(t + δ), δ trainable, 0 at init)
    Δd   = d_n − d_a                         (the defect-focused map; low where a defect is)
    p_a  = softmax([d_n, d_a] / τ)[a] = σ(−Δd / τ),  τ = 0.07

Losses (our reading of eqs. 4-5, the paper text being unavailable)::

    L_TDDF = mean over blocks and labelled patches of CE(softmax([d_n, d_a] / τ), y)     (eq. 4)
    L_Sep  = max(0, <t_n', t_a'> − m),  m = 0 by default                              (eq. 5)

Patch labels ``y`` come from the masks where they exist (a patch is abnormal when more than half of
it is), are 0 on every patch of a normal image, and -1 (ignored) elsewhere; so with normal shots only,
L_TDDF pulls normal patches towards the normal text. Frozen: the whole CLIP model (both towers).
Trainable: ``W_b`` and the text offsets ``δ`` -- the text embeddings become constants at export, so
the runtime needs no text encoder.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from appliance.taxonomy import ANOMALY_LABEL, Taxonomy

TEMPERATURE = 0.07
TEMPLATES = (
    "a photo of a {}.",
    "a cropped photo of the {}.",
    "a close-up photo of a {}.",
    "a bright photo of the {}.",
    "a photo of the {} for visual inspection.",
    "a photo of a {} on a production line.",
)
NORMAL_STATES = ("{}", "flawless {}", "perfect {}", "unblemished {}", "{} without defect")
ABNORMAL_STATES = ("damaged {}", "broken {}", "{} with flaw", "{} with defect", "{} with damage")


def label_phrase(label: str) -> str:
    """A taxonomy label as words (``surface_crack`` -> ``surface crack``)."""
    return "defect" if label == ANOMALY_LABEL else label.replace("_", " ")


def label_prompts(label: str, object_name: str) -> list[str]:
    """Abnormal prompts naming one taxonomy label."""
    state = f"{object_name} with {label_phrase(label)}"
    return [template.format(state) for template in TEMPLATES]


def prompt_ensembles(
    taxonomy: Taxonomy, object_name: str, descriptions: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """(normal prompts, abnormal prompts) from the taxonomy, plus per-image descriptions."""
    normal = [t.format(s.format(object_name)) for s in NORMAL_STATES for t in TEMPLATES]
    abnormal = [t.format(s.format(object_name)) for s in ABNORMAL_STATES for t in TEMPLATES]
    for label in taxonomy.labels:
        if label != ANOMALY_LABEL:
            abnormal.extend(label_prompts(label, object_name))
    abnormal.extend(d.strip() for d in descriptions if d and d.strip())
    return normal, abnormal


@torch.no_grad()
def encode_prompts(model, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
    """The normalised mean of the normalised text embeddings of ``prompts`` (C,)."""
    if not prompts:
        raise ValueError("an ensemble needs at least one prompt")
    features = F.normalize(model.encode_text(tokenizer(list(prompts))), dim=-1)
    return F.normalize(features.mean(0), dim=-1)


def text_embeddings(
    model, tokenizer, taxonomy: Taxonomy, object_name: str, descriptions: Sequence[str] = ()
) -> tuple[torch.Tensor, torch.Tensor]:
    """(2, C) [t_n, t_a] and (L, C) per-label abnormal embeddings, in ``taxonomy.labels`` order."""
    normal, abnormal = prompt_ensembles(taxonomy, object_name, descriptions)
    states = torch.stack([encode_prompts(model, tokenizer, p) for p in (normal, abnormal)])
    labels = torch.stack(
        [
            encode_prompts(model, tokenizer, label_prompts(label, object_name))
            for label in taxonomy.labels
        ]
    )
    return states, labels


class TextFocuser(nn.Module):
    """Per-block residual projections plus the (learnably offset) normal/abnormal text embeddings."""

    def __init__(
        self,
        states: torch.Tensor,
        labels: torch.Tensor,
        blocks: int,
        temperature: float = TEMPERATURE,
    ) -> None:
        super().__init__()
        dim = states.shape[-1]
        self.register_buffer("base_states", F.normalize(states.float(), dim=-1))
        self.register_buffer("base_labels", F.normalize(labels.float(), dim=-1))
        self.delta = nn.Parameter(torch.zeros_like(self.base_states))
        self.projections = nn.ModuleList(nn.Linear(dim, dim) for _ in range(blocks))
        for linear in self.projections:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)
        self.temperature = temperature

    def states(self) -> torch.Tensor:
        """(2, C) normalised [t_n', t_a']."""
        return F.normalize(self.base_states + self.delta, dim=-1)

    def focus(self, maps: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Normalised focused features f' per block, each (N, h, w, C)."""
        return [
            F.normalize(proj(m) + m, dim=-1) for proj, m in zip(self.projections, maps, strict=True)
        ]

    def similarities(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, N, h, w, 2) cosine similarities [d_n, d_a] per block."""
        text = self.states()
        return torch.stack([f @ text.T for f in self.focus(maps)])

    def forward(self, maps: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Δd (B, N, h, w) and the abnormal probability p_a (B, N, h, w)."""
        sims = self.similarities(maps)
        delta = sims[..., 0] - sims[..., 1]
        return delta, torch.sigmoid(-delta / self.temperature)

    def image_logits(self, cls: torch.Tensor) -> torch.Tensor:
        """(N, 2) normal/abnormal logits of the global CLS feature."""
        return F.normalize(cls, dim=-1) @ self.states().T / self.temperature

    def label_scores(self, cls: torch.Tensor) -> torch.Tensor:
        """(N, L) softmax over the taxonomy labels of the CLS feature (which defect it reads as)."""
        logits = F.normalize(cls, dim=-1) @ self.base_labels.T / self.temperature
        return torch.softmax(logits, dim=-1)


def patch_labels(masks: torch.Tensor | None, normal: torch.Tensor, grid: tuple[int, int]):
    """(N, h, w) long labels: 1 where > half the patch is masked, 0 on normal images, else -1."""
    n = normal.shape[0]
    labels = torch.full((n, *grid), -1, dtype=torch.long)
    if masks is not None:
        fraction = F.adaptive_avg_pool2d(masks.float().unsqueeze(1), grid).squeeze(1)
        labels = (fraction > 0.5).long()
    labels[normal.bool()] = 0
    return labels


def tddf_loss(focuser: TextFocuser, maps: Sequence[torch.Tensor], labels: torch.Tensor):
    """Eq. 4: cross-entropy of the patch's [d_n, d_a] / τ against its label (-1 ignored)."""
    sims = focuser.similarities(maps) / focuser.temperature
    target = labels.unsqueeze(0).expand(sims.shape[:-1])
    if not bool((target >= 0).any()):
        return sims.sum() * 0.0
    return F.cross_entropy(sims.reshape(-1, 2), target.reshape(-1), ignore_index=-1)


def separation_loss(focuser: TextFocuser, margin: float = 0.0) -> torch.Tensor:
    """Eq. 5: the normal and abnormal text embeddings are pushed below cosine ``margin``."""
    text = focuser.states()
    return F.relu((text[0] * text[1]).sum() - margin)


def pixel_loss(probability: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """L_I: binary cross-entropy of the block-mean p_a map, upsampled, against the pixel masks."""
    fused = probability.mean(0).unsqueeze(1)
    up = F.interpolate(fused, size=masks.shape[-2:], mode="bilinear", align_corners=False)
    up = up.squeeze(1).clamp(1e-6, 1 - 1e-6)
    return F.binary_cross_entropy(up, masks.float())
