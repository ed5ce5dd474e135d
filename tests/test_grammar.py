"""The schema-to-GBNF converter: exact grammars for small schemas, and property checks.

The property checks read the generated grammar back with a small GBNF reader (enough for the
non-recursive grammars the converter writes), then (a) sample sentences from it and check that each
one parses with ``json.loads`` and validates against the schema, and (b) turn it into a Python regex
to check exactly which numbers and strings it accepts. A last test has llama.cpp itself parse the
grammars against the real narrative model's vocabulary.
"""

from __future__ import annotations

import json
import random
import re

import pytest
from jsonschema import Draft202012Validator

from appliance.grammar import MAX_FRACTION_DIGITS, gbnf_from_schema
from appliance.schema import defect_schema, narrative_schema, report_schema
from appliance.taxonomy import Taxonomy

# --- a small GBNF reader: rules -> AST -> sampler / regex -------------------------------------

TOKEN = re.compile(
    r'\s+|"(?:\\.|[^"\\])*"|\[(?:\\.|[^\]\\])*\]|[a-zA-Z0-9-]+|[()|?*+]|\{\d+(?:,\d*)?\}'
)
ESCAPES = {"n": "\n", "r": "\r", "t": "\t"}
POOL = [chr(c) for c in range(0x80)] + ["é", "µ", "→", "😀", "\u2028"]


def _chars(text: str) -> list[str]:
    out, i = [], 0
    while i < len(text):
        if text[i] == "\\" and text[i + 1] == "x":
            out.append(chr(int(text[i + 2 : i + 4], 16)))
            i += 4
        elif text[i] == "\\":
            out.append(ESCAPES.get(text[i + 1], text[i + 1]))
            i += 2
        else:
            out.append(text[i])
            i += 1
    return out


def _char_class(token: str) -> tuple:
    body = token[1:-1]
    negated = body.startswith("^")
    chars = _chars(body[1:] if negated else body)
    ranges, i = [], 0
    while i < len(chars):
        if i + 2 < len(chars) and chars[i + 1] == "-":
            ranges.append((chars[i], chars[i + 2]))
            i += 3
        else:
            ranges.append((chars[i], chars[i]))
            i += 1
    allowed = [c for c in POOL if any(lo <= c <= hi for lo, hi in ranges) != negated]
    return ("class", negated, ranges, allowed)


def _parse_alt(tokens: list[str]) -> tuple:
    alts, seq = [], []
    while tokens and tokens[0] != ")":
        token = tokens.pop(0)
        if token == "|":
            alts.append(("seq", seq))
            seq = []
        elif token == "(":
            seq.append(_parse_alt(tokens))
            tokens.pop(0)
        elif token[0] in "?*+{":
            low, high = {"?": (0, 1), "*": (0, None), "+": (1, None)}.get(token, (None, None))
            if token[0] == "{":
                parts = token[1:-1].split(",")
                low = int(parts[0])
                high = low if len(parts) == 1 else (int(parts[1]) if parts[1] else None)
            seq[-1] = ("rep", seq[-1], low, high)
        elif token[0] == '"':
            seq.append(("lit", "".join(_chars(token[1:-1]))))
        elif token[0] == "[":
            seq.append(_char_class(token))
        else:
            seq.append(("ref", token))
    alts.append(("seq", seq))
    return ("alt", alts)


def parse_gbnf(text: str) -> dict:
    rules = {}
    for line in text.strip().splitlines():
        name, body = line.split(" ::= ")
        tokens = [t for t in TOKEN.findall(body) if not t.isspace()]
        assert "".join(tokens) == re.sub(r"\s+", "", body), f"unread tokens in {line!r}"
        rules[name] = _parse_alt(tokens)
    return rules


def sample(rules: dict, rng: random.Random, node: tuple = ("ref", "root")) -> str:
    kind = node[0]
    if kind == "lit":
        return node[1]
    if kind == "class":
        return rng.choice(node[3])
    if kind == "ref":
        return sample(rules, rng, rules[node[1]])
    if kind == "seq":
        return "".join(sample(rules, rng, part) for part in node[1])
    if kind == "alt":
        return sample(rules, rng, rng.choice(node[1]))
    low, high = node[2], node[3] if node[3] is not None else node[2] + 4
    count = rng.choice([low, high, rng.randint(low, high)])
    return "".join(sample(rules, rng, node[1]) for _ in range(count))


def to_regex(rules: dict, node: tuple = ("ref", "root")) -> str:
    kind = node[0]
    if kind == "lit":
        return re.escape(node[1])
    if kind == "class":
        ranges = "".join(f"\\x{ord(lo):02x}-\\x{ord(hi):02x}" for lo, hi in node[2])
        return f"[{'^' if node[1] else ''}{ranges}]"
    if kind == "ref":
        return to_regex(rules, rules[node[1]])
    if kind == "seq":
        return "".join(to_regex(rules, part) for part in node[1])
    if kind == "alt":
        return "(?:" + "|".join(to_regex(rules, alt) for alt in node[1]) + ")"
    high = "" if node[3] is None else node[3]
    return f"(?:{to_regex(rules, node[1])}){{{node[2]},{high}}}"


