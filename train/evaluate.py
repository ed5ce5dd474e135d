"""``appliance eval``: score appliance reports against a ground-truth data set.

Reports (the JSON lines the daemon or ``appliance inspect`` writes) are matched to ground-truth
images by file name (``source.path``'s last part; reports without a path, e.g. from MQTT, by the
image's SHA-256). The ground truth is read by ``train.data.read_dataset`` in any of its formats. The
maths is ``appliance.metrics`` (pure, numpy); this module only reads, matches, prints and asks the
optional judge. It imports no torch, so it runs wherever ``train.data`` does (numpy and Pillow).

The judge (seed 000, Fig. 5) is an OpenAI-compatible chat endpoint that rates the report's
narrative against the ground truth from 1 to 10. ``judge_messages`` and ``parse_judge_score`` are
pure; ``train.chat_client.ChatClient`` is imported only when ``--judge-url`` is given.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

from appliance import metrics
from appliance.metrics import Detection, GroundTruth
from appliance.schema import report_problems
from appliance.taxonomy import Taxonomy
from train.clip_anomaly.evaluate import anomaly_metrics
from train.data import FORMATS, DataError, Record, read_dataset

MALFORMED = "<malformed>"  # the label of a reported defect without a usable label or box
JUDGE_MAX_TOKENS = 16  # the answer is one number; a little room for "[[7]]" or "7/10"


@dataclass(frozen=True)
class ReportLine:
    line: int
    report: dict


@dataclass(frozen=True)
class Pair:
    """One ground-truth image and the report about it."""

    record: Record
    report: ReportLine


def read_reports(path: str | Path) -> list[ReportLine]:
    """Every report of a JSON-lines file (blank lines skipped); bad lines raise ``DataError``."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "reports file does not exist")
    reports = []
    with open(path, encoding="utf-8") as handle:
        for number, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                data = json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(path, number, f"not a JSON report line: {exc.msg}") from None
            if not isinstance(data, dict):
                raise DataError(
                    path, number, f"a report is a JSON object, not {type(data).__name__}"
                )
            reports.append(ReportLine(number, data))
    if not reports:
        raise DataError(path, None, "no reports in the file: write one JSON report per line")
    return reports


def _file_name(report: dict) -> str | None:
    source = report.get("source")
    path = source.get("path") if isinstance(source, dict) else None
    if not isinstance(path, str):
        return None
    return re.split(r"[\\/]", path)[-1] or None


def _sha256(report: dict) -> str | None:
    image = report.get("image")
    return image.get("sha256") if isinstance(image, dict) else None


def _by_path_suffix(path: str, candidates: list[Record]) -> list[Record]:
    """The candidates sharing the most trailing path parts with ``path``."""
    parts = re.split(r"[\\/]", path)[::-1]

    def shared(record: Record) -> int:
        own = record.image.parts[::-1]
        same = (k for k, (a, b) in enumerate(zip(parts, own, strict=False)) if a != b)
        return next(same, min(len(parts), len(own)))

    best = max(map(shared, candidates))
    return [r for r in candidates if shared(r) == best]


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def match_reports(reports: list[ReportLine], records: list[Record], where: Path) -> list[Pair]:
    """Pair each report with its ground-truth image; unknown, ambiguous or repeated images raise."""
    by_name: dict[str, list[Record]] = {}
    for record in records:
        by_name.setdefault(record.image.name, []).append(record)
    by_sha: dict[str, Record] | None = None
    taken: dict[Path, int] = {}
    pairs = []
    for item in reports:
        name = _file_name(item.report)
        if name is not None:
            candidates = by_name.get(name, [])
            if len(candidates) > 1:
                candidates = _by_path_suffix(item.report["source"]["path"], candidates)
            what = f"image {name!r}"
        else:
            sha = _sha256(item.report)
            if not isinstance(sha, str):
                raise DataError(where, item.line, "report has neither source.path nor image.sha256")
            if by_sha is None:
                by_sha = {_file_sha256(r.image): r for r in records}
            candidates = [by_sha[sha]] if sha in by_sha else []
            what = f"image with sha256 {sha[:12]}... (the report has no source.path)"
        if not candidates:
            raise DataError(
                where,
                item.line,
                f"report for {what}, which is not in the ground truth ({len(records)} images); "
                "evaluate against the data set the images came from",
            )
        if len(candidates) > 1:
            paths = ", ".join(str(r.image) for r in candidates[:3])
            raise DataError(where, item.line, f"report for {what} matches several images: {paths}")
        record = candidates[0]
        if record.image in taken:
            raise DataError(
                where,
                item.line,
                f"second report for {record.image} (the first is line {taken[record.image]}); "
                "keep one report per image",
            )
        _check_size(item, record, where)
        taken[record.image] = item.line
        pairs.append(Pair(record, item))
    return pairs


