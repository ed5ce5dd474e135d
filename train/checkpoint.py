"""Inspector checkpoints: a folder that says what it is and can be trained further or served.

Layout of a checkpoint directory::

    meta.json               stage, step, recipe (+ digest), taxonomy, image tokens, versions
    inspector.safetensors   projector (and prompt embeddings for adapter "prompt")
    adapter/                peft LoRA adapter (adapter "lora")
    tokenizer/              the tokenizer, chat template included
    base_lm/                the base LM when it was built at random from a config (else meta
                            names the local path or GGUF it came from)
    trainer_state.pt        optimizer state, RNG state and step, for resuming

A checkpoint is written into a temporary sibling folder and swapped in with renames, so an
interruption leaves the previous checkpoint or the new one, never half of each.
"""

from __future__ import annotations

import json
import platform
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from train.model import Inspector, build_language_model, make_inspector
from train.recipe import Recipe, recipe_from_json
from train.tokenizer import build_tokenizer

FORMAT = "inspector-checkpoint/1"
META, WEIGHTS, ADAPTER = "meta.json", "inspector.safetensors", "adapter"
TOKENIZER, BASE_LM, TRAINER_STATE = "tokenizer", "base_lm", "trainer_state.pt"
TRAINABLE_PREFIXES = ("projector.", "prompt")
VERSIONED = ("torch", "transformers", "peft", "timm", "tokenizers", "inspection-appliance")


class CheckpointError(ValueError):
    """A checkpoint that is missing, incomplete or does not fit the requested run."""


@dataclass(frozen=True)
class Progress:
    stage: str
    step: int
    total_steps: int
    history: list[tuple[int, float]]  # (optimizer step, mean loss)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in VERSIONED:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "absent"
    return found


def read_meta(path: Path) -> dict:
    meta_path = Path(path) / META
    if not meta_path.is_file():
        raise CheckpointError(f"{path} is not an inspector checkpoint: {META} is missing")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    return meta


def _base_state(lm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The base LM's weights without peft's additions (LoRA layers, trained module copies);
    peft keeps the originals as ``*.base_layer.*`` and ``*.original_module.*``."""
    base = lm.get_base_model() if hasattr(lm, "get_base_model") else lm
    return {
        name.replace(".base_layer.", ".").replace(".original_module.", "."): tensor.detach()
        for name, tensor in base.state_dict().items()
        if "lora_" not in name and ".modules_to_save." not in name
    }


def _write(folder: Path, model: Inspector, tokenizer, recipe: Recipe, meta: dict) -> None:
    trainable = {k: v for k, v in model.state_dict().items() if k.startswith(TRAINABLE_PREFIXES)}
    save_file({k: v.contiguous() for k, v in trainable.items()}, folder / WEIGHTS)
    if recipe.model.adapter == "lora":
        model.lm.save_pretrained(folder / ADAPTER)
    tokenizer.save_pretrained(folder / TOKENIZER)
    if recipe.model.lm.is_random:
        (folder / BASE_LM).mkdir()
        model.lm.config.save_pretrained(folder / BASE_LM)
        save_file(
            {k: v.contiguous() for k, v in _base_state(model.lm).items()},
            folder / BASE_LM / "model.safetensors",
        )
    (folder / META).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def save_checkpoint(
    out: Path,
    model: Inspector,
    tokenizer,
    recipe: Recipe,
    progress: Progress,
    trainer_state: dict,
    parent: Path | None = None,
) -> Path:
    """Write a complete checkpoint to ``out``, replacing the previous one atomically."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.with_name(f".{out.name}.tmp"), out.with_name(f".{out.name}.old")
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    tmp.mkdir()
    meta = {
        "format": FORMAT,
        "stage": progress.stage,
        "step": progress.step,
        "total_steps": progress.total_steps,
        "done": progress.step >= progress.total_steps,
        "history": progress.history,
        "parent": str(parent) if parent else None,
        "recipe": recipe.to_json(),
        "recipe_digest": recipe.digest(),
        "taxonomy": recipe.data.taxonomy.to_dict(),
        "adapter": recipe.model.adapter,
        "image_grid": recipe.model.image_grid,
        "image_tokens": recipe.model.image_tokens,
        "input_size": list(recipe.data.input_size),
        "base_lm": BASE_LM if recipe.model.lm.is_random else str(recipe.model.lm.path),
        "gguf_file": recipe.model.lm.gguf_file,
        "versions": versions(),
    }
    _write(tmp, model, tokenizer, recipe, meta)
    torch.save({**trainer_state, "step": progress.step}, tmp / TRAINER_STATE)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def load_inspector(path: Path, trainable: bool) -> tuple[Inspector, object, dict]:
    """The inspector, tokenizer and meta of a checkpoint (LoRA trainable when ``trainable``)."""
    path = Path(path)
    meta = read_meta(path)
    recipe = recipe_from_json(meta["recipe"])
    spec = recipe.model
    base_dir = path / BASE_LM if spec.lm.is_random else None
    tokenizer = build_tokenizer(spec.lm, path / TOKENIZER)
    lm = build_language_model(spec.lm, tokenizer, base_dir)
    if spec.adapter == "lora":
        from peft import PeftModel

        lm = PeftModel.from_pretrained(lm, path / ADAPTER, is_trainable=trainable)
    model = make_inspector(spec, lm)
    missing = set(load_file(path / WEIGHTS)) ^ {
        k for k in model.state_dict() if k.startswith(TRAINABLE_PREFIXES)
    }
    if missing:
        raise CheckpointError(f"{path / WEIGHTS} does not match the recipe's model: {missing}")
    model.load_state_dict(load_file(path / WEIGHTS), strict=False)
    if not trainable:
        model.requires_grad_(False)
    return model, tokenizer, meta


def load_trainer_state(path: Path) -> dict:
    state_path = Path(path) / TRAINER_STATE
    if not state_path.is_file():
        raise CheckpointError(f"{state_path} is missing; the checkpoint cannot be resumed")
    return torch.load(state_path, map_location="cpu", weights_only=False)
