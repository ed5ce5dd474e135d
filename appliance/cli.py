"""The ``appliance`` command: run, inspect, enroll, schema, check-config, status, train, demo."""

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
    print(json.dumps(report_schema(taxonomy), indent=2))
    return 0


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


def cmd_train(args) -> int:
    try:
        from train.checkpoint import CheckpointError
        from train.cli import run_train
        from train.data import DataError
    except ImportError as exc:
        print(
            f"`appliance train` needs the train extra ({exc.name} is missing): "
            "pip install 'inspection-appliance[train]'",
            file=sys.stderr,
        )
        return 2
    try:
        run_train(args.stage, args.recipe, args.out, args.from_ckpt)
    except (CheckpointError, DataError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


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
    p.set_defaults(func=cmd_schema)
    p = sub.add_parser("check-config", help="validate a config file")
    p.add_argument("path")
    p.set_defaults(func=cmd_check_config)
    p = sub.add_parser("status", help="queue depth, backlog, recent reports, errors and rates")
    p.add_argument("--config")
    p.add_argument("--json", action="store_true")
    p.add_argument("--recent", type=int, default=10)
    p.set_defaults(func=cmd_status)
    p = sub.add_parser("train", help="fine-tune an inspector (needs the train extra)")
    p.add_argument("--stage", required=True, choices=["detect", "knowledge"])
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True, help="checkpoint directory (resumed if unfinished)")
    p.add_argument("--from", dest="from_ckpt", help="checkpoint of the previous stage")
    p.set_defaults(func=cmd_train)
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
