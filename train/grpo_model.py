"""The inspector in the shape TRL's ``GRPOTrainer`` drives a vision-language model.

TRL treats a model as a VLM when its ``processing_class`` is a ``ProcessorMixin``: it renders the
conversational prompts with the processor (images as content blocks), passes ``pixel_values`` to
``model.generate`` for the rollouts and to ``model(...)`` for the log-probabilities, and scores
only completion tokens through its fused LM head, which calls ``model.base_model(...)`` for the
last hidden states and ``model.get_output_embeddings()`` for the head. Two thin adapters give the
``Inspector`` exactly that surface and nothing more:

* ``InspectorProcessor`` renders a chat with the tokenizer's template, each image block becoming
  ``IMAGE_TOKEN`` and then ``image_tokens`` placeholder ids (``encode_chat``'s convention), and
  preprocesses each image to the recipe's input size;
* ``InspectorPolicy`` is a ``PreTrainedModel`` whose backbone embeds tokens and images with
  ``Inspector.embed`` and runs the LM's decoder; ``generate`` samples with the LM's own
  ``generate`` on those embeddings, so TRL's sampling settings (temperature, top-p, ...) apply.

The wrapped modules are the inspector's own: training the policy trains the inspector in place.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from transformers import BatchFeature, GenerationConfig, PreTrainedModel, ProcessorMixin
from transformers.modeling_outputs import BaseModelOutputWithPast, CausalLMOutputWithPast

from train.model import IMAGE_ID, Inspector, preprocess
from train.prompts import IMAGE_TOKEN
from train.tokenizer import stop_ids


def render_content(content: str | list[dict]) -> str:
    """A message's content as template text: text parts as they are, image parts as ``IMAGE_TOKEN``."""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") == "image":
            parts.append(IMAGE_TOKEN)
        elif part.get("type") == "text":
            parts.append(part["text"])
        else:
            raise ValueError(f"unsupported content part {part.get('type')!r}: only text and image")
    return "".join(parts)


def image_pixels(
    image: object, input_size: tuple[int, int], normalisation: tuple | None = None
) -> torch.Tensor:
    """A PIL image, an RGB array or an image file path → the model's 3 x H x W input tensor,
    normalised with the recipe's (mean, std) (``Model.normalisation``; default the backbone's)."""
    norm = {} if normalisation is None else {"mean": normalisation[0], "std": normalisation[1]}
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return preprocess(np.asarray(opened.convert("RGB")), input_size, **norm)
    if isinstance(image, Image.Image):
        return preprocess(np.asarray(image.convert("RGB")), input_size, **norm)
    if isinstance(image, np.ndarray):
        return preprocess(image, input_size, **norm)
    raise TypeError(f"an image must be a PIL image, an RGB array or a file path, got {type(image)}")


