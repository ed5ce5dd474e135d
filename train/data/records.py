"""Inspection records: the one training-data format every source converts into.

Public data sets (YOLO, VOC, COCO, labelme), teacher answers and confirmed appliance reports all
become ``Record`` objects, so the trainer, the splitter and the evaluator read one shape only. On disk
they are JSON lines (``*.jsonl``, UTF-8), one image per line::

    {"image": "images/plate_0042.png",       # path relative to the records file (required)
     "width": 640, "height": 480,             # image size in pixels (required, integers >= 1)
     "objects": [                             # ground truth, may be empty (required)
       {"label": "scratch",                   # data-set or taxonomy label (required)
        "bbox": [12, 40, 130.5, 77],          # [x1, y1, x2, y2] in original pixels (required)
        "attributes": {"severity": "minor"}}  # attribute name -> value (optional, default {})
     ],
     "description": "A long scratch ...",     # free text about the image (optional)
     "qa": [                                  # question-answer pairs (optional, default [])
       {"question": "What caused it?", "answer": "Handling.", "perspective": "causes"}
     ],
     "provenance": {"source": "report",       # dataset | report | feedback (required in it)
                    "who": "j.doe",           # who made or confirmed it (optional)
                    "when": "2025-05-01T10:00:00Z",  # ISO 8601 (optional)
                    "ref": "3f2a..."}}        # data-set file or report id (optional)

Boxes use pixel-edge coordinates (the whole image is ``[0, 0, W, H]``); a coordinate up to
``EDGE_TOLERANCE_PX`` (1 px) outside the image is clamped, anything further is an error. Unknown keys
are errors, blank lines are skipped, and every problem names the file and line. A ``perspective`` is
one of ``PERSPECTIVES``, seed 000's five angles on a defect.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from appliance.outbox import atomic_write
from train.data.boxes import Box, box_problem, clip_box
from train.data.errors import DataError
from train.data.images import check_image_size

PERSPECTIVES = ("what_where", "causes", "urgency", "repair", "prevention")
PROVENANCE_SOURCES = ("dataset", "report", "feedback")
_RECORD_KEYS = {"image", "width", "height", "objects", "description", "qa", "provenance"}
_OBJ_KEYS = {"label", "bbox", "attributes"}
_QA_KEYS = {"question", "answer", "perspective"}
_PROVENANCE_KEYS = {"source", "who", "when", "ref"}
Where = tuple[str, int | str | None]


@dataclass(frozen=True)
class Obj:
    """One ground-truth object. ``origin`` (file, line) points back at the annotation."""

    label: str
    bbox: Box
    attributes: dict[str, str] = field(default_factory=dict)
    origin: Where | None = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class QA:
    question: str
    answer: str
    perspective: str | None = None


@dataclass(frozen=True)
class Provenance:
    source: str  # one of PROVENANCE_SOURCES
    who: str | None = None
    when: str | None = None
    ref: str | None = None


@dataclass(frozen=True)
class Record:
    """One training image and what is known about it. ``image`` is an absolute path in memory."""

    image: Path
    width: int
    height: int
    objects: tuple[Obj, ...] = ()
    description: str | None = None
    qa: tuple[QA, ...] = ()
    provenance: Provenance | None = None
    origin: Where | None = field(default=None, compare=False, repr=False)

    @property
    def labels(self) -> list[str]:
        return [obj.label for obj in self.objects]


def make_obj(
    label: object,
    bbox: Sequence[float],
    width: int,
    height: int,
    where: Where,
    attributes: dict[str, str] | None = None,
) -> Obj:
    """A checked ``Obj``: non-empty label, a box inside the image (clamped within the tolerance)."""
    if not isinstance(label, str) or not label.strip():
        raise DataError(*where, f"label must be a non-empty string, got {label!r}")
    problem = box_problem(list(bbox), width, height)
    if problem is not None:
        raise DataError(*where, f"label {label!r}: {problem}")
    return Obj(label, clip_box(bbox, width, height), dict(attributes or {}), origin=where)


def _check_keys(data: object, allowed: set[str], required: set[str], what: str, where: Where):
    if not isinstance(data, dict):
        raise DataError(*where, f"{what} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise DataError(*where, f"{what}: unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    missing = sorted(required - set(data))
    if missing:
        raise DataError(*where, f"{what}: missing key(s) {missing}")


def _optional_str(data: dict, key: str, what: str, where: Where) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise DataError(*where, f"{what}.{key} must be a string or null, got {value!r}")
    return value


def _parse_obj(data: object, width: int, height: int, what: str, where: Where) -> Obj:
    _check_keys(data, _OBJ_KEYS, {"label", "bbox"}, what, where)
    attributes = data.get("attributes") or {}
    if not isinstance(attributes, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in attributes.items()
    ):
        raise DataError(*where, f"{what}.attributes must map names to string values")
    bbox = data["bbox"]
    if not isinstance(bbox, list):
        raise DataError(*where, f"{what}.bbox must be a list [x1, y1, x2, y2], got {bbox!r}")
    try:
        return make_obj(data["label"], bbox, width, height, where, attributes)
    except DataError as exc:
        raise DataError(*where, f"{what}: {exc.message}") from None


def _parse_qa(data: object, what: str, where: Where) -> QA:
    _check_keys(data, _QA_KEYS, {"question", "answer"}, what, where)
    question, answer = data["question"], data["answer"]
    if not (isinstance(question, str) and question.strip() and isinstance(answer, str)):
        raise DataError(*where, f"{what}: question must be non-empty text and answer text")
    perspective = _optional_str(data, "perspective", what, where)
    if perspective is not None and perspective not in PERSPECTIVES:
        raise DataError(*where, f"{what}.perspective {perspective!r} is not one of {PERSPECTIVES}")
    return QA(question, answer, perspective)


def _parse_provenance(data: object, where: Where) -> Provenance | None:
    if data is None:
        return None
    _check_keys(data, _PROVENANCE_KEYS, {"source"}, "provenance", where)
    if data["source"] not in PROVENANCE_SOURCES:
        raise DataError(
            *where, f"provenance.source {data['source']!r} is not one of {PROVENANCE_SOURCES}"
        )
    who, when, ref = (_optional_str(data, k, "provenance", where) for k in ("who", "when", "ref"))
    return Provenance(data["source"], who, when, ref)


def _size(data: dict, key: str, where: Where) -> int:
    value = data[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise DataError(*where, f"{key} must be an integer >= 1, got {value!r}")
    return value


def parse_record(data: object, base_dir: Path, where: Where) -> Record:
    """One decoded JSON line → ``Record`` (image path resolved against ``base_dir``)."""
    _check_keys(data, _RECORD_KEYS, {"image", "width", "height", "objects"}, "record", where)
    if not isinstance(data["image"], str) or not data["image"]:
        raise DataError(*where, "image must be a non-empty path string")
    width, height = _size(data, "width", where), _size(data, "height", where)
    if not isinstance(data["objects"], list):
        raise DataError(*where, "objects must be a list (use [] for an image without defects)")
    objects = tuple(
        _parse_obj(obj, width, height, f"objects[{i}]", where)
        for i, obj in enumerate(data["objects"])
    )
    qa_items = data.get("qa") or []
    if not isinstance(qa_items, list):
        raise DataError(*where, "qa must be a list of {question, answer, perspective}")
    return Record(
        image=Path(os.path.normpath(base_dir / data["image"])),
        width=width,
        height=height,
        objects=objects,
        description=_optional_str(data, "description", "record", where),
        qa=tuple(_parse_qa(item, f"qa[{i}]", where) for i, item in enumerate(qa_items)),
        provenance=_parse_provenance(data.get("provenance"), where),
        origin=where,
    )


def read_records(path: str | Path, check_images: bool = True) -> list[Record]:
    """All records of a JSON-lines file; with ``check_images`` every image must exist at its size."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, None, "records file does not exist")
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                data = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, number, f"malformed JSON line: {exc.msg}") from None
            record = parse_record(data, path.parent.absolute(), (str(path), number))
            if check_images:
                check_image_size(record.image, record.width, record.height, path, number)
            records.append(record)
    if not records:
        raise DataError(path, 1, "file is empty: a records file needs at least one JSON line")
    return records


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


