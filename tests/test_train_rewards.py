"""The GRPO reward suite on literal completions: known values, one failure mode at a time."""

from __future__ import annotations

import pytest

from appliance.taxonomy import Taxonomy
from train.rewards import (
    RewardWeights,
    anti_gibberish_reward,
    attribute_accuracy_reward,
    build_reward_suite,
    count_reward,
    detection_f1_reward,
    format_reward,
    gibberish_score,
    iou,
    json_validity_reward,
    make_schema_compliance_reward,
    match_defects,
)

TAXONOMY = Taxonomy(labels=("scratch", "crack"), attributes={"severity": ("minor", "major")})
GT = [
    {"label": "scratch", "bbox": [10, 10, 50, 30], "attributes": {"severity": "minor"}},
    {"label": "crack", "bbox": [100, 100, 140, 180], "attributes": {"severity": "major"}},
]
SCRATCH = '{"label":"scratch","bbox":[10,10,50,30],"attributes":{"severity":"minor"}}'
CRACK = '{"label":"crack","bbox":[100,100,140,180],"attributes":{"severity":"major"}}'
THINK = (
    "<think>A thin bright line runs across the top left; a dark jagged crack lower right.</think>"
)


def answer(*defects: str, narrative: str = "null") -> str:
    return f'<answer>{{"defects":[{",".join(defects)}],"narrative":{narrative}}}</answer>'


PERFECT = THINK + answer(SCRATCH, CRACK)
NAMES = [
    "format_reward",
    "json_validity_reward",
    "schema_compliance_reward",
    "count_reward",
    "detection_f1_reward",
    "attribute_accuracy_reward",
    "anti_gibberish_reward",
]


def scores(completion: object, gt: list[dict] = GT) -> dict[str, float]:
    functions, _ = build_reward_suite(TAXONOMY)
    kwargs = {"prompts": ["p"], "completion_ids": [[1]], "objects": [gt]}
    return {f.__name__: f([completion], **kwargs)[0] for f in functions}


def changed(completion: str, gt: list[dict] = GT) -> dict[str, float]:
    """The rewards that are not 1.0."""
    return {name: value for name, value in scores(completion, gt).items() if value != 1.0}


def test_suite_order_names_and_weights_match_grpo_config():
    functions, weights = build_reward_suite(TAXONOMY, RewardWeights(detection_f1=2.0, count=0.5))
    assert [f.__name__ for f in functions] == NAMES
    assert weights == [1.0, 1.0, 1.0, 0.5, 2.0, 1.0, 1.0]


def test_perfect_answer_scores_one_everywhere():
    assert scores(PERFECT) == dict.fromkeys(NAMES, 1.0)


def test_perfect_answer_with_narrative_scores_one_everywhere():
    narrative = (
        '{"summary":"A minor scratch and a major crack.","probable_causes":["tool wear"],'
        '"urgency":"high","recommended_actions":["reject the part"]}'
    )
    assert scores(THINK + answer(SCRATCH, CRACK, narrative=narrative)) == dict.fromkeys(NAMES, 1.0)


def test_chat_format_completion_scores_like_the_string():
    chat = [{"role": "assistant", "content": PERFECT}]
    parts = [{"role": "assistant", "content": [{"type": "text", "text": PERFECT}]}]
    assert scores(chat) == scores(parts) == dict.fromkeys(NAMES, 1.0)


def test_empty_image_with_empty_answer_scores_one():
    assert changed(THINK + answer(), gt=[]) == {}


@pytest.mark.parametrize(
    "completion",
    [
        answer(SCRATCH, CRACK),  # no think block
        THINK + answer(SCRATCH, CRACK) + " Done.",  # text after the answer
        "Sure! " + THINK + answer(SCRATCH, CRACK),  # text before
        "<think>Look closer.</think>" + THINK + answer(SCRATCH, CRACK),  # two think blocks
        THINK + answer(SCRATCH) + answer(SCRATCH, CRACK),  # two answers (the last is scored)
        answer(SCRATCH, CRACK) + THINK,  # wrong order
    ],
)
def test_format_failures_lower_only_the_format_reward(completion):
    assert changed(completion) == {"format_reward": 0.0}


