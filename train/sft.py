"""Supervised fine-tuning of the inspector: stage ``detect``, then stage ``knowledge``.

* ``detect`` (seed 000, stage 1) starts from the base model: image + a template question →
  the target JSON of ``appliance.target`` (defects with boxes in input pixels, null narrative).
* ``knowledge`` (stage 2) starts from a ``detect`` checkpoint: image + a question from the
  records' QA pairs (written by ``appliance distill``) → the answer text.

A plain torch loop, deterministic under the recipe's seed: the order of examples is a pure
function of (seed, epoch), so a run resumed from step ``s`` sees exactly the batches it would
have seen without the interruption. Checkpoints are written every ``save_every`` steps and at
the end (``train.checkpoint``); an existing unfinished checkpoint at ``out`` is resumed.

Data parallel by ``accelerate``: the same recipe runs under ``accelerate launch`` or ``torchrun``
on several processes. Every micro-batch of the recipe (``batch_size`` examples, the global batch)
is split by index across the processes (``shard``), gradients are averaged by accelerate's DDP,
the logged loss is the mean over processes, and only the main process prints and saves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from PIL import Image
from tqdm import tqdm

from appliance.target import render_target
from train.checkpoint import (
    CheckpointError,
    Progress,
    load_inspector,
    load_trainer_state,
    read_meta,
    save_checkpoint,
)
from train.data import LabelMap, Record, read_dataset
from train.model import Example, Inspector, build_inspector, collate, encode_chat, preprocess
from train.prompts import detection_messages, knowledge_messages
from train.recipe import BACKBONE_NORMALISATION, Recipe, Stage, Training
from train.tokenizer import build_tokenizer


@dataclass(frozen=True)
class Item:
    """One training example: its sequence and the image it shows."""

    example: Example
    image: Path


def load_records(recipe: Recipe) -> list[Record]:
    """The recipe's data set with its labels mapped onto the taxonomy."""
    data = recipe.data
    records = read_dataset(data.path, data.format)
    mapping = LabelMap(data.taxonomy, dict(data.label_map), unknown=data.unknown_labels)
    return mapping.apply(records)


def detect_messages(record: Record, recipe: Recipe) -> list[dict]:
    objects = [
        {"label": o.label, "bbox": list(o.bbox), "attributes": o.attributes} for o in record.objects
    ]
    size = (record.width, record.height)
    target = render_target(objects, recipe.data.taxonomy, size, tuple(recipe.data.input_size))
    return detection_messages(target, seed=str(record.image.name))


def stage_items(records: list[Record], recipe: Recipe, stage: str, tokenizer) -> list[Item]:
    """The stage's examples: one per image (detect) or one per QA pair (knowledge)."""
    tokens = recipe.model.image_tokens
    if stage == "detect":
        chats = [(r.image, detect_messages(r, recipe)) for r in records]
    else:
        cap = recipe.training.questions_per_image
        chats = [
            (r.image, knowledge_messages(qa.question, qa.answer))
            for r in records
            for qa in r.qa[:cap]
        ]
        if not chats:
            raise ValueError(
                f"{recipe.data.path}: no question-answer pairs for stage knowledge; "
                "run `appliance distill` to add teacher answers to the records first"
            )
    return [Item(encode_chat(tokenizer, chat, tokens), image) for image, chat in chats]


@lru_cache(maxsize=1024)
def load_pixels(
    image: Path,
    input_size: tuple[int, int],
    normalisation: tuple[tuple[float, ...], tuple[float, ...]] = BACKBONE_NORMALISATION,
) -> torch.Tensor:
    """The model input of one image file, normalised by ``(mean, std)`` of the vision tower."""
    mean, std = normalisation
    with Image.open(image) as img:
        return preprocess(np.asarray(img.convert("RGB")), input_size, mean, std)


