"""Stage grpo: TRL's real GRPOTrainer drives the inspector (tiny random Llama, byte tokenizer,
tiny CNN, generated images) for a few steps on two CPU cores."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("trl")

from examples.tiny.make_data import make_dataset  # noqa: E402
from tests.test_train_model import recipe_dict  # noqa: E402
from train.checkpoint import (  # noqa: E402
    CheckpointError,
    Progress,
    load_inspector,
    read_meta,
    save_checkpoint,
)
from train.cli import main as cli_main  # noqa: E402
from train.grpo import grpo_rows, train_grpo, trl_prompt  # noqa: E402
from train.grpo_model import InspectorPolicy, InspectorProcessor  # noqa: E402
from train.model import IMAGE_ID, build_inspector  # noqa: E402
from train.prompts import grpo_messages  # noqa: E402
from train.recipe import RecipeError, parse_recipe  # noqa: E402
from train.sft import load_records, train_stage  # noqa: E402
from train.tokenizer import tiny_tokenizer  # noqa: E402

REWARDS = (
    "format",
    "json_validity",
    "schema_compliance",
    "count",
    "detection_f1",
    "attribute_accuracy",
    "anti_gibberish",
)
GRPO = {
    "lr": 1e-2,
    "max_steps": 2,
    "num_generations": 4,
    "max_completion_length": 24,
    "beta": 0.1,  # exercises the reference model
}


def grpo_recipe(records: Path, **grpo):
    data = recipe_dict(records)
    data["training"]["detect"] = {"lr": 1e-2, "max_steps": 8}  # enough for printable bytes
    data["training"]["knowledge"] = {"lr": 1e-2, "max_steps": 1}
    data["training"]["grpo"] = {**GRPO, **grpo}
    return parse_recipe(data, records.parent)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"), per_kind=1)


@pytest.fixture
def processor_and_model(records):
    recipe = grpo_recipe(records)
    tokenizer = tiny_tokenizer()
    model = build_inspector(recipe.model, tokenizer)
    processor = InspectorProcessor(tokenizer, model.image_tokens, recipe.data.input_size)
    return recipe, processor, model


def test_processor_renders_the_grpo_prompt_with_the_image(processor_and_model, records) -> None:
    from trl.data_utils import prepare_multimodal_messages

    recipe, processor, model = processor_and_model
    row = grpo_rows(load_records(recipe), recipe)[0]
    chat = prepare_multimodal_messages(row["prompt"], images=[row["image"]])
    messages = grpo_messages(recipe.data.taxonomy, tuple(recipe.data.input_size))
    assert processor.apply_chat_template(chat, add_generation_prompt=True) == (
        processor.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
    )
    batch = processor.apply_chat_template(
        [chat, chat], add_generation_prompt=True, tokenize=True, return_dict=True
    )
    assert [ids.count(IMAGE_ID) for ids in batch["input_ids"]] == [9, 9]
    assert batch["pixel_values"].shape == (2, 3, 32, 48)
    with pytest.raises(ValueError, match="must start with"):
        trl_prompt([{"role": "user", "content": "no image"}])


def test_ground_truth_is_in_model_input_pixels(records) -> None:
    recipe = grpo_recipe(records)
    rows = {Path(r["image"]).name: r["objects"] for r in grpo_rows(load_records(recipe), recipe)}
    assert rows["good_1030.png"] == []
    (crack,) = rows["crack_1010.png"]
    assert crack["label"] == "crack" and all(isinstance(v, int) for v in crack["bbox"])
    assert 0 <= crack["bbox"][0] < crack["bbox"][2] <= 48 and crack["bbox"][3] <= 32


def test_policy_scores_completions_like_the_inspector(processor_and_model) -> None:
    """TRL's fused LM head on the wrapper gives the inspector's own token log-probabilities."""
    from trl.trainer.utils import add_fused_lm_head

    _, processor, model = processor_and_model
    policy = InspectorPolicy(model, processor.tokenizer)
    add_fused_lm_head(policy, temperature=0.7)
    ids = torch.tensor([processor.ids("<|user|>\n<image>\nFind defects.<|end|>\n") + [65, 66, 67]])
    pixels = torch.randn(1, 3, 32, 48)
    labels = ids.clone()
    labels[:, :-3] = -100
    fused = policy(
        input_ids=ids,
        attention_mask=torch.ones_like(ids),
        pixel_values=pixels,
        labels=labels,
        fused_lm_head=True,
    )
    with torch.no_grad():
        logits = model(ids, torch.ones_like(ids), pixels).logits[0, -4:-1] / 0.7
    expected = torch.log_softmax(logits, -1).gather(-1, ids[0, -3:, None])[:, 0]
    assert torch.allclose(fused.log_probs[0, -3:], expected, atol=1e-5)
    sampled = policy.generate(ids, torch.ones_like(ids), pixels, max_new_tokens=5, do_sample=False)
    assert sampled.shape == (1, ids.shape[1] + 5) and torch.equal(sampled[:, : ids.shape[1]], ids)
    assert sampled[0, ids.shape[1] :].tolist() == model.generate(
        ids[0].tolist(), pixels[0], stop_ids=set(), max_new_tokens=5
    )


def test_reward_weights_are_validated_by_key_path(records) -> None:
    for weights, message in (
        ({"formt": 1.0}, r"training\.grpo\.reward_weights\.formt"),
        ({"format": -1.0}, r"training\.grpo\.reward_weights.*format must be finite and >= 0"),
        ({name: 0.0 for name in REWARDS}, "at least one reward weight must be positive"),
    ):
        with pytest.raises(RecipeError, match=message):
            grpo_recipe(records, reward_weights=weights)
    with pytest.raises(RecipeError, match=r"training\.grpo\.num_generations"):
        grpo_recipe(records, num_generations=1)


def test_grpo_needs_a_knowledge_checkpoint(records, tmp_path, capsys) -> None:
    recipe = grpo_recipe(records)
    with pytest.raises(CheckpointError, match="pass --from CKPT"):
        train_grpo(recipe, tmp_path / "grpo", None, progress=False)
    model = build_inspector(recipe.model, tiny_tokenizer())
    detect = save_checkpoint(
        tmp_path / "detect", model, tiny_tokenizer(), recipe, Progress("detect", 8, 8, []), {}
    )
    with pytest.raises(CheckpointError, match="is a detect checkpoint; GRPO starts from stage 2"):
        train_grpo(recipe, tmp_path / "grpo", detect, progress=False)
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(f'[data]\npath = "{records}"\nlabels = ["scratch", "crack", "spot"]\n')
    argv = ["--stage", "grpo", "--recipe", str(recipe_file), "--out", str(tmp_path / "g")]
    assert cli_main(argv) == 2
    assert "pass --from CKPT" in capsys.readouterr().err
    assert cli_main([*argv, "--from", str(detect)]) == 2
    assert "train `--stage knowledge" in capsys.readouterr().err


@pytest.mark.slow
def test_grpo_trains_the_knowledge_checkpoint_with_trl(records, tmp_path) -> None:
    recipe = grpo_recipe(records)
    train_stage(recipe, "detect", tmp_path / "detect", progress=False)
    train_stage(recipe, "knowledge", tmp_path / "knowledge", tmp_path / "detect", progress=False)
    progress, rewards = train_grpo(
        recipe, tmp_path / "grpo", tmp_path / "knowledge", progress=False
    )

    assert (progress.stage, progress.step, [s for s, _ in progress.history]) == ("grpo", 2, [1, 2])
    assert [r["step"] for r in rewards] == [1, 2]
    for logged in rewards:
        means = [logged[f"rewards/{name}_reward/mean"] for name in REWARDS]
        assert all(0.0 <= m <= 1.0 for m in means), logged
        total = sum(means)  # default weights: all 1
        assert math.isclose(logged["reward"], total, rel_tol=1e-5, abs_tol=1e-6), logged
    assert any(r["reward_std"] > 0 for r in rewards), "no advantage: nothing could be learned"

    meta = read_meta(tmp_path / "grpo")
    assert (meta["stage"], meta["step"], meta["done"]) == ("grpo", 2, True)
    assert meta["parent"] == str(tmp_path / "knowledge")
    before, _, _ = load_inspector(tmp_path / "knowledge", trainable=True)
    after, _, _ = load_inspector(tmp_path / "grpo", trainable=False)
    trainable = {name for name, p in before.named_parameters() if p.requires_grad}
    assert any("lora_" in name for name in trainable) and "projector.0.weight" in trainable
    saved = after.state_dict()
    for name, p in before.named_parameters():
        changed = not torch.equal(p.detach(), saved[name])
        assert changed == (name in trainable), name
    with pytest.raises(CheckpointError, match="already holds a grpo checkpoint"):
        train_grpo(recipe, tmp_path / "grpo", tmp_path / "knowledge", progress=False)
