"""Technicians' feedback on reports: its JSON Schema, validation, and what it makes of a report.

A feedback names a report and says ``accept`` (the defects are right), ``reject`` (none of them is
real) or ``fix`` (edit a defect's label, box or attributes, or remove it); any of the three may
``add`` defects the inspector missed. Applying it to the report gives the corrected objects, which
become an inspection record (the training-data line format of ``train/data/records.py``) with who
and when. Pure functions only: ``appliance.feedback_store`` does the files, the CLI and MQTT wrap it.

A feedback message (``appliance schema --feedback`` prints the schema for a config's taxonomy)::

    {"report_id": "3f2a...", "who": "j.doe", "when": "2025-05-01T10:00:00Z",
     "action": "fix",                          # accept | reject | fix
     "edits": [{"defect": 0, "label": "crack", "bbox": [10, 20, 80, 60],
                "attributes": {"severity": "major", "surface": null}},   # null removes it
               {"defect": 1, "remove": true}],  # edits only with "fix"; indexes are the report's
     "add": [{"label": "spot", "bbox": [200, 30, 220, 50], "attributes": {}}],
     "note": "second scratch was a reflection", # optional
     "id": "tablet-7-0042"}                     # optional; default: a hash of the message
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from functools import lru_cache

from jsonschema import Draft202012Validator

from appliance.schema import defect_schema
from appliance.taxonomy import Taxonomy

FEEDBACK_SCHEMA_VERSION = "1.0"
ACTIONS = ("accept", "reject", "fix")
RECORD_SOURCE = "feedback"  # provenance.source of every record written from feedback


class FeedbackError(ValueError):
    """The feedback cannot be used; ``problems`` holds one ``field: why`` line per problem."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("; ".join(problems))


def feedback_schema(taxonomy: Taxonomy) -> dict:
    """The feedback message schema; labels and attribute enums come from the report's defects."""
    defect = defect_schema(taxonomy)["properties"]
    edit_attributes = {
        "type": "object",
        "additionalProperties": False,
        "properties": {
            name: {"enum": [*values, None]} for name, values in taxonomy.attributes.items()
        },
    }
    added = {
        "type": "object",
        "additionalProperties": False,
        "required": ["label", "bbox"],
        "properties": {k: defect[k] for k in ("label", "bbox", "attributes")},
    }
    edit = {
        "type": "object",
        "additionalProperties": False,
        "required": ["defect"],
        "minProperties": 2,
        "properties": {
            "defect": {"type": "integer", "minimum": 0},
            "label": defect["label"],
            "bbox": defect["bbox"],
            "attributes": edit_attributes,
            "remove": {"const": True},
        },
    }
    text = {"type": "string", "minLength": 1, "maxLength": 200}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:appliance:inspection-feedback:" + FEEDBACK_SCHEMA_VERSION,
        "title": "Inspection feedback",
        "type": "object",
        "additionalProperties": False,
        "required": ["report_id", "who", "when", "action"],
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": 128},
            "report_id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "who": text,
            "when": {"type": "string", "format": "date-time"},
            "action": {"enum": list(ACTIONS)},
            "edits": {"type": "array", "items": edit},
            "add": {"type": "array", "items": added},
            "note": {"type": "string", "maxLength": 2000},
        },
        "allOf": [
            {
                "if": {"properties": {"action": {"enum": ["accept", "reject"]}}},
                "then": {"properties": {"edits": {"maxItems": 0}}},
            },
        ],
    }


@lru_cache(maxsize=8)
def _validator(taxonomy: Taxonomy) -> Draft202012Validator:
    schema = feedback_schema(taxonomy)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def _field(path) -> str:
    """``['edits', 0, 'label']`` → ``edits[0].label``."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def feedback_problems(feedback: object, taxonomy: Taxonomy) -> list[str]:
    """Every way ``feedback`` breaks the schema, one ``field: why`` line each (empty when valid)."""
    errors = sorted(_validator(taxonomy).iter_errors(feedback), key=lambda e: list(e.path))
    problems = []
    for error in errors:
        where = _field(error.absolute_path)
        if error.validator == "maxItems" and list(error.absolute_path) == ["edits"]:
            problems.append("edits: only a 'fix' may edit defects; use action 'fix'")
        elif error.validator == "minProperties":
            problems.append(f"{where}: say what to change: label, bbox, attributes or remove")
        else:
            problems.append(f"{where}: {error.message}")
    when = feedback.get("when") if isinstance(feedback, dict) else None
    if isinstance(when, str) and not _is_datetime(when):
        problems.append(f"when: {when!r} is not an ISO 8601 time with a time zone")
    if problems:
        return problems
    if feedback["action"] == "fix" and not (feedback.get("edits") or feedback.get("add")):
        problems.append("action: 'fix' needs at least one entry in edits or add")
    for i, edit in enumerate(feedback.get("edits") or []):
        if edit.get("remove") and len(edit) > 2:
            problems.append(f"edits[{i}]: 'remove' cannot be combined with other changes")
    return problems


def _is_datetime(text: str) -> bool:
    try:
        return datetime.fromisoformat(text).tzinfo is not None
    except ValueError:
        return False


def check_feedback(feedback: object, taxonomy: Taxonomy) -> dict:
    """``feedback`` with its ``id`` filled in, or FeedbackError naming every bad field."""
    problems = feedback_problems(feedback, taxonomy)
    if problems:
        raise FeedbackError(problems)
    return {**feedback, "id": feedback_id(feedback)}


def feedback_id(feedback: dict) -> str:
    """The message's own ``id``, else a hash of its content (a redelivered message dedupes)."""
    if feedback.get("id"):
        return str(feedback["id"])
    canonical = json.dumps(feedback, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:32]


