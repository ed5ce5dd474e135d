"""Training targets and prompts on literals: the target schema, box convention and question pool."""

from __future__ import annotations

import json

import pytest

from appliance.grammar import gbnf_from_schema
from appliance.schema import defect_schema, narrative_schema
from appliance.target import (
    answer_text,
    from_input_pixels,
    objects_from_target,
    parse_target,
    render_target,
    target_problems,
    target_schema,
    to_input_pixels,
)
from appliance.taxonomy import Taxonomy
from train.prompts import (
    DETECTION_QUESTIONS,
    GRPO_SYSTEM_PROMPT,
    IMAGE_TOKEN,
    KNOWLEDGE_QUESTIONS,
    PERSPECTIVES,
    Question,
    detection_messages,
    grpo_messages,
    knowledge_messages,
    labels_phrase,
    sample_questions,
)

TAXONOMY = Taxonomy(labels=("scratch", "crack"), attributes={"severity": ("minor", "major")})
OBJECTS = [
    {"label": "crack", "bbox": [100, 50, 300, 250], "attributes": {"severity": "major"}},
    {"label": "scratch", "bbox": [0, 0, 100, 40]},
]
NARRATIVE = {
    "summary": "A crack and a scratch.",
    "probable_causes": ["tool wear"],
    "urgency": "high",
    "recommended_actions": ["reject the part"],
}
# A 1000x500 image shown to the model at 448x448: x' = x * 448/1000, y' = y * 448/500.
RENDERED = (
    '{"defects":[{"label":"scratch","bbox":[0,0,45,36],"attributes":{}},'
    '{"label":"crack","bbox":[45,45,134,224],"attributes":{"severity":"major"}}],'
    '"narrative":null}'
)


def test_render_target_is_compact_json_in_reading_order_and_model_pixels():
    assert render_target(OBJECTS, TAXONOMY, (1000, 500), (448, 448)) == RENDERED


def test_target_schema_is_derived_from_the_report_schema():
    schema = target_schema(TAXONOMY)
    defect = schema["properties"]["defects"]["items"]
    report_defect = defect_schema(TAXONOMY)
    assert schema["required"] == ["defects", "narrative"]
    assert list(defect["properties"]) == [k for k in report_defect["properties"] if k != "score"]
    assert defect["properties"]["label"] == report_defect["properties"]["label"]
    assert defect["properties"]["bbox"]["items"] == {"type": "integer", "minimum": 0}
    assert schema["properties"]["narrative"]["oneOf"][1] == narrative_schema()
    assert report_defect["properties"]["bbox"]["items"]["type"] == "number"  # not mutated


def test_target_schema_accepts_rendered_targets_with_and_without_narrative():
    assert target_problems(json.loads(RENDERED), TAXONOMY) == []
    rendered = render_target(OBJECTS, TAXONOMY, (1000, 500), (448, 448), narrative=NARRATIVE)
    assert json.loads(rendered)["narrative"] == NARRATIVE
    assert target_problems(json.loads(rendered), TAXONOMY) == []
    assert render_target([], TAXONOMY, (10, 10), (10, 10)) == '{"defects":[],"narrative":null}'


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"label": "dent", "bbox": [0, 0, 5, 5]}, "'dent' is not one of"),
        ({"label": "crack", "bbox": [0, 0, 5, 5], "attributes": {"severity": "huge"}}, "'huge'"),
        ({"label": "crack", "bbox": [0, 0, 5, 5], "attributes": {"colour": "red"}}, "colour"),
    ],
)
def test_out_of_taxonomy_ground_truth_is_refused(obj, message):
    with pytest.raises(ValueError, match=message):
        render_target([obj], TAXONOMY, (10, 10), (10, 10))


def test_target_schema_rejects_runtime_fields_fractions_and_unknown_keys():
    good = json.loads(RENDERED)
    for bad in (
        {**good, "verdict": "ok"},
        {"defects": good["defects"]},
        {"defects": [{**good["defects"][0], "score": 0.9}], "narrative": None},
        {"defects": [{**good["defects"][0], "bbox": [0.5, 0, 45, 36]}], "narrative": None},
        {"defects": [{**good["defects"][0], "bbox": [0, 0, 45]}], "narrative": None},
    ):
        assert target_problems(bad, TAXONOMY) != []
    anomaly = {"defects": [{**good["defects"][0], "label": "anomaly"}], "narrative": None}
    assert target_problems(anomaly, TAXONOMY) == []  # every taxonomy holds the generic label


def test_target_schema_builds_a_decoding_grammar():
    grammar = gbnf_from_schema(target_schema(TAXONOMY))
    assert '"\\"scratch\\""' in grammar and "defects-item-bbox-item ::= [0-9] |" in grammar


