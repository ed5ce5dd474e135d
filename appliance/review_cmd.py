"""``appliance review``: technicians confirm or correct reports, list what awaits review, and import
folders of labelled images. Every outcome is an inspection record under ``{state.dir}/feedback``.

    appliance review REPORT_ID --accept | --reject | --set-label I LABEL | --set-box I x1,y1,x2,y2
                     | --set-attr I NAME=VALUE | --remove I | --add LABEL x1,y1,x2,y2
                     [--who NAME] [--note TEXT] [--image PATH] [--config P]
    appliance review list [--pending] [--recent N] [--json] [--config P]
    appliance review import DIR --format yolo|voc|coco|labelme [--who NAME] [--config P]

``I`` is the defect's index in the report (0 first). ``--set-attr I NAME=`` removes the attribute.
"""

from __future__ import annotations

import argparse
import getpass
import hashlib
import importlib
import json
import os
import sys
from pathlib import Path

# Only the functions below import anything heavy: cli.py builds this parser on every command.
IMPORT_FORMATS = ("yolo", "voc", "coco", "labelme")


def add_review_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("target", metavar="REPORT_ID|list|import", help="a report id, list or import")
    p.add_argument("path", nargs="?", metavar="DIR", help="import: the labelled data set")
    p.add_argument("--config")
    verdict = p.add_mutually_exclusive_group()
    verdict.add_argument("--accept", dest="action", action="store_const", const="accept")
    verdict.add_argument("--reject", dest="action", action="store_const", const="reject")
    edit = {"action": "append", "default": [], "nargs": 2}
    p.add_argument("--set-label", metavar=("I", "LABEL"), **edit)
    p.add_argument("--set-box", metavar=("I", "X1,Y1,X2,Y2"), **edit)
    p.add_argument("--set-attr", metavar=("I", "NAME=VALUE"), **edit)
    p.add_argument("--remove", metavar="I", action="append", default=[], type=int)
    p.add_argument("--add", metavar=("LABEL", "X1,Y1,X2,Y2"), help="a missed defect", **edit)
    p.add_argument("--who", help="who reviewed (default: $USER)")
    p.add_argument("--note")
    p.add_argument("--image", help="the report's image, when the appliance no longer has it")
    p.add_argument("--pending", action="store_true", help="list: only reports without feedback")
    p.add_argument("--recent", type=int, default=20, help="list: how many recent reports")
    p.add_argument("--json", action="store_true", help="list: JSON output")
    p.add_argument("--format", choices=IMPORT_FORMATS, help="import: the annotation format")
    p.add_argument("--classes", help="import yolo: comma-separated class names")
    p.add_argument("--images-dir", help="import coco: folder of the images")


class UsageError(Exception):
    pass


def _index(text: str, option: str) -> int:
    if not text.isdigit():
        raise UsageError(f"{option}: defect index {text!r} must be 0, 1, 2, ...")
    return int(text)


