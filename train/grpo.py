"""Stage ``grpo`` (seed 001): reinforcement learning of the inspector with TRL's ``GRPOTrainer``.

GRPO continues a ``knowledge`` checkpoint (stage 2, which itself continues stage 1). Each image
of the data set becomes one prompt: the think/answer system prompt and the schema-constrained
inspection request of ``train.prompts.grpo_messages``, the image, and its ground-truth defects in
the target's convention (column ``objects``). TRL samples ``num_generations`` completions per
prompt, scores them with the reward suite of ``train.rewards`` (weights from
``[training.grpo.reward_weights]``), and owns the rest: group advantages, the clipped policy
loss, the KL term to the reference (``beta``), optimisation and logging.

The inspector reaches TRL as a vision-language model through ``train.grpo_model`` (a processor
and a ``PreTrainedModel`` wrapper). The one override here is the reference model: TRL builds it
from a hub name or takes the PEFT base, neither of which is the knowledge checkpoint, so
``InspectorGRPOTrainer`` accepts the reference explicitly.

The result is written with ``train.checkpoint`` (stage ``"grpo"``, parent = ``--from``), so export
reads it like any other stage. A run is not resumed mid-way: an unfinished GRPO checkpoint at
``out`` is an error, a finished one of the same recipe is left as it is.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from transformers import TrainerCallback

from appliance.target import target_from_objects
from train.checkpoint import (
    CheckpointError,
    Progress,
    load_inspector,
    read_meta,
    save_checkpoint,
)
from train.data import Record
from train.grpo_model import InspectorPolicy, InspectorProcessor
from train.model import Inspector
from train.prompts import IMAGE_TOKEN, grpo_messages
from train.recipe import Recipe
from train.rewards import build_reward_suite
from train.sft import load_records

STAGE, PARENT_STAGE = "grpo", "knowledge"
# Recipe parts a GRPO run must share with its parent: the model it loads, and what it sees.
SHARED_WITH_PARENT = (
    ("model",),
    ("data", "labels"),
    ("data", "attributes"),
    ("data", "input_size"),
)


def trl_prompt(messages: list[dict]) -> list[dict]:
    """``grpo_messages`` for TRL: the image travels in the ``image`` column, and TRL puts its
    content block where ``IMAGE_TOKEN`` stood (first in the first user turn)."""
    user = messages[-1]["content"]
    if not user.startswith(IMAGE_TOKEN):
        raise ValueError(f"the GRPO user turn must start with {IMAGE_TOKEN!r}")
    return [*messages[:-1], {"role": "user", "content": user[len(IMAGE_TOKEN) :]}]


def grpo_rows(records: list[Record], recipe: Recipe) -> list[dict]:
    """One row per image: ``prompt``, ``image`` (path) and ``objects`` (ground-truth defects
    with integer boxes in model-input pixels, as the rewards compare them)."""
    taxonomy, input_size = recipe.data.taxonomy, tuple(recipe.data.input_size)
    prompt = trl_prompt(grpo_messages(taxonomy, input_size))
    rows = []
    for record in records:
        objects = [
            {"label": o.label, "bbox": list(o.bbox), "attributes": dict(o.attributes or {})}
            for o in record.objects
        ]
        size = (record.width, record.height)
        target = target_from_objects(objects, taxonomy, size, input_size)
        rows.append({"prompt": prompt, "image": str(record.image), "objects": target["defects"]})
    return rows


def _section(meta_recipe: dict, path: tuple[str, ...]):
    for key in path:
        meta_recipe = meta_recipe.get(key) if isinstance(meta_recipe, dict) else None
    return meta_recipe


def check_parent(recipe: Recipe, from_ckpt: Path | None) -> dict:
    """The parent's meta; raises ``CheckpointError`` unless it is a finished knowledge
    checkpoint built from the same model and data conventions as ``recipe``."""
    if from_ckpt is None:
        raise CheckpointError("stage grpo continues a knowledge checkpoint: pass --from CKPT")
    meta = read_meta(from_ckpt)
    if meta["stage"] != PARENT_STAGE:
        raise CheckpointError(
            f"--from {from_ckpt} is a {meta['stage']} checkpoint; GRPO starts from stage 2 "
            f"({PARENT_STAGE}): train `--stage knowledge --from <detect checkpoint>` first"
        )
    if not meta.get("done"):
        raise CheckpointError(f"--from {from_ckpt} is unfinished; finish stage knowledge first")
    ours = recipe.to_json()
    for path in SHARED_WITH_PARENT:
        if _section(ours, path) != _section(meta["recipe"], path):
            raise CheckpointError(
                f"recipe {'.'.join(path)} differs from the one --from {from_ckpt} was trained "
                "with; GRPO must keep the parent's model and data conventions"
            )
    return meta


def optimizer_name(recipe: Recipe) -> str:
    """``training.optimizer`` as a ``TrainingArguments.optim`` name."""
    wanted, cuda = recipe.training.optimizer, torch.cuda.is_available()
    if wanted == "adamw_8bit" or (wanted == "auto" and cuda and _has_bitsandbytes()):
        if not _has_bitsandbytes():
            raise ValueError(
                "training.optimizer = 'adamw_8bit' needs bitsandbytes: pip install bitsandbytes"
            )
        return "adamw_bnb_8bit"
    return "adamw_torch"


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        return False
    return True


def grpo_config(recipe: Recipe, output_dir: Path, progress: bool):
    """TRL's ``GRPOConfig`` from ``[training]`` and ``[training.grpo]``."""
    from trl import GRPOConfig

    training, grpo = recipe.training, recipe.training.grpo
    _, weights = build_reward_suite(recipe.data.taxonomy, grpo.reward_weights)
    return GRPOConfig(
        output_dir=str(output_dir),
        learning_rate=grpo.lr,
        max_steps=grpo.max_steps,
        warmup_steps=grpo.warmup_steps,
        lr_scheduler_type="linear",
        per_device_train_batch_size=grpo.images_per_step * grpo.num_generations,
        gradient_accumulation_steps=training.grad_accum,
        num_generations=grpo.num_generations,
        max_completion_length=grpo.max_completion_length,
        temperature=grpo.temperature,
        beta=grpo.beta,
        reward_weights=weights,
        seed=training.seed,
        bf16=training.precision == "bf16",
        gradient_checkpointing=training.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        max_grad_norm=training.max_grad_norm,
        weight_decay=training.weight_decay,
        optim=optimizer_name(recipe),
        use_cpu=not torch.cuda.is_available(),
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=not progress,
        dataloader_num_workers=0,
    )


