"""GBNF decoding grammars generated from the report JSON Schema.

The narrative is decoded by llama.cpp under a grammar so that a tiny model can only ever emit a JSON
object the schema accepts. The grammar is generated from the same schema that validates the report
(``appliance.schema``), so the field list is written once. llama-cpp-python ships its own converter,
but it lets raw control characters into strings and ignores numeric bounds, so its output can fail
``json.loads`` or the schema; this one is strict about both and refuses any keyword it does not
enforce instead of silently ignoring it.

The output is compact JSON: no whitespace anywhere, properties in declared order, optional
properties allowed (each may be left out). Strings hold printable characters and the escapes ``\\" \\\\ \\/ \\n \\r \\t``
(never a raw U+0000-U+001F or U+007F). Numbers have no exponent, at most ``MAX_FRACTION_DIGITS``
fraction digits, and integer parts of at most ``MAX_INT_DIGITS`` digits when the schema gives no
bound, so every value the grammar admits lies within ``minimum``/``maximum``.
"""

from __future__ import annotations

import json
import math
import re

MAX_INT_DIGITS = 15  # integer part digits when a bound is missing (exact in a float64)
MAX_FRACTION_DIGITS = 6
# llama.cpp silently treats an {m,n} bound above this as unbounded, so larger bounds are refused.
MAX_REPETITION = 2000
QUOTE = r'"\""'
CHAR_RULE = r'char ::= [^"\\\x00-\x1F\x7F] | "\\" ["\\/nrt]'
ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "title", "description", "examples", "default"}
)
TYPE_KEYWORDS = {
    "object": {"properties", "required", "additionalProperties"},
    "array": {"items", "minItems", "maxItems"},
    "string": {"minLength", "maxLength"},
    "integer": {"minimum", "maximum"},
    "number": {"minimum", "maximum"},
    "boolean": set(),
    "null": set(),
}


def gbnf_from_schema(schema: dict) -> str:
    """A llama.cpp GBNF grammar whose every sentence is compact JSON valid against ``schema``.

    Raises ``ValueError`` naming the keyword and its JSON pointer for anything outside the
    supported subset (see the module docstring).
    """
    builder = _GrammarBuilder()
    builder.define("root", schema, "#")
    return builder.render()


