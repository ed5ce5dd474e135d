"""The whole scoring path as one module: image + normal memory in, maps and scores out.

This is what ``export/clip_anomaly.py`` traces to ONNX and what the evaluation runs in torch, so the
two cannot drift. Inputs are the preprocessed image batch and the memory tensors (the memory is an
input, not a constant, so one exported graph serves any number of shots and re-enrolment needs no
re-export; a graph traced without memory is the zero-shot, text-only mode). Outputs, all float32 except ``prompt``:

``cls``      (N, C)     normalised global feature (for enrolling shots: it becomes memory_cls)
``local``    (B, N, P, C) normalised local features per block (enrolling: memory_blocks)
``focus``    (N, h, w)  D, the block-mean TDDF abnormal probability
``attention``(N, h, w)  A, the multi-scale self-prompted memory distance (0 in zero-shot mode)
``anomaly``  (N, h, w)  eq. 11: A ⊙ D (few-shot) or D (zero-shot)
``score``    (N,)       image score (``msspmm.image_score``)
``labels``   (N, L)     softmax over the taxonomy labels of the CLS feature
``prompt``   (N,)       int64 index of the self-prompt shot

With an adapter (``adapter.DefectAdapter``, the description half of eq. 14) one more output:

``visual_tokens`` (N, k*k, lm_width) E_img, the image embeddings the language model reads after the
                  adapter's learnable prompt embeddings P (which the bundle carries as constants)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from train.clip_anomaly.msspmm import Memory, attention_map, final_map, image_score
from train.clip_anomaly.tddf import TextFocuser
from train.clip_anomaly.vvclip import VVClipVision

OUTPUTS = ("cls", "local", "focus", "attention", "anomaly", "score", "labels", "prompt")
DESCRIPTION_OUTPUT = "visual_tokens"


class ClipAnomalyNet(nn.Module):
    def __init__(
        self,
        vision: VVClipVision,
        focuser: TextFocuser,
        global_weight: float = 0.0,
        adapter: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.vision = vision
        self.focuser = focuser
        self.global_weight = float(global_weight)
        self.adapter = adapter

    @property
    def output_names(self) -> tuple[str, ...]:
        return OUTPUTS + ((DESCRIPTION_OUTPUT,) if self.adapter is not None else ())

    def forward(
        self,
        image: torch.Tensor,
        memory_cls: torch.Tensor | None = None,
        memory_blocks: torch.Tensor | None = None,
    ):
        """``memory_cls`` (S, C), ``memory_blocks`` (B, S, P, C); no memory means zero-shot."""
        cls, maps = self.vision(image)
        _, probability = self.focuser(maps)
        focus = probability.mean(0)
        cls_abnormal = torch.softmax(self.focuser.image_logits(cls), dim=-1)[:, 1]
        n, h, w, _ = maps[0].shape
        few_shot = memory_cls is not None and memory_blocks is not None
        if few_shot:
            memory = Memory(memory_cls, list(memory_blocks.unbind(0)))
            attention, prompt = attention_map(cls, maps, memory, self.global_weight)
        else:
            attention = torch.zeros_like(focus)
            prompt = torch.full((n,), -1, dtype=torch.long)
        anomaly = final_map(attention if few_shot else None, focus)
        local = torch.stack([F.normalize(m, dim=-1).reshape(n, h * w, -1) for m in maps])
        outputs = (
            F.normalize(cls, dim=-1),
            local,
            focus,
            attention,
            anomaly,
            image_score(anomaly, cls_abnormal),
            self.focuser.label_scores(cls),
            prompt,
        )
        if self.adapter is None:
            return outputs
        return (*outputs, self.adapter.visual(self.focuser.focus(maps), probability))

    @torch.no_grad()
    def enroll(self, shots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(memory_cls (S, C), memory_blocks (B, S, P, C)) of preprocessed normal shots."""
        cls, maps = self.vision(shots)
        n, h, w, _ = maps[0].shape
        blocks = torch.stack([F.normalize(m, dim=-1).reshape(n, h * w, -1) for m in maps])
        return F.normalize(cls, dim=-1), blocks