def _check_size(item: ReportLine, record: Record, where: Path) -> None:
    image = item.report.get("image")
    size = (image.get("width"), image.get("height")) if isinstance(image, dict) else (None, None)
    if None not in size and size != (record.width, record.height):
        raise DataError(
            where,
            item.line,
            f"report says the image is {size[0]}x{size[1]} but {record.image} is "
            f"{record.width}x{record.height}: same file name, different image",
        )


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def report_detections(report: dict) -> list[Detection]:
    """A report's defects (none for an error report). A defect without a usable label and box
    stays in as a ``MALFORMED`` detection that matches nothing, so it counts as a false alarm."""
    defects = report.get("defects") if report.get("verdict") != "error" else []
    detections = []
    for defect in defects if isinstance(defects, list) else []:
        defect = defect if isinstance(defect, dict) else {}
        label, box, score = defect.get("label"), defect.get("bbox"), defect.get("score")
        attributes = defect.get("attributes")
        usable_box = isinstance(box, list) and len(box) == 4 and all(map(_number, box))
        if not isinstance(label, str) or not usable_box:
            label, box = MALFORMED, [0.0, 0.0, 0.0, 0.0]
        detections.append(
            Detection(
                label,
                [float(v) for v in box],
                float(score) if _number(score) else 0.0,
                attributes if isinstance(attributes, dict) else {},
            )
        )
    return detections


def record_truth(record: Record) -> list[GroundTruth]:
    return [GroundTruth(obj.label, obj.bbox, dict(obj.attributes)) for obj in record.objects]


def taxonomy_from_records(records: list[Record]) -> Taxonomy:
    """The labels and attribute values the ground truth uses, for checking reports without a
    deployment config (``ValueError`` when they are not taxonomy identifiers)."""
    attributes: dict[str, set[str]] = {}
    for record in records:
        for obj in record.objects:
            for name, value in obj.attributes.items():
                attributes.setdefault(name, set()).add(value)
    labels = sorted({obj.label for record in records for obj in record.objects})
    return Taxonomy(tuple(labels), {k: tuple(sorted(v)) for k, v in attributes.items()})


def schema_problems(reports: list[ReportLine], taxonomy: Taxonomy | None) -> dict[int, list[str]]:
    """Line → schema problems, for the reports that break the schema (None: cannot check)."""
    if taxonomy is None:
        return {}
    found = {item.line: report_problems(item.report, taxonomy) for item in reports}
    return {line: problems for line, problems in found.items() if problems}


def evaluate(pairs: list[Pair]) -> dict:
    """The detection and attribute metrics of matched pairs, as the ``--json`` object holds them."""
    detections = [report_detections(p.report.report) for p in pairs]
    truth = [record_truth(p.record) for p in pairs]
    per_class_ap = metrics.average_precision_50(detections, truth)
    counts = metrics.detection_counts(detections, truth)
    total = counts.pop(None)
    return {
        "map50": metrics.mean_ap(per_class_ap),
        "per_class_ap50": per_class_ap,
        "precision": total.precision,
        "recall": total.recall,
        "f1": total.f1,
        "per_image_f1": metrics.per_image_f1(detections, truth),
        "attribute_f1": metrics.attribute_f1(detections, truth),
        "per_class": {
            label: {
                "gt": c.truth,
                "predicted": c.predicted,
                "tp": c.tp,
                "ap50": per_class_ap.get(label),
                "precision": c.precision,
                "recall": c.recall,
                "f1": c.f1,
            }
            for label, c in counts.items()
        },
        "objects": {"gt": total.truth, "predicted": total.predicted, "tp": total.tp},
    }


# --- the judge (seed 000, Fig. 5) --------------------------------------------------------------

JUDGE_SYSTEM = (
    "You are an impartial expert in industrial visual inspection. You compare a model's report on "
    "the defects in one image with the ground truth written by a human inspector."
)
JUDGE_INSTRUCTION = (
    "Rate how well the model's report agrees with the ground truth: the right defect types, "
    "places and attributes, and correct, useful statements about causes, urgency and actions. "
    "Do not reward length. Use a scale from 1 (wrong or useless) to 10 (fully correct and "
    "complete). Answer with the number only."
)
_SCORE_PATTERNS = (
    re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]"),  # MT-Bench style [[7]]
    re.compile(r"(?:rating|score)\s*(?:is|:|=)?\s*(\d+(?:\.\d+)?)", re.IGNORECASE),
    re.compile(r"(\d+(?:\.\d+)?)\s*(?:/|out of)\s*10\b", re.IGNORECASE),
    re.compile(r"^\s*(\d+(?:\.\d+)?)\b"),
)