def inspector_trainer_class():
    """``GRPOTrainer`` with an explicit reference model (built lazily: trl is imported here)."""
    from trl import GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head, disable_dropout_in_model

    class InspectorGRPOTrainer(GRPOTrainer):
        """TRL's trainer, unchanged but for where the reference model comes from."""

        def __init__(self, *args, ref_model: InspectorPolicy | None = None, **kwargs) -> None:
            config = kwargs["args"]
            beta = config.beta
            if beta and ref_model is None:
                raise ValueError("beta > 0 needs the reference model (the knowledge checkpoint)")
            config.beta = 0.0  # TRL would otherwise load a reference by the model's hub name
            try:
                super().__init__(*args, **kwargs)
            finally:
                config.beta = beta
            self.beta = beta
            if beta:
                ref_model.requires_grad_(False).eval()
                if config.disable_dropout:
                    disable_dropout_in_model(ref_model)
                add_fused_lm_head(ref_model, temperature=self.temperature)
                self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    return InspectorGRPOTrainer


class SaveEvery(TrainerCallback):
    """Writes the inspector checkpoint every ``every`` steps and at the last one, once the
    step's metrics are logged (so the checkpoint's history includes them)."""

    def __init__(self, save, every: int) -> None:
        self.save, self.every = save, every

    def on_log(self, args, state, control, logs=None, **kwargs):
        step = state.global_step
        if logs and "loss" in logs and (step % self.every == 0 or step >= state.max_steps):
            self.save(state, kwargs.get("optimizer"))


def _history(log_history: list[dict]) -> list[tuple[int, float]]:
    return [(entry["step"], float(entry["loss"])) for entry in log_history if "loss" in entry]


def rewards_logged(log_history: list[dict]) -> list[dict[str, float]]:
    """The per-step reward means TRL logged: ``{"step", "reward", "rewards/<name>/mean", ...}``."""
    return [
        {k: v for k, v in entry.items() if k == "step" or k.startswith("reward")}
        for entry in log_history
        if "reward" in entry
    ]


def start_policy(recipe: Recipe, out: Path, from_ckpt: Path | None) -> tuple[Inspector, object]:
    """The trainable inspector and tokenizer of the parent, after checking ``out`` and it."""
    if (out / "meta.json").is_file():
        meta = read_meta(out)
        raise CheckpointError(
            f"{out} already holds a {meta['stage']} checkpoint "
            f"({'finished' if meta.get('done') else 'unfinished: GRPO is not resumed mid-run'}); "
            "choose a new --out or delete it"
        )
    check_parent(recipe, from_ckpt)
    model, tokenizer, _ = load_inspector(from_ckpt, trainable=True)
    return model, tokenizer


def train_grpo(
    recipe: Recipe, out: Path, from_ckpt: Path | None, *, progress: bool = True
) -> tuple[Progress, list[dict[str, float]]]:
    """Train stage grpo from the knowledge checkpoint ``from_ckpt`` into ``out``.

    Returns the progress (loss per step) and the rewards TRL logged at every step."""
    from datasets import Dataset

    out = Path(out)
    inspector, tokenizer = start_policy(recipe, out, from_ckpt)
    grpo = recipe.training.grpo
    reward_funcs, _ = build_reward_suite(recipe.data.taxonomy, grpo.reward_weights)
    rows = grpo_rows(load_records(recipe), recipe)
    processor = InspectorProcessor(
        tokenizer,
        recipe.model.image_tokens,
        recipe.data.input_size,
        recipe.model.normalisation,
    )
    ref_model = None
    if grpo.beta:
        reference, _, _ = load_inspector(from_ckpt, trainable=False)
        ref_model = InspectorPolicy(reference, tokenizer)

    def save(state, optimizer) -> None:
        snapshot = Progress(STAGE, state.global_step, grpo.max_steps, _history(state.log_history))
        trainer_state = {
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "rng": torch.random.get_rng_state(),
            "history": snapshot.history,
            "log_history": list(state.log_history),
        }
        save_checkpoint(out, inspector, tokenizer, recipe, snapshot, trainer_state, from_ckpt)

    with tempfile.TemporaryDirectory(prefix="grpo-trl-") as scratch:
        trainer = inspector_trainer_class()(
            model=InspectorPolicy(inspector, tokenizer),
            reward_funcs=reward_funcs,
            args=grpo_config(recipe, Path(scratch), progress),
            train_dataset=Dataset.from_list(rows),
            processing_class=processor,
            callbacks=[SaveEvery(save, recipe.training.save_every)],
            ref_model=ref_model,
        )
        trainer.train()
        log_history = list(trainer.state.log_history)
    history = _history(log_history)
    return Progress(STAGE, trainer.state.global_step, grpo.max_steps, history), rewards_logged(
        log_history
    )
