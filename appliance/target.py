"""The training target: the part of an inspection report that the inspector model writes.

The model does not write the whole report (ids, timings and the anomaly score come from the
appliance); it writes ``{"defects": [...], "narrative": {...} | null}``. Its schema is a projection
of the report schema (``appliance.schema``), so the field list is never written twice. Two things
differ from the report, both derived by editing the generated schema, never by re-listing fields:

* ``score`` is dropped from each defect: ground truth has no confidence to learn, and the runtime
  attaches one itself.
* ``bbox`` coordinates are integers, because the model writes boxes in a fixed pixel convention.

**Box convention.** Boxes are ``[x1, y1, x2, y2]`` in integer pixels of the *model's input image*
(width ``W'``, height ``H'``), origin at the top-left corner, after seed 001's resize equations
``x' = x * W' / W`` and ``y' = y * H' / H`` for an image of ``W x H`` pixels. Coordinates are rounded
to the nearest integer and clamped to the input image. ``objects_from_target`` inverts the mapping.

Targets are rendered as compact JSON with keys in the schema's declared order and defects in reading
order (top to bottom, then left to right), which is exactly the text the decoding grammar generated
from ``target_schema`` produces, so supervised targets and constrained decoding agree.
"""

from __future__ import annotations

import copy
import json
import math
import re
from functools import lru_cache

from jsonschema import Draft202012Validator

from appliance.schema import report_schema
from appliance.taxonomy import Taxonomy

TARGET_KEYS = ("defects", "narrative")
# Report fields of a defect that the model does not write (the runtime fills them in).
RUNTIME_DEFECT_FIELDS = ("score",)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)

Size = tuple[int, int]  # (width, height) in pixels


def target_defect_schema(taxonomy: Taxonomy) -> dict:
    """The report's defect schema without runtime fields and with integer box coordinates."""
    defect = copy.deepcopy(report_schema(taxonomy)["properties"]["defects"]["items"])
    for name in RUNTIME_DEFECT_FIELDS:
        defect["properties"].pop(name)
        defect["required"].remove(name)
    bbox = defect["properties"]["bbox"]
    bbox["items"] = {**bbox["items"], "type": "integer"}
    return defect


def target_schema(taxonomy: Taxonomy) -> dict:
    """JSON Schema of what the model writes: the report's ``defects`` and ``narrative``."""
    report = report_schema(taxonomy)
    properties = {key: copy.deepcopy(report["properties"][key]) for key in TARGET_KEYS}
    properties["defects"]["items"] = target_defect_schema(taxonomy)
    return {
        "type": "object",
        "additionalProperties": False,
        "required": list(TARGET_KEYS),
        "properties": properties,
    }


@lru_cache(maxsize=8)
def target_validator(taxonomy: Taxonomy) -> Draft202012Validator:
    schema = target_schema(taxonomy)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def target_problems(target: object, taxonomy: Taxonomy) -> list[str]:
    """Every way ``target`` breaks the target schema, as ``path: message`` lines."""
    errors = target_validator(taxonomy).iter_errors(target)
    errors = sorted(errors, key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def to_input_pixels(bbox: list[float], image_size: Size, input_size: Size) -> list[int]:
    """``[x1, y1, x2, y2]`` in image pixels -> integer pixels of the model's input image."""
    (width, height), (in_width, in_height) = image_size, input_size
    scales = (in_width / width, in_height / height) * 2
    limits = (in_width, in_height) * 2
    return [
        min(max(round(value * scale), 0), limit)
        for value, scale, limit in zip(bbox, scales, limits, strict=True)
    ]


def from_input_pixels(bbox: list[float], image_size: Size, input_size: Size) -> list[float]:
    """Inverse of ``to_input_pixels`` (up to rounding): model-input pixels -> image pixels."""
    (width, height), (in_width, in_height) = image_size, input_size
    scales = (width / in_width, height / in_height) * 2
    return [value * scale for value, scale in zip(bbox, scales, strict=True)]


def target_from_objects(
    objects: list[dict],
    taxonomy: Taxonomy,
    image_size: Size,
    input_size: Size,
    narrative: dict | None = None,
) -> dict:
    """The target for ground-truth ``objects`` (``label``, ``bbox`` in image pixels, optional
    ``attributes``); raises ``ValueError`` listing every schema problem, e.g. an unknown label."""
    defect_keys = list(target_defect_schema(taxonomy)["properties"])
    order = {name: i for i, name in enumerate(taxonomy.attributes)}
    defects = []
    for obj in objects:
        attributes = obj.get("attributes") or {}
        defect = {
            "label": obj["label"],
            "bbox": to_input_pixels(obj["bbox"], image_size, input_size),
            # In the taxonomy's declared order, the order the decoding grammar writes them in;
            # unknown names go last and fail the schema check below.
            "attributes": {
                k: attributes[k]
                for k in sorted(attributes, key=lambda k: (k not in order, order.get(k, 0), k))
                if attributes[k] is not None
            },
        }
        defects.append({key: defect[key] for key in defect_keys})
    defects.sort(key=lambda d: (d["bbox"][1], d["bbox"][0], d["bbox"][3], d["bbox"][2], d["label"]))
    target = {"defects": defects, "narrative": narrative}
    problems = target_problems(target, taxonomy)
    if problems:
        raise ValueError(
            "ground truth does not fit the target schema of this taxonomy: "
            + "; ".join(problems)
            + ". Map the labels onto the taxonomy and check the boxes before rendering targets."
        )
    return target


def render_target(
    objects: list[dict],
    taxonomy: Taxonomy,
    image_size: Size,
    input_size: Size,
    narrative: dict | None = None,
) -> str:
    """The target as compact JSON text (what the model is trained to write)."""
    target = target_from_objects(objects, taxonomy, image_size, input_size, narrative)
    return json.dumps(target, separators=(",", ":"), ensure_ascii=False)


def answer_text(completion: str) -> str:
    """The answer part of a completion: the last ``<answer>...</answer>`` block, else all of it.

    Stage-1 completions are bare target JSON; GRPO completions wrap it in answer tags.
    """
    blocks = ANSWER_RE.findall(completion)
    return (blocks[-1] if blocks else completion).strip()


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def parse_target(completion: str) -> dict | None:
    """The JSON object in a completion's answer, or None when it is not exactly one JSON object.

    Strict JSON: no code fences, no trailing text, no NaN or Infinity. Not checked against the
    schema (see ``target_problems``).
    """
    try:
        value = json.loads(answer_text(completion), parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def objects_from_target(target: dict, image_size: Size, input_size: Size) -> list[dict]:
    """The defects of a schema-valid target as objects with boxes back in image pixels."""
    return [
        {
            "label": defect["label"],
            "bbox": from_input_pixels(defect["bbox"], image_size, input_size),
            "attributes": dict(defect.get("attributes") or {}),
        }
        for defect in target["defects"]
    ]


def is_box(value: object) -> bool:
    """True for four finite numbers (not booleans)."""
    return (
        isinstance(value, (list, tuple))
        and len(value) == 4
        and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            for v in value
        )
    )