def _defect_lines(items: list[tuple[str, object, dict]]) -> str:
    if not items:
        return "- no defects"
    lines = []
    for label, box, attributes in items:
        attrs = ", ".join(f"{k}={v}" for k, v in sorted(attributes.items()) if v is not None)
        lines.append(f"- {label} at {list(box)}" + (f" ({attrs})" if attrs else ""))
    return "\n".join(lines)


def judge_messages(record: Record, report: dict) -> list[dict]:
    """The chat messages asking the judge to rate ``report`` against ``record`` from 1 to 10."""
    truth = [(o.label, [round(v, 1) for v in o.bbox], o.attributes) for o in record.objects]
    parts = ["Ground truth", "Defects:", _defect_lines(truth)]
    if record.description:
        parts.append(f"Description: {record.description}")
    parts += [f"Q: {qa.question}\nA: {qa.answer}" for qa in record.qa]
    found = [(d.label, d.bbox, d.attributes) for d in report_detections(report)]
    parts += ["", "Model's report", "Defects:", _defect_lines(found)]
    narrative = report.get("narrative") or {}
    for key, title in (
        ("summary", "Summary"),
        ("probable_causes", "Probable causes"),
        ("urgency", "Urgency"),
        ("recommended_actions", "Recommended actions"),
    ):
        value = narrative.get(key)
        if value:
            parts.append(f"{title}: {'; '.join(value) if isinstance(value, list) else value}")
    parts += ["", JUDGE_INSTRUCTION]
    return [
        {"role": "system", "content": JUDGE_SYSTEM},
        {"role": "user", "content": "\n".join(parts)},
    ]


def parse_judge_score(text: str) -> float | None:
    """The 1–10 rating in a judge's answer (``7``, ``[[7]]``, ``Rating: 7``, ``7/10``), else None."""
    for pattern in _SCORE_PATTERNS:
        found = pattern.search(text or "")
        if found:
            value = float(found.group(1))
            return value if 1.0 <= value <= 10.0 else None
    return None


def judgeable(pair: Pair) -> bool:
    """The judge rates descriptions: the report needs a narrative, the truth a description or Q&A."""
    narrative = pair.report.report.get("narrative")
    return isinstance(narrative, dict) and bool(pair.record.description or pair.record.qa)


def run_judge(pairs: list[Pair], url: str, model: str, key_file: str | None) -> dict:
    """Ask the judge about every judgeable pair; the mean score and how many were rated.

    The client retries what can be retried; an error it gives up on stops the judging (the
    endpoint is unusable) and is reported, and the score covers the pairs rated before it.
    """
    from train.chat_client import ChatClient, TeacherError, read_api_key  # only with a judge

    try:
        api_key = read_api_key(key_file) if key_file else None
    except TeacherError as exc:  # a missing or empty key file: the user's input, not the network
        raise ValueError(f"--judge-key-file: {exc}") from None
    client = ChatClient(url, model, api_key=api_key)
    scores, unparsed, failed = [], 0, []
    for pair in filter(judgeable, pairs):
        try:
            result = client.chat(
                judge_messages(pair.record, pair.report.report),
                max_tokens=JUDGE_MAX_TOKENS,
                temperature=0.0,
                seed=0,
            )
        except TeacherError as exc:
            failed.append(f"report line {pair.report.line}: {exc}")
            break
        score = parse_judge_score(result.text)
        unparsed += score is None
        scores += [] if score is None else [score]
    return {
        "judge_score": sum(scores) / len(scores) if scores else None,
        "judged": len(scores),
        "judge_unparsed": unparsed,
        "judge_failed": failed,
    }


# --- the command -------------------------------------------------------------------------------


def _fmt(value: float | None) -> str:
    return "   -  " if value is None else f"{value:6.3f}"