class _GrammarBuilder:
    """Walks a schema, one GBNF rule per object property and per array item."""

    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self.uses_char = False

    def render(self) -> str:
        lines = [f"{name} ::= {body}" for name, body in self.rules.items()]
        if self.uses_char:
            lines.append(CHAR_RULE)
        return "\n".join(lines) + "\n"

    def define(self, base: str, schema: dict, path: str) -> str:
        """Add a rule for ``schema`` named after ``base`` (made unique); return its name."""
        name = re.sub(r"[^a-zA-Z0-9]+", "-", base).strip("-").lower() or "value"
        unique, n = name, 1
        while unique in self.rules or unique == "char":
            n += 1
            unique = f"{name}{n}"
        self.rules[unique] = ""  # reserve the name so that parents are listed before children
        self.rules[unique] = " | ".join(self.alternatives(schema, path, unique))
        return unique

    def alternatives(self, schema: dict, path: str, name: str) -> list[str]:
        """The GBNF alternatives (each a sequence) matching ``schema``."""
        if not isinstance(schema, dict):
            raise ValueError(f"schema at {path} must be an object, got {schema!r}")
        if "oneOf" in schema or "anyOf" in schema:
            return self._one_of(schema, path, name)
        if "const" in schema or "enum" in schema:
            return _literals(schema, path)
        types = schema.get("type")
        if types is None:
            raise ValueError(
                f"schema at {path} does not say what to generate: give 'type', 'enum', 'const' "
                "or 'oneOf'"
            )
        types = [types] if isinstance(types, str) else list(types)
        _check_keywords(schema, path, {"type"}.union(*(_type_keywords(t, path) for t in types)))
        return [alt for t in types for alt in self._typed(t, schema, path, name)]

    def _one_of(self, schema: dict, path: str, name: str) -> list[str]:
        key = "oneOf" if "oneOf" in schema else "anyOf"
        _check_keywords(schema, path, {key})
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            raise ValueError(f"'{key}' at {path} must be a non-empty list of schemas")
        if key == "oneOf":
            _check_disjoint(branches, f"{path}/oneOf")
        alts = []
        for i, branch in enumerate(branches):
            alts += self.alternatives(branch, f"{path}/{key}/{i}", name)
        return alts

    def _typed(self, kind: str, schema: dict, path: str, name: str) -> list[str]:
        if kind == "object":
            return [self._object(schema, path, name)]
        if kind == "array":
            return [self._array(schema, path, name)]
        if kind == "string":
            self.uses_char = True
            length = _repeat("char", *_bounds(schema, "minLength", "maxLength", path))
            return [" ".join(part for part in (QUOTE, length, QUOTE) if part)]
        if kind in ("integer", "number"):
            return _number(schema, path, integer=kind == "integer")
        return ['"true"', '"false"'] if kind == "boolean" else ['"null"']

    def _object(self, schema: dict, path: str, name: str) -> str:
        properties = schema.get("properties", {})
        required = schema.get("required", [])
        if not isinstance(schema.get("additionalProperties", False), bool):
            raise ValueError(f"'additionalProperties' at {path} must be true or false")
        missing = [key for key in required if key not in properties]
        if missing:
            raise ValueError(f"'required' at {path} names {missing} missing from 'properties'")
        members = []  # (rule text "key":value, required), in declared order
        for key in properties:
            rule = self.define(
                f"{name}-{key}" if name != "root" else key,
                properties[key],
                f"{path}/properties/{key}",
            )
            members.append((f"{_literal(json.dumps(key) + ':')} {rule}", key in required))
        if not members:
            return '"{}"'
        return '"{" ' + _members(members) + ' "}"'

    def _array(self, schema: dict, path: str, name: str) -> str:
        low, high = _bounds(schema, "minItems", "maxItems", path)
        if high == 0:
            return '"[]"'
        if not isinstance(schema.get("items"), dict):
            raise ValueError(f"'items' at {path} must be one schema (tuple forms are unsupported)")
        item = self.define(f"{name}-item", schema["items"], f"{path}/items")
        rest = _repeat(f'("," {item})', max(low - 1, 0), None if high is None else high - 1)
        body = " ".join(part for part in (item, rest) if part)
        return f'"[" {body} "]"' if low > 0 else f'"[" ({body})? "]"'


THINK_ANSWER_ROOT = "envelope"


def think_answer_gbnf(gbnf: str, max_think_chars: int = 1000) -> str:
    """``gbnf`` (start symbol ``root``) inside GRPO's ``<think>...</think><answer>...</answer>``
    envelope; start symbol ``THINK_ANSWER_ROOT``. The reasoning is bounded and holds no ``<``."""
    if max_think_chars > MAX_REPETITION:
        raise ValueError(f"max_think_chars exceeds {MAX_REPETITION}")
    return (
        gbnf
        + f'{THINK_ANSWER_ROOT} ::= "<think>" think-char{{0,{max_think_chars}}} '
        + '"</think><answer>" root "</answer>"\n'
        + "think-char ::= [^<\\x00-\\x08\\x0B-\\x1F\\x7F]\n"
    )


def _members(members: list[tuple[str, bool]]) -> str:
    """Object members in declared order; optional ones may be left out, commas stay right.

    The first member written is any optional one before the first required member (or the first
    required member itself); every later member follows with a comma, optional ones in ``(...)?``.
    With no required member the object may be empty.
    """
    first_required = next((i for i, (_, req) in enumerate(members) if req), len(members))
    alternatives = []
    for start in range(min(first_required, len(members) - 1) + 1):
        rest = [f'"," {rule}' if req else f'("," {rule})?' for rule, req in members[start + 1 :]]
        alternatives.append(" ".join([members[start][0], *rest]))
    if first_required < len(members):
        return _group(alternatives)
    return "(" + " | ".join(alternatives) + ")?"