def test_format_reward_values():
    completions = [
        "<think>a</think><answer>b</answer>",
        "\n<think></think>\n<answer>{}</answer>\n",  # whitespace around the blocks is fine
        "<think>a<think>b</think></think><answer>c</answer>",  # nested
        "<think>a</think><answer>b</answer>c",
        "<think>a</think>",
    ]
    assert format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_invalid_json_scores_zero_for_everything_that_reads_the_answer():
    broken = THINK + answer(SCRATCH, CRACK)[:-10] + "</answer>"
    assert changed(broken) == {
        "json_validity_reward": 0.0,
        "schema_compliance_reward": 0.0,
        "count_reward": 0.0,
        "detection_f1_reward": 0.0,
        "attribute_accuracy_reward": 0.0,
    }


@pytest.mark.parametrize("payload", ["[1, 2]", "NaN", '{"defects": [], "x": NaN}', "```{}```"])
def test_json_validity_wants_one_strict_object(payload):
    assert json_validity_reward([f"<answer>{payload}</answer>", payload]) == [0.0, 0.0]


def test_out_of_taxonomy_label_lowers_schema_and_detection_rewards():
    dent = SCRATCH.replace('"scratch"', '"dent"')
    assert changed(THINK + answer(dent, CRACK)) == {
        "schema_compliance_reward": 0.0,
        "detection_f1_reward": 0.5,
    }


@pytest.mark.parametrize(
    "defect",
    [
        SCRATCH.replace("[10,10,50,30]", "[10.5,10,50,30]"),  # boxes are integers
        SCRATCH.replace('"minor"', '"tiny"'),  # attribute value outside its enum
        SCRATCH.replace('"attributes"', '"score":0.9,"attributes"'),  # score is the runtime's
    ],
)
def test_schema_only_failures_lower_only_schema_compliance(defect):
    result = changed(THINK + answer(defect, CRACK))
    assert result.pop("schema_compliance_reward") == 0.0
    assert set(result) <= {"attribute_accuracy_reward"}  # the enum case also gets it wrong


def test_schema_compliance_factory_is_named_for_trl_logging():
    reward = make_schema_compliance_reward(TAXONOMY)
    assert reward.__name__ == "schema_compliance_reward"
    assert reward(['{"defects":[],"narrative":null}', '{"defects":[]}']) == [1.0, 0.0]


def test_missing_defect_lowers_count_detection_and_nothing_else():
    assert changed(THINK + answer(SCRATCH)) == {
        "count_reward": 0.5,
        "detection_f1_reward": pytest.approx(2 / 3),
    }


def test_extra_defect_lowers_count_and_detection():
    extra = '{"label":"crack","bbox":[300,300,320,320],"attributes":{}}'
    assert changed(THINK + answer(SCRATCH, CRACK, extra)) == {
        "count_reward": pytest.approx(2 / 3),
        "detection_f1_reward": pytest.approx(0.8),
    }


def test_count_reward_values():
    one = [{"label": "scratch", "bbox": [0, 0, 1, 1]}]
    kwargs = {"objects": [one * 3, one, [], []]}
    completions = [answer(SCRATCH), answer(SCRATCH, SCRATCH, SCRATCH, SCRATCH), answer(), "x"]
    assert count_reward(completions, **kwargs) == [pytest.approx(1 / 3), 0.25, 1.0, 0.0]


def test_right_box_wrong_label_is_no_match():
    swapped = SCRATCH.replace('"scratch"', '"crack"')  # the scratch's box, labelled crack
    # Only the true crack matches, and its attributes are right.
    assert changed(THINK + answer(swapped, CRACK)) == {"detection_f1_reward": 0.5}
    assert match_defects([{"label": "crack", "bbox": [10, 10, 50, 30]}], GT) == []


def test_box_below_iou_threshold_is_no_match():
    shifted = SCRATCH.replace("[10,10,50,30]", "[30,10,70,30]")  # IoU 20/60 = 1/3
    assert changed(THINK + answer(shifted, CRACK)) == {"detection_f1_reward": 0.5}


def test_iou_values():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(50 / 150)
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0
    assert iou([0, 0, 0, 0], [0, 0, 0, 0]) == 0.0


def test_greedy_matching_takes_the_highest_iou_pair_first():
    truth = [
        {"label": "scratch", "bbox": [0, 0, 10, 10]},
        {"label": "scratch", "bbox": [3, 0, 13, 10]},
    ]
    # Prediction 0 overlaps truth 0 with IoU 0.67 and truth 1 with IoU 0.82; prediction 1 only
    # overlaps truth 1 (IoU 0.67). Highest-IoU-first pairs 0 with 1, leaving prediction 1 unmatched
    # (an optimal assignment would have matched both).
    predicted = [
        {"label": "scratch", "bbox": [2, 0, 12, 10]},
        {"label": "scratch", "bbox": [5, 0, 15, 10]},
    ]
    assert iou(predicted[0]["bbox"], truth[1]["bbox"]) > iou(predicted[0]["bbox"], truth[0]["bbox"])
    assert match_defects(predicted, truth) == [(0, 1)]
    assert match_defects(predicted[::-1], truth) == [(1, 1)]