def matcher(schema: dict):
    pattern = re.compile(to_regex(parse_gbnf(gbnf_from_schema(schema))), re.DOTALL)
    return lambda text: pattern.fullmatch(text) is not None


# --- exact grammars -----------------------------------------------------------------------------


def test_narrative_grammar_is_compact_ordered_and_bounded():
    assert gbnf_from_schema(narrative_schema()) == (
        'root ::= "{" "\\"summary\\":" summary "," "\\"probable_causes\\":" probable-causes '
        '"," "\\"urgency\\":" urgency "," "\\"recommended_actions\\":" recommended-actions "}"\n'
        'summary ::= "\\"" char{1,280} "\\""\n'
        'probable-causes ::= "[" probable-causes-item ("," probable-causes-item){0,2} "]"\n'
        'probable-causes-item ::= "\\"" char{1,140} "\\""\n'
        'urgency ::= "\\"none\\"" | "\\"low\\"" | "\\"medium\\"" | "\\"high\\"" | '
        '"\\"critical\\""\n'
        'recommended-actions ::= "[" recommended-actions-item ("," recommended-actions-item){0,2} '
        '"]"\n'
        'recommended-actions-item ::= "\\"" char{1,140} "\\""\n'
        'char ::= [^"\\\\\\x00-\\x1F\\x7F] | "\\\\" ["\\\\/nrt]\n'
    )


@pytest.mark.parametrize(
    ("schema", "grammar"),
    [
        ({"const": "1.0"}, 'root ::= "\\"1.0\\""\n'),
        ({"enum": ["a", 2, 0.5]}, 'root ::= "\\"a\\"" | "2" | "0.5"\n'),
        ({"type": "boolean"}, 'root ::= "true" | "false"\n'),
        (
            {"type": "number", "minimum": 0, "maximum": 1},
            ('root ::= ("0" ("." [0-9]{1,6})? | "1" ("." "0"{1,6})?)\n'),
        ),
        ({"type": "integer", "minimum": 0}, "root ::= [0-9] | [1-9] [0-9]{1,14}\n"),
        (
            {"type": "integer", "minimum": 1, "maximum": 250},
            ('root ::= [1-9] [0-9]? | ("1" [0-9]{2} | "2" ([0-4] [0-9] | "5" "0"))\n'),
        ),
        ({"type": ["integer", "null"], "minimum": 1, "maximum": 9}, 'root ::= [1-9] | "null"\n'),
        (
            {"type": "array", "items": {"const": 0}, "maxItems": 2},
            ('root ::= "[" (root-item ("," root-item)?)? "]"\nroot-item ::= "0"\n'),
        ),
        (
            {"type": "object", "properties": {"a": {"type": "null"}}},
            'root ::= "{" ("\\"a\\":" a)? "}"\na ::= "null"\n',
        ),
        (
            {
                "type": "object",
                "required": ["b"],
                "properties": {"a": {"const": 1}, "b": {"const": 2}, "c": {"const": 3}},
            },
            'root ::= "{" ("\\"a\\":" a "," "\\"b\\":" b ("," "\\"c\\":" c)? | '
            '"\\"b\\":" b ("," "\\"c\\":" c)?) "}"\na ::= "1"\nb ::= "2"\nc ::= "3"\n',
        ),
        (
            {
                "oneOf": [
                    {"type": "null"},
                    {"type": "object", "required": ["k"], "properties": {"k": {"type": "string"}}},
                ]
            },
            'root ::= "null" | "{" "\\"k\\":" k "}"\nk ::= "\\"" char* "\\""\n'
            'char ::= [^"\\\\\\x00-\\x1F\\x7F] | "\\\\" ["\\\\/nrt]\n',
        ),
    ],
)
def test_small_schemas(schema, grammar):
    assert gbnf_from_schema(schema) == grammar


# --- what the grammars accept -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("low", "high"),
    [
        (0, 0),
        (0, 9),
        (0, 10),
        (1, 250),
        (7, 1234),
        (99, 1000),
        (100, 999),
        (-5, 250),
        (-120, -7),
        (-1000, 1000),
        (5, 5),
        (19, 20),
        (0, 100000),
    ],
)
def test_integer_ranges_accept_exactly_the_range(low, high):
    accepts = matcher({"type": "integer", "minimum": low, "maximum": high})
    window = range(min(low, 0) - 30, min(high + 30, 200000))
    assert [i for i in window if accepts(str(i))] == list(range(low, high + 1))
    assert not any(accepts(text) for text in ("", "-0", "007", "01", "1.0", "+1", "1e1"))


def test_unbounded_integers_have_bounded_digits():
    accepts = matcher({"type": "integer", "minimum": 0})
    assert accepts("0") and accepts("9" * 15) and accepts("10")
    assert not accepts("9" * 16) and not accepts("-1") and not accepts("00")


