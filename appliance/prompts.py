"""Chat prompts for the narrative model, built from the facts of one inspection.

The narrative model is tiny (135M parameters), so the prompt is short and concrete: where each
defect is in words, how large and how sure, and whether the anomaly score crossed its threshold.
The JSON keys and urgency levels are read from the narrative schema so they are never written
twice; the decoding grammar enforces the shape, the prompt only has to steer the content.
"""

from __future__ import annotations

import json

from appliance.schema import URGENCY, narrative_schema

SYSTEM = (
    "You are a quality inspector on a factory line. Explain the inspection result to the operator. "
    "Answer with one JSON object with the keys {keys}. urgency is one of {urgency}."
)
# One worked example, given as an earlier turn: the tiny model copies the length and tone of its
# answer far better than it follows instructions about them.
EXAMPLE_FACTS = {
    "line": "A1",
    "camera": "top",
    "width": 800,
    "height": 600,
    "defects": [{"label": "crack", "bbox": [10, 500, 90, 590], "score": 0.88, "attributes": {}}],
    "anomaly": None,
}
EXAMPLE_NARRATIVE = {
    "summary": "One crack near the bottom left edge of the part.",
    "probable_causes": ["stress during forming", "material fatigue"],
    "urgency": "high",
    "recommended_actions": ["remove the part from the line", "check the press settings"],
}


def facts_from_report(report: dict) -> dict:
    """The facts the narrative needs, picked from a (narrative-less) report."""
    source, image = report.get("source", {}), report.get("image", {})
    return {
        "line": source.get("line", ""),
        "camera": source.get("camera", ""),
        "width": image.get("width"),
        "height": image.get("height"),
        "defects": report.get("defects", []),
        "anomaly": report.get("anomaly"),
    }


def narrative_messages(facts: dict) -> list[dict]:
    """Chat messages asking for the narrative of ``facts``: system, one worked example, the facts.

    ``facts``: ``line``, ``camera``, ``width``, ``height`` (pixels, may be None), ``defects`` (each
    with ``label``, ``bbox`` [x1, y1, x2, y2] in pixels, ``score`` and ``attributes``) and
    ``anomaly`` (``{"score", "threshold"}`` or None).
    """
    keys = ", ".join(narrative_schema()["properties"])
    system = SYSTEM.format(keys=keys, urgency=", ".join(URGENCY))
    example = json.dumps(EXAMPLE_NARRATIVE, separators=(",", ":"))
    return [
        {"role": "system", "content": system},
        {"role": "user", "content": _user(EXAMPLE_FACTS)},
        {"role": "assistant", "content": example},
        {"role": "user", "content": _user(facts)},
    ]


def _user(facts: dict) -> str:
    width, height = facts.get("width"), facts.get("height")
    size = f", image {width}x{height} px" if width and height else ""
    lines = [f"Line {facts.get('line') or '?'}, camera {facts.get('camera') or '?'}{size}."]
    defects = facts.get("defects") or []
    if defects:
        lines.append(f"Defects found: {len(defects)}.")
        lines += [_defect_line(defect, width, height) for defect in defects]
    else:
        lines.append("No defects found.")
    if facts.get("anomaly"):
        lines.append(_anomaly_line(facts["anomaly"]))
    lines.append("Write the inspection narrative as JSON.")
    return "\n".join(lines)


def _defect_line(defect: dict, width: int | None, height: int | None) -> str:
    x1, y1, x2, y2 = defect["bbox"]
    where = f"at x {x1:.0f}-{x2:.0f}, y {y1:.0f}-{y2:.0f} px"
    if width and height:
        area = 100.0 * max(x2 - x1, 0) * max(y2 - y1, 0) / (width * height)
        where += (
            f" ({_region((x1 + x2) / 2 / width, (y1 + y2) / 2 / height)}, {area:.1f}% of image)"
        )
    text = f"- {defect['label'].replace('_', ' ')} {where}, confidence {defect['score']:.2f}"
    attributes = defect.get("attributes") or {}
    if attributes:
        text += "; " + ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in attributes.items())
    return text


def _region(cx: float, cy: float) -> str:
    """Words for where a point lies in the image, from relative coordinates in [0, 1]."""
    row = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else "middle"
    column = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "center"
    return "center" if (row, column) == ("middle", "center") else f"{row} {column}"


def _anomaly_line(anomaly: dict) -> str:
    score, threshold = anomaly["score"], anomaly["threshold"]
    verdict = "above" if score > threshold else "below"
    line = f"Anomaly score {score:.2f}, {verdict} the threshold {threshold:.2f}."
    if anomaly.get("description"):
        line += f" The anomaly detector describes it as: {anomaly['description']}"
    return line