def _type_keywords(kind: object, path: str) -> set[str]:
    if kind not in TYPE_KEYWORDS:
        raise ValueError(
            f"unsupported type {kind!r} at {path}/type (supported: {list(TYPE_KEYWORDS)})"
        )
    return TYPE_KEYWORDS[kind]


def _check_keywords(schema: dict, path: str, allowed: set[str]) -> None:
    for key in schema:
        if key not in allowed and key not in ANNOTATIONS:
            raise ValueError(
                f"unsupported JSON-Schema keyword {key!r} at {path}/{key}: the grammar cannot "
                f"enforce it (supported here: {sorted(allowed)})"
            )


def _json_kinds(schema: dict) -> set[str]:
    """The JSON value kinds a oneOf branch can produce (integer counts as number)."""
    if "const" in schema or "enum" in schema:
        values = [schema["const"]] if "const" in schema else schema["enum"]
        return {_kind_of(value) for value in values}
    types = schema.get("type")
    types = [types] if isinstance(types, str) else list(types or [])
    return {"number" if t == "integer" else t for t in types}


def _kind_of(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def _check_disjoint(branches: list, path: str) -> None:
    """oneOf must match exactly one branch: only accept branches of distinct JSON kinds."""
    seen: set[str] = set()
    for i, branch in enumerate(branches):
        kinds = _json_kinds(branch) if isinstance(branch, dict) else set()
        if not kinds or kinds & seen:
            raise ValueError(
                f"'oneOf' at {path}/{i} may overlap another branch; only branches of distinct "
                "types (e.g. null and an object) are supported"
            )
        seen |= kinds


def _literals(schema: dict, path: str) -> list[str]:
    _check_keywords(schema, path, {"const", "enum", "type"})
    values = [schema["const"]] if "const" in schema else schema["enum"]
    if not isinstance(values, list) or not values:
        raise ValueError(f"'enum' at {path} must be a non-empty list")
    for value in values:
        if not (value is None or isinstance(value, (str, int, float))):
            raise ValueError(f"enum/const value {value!r} at {path} must be a string or number")
    return [_literal(json.dumps(value)) for value in values]


def _literal(text: str) -> str:
    """A GBNF string literal for ``text`` (already JSON, hence free of raw control characters)."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _bounds(schema: dict, low_key: str, high_key: str, path: str) -> tuple[int, int | None]:
    low, high = schema.get(low_key, 0), schema.get(high_key)
    for key, value in ((low_key, low), (high_key, high)):
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise ValueError(f"'{key}' at {path} must be a non-negative integer, got {value!r}")
        if value is not None and value > MAX_REPETITION:
            raise ValueError(
                f"'{key}' {value} at {path} exceeds {MAX_REPETITION}, the largest bounded "
                "repetition llama.cpp enforces"
            )
    if high is not None and low > high:
        raise ValueError(f"'{low_key}' {low} exceeds '{high_key}' {high} at {path}")
    return low, high


def _repeat(symbol: str, low: int, high: int | None) -> str:
    """``symbol`` repeated low..high times (high None: unbounded), in GBNF."""
    if high == 0:
        return ""
    if high is None:
        return {0: f"{symbol}*", 1: f"{symbol}+"}.get(low, f"{symbol}{{{low},}}")
    if low == high:
        return symbol if low == 1 else f"{symbol}{{{low}}}"
    return f"{symbol}?" if (low, high) == (0, 1) else f"{symbol}{{{low},{high}}}"


def _number(schema: dict, path: str, *, integer: bool) -> list[str]:
    """Alternatives for a decimal number in [minimum, maximum] (no exponent)."""
    largest = 10**MAX_INT_DIGITS - 1
    low, high = schema.get("minimum", -largest), schema.get("maximum", largest)
    for key, value in (("minimum", low), ("maximum", high)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isinf(value):
            raise ValueError(f"'{key}' at {path} must be a finite number, got {value!r}")
        if not integer and value != int(value):
            raise ValueError(f"fractional '{key}' {value} at {path} is unsupported for numbers")
    low, high = math.ceil(low), math.floor(high)
    if low > high:
        raise ValueError(f"'minimum' exceeds 'maximum' at {path}: no value is allowed")
    alts = []
    if high >= 0 and integer:
        alts += _uint_range(max(low, 0), high)
    elif high >= 0:
        alts.append(_magnitude(max(low, 0), high, integer=False, bounded="maximum" in schema))
    if low < 0:  # negative values are "-" and a magnitude in [max(-high, 0 or 1), -low]
        least = max(-high, 1 if integer else 0)
        magnitude = _magnitude(least, -low, integer=integer, bounded="minimum" in schema)
        alts.append(f'"-" {magnitude}')
    return alts


def _magnitude(low: int, high: int, *, integer: bool, bounded: bool) -> str:
    """A non-negative decimal in [low, high]; fractions only when not ``integer``."""
    if integer:
        return _group(_uint_range(low, high))
    fraction = f'("." [0-9]{{1,{MAX_FRACTION_DIGITS}}})?'
    if not bounded:
        return f"{_group(_uint_range(low, high))} {fraction}"
    zeros = f'("." "0"{{1,{MAX_FRACTION_DIGITS}}})?'  # the maximum itself, e.g. 1 or 1.0
    alts = [] if low == high else [f"{_group(_uint_range(low, high - 1))} {fraction}"]
    alts.append(f"{_group(_uint_range(high, high))} {zeros}")
    return _group(alts)


def _group(alts: list[str]) -> str:
    return alts[0] if len(alts) == 1 else "(" + " | ".join(alts) + ")"


def _uint_range(low: int, high: int) -> list[str]:
    """Alternatives matching the decimal integers low..high (0 <= low <= high, no leading zeros)."""
    n_low, n_high = len(str(low)), len(str(high))
    if n_low == n_high:
        return [_same_length(str(low), str(high))]
    # Lengths whose every number is in range collapse into one "[1-9] [0-9]{a,b}" alternative.
    full_from = n_low if low == 10 ** (n_low - 1) else n_low + 1
    full_to = n_high if high == 10**n_high - 1 else n_high - 1
    alts = []
    if full_from > n_low:
        alts.append(_same_length(str(low), "9" * n_low))
    if full_from <= full_to:
        alts.append(" ".join(filter(None, ("[1-9]", _repeat("[0-9]", full_from - 1, full_to - 1)))))
    if full_to < n_high:
        alts.append(_same_length("1" + "0" * (n_high - 1), str(high)))
    return alts


def _same_length(low: str, high: str) -> str:
    """A GBNF sequence matching the digit strings low..high of equal length."""
    if not low:
        return ""
    rest = len(low) - 1
    if low[0] == high[0]:
        return " ".join(filter(None, (f'"{low[0]}"', _same_length(low[1:], high[1:]))))
    first, last = int(low[0]), int(high[0])
    alts = []
    if low[1:] != "0" * rest:
        alts.append(" ".join(filter(None, (f'"{low[0]}"', _same_length(low[1:], "9" * rest)))))
        first += 1
    high_full = high[1:] == "9" * rest
    middle_last = last if high_full else last - 1
    if first <= middle_last:
        digit = f'"{first}"' if first == middle_last else f"[{first}-{middle_last}]"
        alts.append(" ".join(filter(None, (digit, _repeat("[0-9]", rest, rest)))))
    if not high_full:
        alts.append(" ".join(filter(None, (f'"{high[0]}"', _same_length("0" * rest, high[1:])))))
    return _group(alts)
