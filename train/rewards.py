"""The GRPO reward suite (seed 001): verifiable rewards as pure functions with TRL's signature.

TRL calls each reward function as ``f(prompts=..., completions=..., completion_ids=..., **columns)``
and uses ``f.__name__`` to log it. ``completions`` are strings, or chat-style lists of
``{"role", "content"}`` dicts (conversational data sets); both are accepted here. Ground truth comes
from the data set column ``objects``: for each completion, a list of ``{"label", "bbox",
"attributes"}`` with boxes in the target's convention (integer pixels of the model's input image,
see ``appliance.target``).

Every reward lies in [0, 1]. A completion that cannot be read scores 0 and never raises; a missing
ground-truth column does raise, because that is a mistake in the data set, not in the model.

The answer is the last ``<answer>...</answer>`` block, or the whole completion when it has none, so
the same rewards score bare stage-1 JSON. Matching for detection F1 and attribute accuracy is greedy
and label-aware: pairs with the same label and IoU >= 0.5, highest IoU first, each box used once.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import astuple, dataclass, fields

from appliance.metrics import match_pairs
from appliance.target import ANSWER_RE, answer_text, is_box, parse_target, target_validator
from appliance.taxonomy import Taxonomy
from train.data.boxes import iou  # noqa: F401  (re-exported: callers score overlaps with it)

IOU_THRESHOLD = 0.5
# Anti-gibberish limits: word n-gram size for repetition, longest plausible token, longest
# plausible completion (about 80 defects with a narrative and reasoning).
REPEAT_NGRAM = 3
MAX_TOKEN_CHARS = 40
MAX_COMPLETION_CHARS = 6000
# Each unprintable character costs this much: none belongs in an inspection report.
UNPRINTABLE_PENALTY = 0.25
# One <think> block then one <answer> block, nothing but whitespace around, no nested tags.
_FREE = r"(?:(?!</?think>|</?answer>).)*"
FORMAT_RE = re.compile(rf"\s*<think>{_FREE}</think>\s*<answer>{_FREE}</answer>\s*", re.DOTALL)

RewardFunction = Callable[..., list[float]]


def completion_text(completion: object) -> str:
    """The text of a completion: a string, or the contents of chat messages (text parts joined)."""
    if isinstance(completion, str):
        return completion
    if not isinstance(completion, list):
        return ""
    texts = []
    for message in completion:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):  # multimodal parts: [{"type": "text", "text": ...}, ...]
            texts += [p["text"] for p in content if isinstance(p, dict) and "text" in p]
    return "".join(text for text in texts if isinstance(text, str))


def _ground_truth(kwargs: dict, n: int) -> list[list[dict]]:
    objects = kwargs.get("objects")
    if objects is None or len(objects) != n:
        raise ValueError(
            f"this reward needs the data set column 'objects' with one list of ground-truth "
            f"objects per completion ({n} completions, got "
            f"{'none' if objects is None else len(objects)}); add it to the GRPO data set"
        )
    return [list(gt or []) for gt in objects]


def _predicted(completion: object) -> list | None:
    """The predicted defects list, or None when the answer is not an object with a defects list."""
    target = parse_target(completion_text(completion))
    defects = None if target is None else target.get("defects")
    return defects if isinstance(defects, list) else None


def format_reward(completions: list, **kwargs) -> list[float]:
    """1 for exactly ``<think>...</think><answer>...</answer>`` and nothing else, else 0."""
    return [1.0 if FORMAT_RE.fullmatch(completion_text(c)) else 0.0 for c in completions]


def json_validity_reward(completions: list, **kwargs) -> list[float]:
    """1 when the answer parses as one JSON object (strict JSON), else 0."""
    return [0.0 if parse_target(completion_text(c)) is None else 1.0 for c in completions]


def make_schema_compliance_reward(taxonomy: Taxonomy) -> RewardFunction:
    """A reward that is 1 when the answer is valid against ``target_schema(taxonomy)``, else 0."""
    validator = target_validator(taxonomy)

    def schema_compliance_reward(completions: list, **kwargs) -> list[float]:
        targets = (parse_target(completion_text(c)) for c in completions)
        return [0.0 if t is None or not validator.is_valid(t) else 1.0 for t in targets]

    return schema_compliance_reward


def _score_each(completions: list, kwargs: dict, score) -> list[float]:
    """``score(predicted, truth)`` per completion; 0 when it has no readable defects list."""
    rewards = []
    for completion, gt in zip(completions, _ground_truth(kwargs, len(completions)), strict=True):
        predicted = _predicted(completion)
        rewards.append(0.0 if predicted is None else score(predicted, gt))
    return rewards


def count_reward(completions: list, **kwargs) -> list[float]:
    """``1 - |n_pred - n_gt| / max(n_pred, n_gt, 1)``; 0 when there is no defects list."""

    def score(predicted: list, gt: list) -> float:
        return 1.0 - abs(len(predicted) - len(gt)) / max(len(predicted), len(gt), 1)

    return _score_each(completions, kwargs, score)


def match_defects(predicted: list, truth: list[dict]) -> list[tuple[int, int]]:
    """Greedy label-aware matching: ``(pred index, truth index)`` pairs, highest IoU first.

    A pair qualifies when the labels are equal and IoU >= ``IOU_THRESHOLD``; ties are broken by
    index so the result is deterministic. Malformed predictions match nothing. The matching itself
    is ``appliance.metrics.match_pairs``, shared with ``appliance eval``.
    """
    usable = [
        i for i, pred in enumerate(predicted) if isinstance(pred, dict) and is_box(pred.get("bbox"))
    ]
    pairs = match_pairs(
        [(predicted[i].get("label"), predicted[i]["bbox"]) for i in usable],
        [(gt["label"], gt["bbox"]) for gt in truth],
        IOU_THRESHOLD,
    )
    return [(usable[i], j) for i, j in pairs]


def detection_f1_reward(completions: list, **kwargs) -> list[float]:
    """F1 of the greedy label-aware matching at IoU >= 0.5; 1 when both lists are empty."""

    def score(predicted: list, gt: list) -> float:
        if not predicted and not gt:
            return 1.0
        return 2.0 * len(match_defects(predicted, gt)) / (len(predicted) + len(gt))

    return _score_each(completions, kwargs, score)


def attribute_accuracy_reward(completions: list, **kwargs) -> list[float]:
    """Fraction of ground-truth attributes predicted exactly, over the matched pairs.

    No matched pair scores 0, except when both lists are empty (1: nothing was missed). Matched
    pairs whose ground truth carries no attributes score 1 (nothing to get wrong); a ground-truth
    value of None means unset. Attributes the
    prediction adds beyond the ground truth are not scored: the ground truth may leave them unset.
    """
    return _score_each(completions, kwargs, _attribute_accuracy)


def _attribute_accuracy(predicted: list, gt: list) -> float:
    if not predicted and not gt:
        return 1.0
    pairs = match_defects(predicted, gt)
    correct = total = 0
    for i, j in pairs:
        pred_attributes = predicted[i].get("attributes")
        pred_attributes = pred_attributes if isinstance(pred_attributes, dict) else {}
        for name, value in (gt[j].get("attributes") or {}).items():
            if value is None:  # unset (Arrow fills missing struct fields with None)
                continue
            total += 1
            correct += pred_attributes.get(name) == value
    return 0.0 if not pairs else correct / total if total else 1.0


def prose(text: str) -> str:
    """The free text of a completion: everything but a parseable answer, plus that answer's
    narrative strings. JSON keys and labels repeat by design, so they are left out; an answer that
    does not parse stays in as it is."""
    target = parse_target(text)
    outside = ANSWER_RE.sub(" ", text) if ANSWER_RE.search(text) else ""
    if target is None:
        return f"{outside} {answer_text(text)}"
    return " ".join([outside, *_strings(target.get("narrative"))])


def _strings(value: object) -> list[str]:
    """Every string inside a JSON value, iteratively (a model can nest arrays very deep)."""
    found, stack = [], [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            found.append(item)
        elif isinstance(item, dict):
            stack += reversed(list(item.values()))
        elif isinstance(item, list):
            stack += reversed(item)
    return found


def repetition_score(text: str, n: int = REPEAT_NGRAM) -> float:
    """Share of distinct word n-grams: 1 when no n-gram repeats, towards 0 for loops."""
    words = re.findall(r"\w+", text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 1.0


def printable_score(text: str) -> float:
    """1 without control, private-use, unassigned or replacement characters; lower with them."""
    bad = sum(1 for ch in text if (not ch.isprintable() and ch not in "\n\r\t") or ch == "\ufffd")
    return max(0.0, 1.0 - UNPRINTABLE_PENALTY * bad)


def token_length_score(text: str, limit: int = MAX_TOKEN_CHARS) -> float:
    """1 minus the share of characters in tokens longer than ``limit`` (JSON punctuation and
    whitespace separate tokens)."""
    tokens = re.findall(r'[^\s"{}\[\],:]+', text)
    total = sum(map(len, tokens))
    too_long = sum(len(token) for token in tokens if len(token) > limit)
    return 1.0 - too_long / total if total else 1.0


def length_score(text: str, limit: int = MAX_COMPLETION_CHARS) -> float:
    """1 up to ``limit`` characters, then ``limit / length``."""
    return min(1.0, limit / len(text)) if text else 1.0


def gibberish_score(text: str) -> float:
    """The product of the four scores above: 1 for clean text, in [0, 1]."""
    free_text = prose(text)
    return (
        repetition_score(free_text)
        * printable_score(text)
        * token_length_score(free_text)
        * length_score(text)
    )


def anti_gibberish_reward(completions: list, **kwargs) -> list[float]:
    """1 for clean text, lower for repeated word n-grams, unprintable characters, very long tokens
    and excessive length (``gibberish_score``). An empty completion scores 0."""
    texts = [completion_text(c) for c in completions]
    return [gibberish_score(text) if text.strip() else 0.0 for text in texts]


@dataclass(frozen=True)
class RewardWeights:
    """Weight of each reward in GRPO's weighted sum. A zero weight keeps the reward logged but
    out of the objective."""

    format: float = 1.0
    json_validity: float = 1.0
    schema_compliance: float = 1.0
    count: float = 1.0
    detection_f1: float = 1.0
    attribute_accuracy: float = 1.0
    anti_gibberish: float = 1.0

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"reward weight {field.name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(
                    f"reward weight {field.name} must be finite and >= 0, got {value!r}; "
                    "use 0 to log a reward without optimising it"
                )
        if not any(astuple(self)):
            raise ValueError("at least one reward weight must be positive, or nothing is learned")


def build_reward_suite(
    taxonomy: Taxonomy, weights: RewardWeights | None = None
) -> tuple[list[RewardFunction], list[float]]:
    """The reward functions and their weights, aligned, for ``GRPOTrainer(reward_funcs=...)`` and
    ``GRPOConfig(reward_weights=...)``."""
    weights = weights or RewardWeights()
    by_name = {
        function.__name__: function
        for function in (
            format_reward,
            json_validity_reward,
            make_schema_compliance_reward(taxonomy),
            count_reward,
            detection_f1_reward,
            attribute_accuracy_reward,
            anti_gibberish_reward,
        )
    }
    names = [field.name for field in fields(weights)]
    return [by_name[f"{name}_reward"] for name in names], [
        float(getattr(weights, n)) for n in names
    ]
