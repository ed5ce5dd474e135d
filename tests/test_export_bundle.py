"""Export of a trained tiny inspector into a ``vlm`` bundle, and identity with training.

A tiny random Llama inspector (byte tokenizer, tiny CNN vision, LoRA) is trained on generated part
images, exported (ONNX vision, GGUF language model) and served by the appliance's torch-free runtime
(ONNX Runtime + llama.cpp). Its greedy answers must equal transformers' greedy answers token for
token, with and without the report grammar, and the daemon-side report must carry the same defects.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gguf")

from appliance.bundle import load_bundle  # noqa: E402
from appliance.imaging import decode_image  # noqa: E402
from appliance.target import objects_from_target, parse_target  # noqa: E402
from appliance.vlm import defect_spans, open_vlm  # noqa: E402
from examples.tiny.make_data import make_dataset  # noqa: E402
from export.inspector_bundle import ExportError, Tolerances, export_bundle  # noqa: E402
from export.language import transformers_greedy  # noqa: E402
from train.checkpoint import load_inspector  # noqa: E402
from train.model import preprocess  # noqa: E402
from train.recipe import parse_recipe  # noqa: E402
from train.sft import train_stage  # noqa: E402
from train.tokenizer import stop_ids  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
INPUT_SIZE = (64, 48)


def recipe_dict(records: Path, adapter: str = "lora") -> dict:
    return {
        "model": {
            "vision": "tiny",
            "image_grid": 2,
            "projector_hidden": 64,
            "adapter": adapter,
            "prompt_tokens": 4,
            "lm": {
                "hidden_size": 64,
                "layers": 2,
                "heads": 4,
                "kv_heads": 2,
                "intermediate_size": 128,
            },
            "lora": {"r": 8, "alpha": 16, "modules_to_save": ["lm_head"]},
        },
        "data": {
            "path": str(records),
            "labels": ["scratch", "crack", "spot"],
            "input_size": list(INPUT_SIZE),
        },
        "training": {
            "seed": 0,
            "batch_size": 8,
            "precision": "fp32",
            "gradient_checkpointing": False,
            "save_every": 100,
            "detect": {"lr": 1e-2, "max_steps": 40, "warmup_steps": 5},
        },
    }


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("tiny"), per_kind=2)


@pytest.fixture(scope="module")
def checkpoint(records, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt") / "detect"
    recipe = parse_recipe(recipe_dict(records), records.parent)
    train_stage(recipe, "detect", out, progress=False)
    return out


@pytest.fixture(scope="module")
def bundle_f32(checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "f32"
    export_bundle(checkpoint, out, quant="F32", max_tokens=160)
    return out


@pytest.fixture(scope="module")
def images(records) -> list[Path]:
    return sorted((records.parent / "images").glob("*.png"))[:4]


@pytest.fixture(scope="module")
def torch_model(checkpoint):
    model, tokenizer, meta = load_inspector(checkpoint, trainable=False)
    return model.eval(), tokenizer


def _torch_answer(torch_model, bundle, image: Path, decoder, constrained: bool) -> list[int]:
    """transformers' greedy tokens for ``image`` (under llama.cpp's grammar when constrained)."""
    model, tokenizer = torch_model
    rgb = decode_image(image.read_bytes()).rgb
    pixels = preprocess(rgb, INPUT_SIZE).unsqueeze(0)
    with torch.no_grad():
        embedded = model.encode_images(pixels)[0]
    segments = bundle.manifest["vlm"]["prompt"]["segments"]
    if not constrained:
        tokens, _ = transformers_greedy(model, segments, embedded, stop_ids(tokenizer), 160)
        return tokens
    from export.language import _embeddings

    grammar, tokens = decoder.new_grammar(), []
    try:
        embeds = _embeddings(model, segments, embedded).unsqueeze(0)
        with torch.no_grad():
            out = model.lm(inputs_embeds=embeds, use_cache=True)
            for _ in range(160):
                token = decoder.pick(grammar, out.logits[0, -1].float().numpy())
                if token in stop_ids(tokenizer):
                    break
                tokens.append(token)
                step = model.lm.get_input_embeddings()(torch.tensor([[token]]))
                out = model.lm(inputs_embeds=step, past_key_values=out.past_key_values)
    finally:
        decoder.free_grammar(grammar)
    return tokens


def test_manifest_records_parity_preprocessing_and_prompt(bundle_f32) -> None:
    bundle = load_bundle(bundle_f32)
    assert bundle.kind == "vlm"
    vlm, parity = bundle.manifest["vlm"], bundle.manifest["parity"]
    assert vlm["image_tokens"] == 4 and vlm["preprocess"]["input_size"] == list(INPUT_SIZE)
    assert set(bundle.manifest["files"]) == {"vision.onnx", "language_model.F32.gguf"}
    assert parity["vision"]["max_abs_diff"] < 1e-4 * max(1.0, parity["vision"]["scale"])
    assert parity["F32"]["top1_agreement"] == 1.0 and parity["F32"]["min_cosine"] > 0.99999
    kinds = [next(iter(s)) for s in vlm["prompt"]["segments"]]
    assert kinds == ["tokens", "image", "tokens"]


def assert_runtime_equals_transformers(bundle_dir, torch_model, images, **options) -> None:
    bundle = load_bundle(bundle_dir)
    inspector = open_vlm(bundle, **options)
    try:
        rgbs = [decode_image(p.read_bytes()).rgb for p in images]
        embeddings, _, _ = inspector.embed(rgbs)
        for path, embedded in zip(images, embeddings, strict=True):
            for constrained in (False, True):
                want = _torch_answer(torch_model, bundle, path, inspector.decoder, constrained)
                got = inspector.decoder.generate(embedded, 160, constrained=constrained)
                assert got.tokens == want, (path.name, constrained, got.text)
    finally:
        inspector.close()


def test_runtime_equals_transformers_token_for_token(bundle_f32, torch_model, images) -> None:
    assert_runtime_equals_transformers(bundle_f32, torch_model, images)


@pytest.mark.gpu
def test_gpu_runtime_equals_transformers_token_for_token(bundle_f32, torch_model, images) -> None:
    """The same identity with every layer offloaded to the GPU (a CUDA build of llama.cpp): the
    image embeddings go in as embedding batches on the device. Vision stays on the CPU provider so
    that only the language model's device changes."""
    import llama_cpp

    if not llama_cpp.llama_supports_gpu_offload():
        pytest.skip(
            "llama-cpp-python here is a CPU build; CMAKE_ARGS='-DGGML_CUDA=on' builds the GPU one"
        )
    assert_runtime_equals_transformers(bundle_f32, torch_model, images, n_gpu_layers=-1)