def test_scores_stay_within_zero_and_one():
    accepts = matcher({"type": "number", "minimum": 0, "maximum": 1})
    for text in ("0", "1", "0.5", "1.0", "0.999999", "1.000000", "0.000001"):
        assert accepts(text), text
    for text in ("1.5", "1.000001", "-0.1", "2", "1e0", ".5", "01", "0.", "0.1234567", "10"):
        assert not accepts(text), text


def test_strings_reject_raw_control_characters_and_accept_escapes():
    accepts = matcher({"type": "string", "maxLength": 3})
    assert accepts('"abc"') and accepts('"\\n\\"\\\\"') and accepts('"é😀"') and accepts('""')
    for char in [chr(c) for c in range(0x20)] + ["\x7f", '"', "\\"]:
        assert not accepts(f'"{char}"'), repr(char)
    assert not accepts('"abcd"') and not accepts('"\\u0000"')


SCHEMAS = [
    narrative_schema(),
    defect_schema(Taxonomy(labels=("scratch", "dent"), attributes={"severity": ("low", "high")})),
    {
        "type": "object",
        "required": ["n", "x", "s"],
        "additionalProperties": False,
        "properties": {
            "n": {"type": ["integer", "null"], "minimum": -3, "maximum": 12},
            "x": {"type": "number", "minimum": -2, "maximum": 3},
            "s": {"type": "string", "minLength": 2, "maxLength": 5},
        },
    },
    {"type": "array", "items": {"type": "number"}, "minItems": 0, "maxItems": 4},
    {"oneOf": [{"type": "null"}, narrative_schema()]},
]


@pytest.mark.parametrize("schema", SCHEMAS, ids=["narrative", "defect", "mixed", "array", "oneOf"])
def test_sampled_sentences_parse_and_validate(schema):
    rules = parse_gbnf(gbnf_from_schema(schema))
    validator = Draft202012Validator(schema)
    rng = random.Random(1234)
    for _ in range(100):
        text = sample(rules, rng)
        value = json.loads(text)  # raises on raw control characters in strings
        errors = [e.message for e in validator.iter_errors(value)]
        assert not errors, (text, errors)


def test_sampled_numbers_reach_their_bounds_without_crossing_them():
    rules = parse_gbnf(gbnf_from_schema({"type": "number", "minimum": -2, "maximum": 3}))
    values = {json.loads(sample(rules, random.Random(seed))) for seed in range(2000)}
    assert min(values) == -2 and max(values) == 3
    assert all(len(repr(v).split(".")[-1]) <= MAX_FRACTION_DIGITS for v in values)


# --- refusals -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("schema", "words"),
    [
        ({"type": "string", "pattern": "^a$"}, ["'pattern'", "#/pattern"]),
        (
            {
                "type": "object",
                "required": ["a"],
                "properties": {"a": {"type": "string", "format": "date-time"}},
            },
            ["'format'", "#/properties/a/format"],
        ),
        ({"type": "number", "exclusiveMaximum": 1}, ["'exclusiveMaximum'"]),
        ({"type": "array", "items": {"type": "null"}, "uniqueItems": True}, ["'uniqueItems'"]),
        ({"allOf": [{"type": "null"}]}, ["does not say what to generate"]),
        ({"type": "string", "maxLength": 5000}, ["'maxLength'", "2000"]),
        ({"type": "number", "maximum": 0.5}, ["fractional 'maximum'"]),
        ({"type": "integer", "minimum": 3, "maximum": 2}, ["no value is allowed"]),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, ["#/oneOf/1", "overlap"]),
        ({"type": "object", "required": ["b"], "properties": {}}, ["'required'", "['b']"]),
        ({"type": "date"}, ["unsupported type 'date'"]),
        ({"enum": [{"a": 1}]}, ["must be a string or number"]),
    ],
)
def test_unsupported_keywords_are_refused_by_name_and_path(schema, words):
    with pytest.raises(ValueError) as error:
        gbnf_from_schema(schema)
    for word in words:
        assert word in str(error.value)


def test_the_full_report_schema_is_refused_naming_what_the_grammar_cannot_enforce():
    schema = report_schema(Taxonomy(labels=("scratch",)))
    with pytest.raises(ValueError, match=r"'allOf' at #/allOf:"):
        gbnf_from_schema(schema)
    del schema["allOf"]
    with pytest.raises(ValueError, match=r"'pattern' at #/properties/id/pattern:"):
        gbnf_from_schema(schema)


# --- llama.cpp reads the same grammars ----------------------------------------------------------


def test_llama_cpp_parses_the_generated_grammars():
    llama_cpp = pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not importable: pip install llama-cpp-python"
    )
    from appliance.backends.llamacpp import llama_accepts_grammar
    from appliance.models import default_narrative_gguf

    llm = llama_cpp.Llama(str(default_narrative_gguf()), vocab_only=True, verbose=False)
    for schema in SCHEMAS:
        assert llama_accepts_grammar(llm, gbnf_from_schema(schema))
    assert not llama_accepts_grammar(llm, 'root ::= "a" | (')  # the check can fail
    llm.close()