def _image_size(report: dict) -> tuple[int, int]:
    verdict = report.get("verdict")
    if verdict not in ("ok", "defective"):
        error = report.get("error") or {}
        raise FeedbackError(
            [
                f"report_id: report {report.get('id')} is an {verdict!r} report "
                f"({error.get('code')}): there is no decoded image to label"
            ]
        )
    return report["image"]["width"], report["image"]["height"]


def box_problem(bbox: list, width: int, height: int) -> str | None:
    """Why ``[x1, y1, x2, y2]`` is not a box inside a ``width`` x ``height`` image, or None."""
    x1, y1, x2, y2 = bbox
    if not (x1 < x2 and y1 < y2):
        return f"{bbox} needs x1 < x2 and y1 < y2"
    if x2 > width or y2 > height:
        return f"{bbox} lies outside the {width}x{height} image"
    return None


def apply_feedback(report: dict, feedback: dict) -> list[dict]:
    """The corrected objects ``[{label, bbox, attributes}]`` (scores dropped: this is ground truth).

    ``feedback`` must have passed ``check_feedback``; problems that need the report (a defect index
    past the end, a box outside the image, a reject of an ``ok`` report with nothing added) raise
    FeedbackError naming the field.
    """
    width, height = _image_size(report)
    problems = []
    if feedback["report_id"] != report.get("id"):
        problems.append(f"report_id: {feedback['report_id']} is not report {report.get('id')}")
    if feedback["action"] == "reject" and not report["defects"] and not feedback.get("add"):
        problems.append(
            "action: rejecting an 'ok' report says a defect was missed; add it "
            "(add: [{label, bbox}], CLI --add LABEL x1,y1,x2,y2)"
        )
    objects = [
        {
            "label": d["label"],
            "bbox": _clipped(d["bbox"], width, height),
            "attributes": dict(d.get("attributes") or {}),
        }
        for d in report["defects"]
    ]
    removed: set[int] = set()
    for i, edit in enumerate(feedback.get("edits") or []):
        problems += _apply_edit(objects, edit, f"edits[{i}]", (width, height), removed)
    if feedback["action"] == "reject":
        objects, removed = [], set()
    kept = [obj for index, obj in enumerate(objects) if index not in removed]
    for i, add in enumerate(feedback.get("add") or []):
        problem = box_problem(add["bbox"], width, height)
        if problem:
            problems.append(f"add[{i}].bbox: {problem}")
        kept.append(
            {
                "label": add["label"],
                "bbox": list(add["bbox"]),
                "attributes": dict(add.get("attributes") or {}),
            }
        )
    if problems:
        raise FeedbackError(problems)
    return kept


def _apply_edit(
    objects: list[dict], edit: dict, where: str, size: tuple[int, int], removed: set[int]
) -> list[str]:
    index = edit["defect"]
    if index >= len(objects):
        last = f"0..{len(objects) - 1}" if objects else "none"
        return [f"{where}.defect: the report has {len(objects)} defect(s) (indexes {last})"]
    obj = objects[index]
    if edit.get("remove"):
        removed.add(index)
        return []
    if "label" in edit:
        obj["label"] = edit["label"]
    if "bbox" in edit:
        problem = box_problem(edit["bbox"], *size)
        if problem:
            return [f"{where}.bbox: {problem}"]
        obj["bbox"] = list(edit["bbox"])
    for name, value in (edit.get("attributes") or {}).items():
        if value is None:
            obj["attributes"].pop(name, None)
        else:
            obj["attributes"][name] = value
    return []


def _clipped(bbox: list, width: int, height: int) -> list:
    x1, y1, x2, y2 = bbox
    return [max(0, min(x1, width)), max(0, min(y1, height)), min(x2, width), min(y2, height)]


def inspection_record(
    *,
    image: str,
    width: int,
    height: int,
    objects: list[dict],
    who: str | None,
    when: str | None,
    ref: str | None,
) -> dict:
    """One line of an inspection-records file (``train.data.records``), provenance ``feedback``.

    ``image`` is relative to the records file, with forward slashes.
    """
    return {
        "image": image,
        "width": width,
        "height": height,
        "objects": [
            {
                "label": obj["label"],
                "bbox": [_number(v) for v in obj["bbox"]],
                "attributes": dict(obj.get("attributes") or {}),
            }
            for obj in objects
        ],
        "provenance": {"source": RECORD_SOURCE, "who": who, "when": when, "ref": ref},
    }


def feedback_record(report: dict, feedback: dict, image: str) -> dict:
    """The inspection record a checked feedback makes of ``report`` (``image`` as in the file)."""
    objects = apply_feedback(report, feedback)
    width, height = report["image"]["width"], report["image"]["height"]
    return inspection_record(
        image=image,
        width=width,
        height=height,
        objects=objects,
        who=feedback["who"],
        when=feedback["when"],
        ref=report["id"],
    )


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)