def test_box_convention_rounds_clamps_and_inverts():
    assert to_input_pixels([0, 0, 1000, 500], (1000, 500), (448, 448)) == [0, 0, 448, 448]
    assert to_input_pixels([-3, 2, 1010, 250.5], (1000, 500), (100, 100)) == [0, 0, 100, 50]
    assert from_input_pixels([0, 45, 448, 224], (1000, 500), (448, 448)) == pytest.approx(
        [0, 50.223, 1000, 250], abs=1e-3
    )


def test_parse_target_round_trips_a_rendered_completion():
    completion = f"<think>Two marks.</think><answer>{RENDERED}</answer>"
    assert answer_text(completion) == RENDERED
    target = parse_target(completion)
    assert target == json.loads(RENDERED) == parse_target(RENDERED)
    objects = objects_from_target(target, (1000, 500), (448, 448))
    assert [o["label"] for o in objects] == ["scratch", "crack"]
    assert objects[1]["bbox"] == pytest.approx([100.4, 50.2, 299.1, 250.0], abs=0.1)
    assert objects[1]["attributes"] == {"severity": "major"}


@pytest.mark.parametrize("text", ["", "[]", "NaN", "```json\n{}\n```", '{"a": 1} trailing'])
def test_parse_target_is_strict(text):
    assert parse_target(text) is None


def test_detection_messages_use_a_template_and_the_target_as_answer():
    messages = detection_messages(RENDERED, seed=3)
    assert messages == detection_messages(RENDERED, seed=3)
    assert messages[0]["role"] == "user" and messages[0]["content"].startswith(IMAGE_TOKEN + "\n")
    assert messages[0]["content"].removeprefix(IMAGE_TOKEN + "\n") in DETECTION_QUESTIONS
    assert messages[1] == {"role": "assistant", "content": RENDERED}
    questions = {detection_messages(RENDERED, seed)[0]["content"] for seed in range(50)}
    assert len(questions) == len(DETECTION_QUESTIONS)


def test_five_perspectives_each_with_several_templates():
    assert PERSPECTIVES == ("what_where", "causes", "urgency", "repair", "prevention")
    assert set(KNOWLEDGE_QUESTIONS) == set(PERSPECTIVES)
    for templates in KNOWLEDGE_QUESTIONS.values():
        assert len(templates) >= 3 and all("{defects}" in t for t in templates)


def test_labels_phrase():
    assert labels_phrase([]) == "defects"
    assert labels_phrase(["scratch", "scratch"]) == "scratch"
    assert labels_phrase(["oil_stain", "crack"]) == "oil stain and crack"
    assert labels_phrase(["a", "b", "a", "c"]) == "a, b and c"


def test_sample_questions_covers_perspectives_and_is_deterministic():
    questions = sample_questions(["scratch", "crack"], k=5, seed=7)
    assert sorted(q.perspective for q in questions) == sorted(PERSPECTIVES)
    assert all("scratch and crack" in q.text for q in questions)
    assert questions == sample_questions(["scratch", "crack"], k=5, seed=7)
    assert sample_questions(["scratch"], k=3, seed="a.png") == sample_questions(
        ["scratch"], k=3, seed="a.png"
    )
    seeds = {tuple(sample_questions(["scratch"], k=5, seed=s)) for s in range(20)}
    assert len(seeds) > 1


def test_sample_questions_draws_distinct_questions_up_to_the_pool():
    everything = sample_questions(["crack"], k=15, seed=0)
    assert len({q.text for q in everything}) == 15
    assert [q.perspective for q in everything[:5]] * 3 == [q.perspective for q in everything]
    assert sample_questions(["crack"], k=0, seed=0) == []
    with pytest.raises(ValueError, match="between 0 and 15"):
        sample_questions(["crack"], k=16, seed=0)


def test_knowledge_messages():
    question = Question("causes", "Why?")
    assert knowledge_messages(question, "Wear.") == [
        {"role": "user", "content": f"{IMAGE_TOKEN}\nWhy?"},
        {"role": "assistant", "content": "Wear."},
    ]


def test_grpo_prompt_carries_envelope_schema_and_taxonomy():
    system, user = grpo_messages(TAXONOMY, (448, 336))
    assert system == {"role": "system", "content": GRPO_SYSTEM_PROMPT}
    assert "<think>" in system["content"] and "<answer>" in system["content"]
    text = user["content"]
    assert user["role"] == "user" and text.startswith(IMAGE_TOKEN)
    assert "448x336" in text
    assert "Defect labels: scratch, crack, anomaly." in text
    assert "Attribute severity: one of minor, major." in text
    schema_json = text[text.index("{") :]
    assert json.loads(schema_json) == target_schema(TAXONOMY)
