"""The report JSON Schema (draft 2020-12), generated from the taxonomy.

This is the single definition of what a report is. The same schema validates every report before it
leaves the appliance, is the source of the narrative decoding grammar (``appliance.grammar``), and is
the target that training scores against. Never write the field list anywhere else.
"""

from __future__ import annotations

from functools import lru_cache

from jsonschema import Draft202012Validator

from appliance.taxonomy import Taxonomy

SCHEMA_VERSION = "1.1"  # 1.1: optional anomaly.description (the CLIP branch)
VERDICTS = ("ok", "defective", "error")
URGENCY = ("none", "low", "medium", "high", "critical")
SOURCE_KINDS = ("folder", "mqtt", "cli")
ERROR_CODES = (
    "empty_file",
    "not_an_image",
    "truncated_image",
    "unsupported_image",
    "decompression_bomb",
    "file_vanished",
    "unreadable_file",
    "payload_too_large",
    "bad_envelope",
    "bad_base64",
    "inference_failed",
    "invalid_report",
)
TIMING_STAGES = (
    "decode",
    "preprocess",
    "vision",
    "anomaly",
    "prefill",
    "generation",
    "narrative",
    "description",
    "total",
)
DESCRIPTION_MAX_LENGTH = 500  # anomaly.description, the CLIP branch's words for the defect
# Bounds of the narrative, shared by the schema and the grammar that generates it.
NARRATIVE_LIMITS = {"summary": 280, "item": 140, "max_items": 3}


def narrative_schema() -> dict:
    """The narrative object: what it is, probable causes, urgency, what to do."""
    item = {"type": "string", "minLength": 1, "maxLength": NARRATIVE_LIMITS["item"]}
    items = {
        "type": "array",
        "items": item,
        "minItems": 1,
        "maxItems": NARRATIVE_LIMITS["max_items"],
    }
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["summary", "probable_causes", "urgency", "recommended_actions"],
        "properties": {
            "summary": {"type": "string", "minLength": 1, "maxLength": NARRATIVE_LIMITS["summary"]},
            "probable_causes": items,
            "urgency": {"enum": list(URGENCY)},
            "recommended_actions": items,
        },
    }


def defect_schema(taxonomy: Taxonomy) -> dict:
    attributes = {name: {"enum": list(values)} for name, values in taxonomy.attributes.items()}
    coord = {"type": "number", "minimum": 0}
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["label", "bbox", "score", "attributes"],
        "properties": {
            "label": {"enum": list(taxonomy.labels)},
            "bbox": {"type": "array", "items": coord, "minItems": 4, "maxItems": 4},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
            "attributes": {
                "type": "object",
                "additionalProperties": False,
                "properties": attributes,
            },
        },
    }


def report_schema(taxonomy: Taxonomy) -> dict:
    """The full report schema for a deployment's taxonomy."""
    nullable_str = {"type": ["string", "null"]}
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:appliance:inspection-report:" + SCHEMA_VERSION,
        "title": "Inspection report",
        "type": "object",
        "additionalProperties": False,
        "required": [
            "schema_version",
            "id",
            "created_at",
            "source",
            "image",
            "bundle",
            "verdict",
            "defects",
            "anomaly",
            "narrative",
            "timings_ms",
            "error",
        ],
        "properties": {
            "schema_version": {"const": SCHEMA_VERSION},
            "id": {"type": "string", "pattern": "^[0-9a-f]{32}$"},
            "created_at": {"type": "string", "format": "date-time"},
            "source": {
                "type": "object",
                "additionalProperties": False,
                "required": ["kind", "line", "camera"],
                "properties": {
                    "kind": {"enum": list(SOURCE_KINDS)},
                    "line": {"type": "string"},
                    "camera": {"type": "string"},
                    "path": nullable_str,
                    "topic": nullable_str,
                    "message_id": nullable_str,
                    "captured_at": nullable_str,
                },
            },
            "image": {
                "type": "object",
                "additionalProperties": False,
                "required": ["sha256", "width", "height"],
                "properties": {
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "width": {"type": ["integer", "null"], "minimum": 1},
                    "height": {"type": ["integer", "null"], "minimum": 1},
                    "format": nullable_str,
                    "mode": nullable_str,
                },
            },
            "bundle": {
                "type": "object",
                "additionalProperties": False,
                "required": ["id", "kind"],
                "properties": {"id": {"type": "string"}, "kind": {"type": "string"}},
            },
            "verdict": {"enum": list(VERDICTS)},
            "defects": {"type": "array", "items": defect_schema(taxonomy)},
            "anomaly": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["score", "threshold"],
                        "properties": {
                            "score": {"type": "number", "minimum": 0},
                            "threshold": {"type": "number", "minimum": 0},
                            "heatmap": nullable_str,
                            "nearest_normal": nullable_str,
                            "description": {
                                "type": "string",
                                "maxLength": DESCRIPTION_MAX_LENGTH,
                            },
                        },
                    },
                ]
            },
            "narrative": {"oneOf": [{"type": "null"}, narrative_schema()]},
            "timings_ms": {
                "type": "object",
                "additionalProperties": False,
                "properties": {stage: {"type": "number", "minimum": 0} for stage in TIMING_STAGES},
            },
            "error": {
                "oneOf": [
                    {"type": "null"},
                    {
                        "type": "object",
                        "additionalProperties": False,
                        "required": ["code", "message"],
                        "properties": {
                            "code": {"enum": list(ERROR_CODES)},
                            "message": {"type": "string"},
                        },
                    },
                ]
            },
        },
        "allOf": [
            {
                "if": {"properties": {"verdict": {"const": "error"}}},
                "then": {"properties": {"error": {"type": "object"}, "defects": {"maxItems": 0}}},
                "else": {"properties": {"error": {"type": "null"}}},
            },
            {
                "if": {"properties": {"verdict": {"const": "ok"}}},
                "then": {"properties": {"defects": {"maxItems": 0}}},
            },
            {
                "if": {"properties": {"verdict": {"const": "defective"}}},
                "then": {"properties": {"defects": {"minItems": 1}}},
            },
        ],
    }


@lru_cache(maxsize=8)
def _validator(taxonomy: Taxonomy) -> Draft202012Validator:
    schema = report_schema(taxonomy)
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


def report_problems(report: dict, taxonomy: Taxonomy) -> list[str]:
    """Every way ``report`` breaks the schema, as ``path: message`` lines (empty when valid)."""
    errors = sorted(_validator(taxonomy).iter_errors(report), key=lambda e: list(e.absolute_path))
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]
