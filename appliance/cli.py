"""The ``appliance`` command: run, inspect, enroll, schema, check-config, status, demo; and, with
the train extra, train, distill, eval and export."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

from appliance.config import ConfigError, load_config

DEFAULT_CONFIGS = (Path("/etc/appliance/config.toml"), Path("config.toml"))


def _config_path(given: str | None) -> Path:
    if given:
        return Path(given)
    if os.environ.get("APPLIANCE_CONFIG"):
        return Path(os.environ["APPLIANCE_CONFIG"])
    for candidate in DEFAULT_CONFIGS:
        if candidate.is_file():
            return candidate
    raise SystemExit("no config given: pass --config PATH or set APPLIANCE_CONFIG")


def _setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def cmd_check_config(args) -> int:
    config = load_config(Path(args.path))  # problems: printed by main(), exit 2
    print(
        f"{args.path}: OK ({len(config.sources.folder)} folder source(s), "
        f"{len(config.taxonomy_obj.labels)} labels, bundle {config.model.bundle})"
    )
    return 0


def cmd_schema(args) -> int:
    from appliance.schema import report_schema
    from appliance.taxonomy import Taxonomy

    if args.config:
        taxonomy = load_config(Path(args.config), check_paths=False).taxonomy_obj
    else:
        taxonomy = Taxonomy(labels=())
    if args.feedback:
        from appliance.feedback import feedback_schema

        print(json.dumps(feedback_schema(taxonomy), indent=2))
        return 0
    print(json.dumps(report_schema(taxonomy), indent=2))
    return 0


def cmd_review(args) -> int:
    from appliance.review_cmd import run_review

    return run_review(args)


def cmd_run(args) -> int:
    config = load_config(_config_path(args.config))  # problems: printed by main(), exit 2
    _setup_logging(config.logging.level)
    from appliance.bundle import BundleError
    from appliance.daemon import Daemon

    try:
        daemon = Daemon(config)
    except BundleError as exc:
        print(f"cannot serve the bundle: {exc}", file=sys.stderr)
        return 3
    daemon.run_forever()
    return 0


def cmd_inspect(args) -> int:
    from appliance.inspect_cmd import inspect_files

    _setup_logging("WARNING")
    return inspect_files(args)


def cmd_enroll(args) -> int:
    _setup_logging("INFO")
    from appliance.anomaly.enroll import enroll
    from appliance.taxonomy import Taxonomy

    try:
        from export.efficientnet_lite0 import build_backbone_onnx
    except ImportError as exc:
        print(
            f"enroll needs the export module and onnx ({exc}); pip install the appliance",
            file=sys.stderr,
        )
        return 2
    normal = sorted(
        p
        for p in Path(args.normal).iterdir()
        if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
    )
    if not normal:
        print(f"--normal {args.normal}: no images (.png/.jpg/.bmp/.tif) found", file=sys.stderr)
        return 2
    taxonomy = (
        load_config(Path(args.config), check_paths=False).taxonomy_obj
        if args.config
        else Taxonomy(labels=())
    )
    with tempfile.TemporaryDirectory() as tmp:
        backbone = build_backbone_onnx(Path(tmp) / "backbone.onnx")
        bundle = enroll(
            normal,
            Path(args.out),
            taxonomy=taxonomy,
            backbone_onnx=backbone,
            size=(args.size, args.size),
        )
    print(
        json.dumps(
            {
                "bundle": str(bundle.path),
                "id": bundle.id,
                "normal_images": len(normal),
                "thresholds": bundle.manifest.get("anomaly", {}).get("thresholds"),
            },
            indent=2,
        )
    )
    return 0


def cmd_status(args) -> int:
    from appliance.daemon import state_paths
    from appliance.store import Store

    config = load_config(_config_path(args.config), check_paths=False)
    db = state_paths(config)["db"]
    if not db.exists():
        print(f"no state yet at {db}: the daemon has not run with this config", file=sys.stderr)
        return 1
    store = Store(db)
    stats = store.stats()
    stats["recent"] = store.recent_reports(args.recent)
    if args.json:
        print(json.dumps(stats, indent=2, default=str))
        return 0
    print(f"queue depth      {stats['queue_depth']}")
    print(f"publish backlog  {stats['publish_backlog']}")
    print(
        f"images / reports {stats['images_total']} / {stats['reports_total']} "
        f"(duplicates skipped: {stats['duplicates']})"
    )
    print(f"verdicts         {stats['verdicts']}")
    print(f"error codes      {stats['error_codes']}")
    print(
        f"rate (last {stats['rate_window_s']:.0f}s)  {stats['reports_per_min']:.1f} reports/min, "
        f"{stats['published_per_min']:.1f} published/min"
    )
    for row in stats["recent"]:
        published = "published" if row["published_at"] else "waiting"
        print(f"  {row['id']}  {row['verdict']:<9} {row['error_code'] or '':<18} {published}")
    return 0


def cmd_bundles(args) -> int:
    from appliance.bundle import BundleError
    from appliance.registry import BundleRegistry, RegistryError

    config = load_config(_config_path(args.config), check_paths=False)
    registry = BundleRegistry(config.state.dir)
    who = os.environ.get("USER") or "unknown"
    try:
        if args.action == "install":
            bundle = registry.install(Path(args.target))
            print(f"installed {bundle.id}")
            if args.promote:
                registry.adopt(config.model.bundle, by=who)
                registry.promote(bundle.id, by=who, reason="installed by hand")
                print(f"active: {bundle.id}")
        elif args.action == "rollback":
            print(f"active: {registry.rollback(args.target, by=who)}")
        else:
            entries = registry.entries()
            if args.json:
                print(json.dumps([{**e.__dict__, "path": str(e.path)} for e in entries]))
                return 0
            if not entries:
                print(f"no bundles installed; serving [model] bundle = {config.model.bundle}")
            for e in entries:
                mark = "*" if e.active else " "
                summary = " ".join(f"{k}={v}" for k, v in e.summary.items())
                print(f"{mark} {e.id}  {e.kind:<12} {e.created_at}  {summary}")
    except (RegistryError, BundleError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def _train_side(command: str, *modules: str) -> list | None:
    """Import train/export modules lazily; None (after saying which extra to install) if missing."""
    import importlib

    try:
        return [importlib.import_module(name) for name in modules]
    except ImportError as exc:
        print(
            f"`appliance {command}` needs the train extra ({exc.name} is missing): "
            "pip install 'inspection-appliance[train]'",
            file=sys.stderr,
        )
        return None


def cmd_train(args) -> int:
    modules = _train_side("train", "train.checkpoint", "train.cli", "train.data")
    if modules is None:
        return 2
    checkpoint, cli, data = modules
    try:
        cli.run_train(args.stage, args.recipe, args.out, args.from_ckpt)
    except (checkpoint.CheckpointError, data.DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_distill(args) -> int:
    modules = _train_side(
        "distill", "train.chat_client", "train.data", "train.distill", "train.recipe"
    )
    if modules is None:
        return 2
    client, data, distill, recipe = modules
    _setup_logging("WARNING")
    try:
        tally = distill.run_distill(
            recipe.load_recipe(args.recipe),
            Path(args.out),
            questions_per_image=args.questions_per_image,
            limit=args.limit,
        )
    except (client.TeacherError, data.DataError, ValueError) as exc:  # RecipeError: ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: {tally.summary()}")
    return 0


def cmd_eval(args) -> int:
    modules = _train_side("eval", "train.data", "train.evaluate")
    if modules is None:
        return 2
    data, evaluate = modules
    try:
        evaluate.run_eval(args)
    except (data.DataError, ValueError, OSError) as exc:  # DataError says path:line: why
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_export(args) -> int:
    if args.formats:
        from export.formats import export_formats_table

        print(export_formats_table())
        return 0
    if not (args.checkpoint and args.out):
        print("export needs --checkpoint DIR and --out BUNDLE", file=sys.stderr)
        return 2
    modules = _train_side("export", "export.inspector_bundle", "train.checkpoint")
    if modules is None:
        return 2
    exporter, checkpoint = modules
    _setup_logging("INFO")
    try:
        bundle = exporter.export_bundle(
            Path(args.checkpoint),
            Path(args.out),
            quant=args.quant,
            tensorrt=args.tensorrt,
            max_tokens=args.max_tokens,
            with_checkpoint=args.with_checkpoint,
        )
    except (exporter.ExportError, checkpoint.CheckpointError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    print(exporter.summary(bundle))
    return 0


def cmd_clip_anomaly(args) -> int:
    modules = _train_side(
        "clip-anomaly", "train.clip_anomaly.build", "export.inspector_bundle", "appliance.anomaly"
    )
    if modules is None:
        return 2
    build, exporter, anomaly = modules
    _setup_logging("INFO")
    try:
        recipe = build.load_clip_recipe(args.recipe)
        bundle = build.build_clip_bundle(recipe, Path(args.out))
    except (exporter.ExportError, anomaly.EnrollError, ValueError, OSError) as exc:
        print(f"clip-anomaly failed: {exc}", file=sys.stderr)  # RecipeError, DataError: ValueError
        return 2
    print(json.dumps(build.summary(bundle), indent=2))
    return 0


def cmd_retrain(args) -> int:
    modules = _train_side("retrain", "train.retrain", "train.checkpoint")
    if modules is None:
        return 2
    retrain, checkpoint = modules
    import tomllib

    config = load_config(_config_path(args.config))
    try:
        data = tomllib.loads(Path(args.recipe).read_text()) if args.recipe else {}
        unknown = sorted(set(data) - {"retrain"})
        if unknown:
            raise retrain.RetrainError(
                f"{args.recipe}: unknown section(s) {unknown}; use [retrain]"
            )
        settings = retrain.RetrainSettings(**data.get("retrain", {}))
        if args.steps:
            settings = settings.model_copy(update={"steps": args.steps})
        result = retrain.run_retrain(
            config.state.dir,
            config.model.bundle,
            config.taxonomy_obj,
            settings,
            by=os.environ.get("USER") or "unknown",
        )
    except (retrain.RetrainError, checkpoint.CheckpointError, ValueError, OSError) as exc:
        print(f"retrain failed: {exc}", file=sys.stderr)
        return 2
    verdict = f"promoted {result.bundle_id}" if result.promoted else "kept the served bundle"
    print(f"retrain {result.run_dir.name}: {verdict}")
    for reason in result.reasons:
        print(f"  {reason}")
    for key in ("map50", "f1", "schema_valid_rate", "image_auroc"):
        before, after = result.old.get(key), result.new.get(key)
        print(
            f"  {key:<18} {before if before is None else round(before, 4)} → "
            f"{after if after is None else round(after, 4)}"
        )
    print(f"report: {result.report}")
    return 0 if result.promoted else 1


def cmd_demo(args) -> int:
    from appliance.demo import run_demo

    _setup_logging("WARNING")
    return run_demo(Path(args.workspace) if args.workspace else None, count=args.count)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the inspection daemon")
    p.add_argument("--config")
    p.set_defaults(func=cmd_run)
    p = sub.add_parser("inspect", help="inspect image files, one JSON report per line")
    p.add_argument("images", nargs="+")
    p.add_argument("--bundle")
    p.add_argument("--config")
    p.add_argument("--no-narrative", action="store_true")
    p.set_defaults(func=cmd_inspect)
    p = sub.add_parser("enroll", help="build a few-shot anomaly bundle from normal images")
    p.add_argument("--normal", required=True, help="directory of normal (good) images")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--config", help="take the taxonomy from this config")
    p.add_argument("--size", type=int, default=256, help="working resolution (square)")
    p.set_defaults(func=cmd_enroll)
    p = sub.add_parser("schema", help="print the report JSON Schema")
    p.add_argument("--config")
    p.add_argument("--feedback", action="store_true", help="the feedback message schema instead")
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("path")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("status", help="queue depth, backlog, recent reports, errors and rates")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")
    p.add_argument("--recent", type=int, default=10)
    p.set_defaults(func=cmd_status)
    from appliance import review_cmd

    p = sub.add_parser(
        "review",
        help="confirm or correct a report; list reports to review; import labelled images",
        description=review_cmd.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    review_cmd.add_review_arguments(p)
    p.set_defaults(func=cmd_review)
    p = sub.add_parser("train", help="fine-tune an inspector (needs the train extra)")
    p.add_argument("--stage", required=True, choices=["detect", "knowledge", "grpo"])
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True, help="checkpoint directory (resumed if unfinished)")
    p.add_argument("--from", dest="from_ckpt", help="checkpoint of the previous stage")
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("distill", help="stage-2 data: teacher answers to sampled questions")
    p.add_argument("--recipe", required=True, help="recipe TOML with a [distill] section")
    p.add_argument("--out", required=True, help="records .jsonl to write (answers cached beside)")
    p.add_argument("--questions-per-image", type=int, help="overrides distill.questions_per_image")
    p.add_argument("--limit", type=int, help="distil only the first N images")
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("eval", help="score reports against a ground-truth data set (train extra)")
    p.add_argument("--reports", required=True, help="appliance reports, one JSON per line")
    p.add_argument("--data", required=True, help="the ground-truth data set")
    p.add_argument("--format", default="records", help="yolo|voc|coco|labelme|records")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.add_argument("--config", help="check reports against this config's taxonomy")
    p.add_argument("--classes", help="yolo: comma-separated class names (else classes.txt)")
    p.add_argument("--images-dir", help="coco: folder of the images")
    p.add_argument("--judge-url", help="OpenAI-compatible endpoint of the judge model")
    p.add_argument("--judge-model", help="the judge's model name")
    p.add_argument("--judge-key-file", help="file holding the judge's API key")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("export", help="turn a trained checkpoint into a bundle (train extra)")
    p.add_argument("--checkpoint", help="checkpoint directory from `appliance train`")
    p.add_argument("--out", help="bundle directory to write (must not exist)")
    p.add_argument("--quant", default="Q8_0", choices=["F32", "F16", "Q8_0", "Q5_K_M", "Q4_K_M"])
    p.add_argument("--tensorrt", choices=["fp16", "int8"], help="also build a vision engine")
    p.add_argument("--max-tokens", type=int, default=512, help="answer length limit at serving")
    p.add_argument(
        "--with-checkpoint",
        action="store_true",
        help="carry the checkpoint inside the bundle (needed by `appliance retrain`)",
    )
    p.add_argument("--formats", action="store_true", help="print the export formats table")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser(
        "clip-anomaly",
        help="build a seed-002 CLIP anomaly bundle from a recipe (train extra)",
        description=(
            "Train the text-driven focuser (and optionally the adapter into a language model "
            "that writes descriptions), enrol normal shots and export a clip-anomaly bundle. "
            "See docs/clip-anomaly.md and examples/clip-anomaly.toml."
        ),
    )
    p.add_argument("--recipe", required=True, help="TOML: [clip], [taxonomy], [normal], ...")
    p.add_argument("--out", required=True, help="bundle directory to write (must not exist)")
    p.set_defaults(func=cmd_clip_anomaly)
    p = sub.add_parser("retrain", help="learn from feedback; promote only if not worse")
    p.add_argument("--config")
    p.add_argument("--recipe", help="TOML with a [retrain] section (steps, gate, replay, ...)")
    p.add_argument("--steps", type=int, help="training steps (overrides the recipe)")
    p.set_defaults(func=cmd_retrain)
    p = sub.add_parser("bundles", help="installed bundles: list, install, rollback")
    p.add_argument("action", choices=["list", "install", "rollback"])
    p.add_argument("target", nargs="?", help="install: bundle dir; rollback: bundle id")
    p.add_argument("--promote", action="store_true", help="install: make it active at once")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_bundles)
    p = sub.add_parser("demo", help="enroll, run the daemon, drop sample images, show reports")
    p.add_argument("--workspace")
    p.add_argument("--count", type=int, default=6)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"{exc.source}: {problem}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
