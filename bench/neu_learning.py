"""Does stage 1 learn on real data? NEU-DET, the smallest real inspector, CPU only.

The inspector is the smallest one built from real pieces: the appliance's EfficientNet-Lite0
(frozen) and SmolLM2-135M-Instruct, dequantised by transformers from the GGUF the appliance ships
(``appliance.models.default_narrative_gguf()``, through the recipe's ``lm.path`` + ``lm.gguf_file``),
with LoRA and a fresh projector. NEU-DET (six steel-surface defect classes, 200 x 200 images, VOC
XML) is split per class with a fixed seed into a training subsample and a held-out subsample; the
held-out images are answered greedily (``train.model.generate_text``) before and after a short
stage-1 run and scored with ``appliance.metrics`` (COCO AP@50 and data-set F1 at IoU 0.5).

A generated answer that is not a schema-valid target scores as no detections. The model writes no
scores, so a defect's score is its rank in the answer (1, 1/2, 1/3, ...): AP then ranks each
image's defects in the order the model wrote them. Expect low absolute numbers from a CPU-sized
run; the point is the direction and the cost.

Prints a table and writes the section "## Learning run (NEU-DET)" of docs/benchmarks.md
(the loss curve as a small table in it).

    python -m bench.neu_learning [--train-per-class 40] [--eval-per-class 4] [--steps 60]
        [--batch-size 4] [--lr 1e-3] [--max-new-tokens 160] [--threads 1] [--no-docs]
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

from bench._common import machine, write_section

HEADING = "## Learning run (NEU-DET)"
NEU_DET = Path("/work/shared/datasets/neu_det")
LABEL_MAP = {"rolled-in_scale": "rolled_in_scale"}  # taxonomy labels are identifiers
LABELS = ("crazing", "inclusion", "patches", "pitted_surface", "rolled_in_scale", "scratches")
INPUT_SIZE = (224, 224)
PROBE_TOKENS = 6


@dataclass(frozen=True)
class Scores:
    map50: float | None
    precision: float
    recall: float
    f1: float
    valid: float  # share of answers that are schema-valid targets
    predicted: int  # defects predicted over the held-out set
    seconds_per_image: float


def split(records: list, train_per_class: int, eval_per_class: int, seed: int = 0):
    """(train, held-out): per class (NEU-DET's file prefix), a seeded shuffle, held-out first."""
    by_class: dict[str, list] = {}
    for record in sorted(records, key=lambda r: r.image.name):
        by_class.setdefault(record.image.stem.rsplit("_", 1)[0], []).append(record)
    train, held_out = [], []
    for name in sorted(by_class):
        group = by_class[name][:]
        random.Random(f"{seed}:{name}").shuffle(group)
        held_out += group[:eval_per_class]
        train += group[eval_per_class : eval_per_class + train_per_class]
    return train, held_out


def recipe_data(records: Path, gguf: Path, args: argparse.Namespace) -> dict:
    return {
        "model": {
            "vision": "efficientnet_lite0",
            "image_grid": args.grid,
            "projector_hidden": 256,
            "adapter": "lora",
            "lm": {"path": str(gguf.parent), "gguf_file": gguf.name},
            "lora": {
                "r": 16,
                "alpha": 32,
                "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
            },
        },
        "data": {
            "path": str(records),
            "format": "records",
            "labels": list(LABELS),
            "label_map": LABEL_MAP,
            "input_size": list(INPUT_SIZE),
        },
        "training": {
            "seed": 0,
            "batch_size": args.batch_size,
            "precision": "fp32",
            "gradient_checkpointing": False,
            "optimizer": "adamw",
            "save_every": 10_000,
            "detect": {"lr": args.lr, "max_steps": args.steps, "warmup_steps": 4},
        },
    }


def detections(text: str, record, taxonomy) -> tuple[list, bool]:
    """The answer as ``Detection``s in image pixels (rank scores), and whether it was valid."""
    from appliance.metrics import Detection
    from appliance.target import objects_from_target, parse_target, target_problems

    target = parse_target(text)
    if target is None or target_problems(target, taxonomy):
        return [], False
    objects = objects_from_target(target, (record.width, record.height), INPUT_SIZE)
    return [Detection(o["label"], o["bbox"], 1.0 / (1 + i)) for i, o in enumerate(objects)], True


def score(model, tokenizer, held_out: list, recipe, max_new_tokens: int) -> Scores:
    """Greedy answers on the held-out images, scored against their ground truth."""
    import torch

    from appliance import metrics
    from appliance.metrics import GroundTruth
    from train.prompts import DETECTION_QUESTIONS
    from train.sft import load_pixels

    model.eval()
    taxonomy = recipe.data.taxonomy
    found, truth, valid = [], [], 0
    started = time.perf_counter()
    for record in held_out:
        pixels = load_pixels(record.image, INPUT_SIZE, recipe.model.normalisation)
        with torch.no_grad():
            text = answer(model, tokenizer, pixels, DETECTION_QUESTIONS[0], max_new_tokens)
        dets, ok = detections(text, record, taxonomy)
        found.append(dets)
        valid += ok
        truth.append([GroundTruth(o.label, o.bbox) for o in record.objects])
    elapsed = time.perf_counter() - started
    precision, recall, f1 = metrics.precision_recall_f1(found, truth)
    return Scores(
        metrics.mean_ap(metrics.average_precision_50(found, truth)),
        precision,
        recall,
        f1,
        valid / len(held_out),
        sum(len(d) for d in found),
        elapsed / len(held_out),
    )


def answer(model, tokenizer, pixels, question: str, max_new_tokens: int) -> str:
    """The greedy answer; one that does not start with ``{`` after ``PROBE_TOKENS`` tokens can
    never parse as a target, so it is not decoded further (greedy: the prefix is the same)."""
    from train.model import generate_text

    head = generate_text(model, tokenizer, pixels, question, PROBE_TOKENS)
    if not head.lstrip().startswith("{"):
        return head
    return generate_text(model, tokenizer, pixels, question, max_new_tokens)


def loss_table(history: list[tuple[int, float]], rows: int = 12) -> str:
    """Every k-th step's loss as a Markdown table, with a bar to read the curve's shape."""
    every = max(1, len(history) // rows)
    picked = [history[0], *history[every - 1 :: every][1 if every == 1 else 0 :]]
    if picked[-1] != history[-1]:
        picked.append(history[-1])
    top = max(loss for _, loss in history)
    lines = ["| step | loss | |", "|---:|---:|:---|"]
    for step, loss in picked:
        lines.append(f"| {step} | {loss:.3f} | `{'#' * max(1, round(30 * loss / top))}` |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def results_table(before: Scores, after: Scores) -> str:
    lines = [
        "| held-out | mAP@50 | precision | recall | F1 | valid JSON | defects predicted | s/image |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, s in (("before stage 1", before), ("after stage 1", after)):
        lines.append(
            f"| {name} | {_fmt(s.map50)} | {s.precision:.3f} | {s.recall:.3f} | {s.f1:.3f} | "
            f"{s.valid:.0%} | {s.predicted} | {s.seconds_per_image:.1f} |"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace, work: Path) -> dict:
    import torch

    from appliance.models import default_narrative_gguf
    from train.checkpoint import load_inspector
    from train.data import read_dataset, write_records
    from train.model import build_inspector
    from train.recipe import parse_recipe
    from train.sft import train_stage
    from train.tokenizer import build_tokenizer

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    train, held_out = split(
        read_dataset(args.data, "voc"), args.train_per_class, args.eval_per_class
    )
    write_records(work / "train.jsonl", train)  # image paths point into the data set
    gguf = default_narrative_gguf()
    recipe = parse_recipe(recipe_data(work / "train.jsonl", gguf, args), work)
    held_out = _map_labels(held_out)
    tokenizer = build_tokenizer(recipe.model.lm)
    started = time.perf_counter()
    base = build_inspector(recipe.model, tokenizer)
    build_s = time.perf_counter() - started
    before = score(base, tokenizer, held_out, recipe, args.max_new_tokens)
    del base
    stamps: list[float] = []
    started = time.perf_counter()
    on_step = lambda *_: stamps.append(time.perf_counter())  # noqa: E731
    progress = train_stage(recipe, "detect", work / "ckpt", progress=False, on_step=on_step)
    train_s = time.perf_counter() - started
    steps = [b - a for a, b in zip([started, *stamps[:-1]], stamps, strict=True)]
    model, tokenizer, _ = load_inspector(work / "ckpt", trainable=False)
    after = score(model, tokenizer, held_out, recipe, args.max_new_tokens)
    return {
        "train": len(train),
        "held_out": len(held_out),
        "before": before,
        "after": after,
        "history": progress.history,
        "seconds_per_step": sorted(steps)[len(steps) // 2],
        "first_step_s": steps[0],
        "train_s": train_s,
        "build_s": build_s,
        "gguf": gguf.name,
    }


def _map_labels(records: list) -> list:
    from appliance.taxonomy import Taxonomy
    from train.data import LabelMap

    return LabelMap(Taxonomy(labels=LABELS), LABEL_MAP).apply(records)


def report(args: argparse.Namespace, result: dict, command: str, wall_s: float) -> str:
    history = result["history"]
    return (
        f"{results_table(result['before'], result['after'])}\n\n"
        f"Stage 1 (`detect`), {args.steps} optimizer steps x batch {args.batch_size} "
        f"({args.steps * args.batch_size} examples, {args.steps * args.batch_size / result['train']:.1f} "
        f"epochs) on a subsample of NEU-DET: {args.train_per_class} training and "
        f"{args.eval_per_class} held-out images per class ({result['train']} / "
        f"{result['held_out']}; seeded per-class split, held-out never trained on). "
        f"Inspector: EfficientNet-Lite0 (frozen) → {args.grid}x{args.grid} = {args.grid**2} image "
        f"tokens → projector → SmolLM2-135M-Instruct dequantised from `{result['gguf']}` (F32), "
        f"LoRA r=16 on q/k/v/o, input {INPUT_SIZE[0]}x{INPUT_SIZE[1]}, fp32, AdamW lr {args.lr:g} "
        f"(4 warm-up steps, linear decay to 10%). Greedy answers, `max_new_tokens` "
        f"{args.max_new_tokens} (answers not starting with `{{` after {PROBE_TOKENS} tokens are not "
        f"decoded further); torch threads {args.threads}; an answer that is not a schema-valid target counts as no "
        f"detections; scores are the rank in the answer.\n\n"
        f"Seconds per optimizer step: {result['seconds_per_step']:.1f} (median; first step "
        f"{result['first_step_s']:.1f}); training {result['train_s'] / 60:.1f} min, model build "
        f"{result['build_s']:.0f} s, whole run {wall_s / 60:.1f} min. "
        f"Loss {history[0][1]:.3f} → {history[-1][1]:.3f}.\n\n"
        f"{loss_table(history)}\n\n"
        f"Date {date.today().isoformat()}; machine: {machine()} (CPU only, shared).\n\n"
        f"Command: `{command}`"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=NEU_DET, help="NEU-DET folder (VOC XML)")
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--eval-per-class", type=int, default=4)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--grid", type=int, default=4, help="k: k*k image tokens")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: the machine is shared)"
    )
    parser.add_argument("--no-docs", action="store_true", help="print only, leave the docs alone")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="neu-learning-") as tmp:
        result = run(args, Path(tmp))
    command = "python -m bench.neu_learning " + shlex.join(sys.argv[1:] if argv is None else argv)
    body = report(args, result, command.strip(), time.perf_counter() - started)
    print(body)
    if not args.no_docs:
        write_section(HEADING, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
