"""``appliance retrain``: learn from the technicians' feedback without ever serving a worse model.

One run, in ``state/retrain/<run id>/``:

1. **Data.** The feedback records (``state/feedback/records.jsonl``: confirmed and corrected
   reports, imported labelled images) plus a seeded *replay* sample of the data the served
   checkpoint was trained on, so old defects are not forgotten. The newest corrections and the
   same share of the replay go to a held-out set that training never sees (``assemble``).
2. **Training.** LoRA continuation from the served bundle's checkpoint (stage ``detect`` from that
   checkpoint, the checkpoint's own recipe with the new data and the run's steps).
3. **Export** into a new bundle (same quantization and answer limit as the served one), with its
   checkpoint inside, so the next retrain continues from it.
4. **Evaluation** of the served and the new bundle on the same held-out set, through the appliance's
   own runtime (``appliance.inspect_cmd.inspect_paths``): mAP@50, F1, schema-valid rate.
5. **Gate and promotion.** The new bundle is promoted (atomically, ``appliance.registry``) only if no
   gated metric drops by more than its allowance; otherwise the served bundle stays. Either way a
   report (markdown, with the loss curve, metrics before and after, per-class changes and the label
   confusion matrix) is written beside the run and, when promoted, into the new bundle.

While training runs the daemon is asked to pause (``BundleRegistry.request_pause``): it finishes
its batch, unloads its models so retraining can have the GPU, and keeps queueing images; it
resumes when the pause is released, or by itself if this process dies.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from appliance.bundle import amend_manifest, load_bundle
from appliance.registry import BundleRegistry
from train.data import Record, read_records, write_records

FEEDBACK_RECORDS = Path("feedback") / "records.jsonl"
GATED = ("map50", "f1", "schema_valid_rate", "image_auroc")


class RetrainError(ValueError):
    """Retraining cannot start or continue; the message says why and what to do."""


class RetrainSettings(BaseModel):
    """``[retrain]`` of a retrain recipe (``appliance retrain --recipe R``); all optional."""

    model_config = ConfigDict(extra="forbid")
    steps: int = Field(40, ge=1)
    lr: float | None = Field(None, gt=0)  # None: the checkpoint recipe's stage-1 rate
    batch_size: int | None = Field(None, ge=1)
    replay_ratio: float = Field(1.0, ge=0)  # replay records per feedback record
    holdout_fraction: float = Field(0.25, gt=0, lt=1)
    min_holdout: int = Field(2, ge=1)
    min_feedback: int = Field(4, ge=2)
    seed: int = 0
    pause_daemon: bool = True
    # Largest allowed drop of each metric, new vs served (0: must not be worse at all).
    gate: dict[str, float] = Field(default_factory=lambda: dict.fromkeys(GATED, 0.0))

    @field_validator("gate")
    @classmethod
    def _known_metrics(cls, gate: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(gate) - set(GATED))
        if unknown:
            raise ValueError(f"unknown gate metric(s) {unknown}; allowed: {list(GATED)}")
        return gate


@dataclass
class Split:
    train: list[Record]
    holdout: list[Record]
    counts: dict = field(default_factory=dict)


def _when(record: Record) -> str:
    return (record.provenance.when if record.provenance else None) or ""


def assemble(feedback: list[Record], replay: list[Record], settings: RetrainSettings) -> Split:
    """Training and held-out records: the newest corrections are held out, and the same share
    of a seeded replay sample of earlier data. Pure."""
    if len(feedback) < settings.min_feedback:
        raise RetrainError(
            f"only {len(feedback)} feedback record(s); retraining needs at least "
            f"{settings.min_feedback} (review more reports with `appliance review`)"
        )
    newest_first = sorted(feedback, key=_when, reverse=True)
    n_hold = max(settings.min_holdout, math.ceil(settings.holdout_fraction * len(feedback)))
    n_hold = min(n_hold, len(feedback) - 1)
    rng = random.Random(settings.seed)
    k = min(len(replay), round(settings.replay_ratio * len(feedback)))
    sample = rng.sample(replay, k)
    r_hold = math.ceil(settings.holdout_fraction * len(sample)) if sample else 0
    return Split(
        train=newest_first[n_hold:] + sample[r_hold:],
        holdout=newest_first[:n_hold] + sample[:r_hold],
        counts={
            "feedback": len(feedback),
            "replay": len(sample),
            "train": len(feedback) - n_hold + len(sample) - r_hold,
            "holdout": n_hold + r_hold,
        },
    )


def gate(old: dict, new: dict, allowed: dict[str, float]) -> tuple[bool, list[str]]:
    """Whether ``new`` may replace ``old``: no gated metric drops by more than allowed. Pure."""
    reasons = []
    for metric, drop in allowed.items():
        before, after = old.get(metric), new.get(metric)
        if after is None and before is not None:
            reasons.append(f"{metric}: new bundle has none (served: {before:.4f})")
        elif before is not None and after < before - drop:
            reasons.append(f"{metric} fell {before:.4f} → {after:.4f} (allowed drop {drop:g})")
    return not reasons, reasons


def served_checkpoint(bundle_path: Path) -> Path:
    inside = Path(bundle_path) / "checkpoint"
    if (inside / "meta.json").is_file():
        return inside
    recorded = load_bundle(bundle_path, verify=False).manifest.get("export", {}).get("checkpoint")
    if recorded and (Path(recorded) / "meta.json").is_file():
        return Path(recorded)
    raise RetrainError(
        f"the served bundle {bundle_path} carries no checkpoint and its training checkpoint "
        f"{recorded!r} is not on this machine; export it with `appliance export --with-checkpoint`"
    )


def replay_pool(checkpoint: Path) -> list[Record]:
    """The records the checkpoint was trained on, when they are on this machine."""
    meta = json.loads((checkpoint / "meta.json").read_text())
    path = Path(meta["recipe"]["data"]["path"])
    if meta["recipe"]["data"].get("format", "records") != "records" or not path.is_file():
        return []
    try:
        return read_records(path)
    except (ValueError, OSError):
        return []


def evaluate_bundle(bundle_path: Path, records: list[Record], taxonomy) -> tuple[dict, list]:
    """Metrics of one bundle on ``records`` through the appliance's runtime; and the pairs."""
    from appliance.inspect_cmd import inspect_paths
    from appliance.inspector import open_inspector
    from appliance.schema import report_problems
    from train.clip_anomaly.evaluate import anomaly_metrics
    from train.evaluate import Pair, ReportLine, evaluate

    inspector = open_inspector(load_bundle(bundle_path), taxonomy=taxonomy, narrative="never")
    try:
        reports = inspect_paths([r.image for r in records], inspector, taxonomy)
    finally:
        inspector.close()
    pairs = [
        Pair(r, ReportLine(i + 1, rep))
        for i, (r, rep) in enumerate(zip(records, reports, strict=True))
    ]
    metrics = evaluate(pairs)
    valid = sum(1 for rep in reports if not report_problems(rep, taxonomy))
    errors = sum(1 for rep in reports if rep["verdict"] == "error")
    metrics["schema_valid_rate"] = valid / len(reports) if reports else None
    metrics.update(anomaly_metrics(pairs, list(taxonomy.labels)))  # image AUROC (memory bank)
    metrics["error_rate"] = errors / len(reports) if reports else None
    if metrics["map50"] is None:
        metrics["map50"] = 0.0 if any(r.objects for r in records) else None
    return metrics, pairs