class InspectorProcessor(ProcessorMixin):
    """Tokenizer + image preprocessing of the inspector, with the ``ProcessorMixin`` interface
    TRL uses for vision-language models (``apply_chat_template``, ``__call__``, ``batch_decode``)."""

    def __init__(
        self,
        tokenizer,
        image_tokens: int,
        input_size: tuple[int, int],
        normalisation: tuple | None = None,
    ) -> None:
        # ProcessorMixin.__init__ checks sub-processors against auto classes; there are none here.
        self.tokenizer = tokenizer
        self.normalisation = normalisation
        self.chat_template = None
        self.image_tokens = image_tokens
        self.input_size = tuple(input_size)

    @property
    def model_input_names(self) -> list[str]:
        return ["input_ids", "attention_mask", "pixel_values"]

    def ids(self, text: str) -> list[int]:
        """Text → ids, each ``IMAGE_TOKEN`` expanded to ``image_tokens`` placeholder ids."""
        ids: list[int] = []
        for index, piece in enumerate(text.split(IMAGE_TOKEN)):
            if index:
                ids += [IMAGE_ID] * self.image_tokens
            ids += self.tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else []
        return ids

    def _render(self, conversation: list[dict], add_generation_prompt: bool) -> str:
        messages = [{**m, "content": render_content(m.get("content") or "")} for m in conversation]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        tools: list | None = None,
        **kwargs,
    ):
        """The chat as text, or (``tokenize``) as ``{"input_ids", "pixel_values"}`` for a batch."""
        if tools:
            raise ValueError("the inspector's GRPO prompts take no tools")
        batched = bool(conversation) and isinstance(conversation[0], list)
        chats = conversation if batched else [conversation]
        texts = [self._render(chat, add_generation_prompt) for chat in chats]
        if not tokenize:
            return texts if batched else texts[0]
        images = [
            part["image"]
            for chat in chats
            for message in chat
            if isinstance(message.get("content"), list)
            for part in message["content"]
            if part.get("type") == "image"
        ]
        out = {"input_ids": [self.ids(text) for text in texts]}
        if images:
            out["pixel_values"] = self.pixels(images)
        return out if return_dict or batched else out["input_ids"][0]

    def pixels(self, images: list) -> torch.Tensor:
        return torch.stack(
            [image_pixels(image, self.input_size, self.normalisation) for image in images]
        )

    def __call__(self, images=None, text=None, padding: bool = True, **kwargs) -> BatchFeature:
        """Left-padded ``input_ids`` and ``attention_mask`` for ``text``, and ``pixel_values`` for
        ``images`` (a list per text, or a flat list)."""
        texts = [text] if isinstance(text, str) else list(text or [])
        rows = [self.ids(t) for t in texts]
        width = max((len(r) for r in rows), default=0)
        pad = self.tokenizer.pad_token_id
        data = {
            "input_ids": torch.tensor(
                [[pad] * (width - len(r)) + r for r in rows], dtype=torch.long
            ),
            "attention_mask": torch.tensor(
                [[0] * (width - len(r)) + [1] * len(r) for r in rows], dtype=torch.long
            ),
        }
        if images is not None:
            flat = [im for group in images for im in (group or [])] if _nested(images) else images
            data["pixel_values"] = self.pixels(list(flat))
        return BatchFeature(data)

    def batch_decode(self, sequences, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(sequences, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)

    def save_pretrained(self, save_directory, **kwargs):
        return self.tokenizer.save_pretrained(save_directory, **kwargs)


def _nested(images) -> bool:
    return any(isinstance(group, (list, tuple)) or group is None for group in images)


def causal_lm(inspector: Inspector) -> nn.Module:
    """The HF causal LM inside the inspector (under peft's wrapper for adapter "lora")."""
    lm = inspector.lm
    return lm.get_base_model() if hasattr(lm, "get_base_model") else lm


class InspectorBackbone(nn.Module):
    """Tokens + images → the LM decoder's last hidden states, one per input position."""

    def __init__(self, inspector: Inspector) -> None:
        super().__init__()
        self.inspector = inspector

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        embeds, mask = self.inspector.embed(input_ids, attention_mask, pixel_values)
        decoder = causal_lm(self.inspector).base_model
        out = decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False)
        hidden = out.last_hidden_state[:, embeds.shape[1] - input_ids.shape[1] :]  # drop prompt
        return BaseModelOutputWithPast(last_hidden_state=hidden)


class InspectorPolicy(PreTrainedModel):
    """The inspector as the ``PreTrainedModel`` TRL trains: ``forward(input_ids,
    attention_mask, pixel_values, labels)`` and ``generate(...)`` on the inspector's modules."""

    base_model_prefix = "backbone"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, inspector: Inspector, tokenizer) -> None:
        config = copy.deepcopy(causal_lm(inspector).config)
        config.image_token_id = IMAGE_ID  # TRL suppresses it when sampling; no vocabulary id
        super().__init__(config)
        self.backbone = InspectorBackbone(inspector)
        self.generation_config = GenerationConfig(
            eos_token_id=sorted(stop_ids(tokenizer)), pad_token_id=tokenizer.pad_token_id
        )

    @property
    def inspector(self) -> Inspector:
        return self.backbone.inspector

    def get_input_embeddings(self) -> nn.Module:
        return causal_lm(self.inspector).get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module:
        return causal_lm(self.inspector).get_output_embeddings()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        out = self.inspector(input_ids, attention_mask, pixel_values, labels=labels)
        logits = out.logits[:, out.logits.shape[1] - input_ids.shape[1] :]
        return CausalLMOutputWithPast(loss=out.loss, logits=logits)

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        generation_config: GenerationConfig | None = None,
        **kwargs,
    ) -> torch.Tensor:
        """Prompt ids followed by sampled completion ids (padded with the pad id), as HF
        ``generate`` returns them for decoder-only models."""
        embeds, mask = self.inspector.embed(input_ids, attention_mask, pixel_values)
        new = self.inspector.lm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            generation_config=generation_config or self.generation_config,
            **kwargs,
        )
        return torch.cat([input_ids, new.to(input_ids.device)], dim=1)
