"""MSSPMM, the multi-scale self-prompted memory of normal samples (seed 002, eqs. 9-11).

The memory holds, per chosen block (3, 8 and 12 of a ViT-B/16 in the paper; configurable, e.g.
(1, 2, 3) for the tests' 3-block ViT), the normalised local patch features of each normal shot, and
the normalised global (CLS) feature of each shot. For a query image with global feature ``g`` and
local features ``f_b(i)``::

    s*      = argmax_s <g, g_s>                                     (eq. 9, the self-prompt)
    A_b(i)  = 1 − max_j <f_b(i), M_{s*,b}(j)>                       (eq. 10, per block)
    A       = mean_b A_b                                            (multi-scale)
    M       = A ⊙ D,    D = mean_b p_a,b   (the TDDF abnormal map)  (eq. 11)

Choices. Eq. 10 compares against the self-prompt's patches only; ``global_weight`` w > 0 blends in
the distance to every shot's patches, ``(1 − w) A_self + w A_all``, which helps when the nearest
normal shot by CLS is not the nearest by texture (unaligned parts; magnetic tile). Zero-shot mode has
no memory and uses ``M = D``. The image score is ``max`` of the final map averaged with the CLS
abnormal probability (``image_score``).

Everything is plain tensor maths on (N, h, w, C) grids, so the same functions run inside the ONNX
graph (``export/clip_anomaly.py``) and on the EfficientNet-Lite0 grids of ``bench/clip_memory.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Memory:
    """Normal-shot features: global (S, C) and per block (S, h*w, C), all normalised."""

    cls: torch.Tensor
    blocks: list[torch.Tensor]

    @classmethod
    def from_features(cls, shot_cls: torch.Tensor, shot_maps: Sequence[torch.Tensor]) -> Memory:
        if shot_cls.shape[0] == 0:
            raise ValueError("the memory needs at least one normal shot")
        flat = [F.normalize(m.reshape(m.shape[0], -1, m.shape[-1]), dim=-1) for m in shot_maps]
        return cls(F.normalize(shot_cls, dim=-1), flat)

    def __len__(self) -> int:
        return self.cls.shape[0]


def self_prompt(query_cls: torch.Tensor, memory_cls: torch.Tensor) -> torch.Tensor:
    """Eq. 9: the index (N,) of the normal shot whose global feature is nearest (cosine)."""
    sims = F.normalize(query_cls, dim=-1) @ memory_cls.T
    return sims.argmax(dim=-1)


def prompt_distance(query: torch.Tensor, shots: torch.Tensor, prompt: torch.Tensor) -> torch.Tensor:
    """Eq. 10 for one block: 1 − max cosine to the chosen shot's patches, (N, h, w).

    ``query`` (N, h, w, C) normalised, ``shots`` (S, P, C), ``prompt`` (N,) shot indices.
    """
    n, h, w, c = query.shape
    chosen = shots.index_select(0, prompt)  # (N, P, C)
    sims = query.reshape(n, h * w, c) @ chosen.transpose(1, 2)
    return (1.0 - sims.max(dim=-1).values).reshape(n, h, w)


def memory_distance(query: torch.Tensor, shots: torch.Tensor) -> torch.Tensor:
    """1 − max cosine to every shot's patches (the plain memory bank), (N, h, w)."""
    n, h, w, c = query.shape
    bank = shots.reshape(-1, c)
    sims = query.reshape(n, h * w, c) @ bank.T
    return (1.0 - sims.max(dim=-1).values).reshape(n, h, w)


def attention_map(
    query_cls: torch.Tensor,
    query_maps: Sequence[torch.Tensor],
    memory: Memory,
    global_weight: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-scale A (N, h, w) at the first block's grid, and the self-prompt indices (N,)."""
    prompt = self_prompt(query_cls, memory.cls)
    size = query_maps[0].shape[1:3]
    maps = []
    for query, shots in zip(query_maps, memory.blocks, strict=True):
        query = F.normalize(query, dim=-1)
        block = prompt_distance(query, shots, prompt)
        if global_weight > 0:
            block = (1.0 - global_weight) * block + global_weight * memory_distance(query, shots)
        if tuple(block.shape[1:]) != tuple(size):
            block = F.interpolate(block.unsqueeze(1), size=size, mode="bilinear").squeeze(1)
        maps.append(block)
    return torch.stack(maps).mean(0), prompt


def final_map(attention: torch.Tensor | None, focus: torch.Tensor) -> torch.Tensor:
    """Eq. 11: A ⊙ D (few-shot) or D alone (zero-shot, ``attention`` None)."""
    return focus if attention is None else attention * focus


def image_score(anomaly_map: torch.Tensor, cls_abnormal: torch.Tensor) -> torch.Tensor:
    """(N,) mean of the map's maximum and the CLS abnormal probability."""
    return 0.5 * (anomaly_map.flatten(1).max(dim=1).values + cls_abnormal)