def test_inspect_command_reports_the_trained_answer(bundle_f32, torch_model, images) -> None:
    bundle = load_bundle(bundle_f32)
    run = subprocess.run(
        [sys.executable, "-m", "appliance", "inspect", "--bundle", str(bundle_f32)]
        + [str(p) for p in images],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=240,
        check=True,
    )
    reports = [json.loads(line) for line in run.stdout.splitlines()]
    assert len(reports) == len(images)
    inspector = open_vlm(bundle)
    try:
        for path, report in zip(images, reports, strict=True):
            tokens = _torch_answer(torch_model, bundle, path, inspector.decoder, True)
            text = torch_model[1].decode(tokens)
            target = parse_target(text)
            if target is None:  # cut off: the daemon must say so, not guess
                assert report["verdict"] == "error", text
                continue
            size = (report["image"]["width"], report["image"]["height"])
            want = objects_from_target(target, size, INPUT_SIZE)
            assert [d["label"] for d in report["defects"]] == [o["label"] for o in want]
            for defect, obj in zip(report["defects"], want, strict=True):
                assert defect["bbox"] == pytest.approx(obj["bbox"], abs=0.06)
                assert 0.0 < defect["score"] <= 1.0
    finally:
        inspector.close()


def test_quantized_export_records_drift_and_fallbacks(checkpoint, tmp_path) -> None:
    bundle = export_bundle(checkpoint, tmp_path / "q8", quant="Q8_0")
    manifest = bundle.manifest
    assert manifest["vlm"]["language_model"] == "language_model.Q8_0.gguf"
    assert "language_model.F16.gguf" not in manifest["files"]  # the reference is not shipped
    assert manifest["parity"]["Q8_0"]["against"] == "F16"
    assert manifest["parity"]["Q8_0"]["min_cosine"] > 0.9
    assert manifest["export"]["quantization"]["bytes"] > 0
    assert isinstance(manifest["export"]["quantization"]["fallbacks"], list)


def test_parity_gate_failure_leaves_no_bundle(checkpoint, tmp_path) -> None:
    strict = Tolerances(reference_rel={"F32": 1e-12, "F16": 1e-12})
    with pytest.raises(ExportError, match="parity failed"):
        export_bundle(checkpoint, tmp_path / "b", quant="F32", tolerances=strict)
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b*"))


def test_export_refuses_an_existing_directory_and_unknown_types(checkpoint, tmp_path) -> None:
    (tmp_path / "taken").mkdir()
    with pytest.raises(ExportError, match="exists"):
        export_bundle(checkpoint, tmp_path / "taken")
    with pytest.raises(ExportError, match="Q3"):
        export_bundle(checkpoint, tmp_path / "new", quant="Q3")


def test_defect_spans_and_scores_on_literals() -> None:
    text = '{"defects":[{"label":"crack","bbox":[1,2,3,4],"attributes":{}},{"label":"spot"}],"n":1}'
    spans = defect_spans(text)
    assert [text[a:b] for a, b in spans] == [
        '{"label":"crack","bbox":[1,2,3,4],"attributes":{}}',
        '{"label":"spot"}',
    ]
    assert defect_spans('{"defects":[],"narrative":null}') == []


