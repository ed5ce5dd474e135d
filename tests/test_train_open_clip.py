"""An open_clip ViT as the inspector's vision tower: recipe checks, training, export and serving.

A tiny random open_clip ViT (width 64, 2 layers, patch 16, 64 x 64 input) is described by a model
config JSON and its weights saved to a local safetensors file, as a user would bring ViT-B-32. The
inspector trains on generated part images, exports (ONNX vision through the parity gate, GGUF
language model) and the torch-free runtime, normalising with the manifest's per-channel mean/std,
answers token for token as transformers does.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from appliance.bundle import load_bundle  # noqa: E402
from appliance.imaging import decode_image  # noqa: E402
from appliance.vlm import open_vlm  # noqa: E402
from appliance.vlm import preprocess as runtime_preprocess  # noqa: E402
from examples.tiny.make_data import make_dataset  # noqa: E402
from export.inspector_bundle import export_bundle  # noqa: E402
from export.language import transformers_greedy  # noqa: E402
from train.checkpoint import load_inspector, read_meta  # noqa: E402
from train.model import build_inspector, preprocess  # noqa: E402
from train.recipe import RecipeError, parse_recipe  # noqa: E402
from train.sft import load_pixels, make_optimizer, optimizer_step, prepare, train_stage  # noqa: E402
from train.tokenizer import stop_ids, tiny_tokenizer  # noqa: E402

NAME = "tiny-vit-test"
SIZE = 64
TINY_VIT = {
    "embed_dim": 32,
    "vision_cfg": {
        "image_size": SIZE,
        "layers": 2,
        "width": 64,
        "head_width": 32,
        "patch_size": 16,
    },
    "text_cfg": {"context_length": 16, "vocab_size": 96, "width": 32, "heads": 2, "layers": 1},
}


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory) -> tuple[Path, Path]:
    """(config JSON, weights .safetensors) of a random tiny open_clip ViT."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("vit")
    config = folder / f"{NAME}.json"
    config.write_text(json.dumps(TINY_VIT))
    open_clip.add_model_config(config)
    torch.manual_seed(7)
    clip = open_clip.create_model(NAME, pretrained=None)
    weights = folder / "tiny_vit.safetensors"
    save_file({k: v.contiguous() for k, v in clip.state_dict().items()}, weights)
    return config, weights


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"), per_kind=2)


def recipe_dict(records: Path, vit_files, **clip) -> dict:
    config, weights = vit_files
    return {
        "model": {
            "vision": "open_clip",
            "open_clip": {"name": NAME, "config": str(config), "weights": str(weights), **clip},
            "image_grid": 2,
            "projector_hidden": 64,
            "lm": {"hidden_size": 64, "layers": 2, "heads": 4, "kv_heads": 2},
            "lora": {"r": 8, "alpha": 16, "modules_to_save": ["lm_head"]},
        },
        "data": {
            "path": str(records),
            "labels": ["scratch", "crack", "spot"],
            "input_size": [SIZE, SIZE],
        },
        "training": {
            "seed": 0,
            "batch_size": 8,
            "precision": "fp32",
            "gradient_checkpointing": False,
            "save_every": 100,
            "detect": {"lr": 1e-2, "max_steps": 30, "warmup_steps": 5},
        },
    }


