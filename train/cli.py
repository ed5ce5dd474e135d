"""Entry point of ``appliance train``: one function the appliance's CLI imports lazily.

``appliance/`` never imports ``train`` at module level (the runtime has no torch); its ``train``
command calls ``run_train`` inside the command, after checking that the train extra is installed.
``python -m train.cli`` runs the same thing without the appliance CLI.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from train.recipe import STAGES, load_recipe

SUPERVISED_STAGES = STAGES
ALL_STAGES = (*STAGES, "grpo")  # grpo: TRL's GRPOTrainer (train.grpo)


def run_train(
    stage: str, recipe: str | Path, out: str | Path, from_ckpt: str | Path | None = None
) -> Path:
    """Train ``stage`` with the recipe file ``recipe`` into the checkpoint folder ``out``.

    ``detect`` starts from the base model; ``knowledge`` needs ``from_ckpt``, a detect checkpoint;
    ``grpo`` needs a knowledge checkpoint. An unfinished detect/knowledge checkpoint at ``out`` is
    resumed. Raises ``RecipeError``, ``DataError``,
    ``CheckpointError`` or ``ValueError`` with a message that says what to fix.
    """
    if stage == "grpo":
        return _run_grpo(recipe, out, from_ckpt)
    from train.sft import train_stage

    if stage not in SUPERVISED_STAGES:
        raise ValueError(f"stage {stage!r} is not one of {', '.join(ALL_STAGES)}")
    progress = train_stage(
        load_recipe(recipe), stage, Path(out), Path(from_ckpt) if from_ckpt else None
    )
    last = f", last loss {progress.history[-1][1]:.4f}" if progress.history else ""
    print(f"{stage}: step {progress.step}/{progress.total_steps}{last} → {out}")
    return Path(out)


def _run_grpo(recipe: str | Path, out: str | Path, from_ckpt: str | Path | None) -> Path:
    from train.grpo import train_grpo

    progress, rewards = train_grpo(
        load_recipe(recipe), Path(out), Path(from_ckpt) if from_ckpt else None
    )
    last = f", last mean reward {rewards[-1]['reward']:.4f}" if rewards else ""
    print(f"grpo: step {progress.step}/{progress.total_steps}{last} → {out}")
    return Path(out)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.cli", description=__doc__)
    parser.add_argument("--stage", required=True, choices=ALL_STAGES)
    parser.add_argument("--recipe", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--from", dest="from_ckpt", type=Path, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    from train.checkpoint import CheckpointError
    from train.data import DataError

    args = build_parser().parse_args(argv)
    try:
        run_train(args.stage, args.recipe, args.out, args.from_ckpt)
    except (CheckpointError, DataError, ValueError) as exc:  # RecipeError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