def test_prompt_adapter_bundle_feeds_the_learned_embeddings(records, tmp_path, images) -> None:
    data = recipe_dict(records, adapter="prompt")
    data["training"]["detect"] = {"lr": 1e-2, "max_steps": 3}
    train_stage(parse_recipe(data, records.parent), "detect", tmp_path / "ckpt", progress=False)
    bundle = export_bundle(tmp_path / "ckpt", tmp_path / "bundle", quant="F32", max_tokens=24)
    kinds = [next(iter(s)) for s in bundle.manifest["vlm"]["prompt"]["segments"]]
    assert kinds == ["embeddings", "tokens", "image", "tokens"]
    model, tokenizer, _ = load_inspector(tmp_path / "ckpt", trainable=False)
    saved = np.load(bundle.path / "prompt_embeddings.npy")
    assert np.array_equal(saved, model.prompt.detach().numpy())
    inspector = open_vlm(load_bundle(bundle.path))
    try:
        want = _torch_answer((model.eval(), tokenizer), bundle, images[0], inspector.decoder, False)
        embedded, _, _ = inspector.embed([decode_image(images[0].read_bytes()).rgb])
        assert inspector.decoder.generate(embedded[0], 160, constrained=False).tokens == want
    finally:
        inspector.close()


@pytest.mark.slow
def test_grpo_checkpoint_is_served_with_its_prompt_and_envelope(records, tmp_path, images) -> None:
    from train.grpo import train_grpo

    data = recipe_dict(records)
    data["model"]["lm"]["max_positions"] = 4096  # the GRPO prompt carries the schema
    data["training"]["detect"] = {"lr": 1e-2, "max_steps": 3}
    data["training"]["knowledge"] = {"lr": 1e-2, "max_steps": 1}
    data["training"]["grpo"] = {
        "lr": 1e-2,
        "max_steps": 1,
        "num_generations": 2,
        "max_completion_length": 8,
        "beta": 0.0,
    }
    recipe = parse_recipe(data, records.parent)
    train_stage(recipe, "detect", tmp_path / "detect", progress=False)
    train_stage(recipe, "knowledge", tmp_path / "knowledge", tmp_path / "detect", progress=False)
    train_grpo(recipe, tmp_path / "grpo", tmp_path / "knowledge", progress=False)
    bundle = export_bundle(tmp_path / "grpo", tmp_path / "bundle", quant="F32", max_tokens=24)
    prompt = bundle.manifest["vlm"]["prompt"]
    assert prompt["envelope"] == "think-answer"
    assert [m["role"] for m in prompt["messages"]] == ["system", "user"]
    model, tokenizer, _ = load_inspector(tmp_path / "grpo", trainable=False)
    inspector = open_vlm(load_bundle(bundle.path))
    try:
        assert inspector.decoder.grammar_root == "envelope"
        want = _torch_answer((model.eval(), tokenizer), bundle, images[0], inspector.decoder, True)
        embedded, _, _ = inspector.embed([decode_image(images[0].read_bytes()).rgb])
        got = inspector.decoder.generate(embedded[0], 160)
        assert got.tokens == want
        assert got.text.startswith("<think>")  # the grammar holds the envelope
    finally:
        inspector.close()


def test_a_cut_off_answer_is_an_error_for_that_image_only(bundle_f32, images) -> None:
    inspector = open_vlm(load_bundle(bundle_f32))
    try:
        decoded = [decode_image(p.read_bytes()) for p in images[:2]]
        inspector.max_tokens = 3
        short = inspector.inspect_batch(decoded, [{}, {}])
        assert [i.error[0] for i in short] == ["inference_failed"] * 2
        assert "cut off at max_tokens=3" in short[0].error[1]
        inspector.max_tokens = 160
        full = inspector.inspect_batch(decoded, [{}, {}])
        assert all(i.error is None for i in full)
        assert set(full[0].timings_ms) == {"preprocess", "vision", "prefill", "generation"}
    finally:
        inspector.close()


def test_export_command_lists_formats_and_names_a_bad_checkpoint(tmp_path) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "appliance", "export", "--formats"],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=True,
    )
    assert "| gguf-q4_k_m | `--quant Q4_K_M` | `.Q4_K_M.gguf` |" in run.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "appliance", "export", "--checkpoint", str(tmp_path)]
        + ["--out", str(tmp_path / "b")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert bad.returncode == 2 and "is not an inspector checkpoint" in bad.stderr


def test_efficientnet_vision_exports_within_parity(records, tmp_path) -> None:
    from export.vision import export_vision_onnx, probe_pixels, vision_parity
    from train.model import build_inspector
    from train.tokenizer import tiny_tokenizer

    data = recipe_dict(records)
    data["model"]["vision"] = "efficientnet_lite0"
    data["model"]["image_grid"] = 3  # 7 x 5 feature map → uneven adaptive bins
    data["data"]["input_size"] = [224, 160]
    recipe = parse_recipe(data, records.parent)
    model = build_inspector(recipe.model, tiny_tokenizer()).eval()
    path = export_vision_onnx(model, (224, 160), tmp_path / "vision.onnx")
    parity = vision_parity(model, path, probe_pixels((224, 160), n=2))
    assert parity["max_abs_diff"] < 1e-4 * max(1.0, parity["scale"]), parity
    assert parity["min_cosine"] > 0.99999
