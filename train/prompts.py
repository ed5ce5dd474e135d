"""Prompts for the three training stages, as pure functions of the record and the taxonomy.

* Stage 1, detection (seed 000, Fig. 2a): a template question about the image; the completion is
  the target JSON of ``appliance.target`` with the defects and their boxes and a null narrative.
* Stage 2, defect knowledge (seed 000, section III-C): questions from five perspectives, filled
  with the image's labels, answered by a teacher (``appliance distill``).
* GRPO (seed 001, section III-B): a system prompt asking for ``<think>...</think><answer>...</answer>``
  and a user prompt that carries the compact target schema, the taxonomy and the box convention.

Every user turn starts with ``IMAGE_TOKEN``; the model's collator replaces it with the image tokens.
Messages are chat-style lists of ``{"role", "content"}`` dicts with string contents.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from appliance.target import Size, target_schema
from appliance.taxonomy import Taxonomy

IMAGE_TOKEN = "<image>"

DETECTION_QUESTIONS = (
    "Inspect this image and list every defect with its box as JSON.",
    "Find all defects in this image. Answer with JSON giving each defect's label and box.",
    "Which defects does this part have, and where? Reply in JSON with a box for each one.",
    "Detect the surface defects in this image and return their labels and boxes as JSON.",
    "Report every defect visible in this image as JSON: label, bounding box and attributes.",
)

PERSPECTIVES = ("what_where", "causes", "urgency", "repair", "prevention")
# Templates per perspective; ``{defects}`` becomes the image's labels in words ("scratch and crack").
KNOWLEDGE_QUESTIONS: dict[str, tuple[str, ...]] = {
    "what_where": (
        "Describe the {defects} in this image: what it looks like, where exactly on the part, "
        "and which visual evidence supports the finding.",
        "Where on the part is the {defects} visible, and which features in the picture identify "
        "the defect type?",
        "Point out the {defects} in this image and explain the visual cues behind the diagnosis.",
    ),
    "causes": (
        "What are the probable causes of the {defects} shown in this image?",
        "Which manufacturing or handling problems most likely produced the {defects} here?",
        "Explain how defects like the {defects} in this image typically form.",
    ),
    "urgency": (
        "How urgent is the {defects} in this image, and what safety risk follows from it?",
        "Should the line act immediately on the {defects} shown here? Assess the risk to safety "
        "and function.",
        "Rate the severity of the {defects} in this image and explain what could happen if "
        "nobody acts.",
    ),
    "repair": (
        "How should the {defects} in this image be repaired, and what maintenance is needed?",
        "What repair steps and follow-up maintenance would you recommend for the {defects} here?",
        "Can a part with the {defects} shown here be reworked? Describe the repair.",
    ),
    "prevention": (
        "How can the {defects} in this image be prevented, and how should the process be "
        "monitored?",
        "What process changes and inspection checks would stop the {defects} seen here from "
        "recurring?",
        "Which signals should be monitored on the line to catch the {defects} in this image early?",
    ),
}
NO_LABELS_PHRASE = "defects"

GRPO_SYSTEM_PROMPT = (
    "You are an industrial visual inspector. First reason about the image step by step inside "
    "<think> </think>, then give the final answer inside <answer> </answer>. Reply exactly as "
    "<think>reasoning</think><answer>JSON</answer> with nothing before, between or after the blocks."
)


@dataclass(frozen=True)
class Question:
    """A stage-2 question and the perspective it asks from."""

    perspective: str
    text: str


def _user(text: str) -> dict:
    return {"role": "user", "content": f"{IMAGE_TOKEN}\n{text}"}


def detection_messages(target_json: str, seed: int | str = 0) -> list[dict]:
    """Stage 1: a template question (picked by ``seed``) and the target JSON as the answer."""
    question = random.Random(seed).choice(DETECTION_QUESTIONS)
    return [_user(question), {"role": "assistant", "content": target_json}]


def labels_phrase(labels: list[str]) -> str:
    """The distinct labels in words, in first-seen order: "scratch", "crack and dent", ..."""
    words = [label.replace("_", " ") for label in dict.fromkeys(labels)]
    if not words:
        return NO_LABELS_PHRASE
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def sample_questions(record_labels: list[str], k: int, seed: int | str) -> list[Question]:
    """``k`` distinct stage-2 questions about an image with ``record_labels``.

    Perspectives are visited in a seeded order and repeated only after all five have been asked,
    so any ``k >= 5`` covers every perspective. The same labels, ``k`` and ``seed`` always give the
    same questions (string seeds, such as an image path, are stable across runs).
    """
    available = sum(len(templates) for templates in KNOWLEDGE_QUESTIONS.values())
    if not 0 <= k <= available:
        raise ValueError(f"k must be between 0 and {available} (the question pool), got {k}")
    rng = random.Random(seed)
    order = rng.sample(PERSPECTIVES, len(PERSPECTIVES))
    templates = {p: rng.sample(KNOWLEDGE_QUESTIONS[p], len(KNOWLEDGE_QUESTIONS[p])) for p in order}
    phrase = labels_phrase(record_labels)
    questions: list[Question] = []
    round_ = 0
    while len(questions) < k:
        for perspective in order:
            if len(questions) < k and round_ < len(templates[perspective]):
                text = templates[perspective][round_].format(defects=phrase)
                questions.append(Question(perspective, text))
        round_ += 1
    return questions


def knowledge_messages(question: Question | str, answer: str) -> list[dict]:
    """Stage 2: one question about the image and the teacher's answer."""
    text = question.text if isinstance(question, Question) else question
    return [_user(text), {"role": "assistant", "content": answer}]


def compact_target_schema(taxonomy: Taxonomy) -> str:
    """The target schema as one line of JSON, for prompts."""
    return json.dumps(target_schema(taxonomy), separators=(",", ":"))


def taxonomy_lines(taxonomy: Taxonomy) -> list[str]:
    """The taxonomy in words: the labels, then one line per attribute with its allowed values."""
    lines = ["Defect labels: " + ", ".join(taxonomy.labels) + "."]
    lines += [
        f"Attribute {name}: one of {', '.join(values)}."
        for name, values in taxonomy.attributes.items()
    ]
    return lines


def grpo_user_prompt(taxonomy: Taxonomy, input_size: Size) -> str:
    """The schema-constrained inspection request (seed 001, section III-B)."""
    width, height = input_size
    return "\n".join(
        [
            f"{IMAGE_TOKEN}",
            f"Inspect this {width}x{height} pixel image of a part for defects.",
            *taxonomy_lines(taxonomy),
            "Give each defect's box as [x1, y1, x2, y2] in integer pixels of this image, origin at "
            "the top-left corner. Use an empty defects list when the part has no defect, and set "
            "narrative to null or to a short explanation.",
            "The answer must be one JSON object valid against this JSON Schema: "
            + compact_target_schema(taxonomy),
        ]
    )


def grpo_messages(taxonomy: Taxonomy, input_size: Size) -> list[dict]:
    """The GRPO prompt: system (think/answer envelope) and the schema-constrained user turn."""
    return [
        {"role": "system", "content": GRPO_SYSTEM_PROMPT},
        {"role": "user", "content": grpo_user_prompt(taxonomy, input_size)},
    ]