@pytest.fixture(scope="module")
def checkpoint(records, vit_files, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "detect"
    recipe = parse_recipe(recipe_dict(records, vit_files), records.parent)
    train_stage(recipe, "detect", out, progress=False)
    return out


@pytest.fixture(scope="module")
def bundle_f32(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "f32"
    export_bundle(checkpoint, out, quant="F32", max_tokens=120)
    return out


def _error(data: dict, base: Path) -> str:
    with pytest.raises(RecipeError) as caught:
        parse_recipe(data, base)
    return str(caught.value)


def test_recipe_names_the_bad_open_clip_settings(records, vit_files, tmp_path) -> None:
    data = recipe_dict(records, vit_files)
    data["model"]["open_clip"]["weights"] = str(tmp_path / "absent.safetensors")
    assert "model.open_clip.weights" in _error(data, tmp_path)
    assert "does not exist" in _error(data, tmp_path)
    data = recipe_dict(records, vit_files)
    data["model"]["open_clip"] = {"name": "ViT-B-33", "weights": str(vit_files[1])}
    message = _error(data, tmp_path)
    assert "'ViT-B-33' is not an open_clip architecture" in message and "ViT-B-32" in message
    data = recipe_dict(records, vit_files)
    data["model"]["open_clip"]["weights"] = str(tmp_path / "w.onnx")
    assert ".safetensors, .bin, .pt, .pth" in _error(data, tmp_path)
    data = recipe_dict(records, vit_files)
    del data["model"]["open_clip"]
    assert "needs a [model.open_clip] section" in _error(data, tmp_path)
    data = recipe_dict(records, vit_files)
    data["data"]["input_size"] = [64, 48]
    assert "data.input_size: [64, 48] must be [64, 64]" in _error(data, tmp_path)
    data = recipe_dict(records, vit_files)
    data["model"]["open_clip"]["colour"] = "rgb"
    assert "model.open_clip.colour" in _error(data, tmp_path)


def test_normalisation_is_open_clips_and_reaches_the_pixels(records, vit_files) -> None:
    recipe = parse_recipe(recipe_dict(records, vit_files), records.parent)
    mean, std = recipe.model.normalisation
    assert mean == pytest.approx(open_clip.constants.OPENAI_DATASET_MEAN)
    assert std == pytest.approx(open_clip.constants.OPENAI_DATASET_STD)
    white = np.full((10, 12, 3), 255, np.uint8)
    pixels = preprocess(white, (SIZE, SIZE), mean, std)
    want = (1.0 - np.array(mean, np.float32)) / np.array(std, np.float32)
    assert pixels[:, 0, 0].numpy() == pytest.approx(want, rel=1e-6)
    assert np.array_equal(runtime_preprocess(white, (SIZE, SIZE), mean, std), pixels.numpy())
    image = records.parent / "images" / "crack_1010.png"
    loaded = load_pixels(image, (SIZE, SIZE), recipe.model.normalisation)
    assert not torch.equal(loaded, load_pixels(image, (SIZE, SIZE)))  # 0.5/0.5 differs


def test_vision_gives_a_patch_map_and_a_step_trains_the_projector_only(
    records, vit_files, tmp_path
) -> None:
    recipe = parse_recipe(recipe_dict(records, vit_files), records.parent)
    model = build_inspector(recipe.model, tiny_tokenizer())
    with torch.no_grad():
        features = model.vision(torch.zeros(2, 3, SIZE, SIZE))
    assert features.shape == (2, 64, SIZE // 16, SIZE // 16)  # width x (grid x grid), no CLS
    assert model.vision.channels == 64
    run, _, _ = prepare(recipe, "detect", tmp_path / "ckpt", None)
    before = {n: p.detach().clone() for n, p in run.model.named_parameters()}
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    optimizer = make_optimizer(trainable, recipe.training, run.device)
    optimizer_step(run, optimizer, 0, total=2)
    for name, param in run.model.named_parameters():
        changed = not torch.equal(param, before[name])
        if name.startswith("projector."):
            assert changed, name
        if name.startswith("vision."):
            assert not changed and not param.requires_grad, name


def test_checkpoint_meta_and_manifest_carry_the_normalisation(checkpoint, bundle_f32) -> None:
    meta = read_meta(checkpoint)
    clip = meta["recipe"]["model"]["open_clip"]
    assert clip["mean"] == pytest.approx(open_clip.constants.OPENAI_DATASET_MEAN)
    assert meta["history"][-1][1] < meta["history"][0][1]
    manifest = load_bundle(bundle_f32).manifest
    pre = manifest["vlm"]["preprocess"]
    assert pre["mean"] == pytest.approx(list(open_clip.constants.OPENAI_DATASET_MEAN))
    assert pre["std"] == pytest.approx(list(open_clip.constants.OPENAI_DATASET_STD))
    vision = manifest["parity"]["vision"]
    assert vision["max_abs_diff"] < 1e-4 * max(1.0, vision["scale"])
    assert vision["min_cosine"] > 0.99999


def test_runtime_equals_transformers_token_for_token(checkpoint, bundle_f32, records) -> None:
    model, tokenizer, meta = load_inspector(checkpoint, trainable=False)
    model.eval()
    mean, std = parse_recipe(meta["recipe"], Path("/")).model.normalisation
    bundle = load_bundle(bundle_f32)
    segments = bundle.manifest["vlm"]["prompt"]["segments"]
    inspector = open_vlm(bundle)
    try:
        assert inspector.mean == pytest.approx(mean) and inspector.std == pytest.approx(std)
        for path in sorted((records.parent / "images").glob("*.png"))[:3]:
            rgb = decode_image(path.read_bytes()).rgb
            with torch.no_grad():
                want = model.encode_images(preprocess(rgb, (SIZE, SIZE), mean, std)[None])[0]
            embedded, _, _ = inspector.embed([rgb])
            assert np.abs(embedded[0] - want.numpy()).max() < 1e-4
            tokens, _ = transformers_greedy(model, segments, want, stop_ids(tokenizer), 120)
            got = inspector.decoder.generate(embedded[0], 120, constrained=False)
            assert got.tokens == tokens, path.name
    finally:
        inspector.close()