def run_id() -> str:
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")


@dataclass
class RetrainResult:
    run_dir: Path
    promoted: bool
    reasons: list[str]
    old: dict
    new: dict
    bundle_id: str | None
    report: Path


def _recipe_for(checkpoint: Path, train_file: Path, settings: RetrainSettings):
    from train.recipe import recipe_from_json

    meta = json.loads((checkpoint / "meta.json").read_text())
    data = json.loads(json.dumps(meta["recipe"]))
    data["data"]["path"] = str(train_file)
    data["data"]["format"] = "records"
    detect = data["training"]["detect"]
    detect.update(max_steps=settings.steps, epochs=None, warmup_steps=min(5, settings.steps // 4))
    if settings.lr is not None:
        detect["lr"] = settings.lr
    if settings.batch_size is not None:
        data["training"]["batch_size"] = settings.batch_size
    data["training"]["save_every"] = max(1, settings.steps // 4)
    return recipe_from_json(data)


def _train_and_export(served_bundle, checkpoint, run_dir, settings, progress, losses):
    """LoRA continuation from the served checkpoint, exported like the served bundle."""
    from export.inspector_bundle import export_bundle
    from train.sft import train_stage

    recipe = _recipe_for(checkpoint, run_dir / "train.jsonl", settings)
    train_stage(
        recipe,
        "detect",
        run_dir / "checkpoint",
        checkpoint,
        continue_training=True,
        progress=progress,
        on_step=lambda step, loss: losses.append((step, loss)),
    )
    vlm = served_bundle.manifest["vlm"]
    return export_bundle(
        run_dir / "checkpoint",
        run_dir / "bundle",
        quant=vlm["quantization"],
        max_tokens=int(vlm["max_tokens"]),
        with_checkpoint=True,
    )


def enroll_again(served_bundle, train: list[Record], out: Path):
    """The few-shot memory enrolled again: its normal images plus the confirmed good parts
    (feedback records without defects) of the training split, with the served settings. A
    ``memory-bank`` bundle is enrolled anew; a ``clip-anomaly`` bundle keeps its graph (and
    description model) and gets a new memory and thresholds (``clip_enroll.reenroll``)."""
    from appliance.anomaly.enroll import NORMALS_DIR, enroll
    from appliance.anomaly.settings import AnomalySettings

    kept = sorted((served_bundle.path / NORMALS_DIR).glob("*"))
    if not kept:
        raise RetrainError(
            f"{served_bundle.path} keeps no normal images (enrolled before they were kept); "
            "enroll again by hand with `appliance enroll`"
        )
    good = [r.image for r in train if not r.objects]
    if not good:
        raise RetrainError("the feedback holds no new good parts to add to the memory")
    if served_bundle.kind == "clip-anomaly":  # the CLIP branch's memory, torch-free
        from appliance.anomaly.clip_enroll import reenroll

        return reenroll(served_bundle, good, out)
    anomaly = AnomalySettings.from_dict(served_bundle.section("anomaly"))
    return enroll(
        [*kept, *good],
        out,
        taxonomy=served_bundle.taxonomy,
        backbone_onnx=served_bundle.file(anomaly.backbone),
        size=tuple(anomaly.working_size),
        layers=anomaly.layers,
        max_patches=anomaly.max_patches,
        prompt_weight=anomaly.prompt_weight,
        reweight_neighbors=anomaly.reweight_neighbors,
        layer_weights=anomaly.layer_weights,
        score_sigma=anomaly.score_sigma,
    )


def run_retrain(
    state_dir: Path,
    configured_bundle: Path,
    taxonomy,
    settings: RetrainSettings,
    *,
    by: str,
    progress: bool = True,
) -> RetrainResult:
    from train.retrain_report import write_report

    registry = BundleRegistry(state_dir)
    served = registry.active_path() or Path(configured_bundle)
    served_bundle = load_bundle(served)
    if served_bundle.kind not in ("vlm", "memory-bank", "clip-anomaly"):
        raise RetrainError(f"bundles of kind {served_bundle.kind!r} are not retrained here")
    feedback_file = Path(state_dir) / FEEDBACK_RECORDS
    if not feedback_file.is_file():
        raise RetrainError(f"no feedback yet ({feedback_file}); review reports first")
    checkpoint = served_checkpoint(served) if served_bundle.kind == "vlm" else None
    replay = replay_pool(checkpoint) if checkpoint else []
    split = assemble(read_records(feedback_file), replay, settings)
    run_dir = Path(state_dir) / "retrain" / run_id()
    run_dir.mkdir(parents=True, exist_ok=True)
    write_records(run_dir / "train.jsonl", split.train)
    write_records(run_dir / "holdout.jsonl", split.holdout)
    losses: list[tuple[int, float]] = []
    started = time.monotonic()
    if settings.pause_daemon:
        registry.request_pause(f"retrain {run_dir.name}")
    try:
        if checkpoint is None:
            candidate = enroll_again(served_bundle, split.train, run_dir / "bundle")
        else:
            candidate = _train_and_export(
                served_bundle, checkpoint, run_dir, settings, progress, losses
            )
        old, old_pairs = evaluate_bundle(served, split.holdout, taxonomy)
        new, new_pairs = evaluate_bundle(candidate.path, split.holdout, taxonomy)
    finally:
        if settings.pause_daemon:
            registry.release_pause()
    passed, reasons = gate(old, new, settings.gate)
    summary = {
        "run": run_dir.name,
        "by": by,
        "parent": served_bundle.id,
        "counts": split.counts,
        "steps": settings.steps if checkpoint else 0,  # the memory bank is enrolled, not trained
        "seconds": round(time.monotonic() - started, 1),
        "promoted": passed,
        "reasons": reasons,
        "before": {k: old.get(k) for k in GATED},
        "after": {k: new.get(k) for k in GATED},
    }
    report = write_report(run_dir, summary, losses, old, new, old_pairs, new_pairs)
    bundle_id = None
    if passed:
        shutil.copy2(report, candidate.path / "retrain-report.md")
        amended = amend_manifest(candidate.path, {"retrain": {"summary": summary}})
        registry.adopt(served, by=by)
        bundle_id = registry.install(amended.path).id
        registry.promote(bundle_id, by=by, reason=f"retrain {run_dir.name}")
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return RetrainResult(run_dir, passed, reasons, old, new, bundle_id, report)