def format_table(result: dict) -> str:
    """The human-readable summary ``appliance eval`` prints."""
    lines = [
        f"{result['reports']} reports, {result['images']} ground-truth images evaluated"
        + (
            f" ({result['images_without_report']} without a report, left out)"
            if result["images_without_report"]
            else ""
        ),
        "",
        f"{'class':<20} {'gt':>5} {'pred':>5} {'tp':>5} {'AP50':>6} {'prec':>6} {'recall':>6} "
        f"{'f1':>6}",
    ]
    for label, row in result["per_class"].items():
        lines.append(
            f"{label:<20} {row['gt']:>5} {row['predicted']:>5} {row['tp']:>5} {_fmt(row['ap50'])} "
            f"{_fmt(row['precision'])} {_fmt(row['recall'])} {_fmt(row['f1'])}"
        )
    o = result["objects"]
    lines.append(
        f"{'all':<20} {o['gt']:>5} {o['predicted']:>5} {o['tp']:>5} {_fmt(result['map50'])} "
        f"{_fmt(result['precision'])} {_fmt(result['recall'])} {_fmt(result['f1'])}"
    )
    attrs = ", ".join(f"{k} {v:.3f}" for k, v in result["attribute_f1"].items()) or "-"
    valid = result["schema_valid_rate"]
    lines += [
        "",
        f"mAP@0.5 (COCO, 101-point)     {_fmt(result['map50']).strip()}",
        f"per-image F1 (mean)           {_fmt(result['per_image_f1']).strip()}",
        f"attribute F1 (macro)          {attrs}",
        f"schema-valid reports          {_fmt(valid).strip()} (taxonomy: {result['taxonomy']})",
    ]
    if result.get("image_auroc") is not None:
        lines.append(
            f"image AUROC (anomaly score)   {_fmt(result['image_auroc']).strip()} "
            f"({result['anomaly_images']} reports with an anomaly section)"
        )
    if "judge_score" in result:
        lines.append(
            f"judge score (1-10)            {_fmt(result['judge_score']).strip()} "
            f"({result['judged']} rated, {result['judge_unparsed']} unreadable answers, "
            f"{len(result['judge_failed'])} failed calls)"
        )
    return "\n".join(lines)


def _taxonomy(config: str | None, records: list[Record]) -> tuple[Taxonomy | None, str]:
    if config:
        from appliance.config import load_config

        return load_config(Path(config), check_paths=False).taxonomy_obj, config
    try:
        return taxonomy_from_records(records), "the ground truth's labels"
    except ValueError as exc:
        return None, f"none: the data set's labels are no taxonomy ({exc}); pass --config"


def _dataset_options(args: argparse.Namespace) -> dict:
    options = {}
    if args.classes:
        options["classes"] = [c.strip() for c in args.classes.split(",")]
    if args.images_dir:
        options["images_dir"] = args.images_dir
    return options


def run_eval(args: argparse.Namespace) -> dict:
    """Read, match, score and print; returns the result object (also written to ``--json``)."""
    if args.judge_url and not args.judge_model:
        raise ValueError("--judge-url needs --judge-model (the model name the endpoint serves)")
    reports_path = Path(args.reports)
    reports = read_reports(reports_path)
    records = read_dataset(args.data, args.format, **_dataset_options(args))
    pairs = match_reports(reports, records, reports_path)
    taxonomy, taxonomy_source = _taxonomy(args.config, records)
    problems = schema_problems(reports, taxonomy)
    result = {
        "reports": len(reports),
        "images": len(pairs),
        "images_without_report": len(records) - len(pairs),
        "error_reports": sum(p.report.report.get("verdict") == "error" for p in pairs),
        **evaluate(pairs),
        # image AUROC of the anomaly score (memory-bank and CLIP bundles), description accuracy
        **anomaly_metrics(pairs, list(taxonomy.labels) if taxonomy else []),
        "schema_valid_rate": None if taxonomy is None else 1 - len(problems) / len(reports),
        "schema_problems": {str(line): found[:5] for line, found in problems.items()},
        "taxonomy": taxonomy_source,
    }
    if args.judge_url:
        result.update(run_judge(pairs, args.judge_url, args.judge_model, args.judge_key_file))
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reports", required=True, help="appliance reports, one JSON per line")
    parser.add_argument("--data", required=True, help="the ground-truth data set")
    parser.add_argument("--format", choices=FORMATS, default="records", help="of --data")
    parser.add_argument("--json", help="also write the metrics to this JSON file")
    parser.add_argument("--config", help="check reports against this config's taxonomy")
    parser.add_argument("--classes", help="yolo: comma-separated class names (else classes.txt)")
    parser.add_argument("--images-dir", help="coco: folder of the images")
    parser.add_argument("--judge-url", help="OpenAI-compatible endpoint of the judge model")
    parser.add_argument("--judge-model", help="the judge's model name")
    parser.add_argument("--judge-key-file", help="file holding the judge's API key")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    from appliance.config import ConfigError

    try:
        run_eval(args)
    except (DataError, ValueError, OSError, ConfigError) as exc:  # DataError: path:line: why
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
