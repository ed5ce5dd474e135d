"""The inspector model: a LLaVA-style vision-language model that writes the report target.

An image flows ``vision tower → adaptive average pool to a k x k grid → MLP projector`` and
becomes exactly ``k*k`` embeddings, which replace the ``IMAGE_ID`` placeholder positions of the
token sequence before the causal LM sees it. The count is fixed by the recipe, identical in
training and serving, and never truncated: a sequence whose placeholders do not match the
images is an error, not a silent crop.

Two ways to adapt the LM (``recipe.model.adapter``):

* ``"lora"`` (seeds 000/001): peft LoRA on the LM's projections; projector trainable.
* ``"prompt"`` (seed 002): learnable prompt embeddings prepended to every sequence; the LM is
  frozen entirely (no LoRA); projector trainable.

The vision tower is frozen: timm's ``tf_efficientnet_lite0`` with the weights of the appliance's
embedded backbone (read without torch by ``export.torchfile``), an open_clip ViT (its patch tokens
reshaped to a feature map) with weights from a local file, or a tiny random CNN for tests. Each
tower has its input normalisation (``recipe.model.normalisation``), which the bundle records.
Sequence building (``encode_chat``) and batching (``collate``) are pure functions of the tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from train.prompts import IMAGE_TOKEN
from train.recipe import LanguageModel, Lora
from train.recipe import Model as ModelSpec
from train.recipe import OpenClip as OpenClipSpec

IMAGE_ID = -200  # placeholder id for one image-token position (never a real vocabulary id)
IGNORE = -100  # label of positions without loss
INPUT_MEAN = 0.5  # same input convention as the appliance backbone: (pixel/255 - 0.5) / 0.5
INPUT_STD = 0.5
Channels = float | tuple[float, ...]  # one value for all channels, or one per RGB channel


class FrozenVision(nn.Module):
    """A feature extractor that stays in eval mode and never receives gradients."""

    def __init__(self, body: nn.Module, channels: int) -> None:
        super().__init__()
        self.body = body.eval().requires_grad_(False)
        self.channels = channels

    def train(self, mode: bool = True) -> FrozenVision:
        return super().train(False)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            body = self.body
            return (
                body.forward_features(pixels) if hasattr(body, "forward_features") else body(pixels)
            )


def tiny_vision(seed: int = 0) -> FrozenVision:
    """A three-layer random CNN (stride 8, 32 channels): fast enough for tests on two cores."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, stride=2, padding=1),
        )
    return FrozenVision(body, 32)


def efficientnet_vision(weights: Path | None = None) -> FrozenVision:
    """timm ``tf_efficientnet_lite0`` (1280 channels, stride 32) with the package's ImageNet weights."""
    import timm

    from export.efficientnet_lite0 import timm_key
    from export.torchfile import default_weights_path, load_legacy_state_dict

    state = load_legacy_state_dict(weights or default_weights_path())
    mapped = {timm_key(k): torch.from_numpy(v) for k, v in state.items()}
    mapped = {k: v for k, v in mapped.items() if not k.startswith("classifier.")}
    body = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    body.load_state_dict(mapped, strict=True)
    return FrozenVision(body, body.num_features)


class ViTPatchMap(nn.Module):
    """An open_clip ``VisionTransformer`` → its last block's patch tokens (after ``ln_post``, class
    token dropped) as an N x width x h x w map, so the pool and projector apply unchanged."""

    def __init__(self, visual: nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        # ONNX has no op for torch's fused attention kernel: trace the plain attention instead.
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(fast and not torch.onnx.is_in_onnx_export())
        try:
            out = self.visual.forward_intermediates(
                pixels, indices=1, normalize_intermediates=True, intermediates_only=True
            )
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        return out["image_intermediates"][-1]


def open_clip_vision(spec: OpenClipSpec) -> FrozenVision:
    """The ViT tower of an open_clip architecture, weights from ``spec.weights`` (a full CLIP
    state dict; positional embeddings are resized when ``spec.input_size`` differs)."""
    import open_clip

    from train.recipe import open_clip_vision_config

    open_clip_vision_config(spec)  # registers spec.config; names valid models when unknown
    size = {"force_image_size": spec.input_size} if spec.input_size else {}
    clip = open_clip.create_model(spec.name, pretrained=None, pretrained_text=False, **size)
    open_clip.load_checkpoint(clip, str(spec.weights))
    return FrozenVision(ViTPatchMap(clip.visual), clip.visual.transformer.width)


def build_vision(spec: ModelSpec) -> FrozenVision:
    if spec.vision == "tiny":
        return tiny_vision(spec.lm.init_seed)
    if spec.vision == "open_clip":
        return open_clip_vision(spec.open_clip)
    return efficientnet_vision(spec.vision_weights)


def preprocess(
    rgb: np.ndarray,
    input_size: tuple[int, int],
    mean: Channels = INPUT_MEAN,
    std: Channels = INPUT_STD,
) -> torch.Tensor:
    """H x W x 3 uint8 → 3 x H' x W' float tensor at the model's input size (width, height),
    normalised as ``(x/255 - mean) / std`` (``recipe.model.normalisation`` of the tower)."""
    image = Image.fromarray(rgb).convert("RGB").resize(input_size, Image.Resampling.BILINEAR)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)
    if not isinstance(mean, (int, float)):
        mean, std = torch.tensor(mean), torch.tensor(std)
    return ((x - mean) / std).permute(2, 0, 1).contiguous()