def record_to_json(record: Record, base_dir: Path) -> dict:
    """The JSON object for one line, ``image`` relative to ``base_dir`` (forward slashes)."""
    image = Path(os.path.relpath(Path(record.image).absolute(), base_dir.absolute()))
    data: dict = {
        "image": image.as_posix(),
        "width": record.width,
        "height": record.height,
        "objects": [
            {
                "label": obj.label,
                "bbox": [_number(v) for v in obj.bbox],
                "attributes": dict(obj.attributes),
            }
            for obj in record.objects
        ],
    }
    if record.description is not None:
        data["description"] = record.description
    if record.qa:
        data["qa"] = [
            {"question": q.question, "answer": q.answer, "perspective": q.perspective}
            for q in record.qa
        ]
    if record.provenance is not None:
        p = record.provenance
        data["provenance"] = {"source": p.source, "who": p.who, "when": p.when, "ref": p.ref}
    return data


def write_records(path: str | Path, records: Iterable[Record]) -> Path:
    """Write ``records`` as JSON lines, atomically (a crash leaves the old file or the new one)."""
    path = Path(path)
    base_dir = path.parent
    lines = [json.dumps(record_to_json(r, base_dir), ensure_ascii=False) + "\n" for r in records]
    return atomic_write(path, "".join(lines).encode("utf-8"))