def batch_indices(micro: int, n: int, batch_size: int, seed: int) -> list[int]:
    """Example indices of micro-batch number ``micro``: epochs are seeded permutations of ``n``."""
    per_epoch = math.ceil(n / batch_size)
    epoch, position = divmod(micro, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return order[position * batch_size : (position + 1) * batch_size].tolist()


def shard(indices: list[int], rank: int, world: int) -> list[int]:
    """Process ``rank``'s part of a micro-batch: every ``world``-th index from ``rank``. A batch
    with fewer examples than processes repeats from its start, so no process is idle."""
    if len(indices) < world:
        indices = (indices * world)[:world]
    return indices[rank::world]


def total_steps(n: int, stage: Stage, training: Training) -> int:
    """Optimizer steps of a stage: ``max_steps``, else ``epochs`` over ``n`` examples."""
    if stage.max_steps is not None:
        return stage.max_steps
    return math.ceil(stage.epochs * math.ceil(n / training.batch_size) / training.grad_accum)


def learning_rate(step: int, stage: Stage, total: int) -> float:
    """Linear warm-up, then linear decay to 10% of the stage's rate."""
    if step < stage.warmup_steps:
        return stage.lr * (step + 1) / stage.warmup_steps
    span = max(total - stage.warmup_steps, 1)
    return stage.lr * (1.0 - 0.9 * (step - stage.warmup_steps) / span)


def make_optimizer(params: list[torch.nn.Parameter], training: Training, device: torch.device):
    """AdamW; 8-bit AdamW (bitsandbytes) when asked, or on CUDA when importable with "auto"."""
    wanted = training.optimizer
    if wanted in ("auto", "adamw_8bit") and device.type == "cuda":
        try:
            import bitsandbytes as bnb
        except ImportError:
            if wanted == "adamw_8bit":
                raise ValueError(
                    "training.optimizer = 'adamw_8bit' needs bitsandbytes: pip install bitsandbytes"
                ) from None
        else:
            return bnb.optim.AdamW8bit(params, lr=1.0, weight_decay=training.weight_decay)
    return torch.optim.AdamW(params, lr=1.0, weight_decay=training.weight_decay)


def start_model(
    recipe: Recipe, stage: str, out: Path, from_ckpt: Path | None, continue_training: bool = False
):
    """(model, tokenizer, trainer state or None, parent): resume ``out``, else start fresh.

    ``continue_training`` (``appliance retrain``): stage detect continues ``from_ckpt``'s weights
    (LoRA, projector) instead of starting from the base model."""
    if (Path(out) / "meta.json").is_file():
        meta = read_meta(out)
        if meta["stage"] != stage or meta["recipe_digest"] != recipe.digest():
            raise CheckpointError(
                f"{out} holds a {meta['stage']} checkpoint of another recipe; choose a new --out "
                "or delete it to start over"
            )
        model, tokenizer, _ = load_inspector(out, trainable=True)
        return model, tokenizer, load_trainer_state(out), meta.get("parent")
    if stage == "detect" and continue_training:
        if from_ckpt is None:
            raise CheckpointError("continuing training needs the checkpoint to continue")
        model, tokenizer, _ = load_inspector(from_ckpt, trainable=True)
        return model, tokenizer, None, str(from_ckpt)
    if stage == "detect":
        if from_ckpt is not None:
            raise CheckpointError("stage detect starts from the base model; drop --from")
        tokenizer = build_tokenizer(recipe.model.lm)
        return build_inspector(recipe.model, tokenizer), tokenizer, None, None
    if from_ckpt is None:
        raise CheckpointError("stage knowledge continues a detect checkpoint: pass --from CKPT")
    parent_meta = read_meta(from_ckpt)
    if parent_meta["stage"] != "detect":
        raise CheckpointError(
            f"--from {from_ckpt} is a {parent_meta['stage']} checkpoint, not detect"
        )
    model, tokenizer, _ = load_inspector(from_ckpt, trainable=True)
    return model, tokenizer, None, str(from_ckpt)


def _micro_step(model: torch.nn.Module, batch: dict, device: torch.device, bf16: bool):
    batch = {k: v.to(device) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
        return model(**batch).loss


@dataclass
class Run:
    """Everything a training loop needs, built once per stage."""

    model: Inspector
    tokenizer: object
    items: list[Item]
    recipe: Recipe
    stage: str
    device: torch.device
    accelerator: Accelerator


def _batch(run: Run, micro: int) -> dict:
    """This process's share of micro-batch number ``micro``."""
    training, acc = run.recipe.training, run.accelerator
    index = batch_indices(micro, len(run.items), training.batch_size, training.seed)
    chosen = [run.items[i] for i in shard(index, acc.process_index, acc.num_processes)]
    size, norm = tuple(run.recipe.data.input_size), run.recipe.model.normalisation
    return collate(
        [c.example for c in chosen],
        [load_pixels(c.image, size, norm) for c in chosen],
        run.tokenizer.pad_token_id,
    )


def optimizer_step(run: Run, optimizer, step: int, total: int) -> float:
    """One optimizer step over ``grad_accum`` micro-batches; returns the mean loss (averaged over
    the processes of a data-parallel run)."""
    training, params = run.recipe.training, [p for p in run.model.parameters() if p.requires_grad]
    for group in optimizer.param_groups:
        group["lr"] = learning_rate(step, run.recipe.stage(run.stage), total)
    losses, acc = [], run.accelerator
    for j in range(training.grad_accum):
        batch = _batch(run, step * training.grad_accum + j)
        last = j == training.grad_accum - 1
        with nullcontext() if last else acc.no_sync(run.model):  # all-reduce once per step
            loss = _micro_step(run.model, batch, run.device, training.precision == "bf16")
            acc.backward(loss / training.grad_accum)
        losses.append(loss.detach())
    acc.clip_grad_norm_(params, training.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(acc.reduce(torch.stack(losses).mean(), reduction="mean"))


def prepare(
    recipe: Recipe,
    stage: str,
    out: Path,
    from_ckpt: Path | None,
    continue_training: bool = False,
) -> tuple[Run, dict | None, str | None]:
    """The run of a stage (model on its device, examples) and the state to resume, if any."""
    model, tokenizer, state, parent = start_model(
        recipe, stage, Path(out), from_ckpt, continue_training
    )
    if recipe.training.gradient_checkpointing:
        model.lm.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    items = stage_items(load_records(recipe), recipe, stage, tokenizer)
    # One process, or those of `accelerate launch` / `torchrun` (gloo on CPU when there is no
    # GPU: accelerate only distributes CPU processes when told that it runs on the CPU).
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    device = accelerator.device
    run = Run(model.to(device), tokenizer, items, recipe, stage, device, accelerator)
    return run, state, parent


def train_stage(
    recipe: Recipe,
    stage: str,
    out: Path,
    from_ckpt: Path | None = None,
    *,
    stop_at: int | None = None,
    progress: bool = True,
    on_step: Callable[[int, float], None] | None = None,
    continue_training: bool = False,
) -> Progress:
    """Train ``stage`` into the checkpoint ``out`` (resuming it when it is unfinished).

    ``stop_at`` ends the run after that optimizer step, with a resumable checkpoint, as an
    interruption would; ``on_step(step, loss)`` observes every step."""
    run, state, parent = prepare(recipe, stage, out, from_ckpt, continue_training)
    total = total_steps(len(run.items), recipe.stage(stage), recipe.training)
    params = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, recipe.training, run.device)
    acc = run.accelerator
    inspector = run.model
    run.model, optimizer = acc.prepare(run.model, optimizer)  # DDP when several processes
    step, history = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        torch.random.set_rng_state(state["rng"])
        step, history = state["step"], [tuple(h) for h in state["history"]]
    else:
        torch.manual_seed(recipe.training.seed)
    end = min(total, stop_at) if stop_at is not None else total
    run.model.train()
    bar = tqdm(
        total=total,
        initial=step,
        desc=f"train {stage}",
        unit="step",
        disable=not (progress and acc.is_main_process),
    )
    while step < end:
        loss = optimizer_step(run, optimizer, step, total)
        step += 1
        history.append((step, loss))
        bar.set_postfix(loss=f"{loss:.4f}")
        bar.update(1)
        if on_step is not None:
            on_step(step, loss)
        if (step % recipe.training.save_every == 0 or step == end) and acc.is_main_process:
            snapshot = Progress(stage, step, total, history)
            trainer_state = {
                "optimizer": optimizer.state_dict(),
                "rng": torch.random.get_rng_state(),
                "history": history,
            }
            save_checkpoint(
                Path(out), inspector, run.tokenizer, recipe, snapshot, trainer_state, parent
            )
        acc.wait_for_everyone()
    bar.close()
    return Progress(stage, step, total, history)