def tiny_lm_config(spec: LanguageModel, vocab_size: int, pad_id: int, eos_id: int):
    """A small random Llama or Qwen2 config built in code (no download)."""
    from transformers import LlamaConfig, Qwen2Config

    config_class = LlamaConfig if spec.arch == "llama" else Qwen2Config
    return config_class(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.heads,
        num_key_value_heads=spec.kv_heads,
        max_position_embeddings=spec.max_positions,
        pad_token_id=pad_id,
        eos_token_id=eos_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )


def build_language_model(spec: LanguageModel, tokenizer, local_dir: Path | None = None):
    """The causal LM: ``local_dir`` (a checkpoint's saved random base) or ``spec.path`` (a local
    HF folder, or its GGUF file through transformers' GGUF loader), else random from config."""
    from transformers import AutoModelForCausalLM

    source = local_dir or spec.path
    if source is not None:
        gguf = {"gguf_file": spec.gguf_file} if spec.gguf_file and local_dir is None else {}
        return AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, **gguf)
    config = tiny_lm_config(spec, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.init_seed)
        return AutoModelForCausalLM.from_config(config)


def add_lora(lm, spec: Lora):
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules),
        modules_to_save=list(spec.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(lm, config)


class Inspector(nn.Module):
    """Vision tower → k x k pooled grid → projector → LM (LoRA or prompt-adapted)."""

    def __init__(
        self,
        vision: FrozenVision,
        lm: nn.Module,
        *,
        image_grid: int,
        projector_hidden: int,
        adapter: str = "lora",
        prompt_tokens: int = 16,
    ) -> None:
        super().__init__()
        hidden = lm.get_input_embeddings().embedding_dim
        self.vision = vision
        self.image_grid = image_grid
        self.pool = nn.AdaptiveAvgPool2d(image_grid)
        self.projector = nn.Sequential(
            nn.Linear(vision.channels, projector_hidden),
            nn.GELU(),
            nn.Linear(projector_hidden, hidden),
        )
        self.lm = lm
        self.adapter = adapter
        self.prompt = None
        if adapter == "prompt":
            self.lm.requires_grad_(False)
            self.prompt = nn.Parameter(torch.randn(prompt_tokens, hidden) * 0.02)

    @property
    def image_tokens(self) -> int:
        return self.image_grid * self.image_grid

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """N x 3 x H x W → N x k*k x hidden image embeddings."""
        features = self.pool(self.vision(pixels)).flatten(2).transpose(1, 2)
        return self.projector(features)

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixels: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Token embeddings with each image's k*k embeddings at its placeholder positions, and the
        prompt embeddings (adapter "prompt") in front. Returns (embeddings, attention mask)."""
        slots = input_ids == IMAGE_ID
        images = self.encode_images(pixels)
        if int(slots.sum()) != images.shape[0] * self.image_tokens:
            raise ValueError(
                f"the batch has {int(slots.sum())} image-token positions but {images.shape[0]} "
                f"image(s) x {self.image_tokens} tokens; build sequences with encode_chat"
            )
        table = self.lm.get_input_embeddings()
        embeds = table(input_ids.clamp(min=0))
        embeds = embeds.masked_scatter(slots.unsqueeze(-1), images.to(embeds.dtype))
        if self.prompt is None:
            return embeds, attention_mask
        prompt = self.prompt.to(embeds.dtype).expand(embeds.shape[0], -1, -1)
        ones = attention_mask.new_ones(attention_mask.shape[0], prompt.shape[1])
        return torch.cat([prompt, embeds], 1), torch.cat([ones, attention_mask], 1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixels: torch.Tensor,
        labels: torch.Tensor | None = None,
    ):
        embeds, mask = self.embed(input_ids, attention_mask, pixels)
        if labels is not None and self.prompt is not None:
            pad = labels.new_full((labels.shape[0], self.prompt.shape[0]), IGNORE)
            labels = torch.cat([pad, labels], 1)
        return self.lm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False)

    @torch.no_grad()
    def generate(
        self, input_ids: list[int], pixels: torch.Tensor, stop_ids: set[int], max_new_tokens: int
    ) -> list[int]:
        """Greedy decoding of one sequence (with a KV cache); returns the new token ids."""
        ids = torch.tensor([input_ids], device=pixels.device)
        embeds, mask = self.embed(ids, torch.ones_like(ids), pixels.unsqueeze(0))
        out = self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=True)
        table, new = self.lm.get_input_embeddings(), []
        for _ in range(max_new_tokens):
            token = int(out.logits[0, -1].argmax())
            if token in stop_ids:
                break
            new.append(token)
            mask = torch.cat([mask, mask.new_ones(1, 1)], 1)
            step = table(torch.tensor([[token]], device=pixels.device))
            out = self.lm(
                inputs_embeds=step,
                attention_mask=mask,
                past_key_values=out.past_key_values,
                use_cache=True,
            )
        return new


def build_inspector(spec: ModelSpec, tokenizer, base_dir: Path | None = None) -> Inspector:
    """A fresh inspector from the recipe (LoRA added when ``adapter = "lora"``); the random
    initialisation (LoRA, projector, prompt) depends on ``spec.lm.init_seed`` only."""
    lm = build_language_model(spec.lm, tokenizer, base_dir)
    if spec.adapter == "lora":
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(spec.lm.init_seed + 2)
            lm = add_lora(lm, spec.lora)
    return make_inspector(spec, lm)


def make_inspector(spec: ModelSpec, lm: nn.Module) -> Inspector:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.lm.init_seed + 1)
        return Inspector(
            build_vision(spec),
            lm,
            image_grid=spec.image_grid,
            projector_hidden=spec.projector_hidden,
            adapter=spec.adapter,
            prompt_tokens=spec.prompt_tokens,
        )


@dataclass(frozen=True)
class Example:
    """One training sequence: ids with image placeholders, labels (IGNORE outside the answer)."""

    input_ids: list[int]
    labels: list[int]


def _tokens(tokenizer, text: str, image_tokens: int) -> list[int]:
    """Text → ids, each ``IMAGE_TOKEN`` expanded to ``image_tokens`` placeholder ids."""
    ids: list[int] = []
    for index, piece in enumerate(text.split(IMAGE_TOKEN)):
        if index:
            ids += [IMAGE_ID] * image_tokens
        ids += tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
    return ids


def prompt_ids(tokenizer, messages: list[dict], image_tokens: int) -> list[int]:
    """The prompt for generation: the chat so far plus the assistant header."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return _tokens(tokenizer, text, image_tokens)


def encode_chat(tokenizer, messages: list[dict], image_tokens: int) -> Example:
    """A user turn (with ``IMAGE_TOKEN``) and the assistant answer as one labelled sequence.

    Only the answer and the chat template's end-of-turn text after it carry labels."""
    if messages[-1]["role"] != "assistant":
        raise ValueError("the last message must be the assistant's answer")
    prompt_text = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    full_text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the prompt differently inside the full chat")
    prompt = _tokens(tokenizer, prompt_text, image_tokens)
    answer = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return Example(prompt + answer, [IGNORE] * len(prompt) + answer)


def collate(examples: list[Example], pixels: list[torch.Tensor], pad_id: int) -> dict:
    """Right-padded batch tensors: input_ids, attention_mask, labels, pixels."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n] = torch.tensor(example.input_ids)
        labels[row, :n] = torch.tensor(example.labels)
        mask[row, :n] = 1
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": labels,
        "pixels": torch.stack(pixels),
    }


def generate_text(
    model: Inspector, tokenizer, pixels: torch.Tensor, question: str, max_new_tokens: int = 512
) -> str:
    """Greedy answer to ``question`` about one preprocessed image (a report target in stage 1)."""
    from train.tokenizer import stop_ids

    messages = [{"role": "user", "content": f"{IMAGE_TOKEN}\n{question}"}]
    ids = prompt_ids(tokenizer, messages, model.image_tokens)
    new = model.generate(ids, pixels, stop_ids(tokenizer), max_new_tokens)
    return tokenizer.decode(new, skip_special_tokens=True)
