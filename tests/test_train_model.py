"""The inspector model and its supervised stages, on a tiny random model built in code.

Everything here is real: a random Llama from a config, a byte-level tokenizer built in code, peft
LoRA, generated part images. The training tests run a handful of steps on two CPU cores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("peft")

from examples.tiny.make_data import make_dataset  # noqa: E402
from train.checkpoint import CheckpointError, load_inspector, read_meta  # noqa: E402
from train.cli import main as cli_main  # noqa: E402
from train.model import (  # noqa: E402
    IGNORE,
    IMAGE_ID,
    build_inspector,
    collate,
    encode_chat,
    prompt_ids,
)
from train.prompts import IMAGE_TOKEN  # noqa: E402
from train.recipe import RecipeError, load_recipe, parse_recipe  # noqa: E402
from train.sft import (  # noqa: E402
    batch_indices,
    load_pixels,
    make_optimizer,
    optimizer_step,
    prepare,
    train_stage,
)
from train.tokenizer import tiny_tokenizer  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CHAT = [
    {"role": "user", "content": f"{IMAGE_TOKEN}\nFind the defects."},
    {"role": "assistant", "content": '{"defects":[],"narrative":null}'},
]


def recipe_dict(records: Path, **model) -> dict:
    return {
        "model": {
            "vision": "tiny",
            "image_grid": 3,
            "projector_hidden": 32,
            "prompt_tokens": 4,
            "lm": {
                "hidden_size": 32,
                "layers": 1,
                "heads": 2,
                "kv_heads": 1,
                "intermediate_size": 64,
            },
            "lora": {"r": 4, "alpha": 8, "modules_to_save": ["lm_head"]},
            **model,
        },
        "data": {
            "path": str(records),
            "labels": ["scratch", "crack", "spot"],
            "input_size": [48, 32],
        },
        "training": {
            "seed": 3,
            "batch_size": 4,
            "precision": "fp32",
            "gradient_checkpointing": False,
            "save_every": 2,
            "detect": {"lr": 1e-2, "max_steps": 4},
            "knowledge": {"lr": 1e-2, "max_steps": 2},
        },
    }


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"), per_kind=1)


@pytest.fixture
def recipe(records):
    return parse_recipe(recipe_dict(records), records.parent)


@pytest.fixture
def model_and_tokenizer(recipe):
    tokenizer = tiny_tokenizer()
    return build_inspector(recipe.model, tokenizer), tokenizer


def params(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def test_image_tokens_replace_the_placeholder(model_and_tokenizer, records) -> None:
    model, tokenizer = model_and_tokenizer
    example = encode_chat(tokenizer, CHAT, model.image_tokens)
    slots = [i for i, t in enumerate(example.input_ids) if t == IMAGE_ID]
    assert len(slots) == 9 and slots == list(range(slots[0], slots[0] + 9))
    assert example.input_ids[: slots[0]] == tokenizer("<|user|>\n")["input_ids"]
    pixels = load_pixels(records.parent / "images" / "crack_1010.png", (48, 32))
    batch = collate([example], [pixels], tokenizer.pad_token_id)
    with torch.no_grad():
        embeds, mask = model.embed(batch["input_ids"], batch["attention_mask"], batch["pixels"])
        image = model.encode_images(batch["pixels"])[0]
        tokens = model.lm.get_input_embeddings()(batch["input_ids"].clamp(min=0))[0]
    assert embeds.shape == (1, len(example.input_ids), 32) and mask.sum() == len(example.input_ids)
    assert torch.equal(embeds[0, slots], image)
    text = [i for i in range(len(example.input_ids)) if i not in slots]
    assert torch.equal(embeds[0, text], tokens[text])


def test_placeholder_count_must_match_the_images(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    example = encode_chat(tokenizer, CHAT, image_tokens=4)  # 4 slots, the model wants 9
    batch = collate([example], [torch.zeros(3, 32, 48)], tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="4 image-token positions but 1 image"):
        model(**batch)


def test_labels_cover_only_the_answer() -> None:
    tokenizer = tiny_tokenizer()
    example = encode_chat(tokenizer, CHAT, image_tokens=4)
    first = next(i for i, label in enumerate(example.labels) if label != IGNORE)
    assert all(label != IGNORE for label in example.labels[first:])
    assert tokenizer.decode(example.labels[first:]) == CHAT[1]["content"] + "<|end|>\n"
    assert example.input_ids[:first] == prompt_ids(tokenizer, CHAT[:1], 4)
    batch = collate(
        [example, encode_chat(tokenizer, CHAT[:1] + CHAT[1:], 4)], [torch.zeros(3, 8, 8)] * 2, 0
    )
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE).all()


def test_forward_backward_reaches_only_trainable_parts(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    batch = collate(
        [encode_chat(tokenizer, CHAT, 9)], [torch.randn(3, 32, 48)], tokenizer.pad_token_id
    )
    loss = model(**batch).loss
    assert torch.isfinite(loss) and loss.item() > 1.0
    loss.backward()
    for name, p in model.named_parameters():
        trainable = name.startswith("projector.") or "lora_" in name or "modules_to_save" in name
        assert p.requires_grad == trainable, name
        assert (p.grad is not None) == trainable, name
        if "lora_A" not in name and trainable:  # lora_B starts at zero, so lora_A's grad is zero
            assert p.grad.abs().sum() > 0, name


def test_batches_are_seeded_epoch_permutations() -> None:
    first = [batch_indices(m, 10, 4, seed=1) for m in range(3)]
    assert sorted(sum(first, [])) == list(range(10)) and [len(b) for b in first] == [4, 4, 2]
    assert first == [batch_indices(m, 10, 4, seed=1) for m in range(3)]
    assert batch_indices(3, 10, 4, seed=1) != first[0]  # the next epoch is reshuffled


def test_recipe_rejects_unknown_keys(records) -> None:
    data = recipe_dict(records)
    data["model"]["lm"]["hiden_size"] = 64
    with pytest.raises(RecipeError, match=r"model\.lm\.hiden_size: Extra inputs"):
        parse_recipe(data, records.parent)
    assert load_recipe(REPO / "examples/tiny/recipe.toml").model.image_tokens == 4


@pytest.mark.slow
def test_every_trainable_parameter_changes_and_frozen_ones_do_not(recipe, tmp_path) -> None:
    run, _, _ = prepare(recipe, "detect", tmp_path / "ckpt", None)
    before = params(run.model)
    optimizer = make_optimizer(
        [p for p in run.model.parameters() if p.requires_grad], recipe.training, run.device
    )
    for step in range(3):
        optimizer_step(run, optimizer, step, total=3)
    for name, p in run.model.named_parameters():
        changed = not torch.equal(before[name], p.detach())
        assert changed == p.requires_grad, name


@pytest.mark.slow
def test_loss_falls_when_overfitting_a_batch(records, tmp_path) -> None:
    data = recipe_dict(records)
    data["training"]["detect"] = {"lr": 1e-2, "max_steps": 30}
    recipe = parse_recipe(data, records.parent)
    run, _, _ = prepare(recipe, "detect", tmp_path / "ckpt", None)
    optimizer = make_optimizer(
        [p for p in run.model.parameters() if p.requires_grad], recipe.training, run.device
    )
    run.items = run.items[:4]  # one fixed batch
    losses = [optimizer_step(run, optimizer, step, total=30) for step in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses


@pytest.mark.slow
def test_resume_continues_from_the_saved_step(recipe, tmp_path) -> None:
    whole = train_stage(recipe, "detect", tmp_path / "whole", progress=False)
    part = train_stage(recipe, "detect", tmp_path / "part", stop_at=2, progress=False)
    meta = read_meta(tmp_path / "part")
    assert (part.step, meta["step"], meta["done"]) == (2, 2, False)
    resumed = train_stage(recipe, "detect", tmp_path / "part", progress=False)
    assert [s for s, _ in resumed.history] == [1, 2, 3, 4] and read_meta(tmp_path / "part")["done"]
    assert [loss for _, loss in resumed.history] == pytest.approx([x for _, x in whole.history])
    a, _, _ = load_inspector(tmp_path / "whole", trainable=False)
    b, _, _ = load_inspector(tmp_path / "part", trainable=False)
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.allclose(x, y, atol=1e-6), name
    other = parse_recipe({**recipe_dict(recipe.data.path), "training": {"seed": 4}}, tmp_path)
    with pytest.raises(CheckpointError, match="another recipe"):
        train_stage(other, "detect", tmp_path / "part", progress=False)


@pytest.mark.slow
def test_knowledge_continues_the_detect_checkpoint(recipe, tmp_path, capsys) -> None:
    train_stage(recipe, "detect", tmp_path / "detect", progress=False)
    detect, _, _ = load_inspector(tmp_path / "detect", trainable=True)
    run, _, _ = prepare(recipe, "knowledge", tmp_path / "knowledge", tmp_path / "detect")
    assert all(torch.equal(detect.state_dict()[k], v) for k, v in run.model.state_dict().items())
    assert "Low urgency" in "".join(
        run.tokenizer.decode([t for t in i.example.labels if t >= 0]) for i in run.items
    )
    done = train_stage(
        recipe, "knowledge", tmp_path / "knowledge", tmp_path / "detect", progress=False
    )
    meta = read_meta(tmp_path / "knowledge")
    assert (
        done.step == 2 and meta["parent"] == str(tmp_path / "detect") and meta["image_tokens"] == 9
    )
    assert (
        json.loads((tmp_path / "knowledge" / "adapter" / "adapter_config.json").read_text())["r"]
        == 4
    )
    recipe_file = tmp_path / "r.toml"
    recipe_file.write_text(f'[data]\npath = "{recipe.data.path}"\nlabels = ["scratch"]\n')
    assert (
        cli_main(
            ["--stage", "knowledge", "--recipe", str(recipe_file), "--out", str(tmp_path / "k2")]
        )
        == 2
    )
    assert "pass --from CKPT" in capsys.readouterr().err


@pytest.mark.slow
def test_prompt_adapter_trains_prompt_and_projector_only(records, tmp_path) -> None:
    recipe = parse_recipe(recipe_dict(records, adapter="prompt"), records.parent)
    run, _, _ = prepare(recipe, "detect", tmp_path / "ckpt", None)
    assert not any("lora_" in name for name, _ in run.model.named_parameters())
    trainable = {name for name, p in run.model.named_parameters() if p.requires_grad}
    assert trainable == {"prompt"} | {
        n for n, _ in run.model.projector.named_parameters(prefix="projector")
    }
    before = params(run.model)
    optimizer = make_optimizer(
        [p for p in run.model.parameters() if p.requires_grad], recipe.training, run.device
    )
    for step in range(2):
        optimizer_step(run, optimizer, step, total=2)
    for name, p in run.model.named_parameters():
        assert torch.equal(before[name], p.detach()) == name.startswith(("lm.", "vision.")), name


@pytest.mark.slow
def test_greedy_generation_matches_teacher_forcing(model_and_tokenizer) -> None:
    model, tokenizer = model_and_tokenizer
    pixels = torch.randn(3, 32, 48)
    ids = prompt_ids(tokenizer, CHAT[:1], model.image_tokens)
    new = model.generate(ids, pixels, stop_ids=set(), max_new_tokens=6)
    assert len(new) == 6
    full = torch.tensor([ids + new])
    with torch.no_grad():
        logits = model(full, torch.ones_like(full), pixels[None]).logits[0]
    assert logits[len(ids) - 1 : -1].argmax(-1).tolist() == new


@pytest.mark.slow
def test_efficientnet_vision_carries_the_package_weights() -> None:
    pytest.importorskip("timm")
    from export.torchfile import default_weights_path, load_legacy_state_dict
    from train.model import efficientnet_vision

    try:
        path = default_weights_path()
    except FileNotFoundError as exc:
        pytest.skip(str(exc))
    vision = efficientnet_vision(path)
    stem = load_legacy_state_dict(path)["_conv_stem.weight"]
    assert torch.equal(vision.body.conv_stem.weight, torch.from_numpy(stem))
    assert vision.channels == 1280 and not any(p.requires_grad for p in vision.parameters())
    assert vision(torch.zeros(1, 3, 96, 64)).shape == (1, 1280, 3, 2)


def test_language_model_and_tokenizer_load_from_a_local_folder(records, tmp_path) -> None:
    """`[model.lm] path` = a Hugging Face folder: training starts from its weights, the checkpoint
    reloads them from there, and the LoRA update is what differs."""
    from train.checkpoint import load_inspector
    from train.model import build_language_model
    from train.recipe import LanguageModel

    tokenizer = tiny_tokenizer()
    spec = LanguageModel(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)
    base = build_language_model(spec, tokenizer)
    folder = tmp_path / "local-lm"
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    data = recipe_dict(records)
    data["model"]["lm"] = {"path": str(folder)}
    recipe = parse_recipe(data, records.parent)
    assert not recipe.model.lm.is_random
    train_stage(recipe, "detect", tmp_path / "ckpt", stop_at=2, progress=False)
    model, loaded_tokenizer, meta = load_inspector(tmp_path / "ckpt", trainable=False)
    assert meta["recipe"]["model"]["lm"]["path"] == str(folder)
    assert loaded_tokenizer.chat_template == tokenizer.chat_template
    merged = model.lm.merge_and_unload()
    before, after = base.state_dict(), merged.state_dict()
    assert set(before) == set(after)
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(("proj" in k) or ("lm_head" in k) for k in changed), changed
    embed = "model.embed_tokens.weight"
    assert torch.equal(before[embed], after[embed])  # the folder's weights, not a fresh init
