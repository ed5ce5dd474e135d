"""Enhanced VV-CLIP: an open_clip ViT with a parallel value-value path for local patch features.

CLIP's q-k attention makes every patch token attend to the same few "global" tokens, so its patch
features say little about *where* something is. CLIP Surgery / VV-CLIP add a second path that
shares the weights but uses value-value self-attention and skips the FFN. Seed 002's eq. 3 became,
for every block ``l`` (the global path is the unchanged open_clip block)::

    V_l      = LN1_l(X_{l-1}^global) W_v + b_v                      (per head)
    A_l      = softmax(V_l V_lᵀ · s),  s = head_dim^-1/2
    X_l^local = X_{l-1}^local + LS1_l(W_o · (A_l V_l) + b_o)         (no FFN on this path)
    X_0^local = X_0^global (the patch + position embeddings after ln_pre)

Local features of block ``l`` are ``normalise(LN_post(X_l^local) · proj)`` for the patch tokens
(the CLS token is dropped), so they live in the joint image-text space and can be compared with the
text embeddings. The CLS feature of the *global* path (``encode_image``) is kept for image-level
scoring and for choosing the self-prompt. Choices: the local path starts at block 1 (CLIP Surgery
starts later on pretrained CLIP; ``start_block`` makes it configurable) and the per-block options
that act on q or k only (qk-norm, scaled cosine attention) do not apply to the v-v product.

Any open_clip ``VisionTransformer`` whose blocks are ``ResidualAttentionBlock`` (nn.MultiheadAttention)
or ``CustomResidualAttentionBlock`` works; weights come from a local file (``load_clip``), never a
download. ``tiny_clip`` builds the small random models the tests use.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

TINY_VISION = {"image_size": 64, "patch_size": 16, "width": 48, "layers": 3, "head_width": 12}
TINY_TEXT = {"context_length": 32, "vocab_size": 49408, "width": 32, "heads": 4, "layers": 2}


def tiny_clip(seed: int = 0, *, embed_dim: int = 32, layers: int = 3, image_size: int = 64):
    """A small randomly initialised open_clip CLIP (ViT vision tower, transformer text tower)."""
    from open_clip.model import CLIP

    vision = {**TINY_VISION, "layers": layers, "image_size": image_size}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIP(embed_dim, vision, dict(TINY_TEXT))
    return model.eval()


def load_clip(name: str, weights: Path | None = None):
    """An open_clip model by config name with weights from a local file (no download)."""
    import open_clip

    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(
            f"CLIP weights {weights} do not exist; pass a local .pt/.bin/.safetensors state dict"
        )
    model = open_clip.create_model(name, pretrained=str(weights) if weights else None)
    return model.eval()


def _value_attention(block: nn.Module, normed: torch.Tensor) -> torch.Tensor:
    """The block's v-v self-attention output (after out_proj and layer scale), (N, L, D)."""
    attn = block.attn
    n, length, dim = normed.shape
    heads = attn.num_heads
    weight, bias = attn.in_proj_weight[2 * dim :], None
    if attn.in_proj_bias is not None:
        bias = attn.in_proj_bias[2 * dim :]
    v = F.linear(normed, weight, bias).reshape(n, length, heads, dim // heads).transpose(1, 2)
    scale = (dim // heads) ** -0.5
    weights = torch.softmax(v @ v.transpose(-2, -1) * scale, dim=-1)
    out = weights @ v
    if getattr(attn, "head_scale", None) is not None:
        out = out * attn.head_scale
    out = out.transpose(1, 2).reshape(n, length, dim)
    out = getattr(attn, "ln_inner", nn.Identity())(out)
    out = attn.out_proj(out)
    out = getattr(block, "ln_attn", nn.Identity())(out)
    return block.ls_1(out)


class VVClipVision(nn.Module):
    """Global CLS feature plus decoupled local patch features at chosen blocks (1-based)."""

    def __init__(self, visual: nn.Module, blocks: Sequence[int], start_block: int = 1) -> None:
        super().__init__()
        depth = len(visual.transformer.resblocks)
        blocks = tuple(int(b) for b in blocks)
        if not blocks or any(b < 1 or b > depth for b in blocks):
            raise ValueError(
                f"blocks {blocks} must lie in 1..{depth} (the ViT's depth); the paper's 3, 8, 12 "
                "are for a 12-block ViT-B"
            )
        if not 1 <= start_block <= min(blocks):
            raise ValueError(f"start_block {start_block} must lie in 1..{min(blocks)}")
        if getattr(visual, "attn_pool", None) is not None:
            raise ValueError("attentional-pool ViTs (CoCa) are not supported by the v-v path")
        self.visual = visual
        self.blocks = blocks
        self.start_block = start_block
        grid = visual.grid_size
        self.grid = (int(grid[0]), int(grid[1]))

    @property
    def image_size(self) -> tuple[int, int]:
        return tuple(int(v) for v in self.visual.image_size)

    def project(self, tokens: torch.Tensor) -> torch.Tensor:
        """LN_post and the output projection, as for the CLS token (no normalisation)."""
        out = self.visual.ln_post(tokens)
        return out @ self.visual.proj if self.visual.proj is not None else out

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(N, 3, H, W) -> CLS (N, C) and per chosen block local features (N, h, w, C)."""
        visual = self.visual
        x = visual._embeds(pixels)
        local = None
        taken = []
        for index, block in enumerate(visual.transformer.resblocks, start=1):
            if index == self.start_block:
                local = x
            if local is not None:
                local = local + _value_attention(block, block.ln_1(x))
            x = block(x)
            if index in self.blocks:
                taken.append(local)
        pooled, _ = visual._pool(x)
        cls = pooled @ visual.proj if visual.proj is not None else pooled
        n = pixels.shape[0]
        h, w = pixels.shape[2] // visual.patch_size[0], pixels.shape[3] // visual.patch_size[1]
        maps = [self.project(t[:, 1:]).reshape(n, h, w, -1) for t in taken]
        return cls, maps


def normalise(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def clip_pixels(rgb_batch, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(N, H, W, 3) uint8 (already at the model's size) -> normalised (N, 3, H, W) float."""
    x = torch.as_tensor(rgb_batch, dtype=torch.float32) / 255.0
    x = (x - torch.tensor(mean)) / torch.tensor(std)
    return x.permute(0, 3, 1, 2).contiguous()


def preprocess_stats(model) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The model's image mean and std (open_clip's OpenAI defaults when it records none)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    cfg = getattr(model.visual, "preprocess_cfg", None) or {}
    return tuple(cfg.get("mean", OPENAI_DATASET_MEAN)), tuple(cfg.get("std", OPENAI_DATASET_STD))