def test_malformed_predictions_match_nothing_and_never_raise():
    predicted = ["scratch", {"label": "scratch"}, {"label": "scratch", "bbox": [1, 2, True, 4]}]
    assert match_defects(predicted, GT) == []
    weird = [None, 3, [{"role": "assistant"}], [{"content": 5}], ""]
    functions, _ = build_reward_suite(TAXONOMY)
    for function in functions:
        assert function(weird, objects=[GT] * len(weird)) == [0.0] * len(weird)
    deep = '<answer>{"defects":[],"narrative":' + "[" * 900 + "]" * 900 + "}</answer>"
    for function in functions:
        assert 0.0 <= function([deep], objects=[[]])[0] <= 1.0
    # A JSON object without a defects list: valid JSON, readable text, nothing else.
    assert changed('<think>Hmm.</think><answer>{"defects": 7}</answer>') == {
        "schema_compliance_reward": 0.0,
        "count_reward": 0.0,
        "detection_f1_reward": 0.0,
        "attribute_accuracy_reward": 0.0,
    }


def test_wrong_attribute_lowers_only_attribute_accuracy():
    wrong = CRACK.replace('"major"', '"minor"')
    assert changed(THINK + answer(SCRATCH, wrong)) == {"attribute_accuracy_reward": 0.5}


def test_attribute_accuracy_edge_cases():
    unmatched = '{"label":"crack","bbox":[0,0,5,5],"attributes":{"severity":"major"}}'
    bare = '{"label":"scratch","bbox":[10,10,50,30],"attributes":{}}'
    truth = [{"label": "scratch", "bbox": [10, 10, 50, 30], "attributes": {}}]
    unset = [{**truth[0], "attributes": {"severity": None}}]  # how Arrow stores a missing key
    completions = [answer(unmatched), answer(), answer(bare), answer(bare), answer(bare)]
    objects = [GT, [], truth, GT[:1], unset]
    assert attribute_accuracy_reward(completions, objects=objects) == [0.0, 1.0, 1.0, 0.0, 1.0]


def test_missing_ground_truth_column_raises_a_clear_error():
    with pytest.raises(ValueError, match="'objects'"):
        detection_f1_reward([PERFECT])


@pytest.mark.parametrize(
    ("reasoning", "low", "high"),
    [
        ("scan the part " * 30, 0.0, 0.1),  # a loop: 3 distinct trigrams of 90
        ("x" * 400, 0.0, 0.1),  # one enormous token
        ("A faint scratch\x00\x01 near the edge.", 0.5, 0.5),  # two control characters
        ("A faint scratch near \ufffd the edge.", 0.75, 0.75),  # one replacement character
    ],
)
def test_gibberish_lowers_only_anti_gibberish(reasoning, low, high):
    result = changed(f"<think>{reasoning}</think>" + answer(SCRATCH, CRACK))
    assert set(result) == {"anti_gibberish_reward"}
    assert low <= result["anti_gibberish_reward"] <= high


def test_gibberish_ignores_json_keys_but_not_a_repetitive_narrative():
    many = THINK + answer(*[SCRATCH] * 20)
    assert anti_gibberish_reward([many], objects=[GT]) == [1.0]
    looping = '{"summary":"' + "bad " * 60 + '","probable_causes":["x"],'
    looping += '"urgency":"low","recommended_actions":["y"]}'
    assert gibberish_score(THINK + answer(narrative=looping)) < 0.5


def test_excessive_length_is_penalised_in_proportion():
    words = " ".join(f"w{i}" for i in range(3000))  # distinct words, about 14,900 characters
    text = f"<think>{words}</think>" + answer()
    assert gibberish_score(text) == pytest.approx(6000 / len(text))


@pytest.mark.parametrize(
    "weights",
    [
        {"format": -1.0},
        {"count": float("nan")},
        {"detection_f1": "2"},
        dict.fromkeys(["format", "json_validity", "schema_compliance", "count"], 0.0)
        | dict.fromkeys(["detection_f1", "attribute_accuracy", "anti_gibberish"], 0.0),
    ],
)
def test_bad_weights_are_refused(weights):
    with pytest.raises(ValueError, match="weight"):
        RewardWeights(**weights)