def parse_box(text: str, option: str) -> list[float]:
    """``"x1,y1,x2,y2"`` → four numbers (pixels)."""
    try:
        box = [float(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise UsageError(f"{option}: box {text!r} must be x1,y1,x2,y2 in pixels")
    return [int(v) if v.is_integer() else v for v in box]


def feedback_from_args(args, *, when: str) -> dict:
    """The feedback message the options describe (checked later against the schema)."""
    edits: list[dict] = []
    for i, label in args.set_label:
        edits.append({"defect": _index(i, "--set-label"), "label": label})
    for i, box in args.set_box:
        edits.append({"defect": _index(i, "--set-box"), "bbox": parse_box(box, "--set-box")})
    for i, pair in args.set_attr:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise UsageError(f"--set-attr: {pair!r} must be NAME=VALUE (NAME= removes it)")
        edits.append({"defect": _index(i, "--set-attr"), "attributes": {name: value or None}})
    edits += [{"defect": i, "remove": True} for i in args.remove]
    add = [
        {"label": label, "bbox": parse_box(box, "--add"), "attributes": {}}
        for label, box in args.add
    ]
    action = args.action or ("fix" if edits or add else None)
    if action is None:
        raise UsageError("say what the report gets: --accept, --reject, --set-*, --remove or --add")
    feedback = {"report_id": args.target, "who": args.who or _user(), "when": when}
    feedback["action"] = action
    if edits:
        feedback["edits"] = edits
    if add:
        feedback["add"] = add
    if args.note:
        feedback["note"] = args.note
    return feedback


def _user() -> str:
    try:
        return getpass.getuser()  # $LOGNAME, $USER, ... then the password database
    except (KeyError, OSError):
        raise UsageError("cannot tell who you are: pass --who NAME") from None


def _service(config):
    from appliance.daemon import state_paths
    from appliance.feedback_store import FeedbackService

    paths = state_paths(config)
    return FeedbackService.open(
        paths["feedback"], paths["db"], config.outbox.dir, config.taxonomy_obj
    )


def review_report(args, config) -> int:
    from appliance.feedback import FeedbackError
    from appliance.report import now_iso

    if args.path:
        raise UsageError(f"unexpected {args.path!r} after the report id")
    service = _service(config)
    try:
        feedback = feedback_from_args(args, when=now_iso())
        entry, added = service.submit(
            feedback, via="cli", image=Path(args.image) if args.image else None
        )
    except FeedbackError as exc:
        for problem in exc.problems:
            print(f"error: {problem}", file=sys.stderr)
        return 2
    objects = entry.record["objects"]
    state = "recorded" if added else "already recorded"
    print(
        f"report {args.target}: {feedback['action']} by {entry.who} {state} "
        f"({len(objects)} object(s): {', '.join(o['label'] for o in objects) or 'no defects'}) "
        f"in {service.store.records_path}"
    )
    return 0


def list_reports(args, config) -> int:
    service = _service(config)
    latest = service.store.latest()
    rows, seen = [], set()
    for row in service.finder.recent(max(args.recent, 1) * 4):
        if row["id"] in seen:
            continue
        seen.add(row["id"])
        entry = latest.get(f"report:{row['id']}")
        row["feedback"] = (
            None
            if entry is None
            else {"who": entry["who"], "when": entry["when"], "id": entry["id"]}
        )
        if args.pending and (entry is not None or row["verdict"] == "error"):
            continue
        rows.append(row)
    rows = rows[: args.recent]
    if args.json:
        print(json.dumps(rows, indent=2, default=str))
        return 0
    for row in rows:
        fb = row["feedback"]
        status = f"reviewed by {fb['who']} at {fb['when']}" if fb else "pending"
        if row["verdict"] == "error":
            status = f"{row['error_code']} (nothing to review)"
        print(f"{row['id']}  {row['verdict']:<9} {status}")
    return 0


def import_dataset(args, config) -> int:
    if not args.path or not args.format:
        raise UsageError("import needs DIR and --format yolo|voc|coco|labelme")
    try:
        data = importlib.import_module("train.data")
    except ImportError as exc:
        print(
            f"`appliance review import` needs the train extra ({exc.name} is missing): "
            "pip install 'inspection-appliance[train]'",
            file=sys.stderr,
        )
        return 2
    from appliance.report import now_iso

    options = {}
    if args.classes:
        options["classes"] = [c.strip() for c in args.classes.split(",") if c.strip()]
    if args.images_dir:
        options["images_dir"] = Path(args.images_dir)
    try:
        records = data.read_dataset(Path(args.path), args.format, **options)
    except (data.DataError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    service = _service(config)
    entries = [
        imported_entry(service.store, record, Path(args.path), args.who or _user(), now_iso())
        for record in records
    ]
    added = service.store.add(entries)
    unknown = sorted(
        {o["label"] for e in entries for o in e.record["objects"]} - set(config.taxonomy_obj.labels)
    )
    print(
        f"{args.path}: {sum(added)} image(s) recorded, {len(added) - sum(added)} already there, "
        f"in {service.store.records_path}"
    )
    if unknown:
        print(f"note: labels not in the taxonomy (map them when retraining): {unknown}")
    return 0


def imported_entry(store, record, root: Path, who: str, when: str):
    """A data-set ``Record`` → a history entry; its image is copied into the feedback folder."""
    from appliance.feedback import inspection_record
    from appliance.feedback_store import Entry

    data = Path(record.image).read_bytes()
    ext = Path(record.image).suffix.lstrip(".").lower() or "img"
    image = store.keep_image(data, ext)
    base = Path(os.path.abspath(root if root.is_dir() else root.parent))
    try:
        origin = Path(record.image).relative_to(base).as_posix()
    except ValueError:
        origin = str(record.image)
    objects = [
        {"label": o.label, "bbox": list(o.bbox), "attributes": dict(o.attributes)}
        for o in record.objects
    ]
    line = inspection_record(
        image=image,
        width=record.width,
        height=record.height,
        objects=objects,
        who=who,
        when=when,
        ref=origin,
    )
    sha = Path(image).stem
    digest = hashlib.sha256(json.dumps([sha, line["objects"]]).encode()).hexdigest()[:32]
    return Entry(
        id=f"import:{digest}",
        key=f"image:{sha}",
        via="import",
        who=who,
        when=when,
        record=line,
        origin=origin,
    )


def run_review(args) -> int:
    from appliance.cli import _config_path
    from appliance.config import load_config

    config = load_config(_config_path(args.config), check_paths=False)
    handler = {"list": list_reports, "import": import_dataset}.get(args.target, review_report)
    try:
        return handler(args, config)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