# Questions under which a report's narrative becomes question-answer pairs (perspective → question).
NARRATIVE_QUESTIONS = {
    "causes": "What are the probable causes of the defects in this image?",
    "urgency": "How urgent is it to act on the defects in this image?",
    "repair": "What should be done about the defects in this image?",
}


def _narrative_qa(narrative: dict | None) -> tuple[str | None, tuple[QA, ...]]:
    if not narrative:
        return None, ()
    answers = {
        "causes": "; ".join(narrative.get("probable_causes") or []),
        "urgency": narrative.get("urgency") or "",
        "repair": "; ".join(narrative.get("recommended_actions") or []),
    }
    qa = tuple(
        QA(NARRATIVE_QUESTIONS[p], answer, p) for p, answer in answers.items() if answer.strip()
    )
    return narrative.get("summary"), qa


def _confirmable_size(report: dict, where: str) -> tuple[int, int]:
    """The image size of an ok/defective report; anything else is refused with the reason."""
    for key in ("verdict", "image", "defects"):
        if key not in report:
            raise DataError(where, None, f"not an appliance report: missing {key!r}")
    verdict = report["verdict"]
    if verdict == "error":
        error = report.get("error") or {}
        raise DataError(
            where,
            "verdict",
            f"error report ({error.get('code')}: {error.get('message')}) has no ground truth; "
            "only ok/defective reports become training data",
        )
    if verdict not in ("ok", "defective"):
        raise DataError(where, "verdict", f"verdict {verdict!r} is not ok/defective")
    if (verdict == "defective") != bool(report["defects"]):
        count = len(report["defects"])
        raise DataError(where, "defects", f"verdict {verdict!r} contradicts {count} defects")
    width, height = report["image"].get("width"), report["image"].get("height")
    if not (isinstance(width, int) and isinstance(height, int) and width > 0 and height > 0):
        raise DataError(where, "image", f"report has no image size ({width}x{height})")
    return width, height


def record_from_report(
    report: dict,
    image_path: str | Path,
    *,
    confirmed_by: str | None = None,
    where: str | Path | None = None,
) -> Record:
    """A confirmed appliance report (verdict ok or defective) → a training ``Record``.

    Defects become objects (the model's ``score`` is dropped: a confirmed defect is ground truth);
    the narrative's summary becomes the description and its causes / urgency / actions become
    question-answer pairs. Error reports carry no ground truth and are refused. Problems are
    reported at ``where`` (the report file; default ``report <id>``) and the report's JSON path.
    """
    where = str(where or f"report {report.get('id', '?')}")
    width, height = _confirmable_size(report, where)
    objects = tuple(
        make_obj(
            d.get("label"),
            d.get("bbox") or [],
            width,
            height,
            (where, f"defects[{i}]"),
            d.get("attributes") or {},
        )
        for i, d in enumerate(report["defects"])
    )
    description, qa = _narrative_qa(report.get("narrative"))
    return Record(
        image=Path(image_path).absolute(),
        width=width,
        height=height,
        objects=objects,
        description=description,
        qa=qa,
        provenance=Provenance("report", confirmed_by, report.get("created_at"), report.get("id")),
        origin=(where, None),
    )
