"""Seed 002's CLIP anomaly branch on tiny random open_clip models, offline (no weights, no data)."""

from __future__ import annotations

import functools

import numpy as np
import pytest

torch = pytest.importorskip("torch")
open_clip = pytest.importorskip("open_clip")

from appliance.bundle import BundleError, load_bundle  # noqa: E402
from appliance.taxonomy import Taxonomy  # noqa: E402
from train.clip_anomaly import msspmm, tddf  # noqa: E402
from train.clip_anomaly.evaluate import auroc, description_accuracy, pixel_auroc  # noqa: E402
from train.clip_anomaly.net import ClipAnomalyNet  # noqa: E402
from train.clip_anomaly.train import Sample, build_focuser, fit_focuser, make_batch  # noqa: E402
from train.clip_anomaly.vvclip import VVClipVision, _value_attention, tiny_clip  # noqa: E402

TAXONOMY = Taxonomy(labels=("crack", "scratch"))
BLOCKS = (1, 2, 3)  # the paper's 3, 8, 12 on a 12-block ViT-B; the tiny ViT has 3 blocks


@pytest.fixture(scope="module")
def clip():
    return tiny_clip(seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    return functools.partial(open_clip.tokenize, context_length=32)


@pytest.fixture(scope="module")
def focuser_factory(clip, tokenizer):
    return lambda: build_focuser(clip, tokenizer, TAXONOMY, "tile", len(BLOCKS))


def images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def test_vvclip_keeps_the_cls_feature_and_gives_local_maps_per_block(clip) -> None:
    vision = VVClipVision(clip.visual, BLOCKS)
    pixels = images(2)
    with torch.no_grad():
        cls, maps = vision(pixels)
        reference = clip.encode_image(pixels)
    assert torch.allclose(cls, reference, atol=1e-6)
    assert [tuple(m.shape) for m in maps] == [(2, 4, 4, 32)] * 3
    assert not torch.allclose(maps[0], maps[2])  # the local path accumulates block by block
    with pytest.raises(ValueError, match="must lie in 1..3"):
        VVClipVision(clip.visual, (3, 8, 12))


@pytest.mark.parametrize(
    "extra",
    [
        {"block_type": "custom", "scale_heads": True, "scale_attn": True, "ls_init_value": 0.1},
        {"pool_type": "avg", "final_ln_after_pool": True, "no_ln_pre": True},
    ],
)
def test_vvclip_takes_other_open_clip_vit_configurations(extra) -> None:
    from open_clip.model import CLIP

    from train.clip_anomaly.vvclip import TINY_TEXT, TINY_VISION

    torch.manual_seed(0)
    model = CLIP(32, {**TINY_VISION, "layers": 2, **extra}, dict(TINY_TEXT)).eval()
    pixels = images(2)
    with torch.no_grad():
        cls, maps = VVClipVision(model.visual, (1, 2))(pixels)
        assert torch.allclose(cls, model.encode_image(pixels), atol=1e-6)
    assert [tuple(m.shape) for m in maps] == [(2, 4, 4, 32)] * 2


def test_value_value_attention_is_mha_with_the_value_projection_as_q_k_and_v(clip) -> None:
    block = clip.visual.transformer.resblocks[1]
    dim = block.attn.embed_dim
    reference = torch.nn.MultiheadAttention(dim, block.attn.num_heads, batch_first=True)
    with torch.no_grad():
        value_w = block.attn.in_proj_weight[2 * dim :]
        value_b = block.attn.in_proj_bias[2 * dim :]
        reference.in_proj_weight.copy_(value_w.repeat(3, 1))
        reference.in_proj_bias.copy_(value_b.repeat(3))
        reference.out_proj.load_state_dict(block.attn.out_proj.state_dict())
        x = torch.randn(2, 17, dim)
        want = reference(x, x, x, need_weights=False)[0]
        got = _value_attention(block, x)
    assert torch.allclose(got, want, atol=1e-5)


def test_prompt_ensembles_come_from_the_taxonomy_and_the_descriptions() -> None:
    normal, abnormal = tddf.prompt_ensembles(TAXONOMY, "tile", ["a tile with a chipped edge"])
    assert "a photo of a flawless tile." in normal
    assert (
        "a photo of a tile with crack." in abnormal
        and "a photo of a tile with scratch." in abnormal
    )
    assert abnormal[-1] == "a tile with a chipped edge"
    assert not any("with" in p and "defect" not in p for p in normal)


def test_defect_focused_map_and_abnormal_probability_agree(clip, focuser_factory) -> None:
    focuser = focuser_factory()
    with torch.no_grad():
        _, maps = VVClipVision(clip.visual, BLOCKS)(images(2))
        delta, probability = focuser(maps)
        sims = focuser.similarities(maps)
    assert delta.shape == probability.shape == (3, 2, 4, 4)
    assert torch.allclose(delta, sims[..., 0] - sims[..., 1])
    softmax = torch.softmax(sims / tddf.TEMPERATURE, dim=-1)[..., 1]
    assert torch.allclose(probability, softmax, atol=1e-6)


def test_patch_labels_follow_masks_and_normal_images() -> None:
    masks = torch.zeros(2, 8, 8)
    masks[1, :4, :4] = 1  # top-left quarter = one patch of a 2x2 grid
    labels = tddf.patch_labels(masks, torch.tensor([True, False]), (2, 2))
    assert labels.tolist() == [[[0, 0], [0, 0]], [[1, 0], [0, 0]]]
    unknown = tddf.patch_labels(None, torch.tensor([True, False]), (2, 2))
    assert unknown[1].eq(-1).all() and unknown[0].eq(0).all()


def test_focuser_training_lowers_the_losses_and_leaves_clip_frozen(clip, focuser_factory) -> None:
    vision = VVClipVision(clip.visual, BLOCKS)
    before = {k: v.clone() for k, v in clip.state_dict().items()}
    focuser = focuser_factory()
    masks = torch.zeros(4, 64, 64)
    masks[2:, 16:48, 16:48] = 1
    batch = {"pixels": images(4), "normal": torch.tensor([1, 1, 0, 0]).bool(), "masks": masks}
    history = fit_focuser(vision, focuser, batch, steps=40)
    assert history[-1] < 0.6 * history[0]
    sep_before = tddf.separation_loss(focuser_factory())
    assert tddf.separation_loss(focuser) < sep_before
    assert all(torch.equal(before[k], v) for k, v in clip.state_dict().items())
    assert focuser.delta.abs().sum() > 0 and focuser.projections[0].weight.abs().sum() > 0


def test_self_prompt_is_the_nearest_normal_shot() -> None:
    gen = torch.Generator().manual_seed(1)
    shot_cls = torch.randn(4, 8, generator=gen)
    shot_maps = [torch.randn(4, 3, 3, 8, generator=gen) for _ in range(2)]
    memory = msspmm.Memory.from_features(shot_cls, shot_maps)
    query_cls = shot_cls[[2, 0]] + 0.05 * torch.randn(2, 8, generator=gen)
    assert msspmm.self_prompt(query_cls, memory.cls).tolist() == [2, 0]
    query_maps = [m[[2, 0]] for m in shot_maps]
    attention, prompt = msspmm.attention_map(query_cls, query_maps, memory)
    assert prompt.tolist() == [2, 0]
    assert torch.allclose(attention, torch.zeros_like(attention), atol=1e-6)  # identical to prompt


def test_prompt_distance_on_literals() -> None:
    shots = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[-1.0, 0.0], [0.0, -1.0]]])  # (S=2, P=2, C=2)
    query = torch.tensor([[[[1.0, 0.0]], [[0.6, 0.8]]]])  # (1, 2, 1, 2)
    got = msspmm.prompt_distance(query, shots, torch.tensor([0]))
    assert torch.allclose(got, torch.tensor([[[0.0], [0.2]]]), atol=1e-6)
    far = msspmm.prompt_distance(query, shots, torch.tensor([1]))
    assert torch.allclose(far, torch.tensor([[[1.0], [1.6]]]), atol=1e-6)
    focus = torch.full((1, 2, 1), 0.5)
    assert torch.allclose(msspmm.final_map(got, focus), got * 0.5)
    assert msspmm.final_map(None, focus) is focus


def test_auroc_matches_scikit_learn_with_ties() -> None:
    metrics = pytest.importorskip("sklearn.metrics")
    labels = [0, 0, 1, 1, 0, 1, 0]
    scores = [0.1, 0.4, 0.4, 0.8, 0.2, 0.3, 0.4]
    assert auroc(labels, scores) == pytest.approx(metrics.roc_auc_score(labels, scores))
    assert auroc([0, 1], [0.0, 1.0]) == 1.0
    assert (
        pixel_auroc([np.array([[0, 1]]), np.array([[0, 0]])], [[[0.1, 0.9]], [[0.2, 0.3]]]) == 1.0
    )
    with pytest.raises(ValueError, match="both"):
        auroc([1, 1], [0.1, 0.2])


def test_description_accuracy_requires_the_true_label_and_no_other() -> None:
    labels = TAXONOMY.labels
    texts = ["tile with crack", "tile with crack and scratch", "tile with scratch", "clean tile"]
    truth = ["crack", "crack", "crack", None]
    assert description_accuracy(texts, truth, labels) == pytest.approx(0.5)


def test_eq14_training_lowers_every_loss_and_keeps_clip_and_lm_frozen(clip, tokenizer) -> None:
    from train.clip_anomaly.train import build_branch, describe, fit
    from train.model import build_language_model
    from train.recipe import LanguageModel
    from train.tokenizer import tiny_tokenizer

    lm_tokenizer = tiny_tokenizer()
    spec = LanguageModel(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)
    lm = build_language_model(spec, lm_tokenizer)
    model = build_branch(clip, tokenizer, TAXONOMY, "tile", BLOCKS, lm)
    lm_before = {k: v.clone() for k, v in lm.state_dict().items()}
    masks = torch.zeros(4, 64, 64)
    masks[2:, 8:40, 8:40] = 1
    pixels = images(4, seed=3)
    texts = ["", "", "tile with crack", "tile with scratch"]
    samples = [Sample(pixels[i], i < 2, masks[i], texts[i]) for i in range(4)]
    history = fit(model, make_batch(samples, lm_tokenizer), steps=40, lr=1e-2)
    for part in ("caption", "tddf", "pixel", "total"):
        assert history[-1][part] < history[0][part], part
    assert all(torch.equal(lm_before[k], v) for k, v in lm.state_dict().items())
    assert isinstance(describe(model, lm_tokenizer, pixels[2], limit=4), str)


def export_net(clip, focuser_factory, few_shot=True):
    return ClipAnomalyNet(VVClipVision(clip.visual, BLOCKS), focuser_factory()).eval()


def test_onnx_graph_matches_torch_for_any_shot_count_and_zero_shot(
    clip, focuser_factory, tmp_path
) -> None:
    from export.clip_anomaly import export_graph, parity

    net = export_net(clip, focuser_factory)
    graph = export_graph(net, tmp_path / "few.onnx", few_shot=True)
    memory = net.enroll(images(3, seed=5))  # traced with 2 shots, served with 3
    diffs = parity(net, graph, images(1, seed=6), memory)
    assert diffs["prompt"] == 0 and max(diffs.values()) < 1e-4, diffs
    zero = export_graph(net, tmp_path / "zero.onnx", few_shot=False)
    diffs = parity(net, zero, images(2, seed=7))
    assert max(diffs.values()) < 1e-4, diffs


def test_bundle_serves_reports_through_the_inspector(clip, focuser_factory, tmp_path) -> None:
    from appliance.imaging import DecodedImage
    from appliance.inspector import open_inspector
    from appliance.report import Source, image_info, inspection_report
    from appliance.schema import report_problems
    from export.clip_anomaly import write_bundle
    from train.clip_anomaly.vvclip import clip_pixels

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    rng = np.random.default_rng(0)
    shots_rgb = rng.integers(0, 255, (3, 64, 64, 3), dtype=np.uint8)
    net = export_net(clip, focuser_factory)
    names = ["a.png", "b.png", "c.png"]
    shots = clip_pixels(shots_rgb, mean, std)
    bundle = write_bundle(
        tmp_path / "b",
        net,
        taxonomy=TAXONOMY,
        object_name="tile",
        mean=mean,
        std=std,
        shots=shots,
        shot_names=names,
    )
    bundle = load_bundle(bundle.path)
    assert bundle.manifest["clip_anomaly"]["calibration"]["method"] == "leave-one-out"
    inspector = open_inspector(bundle, taxonomy=TAXONOMY, narrative="never")
    odd = np.full((64, 64, 3), 255, np.uint8)
    decoded = [
        DecodedImage(rgb=shots_rgb[1], format="PNG", mode="RGB"),
        DecodedImage(rgb=odd, format="PNG", mode="RGB"),
    ]
    found = inspector.inspect_batch(decoded, [{}, {}])
    assert found[0].anomaly["nearest_normal"] == "b.png"  # an enrolled shot prompts itself
    assert found[0].defects == [] and found[0].anomaly["score"] < found[1].anomaly["score"]
    with torch.no_grad():
        torch_score = net(shots[1:2], *net.enroll(shots))[5]
    assert found[0].anomaly["score"] == pytest.approx(float(torch_score[0]), abs=1e-4)
    report = inspection_report(
        source=Source("cli", "l1", "c1"),
        image=image_info("0" * 64, 64, 64, "PNG", "RGB"),
        bundle=inspector.bundle_ref,
        inspection=found[1],
    )
    assert report_problems(report, TAXONOMY) == []


def test_clip_settings_are_strict(clip, focuser_factory, tmp_path) -> None:
    from appliance.anomaly.clip_branch import ClipSettings
    from export.clip_anomaly import write_bundle

    net = export_net(clip, focuser_factory)
    bundle = write_bundle(
        tmp_path / "z",
        net,
        taxonomy=TAXONOMY,
        object_name="tile",
        mean=(0.5,) * 3,
        std=(0.5,) * 3,
        few_shot=False,
    )
    section = bundle.manifest["clip_anomaly"]
    assert section["mode"] == "zero-shot" and section["image_threshold"] == 0.5
    with pytest.raises(BundleError, match="clip_anomaly.colour: unknown key"):
        ClipSettings.from_dict({**section, "colour": 1})
    with pytest.raises(BundleError, match="clip_anomaly.memory: few-shot"):
        ClipSettings.from_dict({**section, "mode": "few-shot"})


def fake_mvtec(root):
    from PIL import Image

    rng = np.random.default_rng(0)
    for category in ("bottle", "metal_nut"):
        for folder, count in (("train/good", 2), ("test/good", 1), ("test/crack", 1)):
            (root / category / folder).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / category / folder / f"{i:03d}.png")
        (root / category / "ground_truth/crack").mkdir(parents=True)
        mask = np.zeros((40, 40), np.uint8)
        mask[10:20, 10:20] = 255
        Image.fromarray(mask).save(root / category / "ground_truth/crack/000_mask.png")
    return root


def fake_visa(root):
    from PIL import Image

    (root / "split_csv").mkdir(parents=True)
    (root / "pcb1/Data/Images").mkdir(parents=True)
    rows = ["object,split,label,image,mask"]
    for i, (split, label) in enumerate(
        [("train", "normal"), ("test", "normal"), ("test", "anomaly")]
    ):
        name = f"pcb1/Data/Images/{i}.JPG"
        Image.fromarray(np.full((40, 40, 3), 40 * i, np.uint8)).save(root / name, format="JPEG")
        rows.append(f"pcb1,{split},{label},{name},")
    (root / "split_csv/1cls.csv").write_text("\n".join(rows) + "\n")
    return root


def test_seed002_tables_reads_both_layouts_and_checks_arguments(tmp_path) -> None:
    from bench import seed002_tables as tables

    items = tables.mvtec_items(fake_mvtec(tmp_path / "mvtec"))
    assert tables.categories(items) == ["bottle", "metal_nut"]
    bad = [i for i in items if i.anomalous]
    assert len(bad) == 2 and all(i.mask.name == "000_mask.png" and i.mask.is_file() for i in bad)
    assert sum(i.split == "train" for i in items) == 4
    visa = tables.visa_items(fake_visa(tmp_path / "visa"))
    assert [(i.split, i.anomalous) for i in visa] == [
        ("train", False),
        ("test", False),
        ("test", True),
    ]
    with pytest.raises(SystemExit):
        tables.parse_args(["--clip-model", "ViT-B-16", "--mvtec", str(tmp_path)])  # no weights
    with pytest.raises(SystemExit):
        tables.parse_args(["--clip-model", "tiny", "--mvtec", str(tmp_path), "--shots", "3"])
    args = tables.parse_args(["--clip-model", "tiny", "--visa", "v", "--blocks", "1", "2", "3"])
    assert args.blocks == [1, 2, 3] and args.shots == [0, 1, 2, 4]


def test_seed002_tables_runs_both_protocols_on_a_tiny_clip(tmp_path) -> None:
    from bench import seed002_tables as tables

    args = tables.parse_args(
        [
            "--clip-model",
            "tiny",
            "--mvtec",
            str(fake_mvtec(tmp_path / "m")),
            "--visa",
            str(fake_visa(tmp_path / "v")),
            "--blocks",
            "1",
            "2",
            "3",
            "--shots",
            "0",
            "1",
            "--seeds",
            "1",
            "--image-size",
            "64",
            "--steps",
            "2",
            "--train-images",
            "4",
        ]
    )
    out = tables.run(args)
    assert set(out["zero_shot"]) == {"visa->mvtec", "mvtec->visa"}
    assert set(out["few_shot"]) == {"mvtec k=1", "visa k=1"}
    row = out["few_shot"]["mvtec k=1"]
    assert set(row) == {"bottle", "metal_nut", "mean"}
    assert all(0.0 <= v <= 1.0 for pair in row.values() for v in pair)


def test_anomaly_metrics_of_eval_pairs() -> None:
    from pathlib import Path

    from train.clip_anomaly.evaluate import anomaly_metrics
    from train.data.records import Obj, Record
    from train.evaluate import Pair, ReportLine

    def pair(label, score, reported):
        objects = (Obj(label, (0.0, 0.0, 4.0, 4.0)),) if label else ()
        report = {"anomaly": {"score": score}, "defects": [{"label": r} for r in reported]}
        return Pair(Record(Path("x.png"), 8, 8, objects), ReportLine(1, report))

    pairs = [
        pair(None, 0.1, []),
        pair(None, 0.5, []),
        pair("crack", 0.9, ["crack"]),
        pair("scratch", 0.4, ["crack"]),
    ]
    result = anomaly_metrics(pairs, TAXONOMY.labels)
    assert result["image_auroc"] == pytest.approx(0.75)
    assert result["description_accuracy"] == pytest.approx(0.75)
    # a generated description (anomaly.description) is judged instead of the labels
    pairs[3].report.report["anomaly"]["description"] = "a long scratch near the edge"
    pairs[2].report.report["anomaly"]["description"] = "a crack and a scratch"
    assert anomaly_metrics(pairs, TAXONOMY.labels)["description_accuracy"] == pytest.approx(0.75)


@pytest.fixture(scope="module")
def described(clip, tokenizer, tmp_path_factory):
    """A trained adapter + tiny LM exported with its description (F32, the identity reference)."""
    from export.clip_anomaly import Describer, write_bundle
    from train.clip_anomaly.train import build_branch, fit
    from train.clip_anomaly.vvclip import clip_pixels
    from train.model import build_language_model
    from train.recipe import LanguageModel
    from train.tokenizer import tiny_tokenizer

    lm_tokenizer = tiny_tokenizer()
    spec = LanguageModel(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate_size=64)
    torch.manual_seed(0)
    model = build_branch(
        clip, tokenizer, TAXONOMY, "tile", BLOCKS, build_language_model(spec, lm_tokenizer)
    )
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 255, (6, 64, 64, 3), dtype=np.uint8)
    rgb[3:, 16:40, 16:40] = 255  # a bright "defect" on the last three
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    pixels = clip_pixels(rgb, mean, std)
    masks = torch.zeros(6, 64, 64)
    masks[3:, 16:40, 16:40] = 1
    texts = ["", "", "", "tile with crack", "tile with crack", "tile with scratch"]
    samples = [Sample(pixels[i], i < 3, masks[i], texts[i]) for i in range(6)]
    fit(model, make_batch(samples, lm_tokenizer), steps=30, lr=1e-2)
    net = ClipAnomalyNet(model.vision, model.focuser, adapter=model.adapter).eval()
    bundle = write_bundle(
        tmp_path_factory.mktemp("described") / "bundle",
        net,
        taxonomy=TAXONOMY,
        object_name="tile",
        mean=mean,
        std=std,
        shots=pixels[:3],
        shot_names=["a.png", "b.png", "c.png"],
        describer=Describer(model.lm, lm_tokenizer, quant="F32", max_tokens=12),
    )
    return model, lm_tokenizer, net, load_bundle(bundle.path), rgb, pixels


def test_description_runs_on_llama_cpp_token_for_token_as_in_transformers(described) -> None:
    from appliance.anomaly.clip_branch import ClipAnomalyDetector
    from train.clip_anomaly.adapter import PROMPT
    from train.tokenizer import stop_ids

    model, lm_tokenizer, net, bundle, rgb, pixels = described
    section = bundle.manifest["clip_anomaly"]["description"]
    assert section["language_model"].endswith(".F32.gguf") and section["image_tokens"] == 4
    parity = bundle.manifest["parity"]
    assert parity["description"]["F32"]["top1_agreement"] == 1.0
    assert max(v for k, v in parity["graph"].items() if k != "prompt") < 1e-3
    prompt = lm_tokenizer(PROMPT, add_special_tokens=False)["input_ids"]
    detector = ClipAnomalyDetector(bundle)
    try:
        outputs = detector.run(pixels.numpy())
        lengths = set()
        for index in range(len(rgb)):
            want = model.describe(pixels[index], prompt, stop_ids(lm_tokenizer), limit=12)
            got = detector.describer.generate(
                outputs["visual_tokens"][index], 12, constrained=False
            )
            assert got.tokens == want, index
            lengths.add(len(want))
        assert max(lengths) > 0  # the adapter writes something, not only end-of-text
    finally:
        detector.close()


def test_description_reaches_the_report_and_the_narrative_facts(described) -> None:
    from dataclasses import replace

    from appliance.imaging import DecodedImage
    from appliance.inspector import open_inspector
    from appliance.prompts import narrative_messages
    from appliance.report import Source, image_info, inspection_report
    from appliance.schema import report_problems

    model, lm_tokenizer, net, bundle, rgb, pixels = described
    inspector = open_inspector(bundle, taxonomy=TAXONOMY, narrative="never")
    try:
        detector = inspector.detector
        detector.settings = replace(detector.settings, image_threshold=0.0)  # every image flagged
        found = inspector.inspect_batch([DecodedImage(rgb=rgb[4], format="PNG", mode="RGB")], [{}])
        text = detector.describe(detector.run(pixels[4:5].numpy())["visual_tokens"][0])
    finally:
        inspector.close()
    anomaly = found[0].anomaly
    assert found[0].defects and anomaly["description"] == (
        text or "tile with an unidentified defect"
    )
    assert found[0].timings_ms["description"] > 0
    report = inspection_report(
        source=Source("cli", "l1", "c1"),
        image=image_info("0" * 64, 64, 64, "PNG", "RGB"),
        bundle=inspector.bundle_ref,
        inspection=found[0],
    )
    assert report_problems(report, TAXONOMY) == []
    facts = {"line": "l1", "camera": "c1", "defects": found[0].defects, "anomaly": anomaly}
    assert anomaly["description"] in narrative_messages(facts)[-1]["content"]


def test_clean_description_keeps_reports_valid() -> None:
    from appliance.anomaly.clip_branch import clean_description

    assert clean_description("a\x00crack\n\n near\tthe  edge\ufffd") == "a crack near the edge"
    assert len(clean_description("x" * 2000)) == 500


def test_clip_bundle_export_is_atomic_and_gated(clip, focuser_factory, tmp_path) -> None:
    from export.clip_anomaly import ExportError, write_bundle

    net = export_net(clip, focuser_factory)
    target = tmp_path / "taken"
    target.mkdir()
    options = {"taxonomy": TAXONOMY, "object_name": "t", "mean": (0.5,) * 3, "std": (0.5,) * 3}
    with pytest.raises(ExportError, match="exists"):
        write_bundle(target, net, few_shot=False, **options)
    with pytest.raises(ValueError, match="adapter"):
        write_bundle(tmp_path / "x", net, few_shot=False, describer=object(), **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_clip_anomaly_command_builds_a_described_bundle_from_the_example(tmp_path) -> None:
    """The example recipe, run by the CLI on generated images, then `appliance inspect`."""
    import importlib.util
    import json
    import shutil
    from pathlib import Path

    from appliance.cli import main

    example = Path(__file__).parent.parent / "examples" / "clip-anomaly"
    spec = importlib.util.spec_from_file_location("make_data", example / "make_data.py")
    make_data = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(make_data)
    shutil.copy(example / "recipe.toml", tmp_path / "recipe.toml")
    data = make_data.make(tmp_path / "data")
    assert (
        main(
            [
                "clip-anomaly",
                "--recipe",
                str(tmp_path / "recipe.toml"),
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )
    bundle = load_bundle(tmp_path / "b")
    section = bundle.manifest["clip_anomaly"]
    assert section["mode"] == "few-shot" and len(section["shots"]) == 4
    assert section["description"]["language_model"] == "language_model.F16.gguf"
    assert section["calibration"]["method"] == "leave-one-out"
    assert bundle.taxonomy.labels == ("crack", "spot", "anomaly")
    out = tmp_path / "reports.jsonl"
    images = sorted((data / "images").glob("*.png"))
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        code = main(["inspect", "--bundle", str(bundle.path), "--no-narrative", *map(str, images)])
    assert code == 0
    reports = [json.loads(line) for line in buffer.getvalue().splitlines()]
    out.write_text(buffer.getvalue())
    assert len(reports) == len(images)
    assert all(r["verdict"] in ("ok", "defective") for r in reports)
    for report in reports:
        if report["verdict"] == "defective":
            assert isinstance(report["anomaly"]["description"], str)
            assert report["anomaly"]["description"]


def test_clip_recipe_errors_name_the_key(tmp_path) -> None:
    from train.clip_anomaly.build import load_clip_recipe
    from train.recipe import RecipeError

    path = tmp_path / "r.toml"
    path.write_text('[clip]\nname = "ViT-B-16"\n[taxonomy]\nlabels = ["crack"]\n')
    with pytest.raises(RecipeError, match="weights: a local CLIP state dict is required"):
        load_clip_recipe(path)
    path.write_text('[clip]\nname = "tiny"\ncolour = 1\n[taxonomy]\nlabels = ["Crack!"]\n')
    with pytest.raises(RecipeError) as info:
        load_clip_recipe(path)
    assert "clip.colour" in str(info.value) and "taxonomy" in str(info.value)
    path.write_text('[clip]\nname = "tiny"\n[taxonomy]\nlabels = ["crack"]\n[describer]\n')
    with pytest.raises(RecipeError, match="add a \\[data\\] section"):
        load_clip_recipe(path)
    path.write_text('[clip]\nname = "tiny"\n[taxonomy]\nlabels = ["crack"]\n[normal]\ndir = "n"\n')
    with pytest.raises(RecipeError, match="normal.dir: .* does not exist"):
        load_clip_recipe(path)


def test_retrain_enrolls_confirmed_good_parts_into_the_clip_memory(described, tmp_path) -> None:
    """`appliance retrain` on a clip-anomaly bundle: kept shots + new good parts become the memory
    (ONNX Runtime only), thresholds are recalibrated, the graph and the description model carried."""
    from PIL import Image

    from appliance.registry import BundleRegistry
    from train.data import Obj, Provenance, Record, write_records
    from train.retrain import RetrainSettings, run_retrain

    _, _, _, bundle, _, _ = described
    rng = np.random.default_rng(7)
    records = []
    for i in range(8):
        rgb = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
        objects = ()
        if i % 2:
            rgb[16:40, 16:40] = 255
            objects = (Obj("crack", (16.0, 16.0, 40.0, 40.0)),)
        path = tmp_path / "fb" / f"p{i}.png"
        path.parent.mkdir(exist_ok=True)
        Image.fromarray(rgb).save(path)
        when = f"2026-11-26T10:{i:02d}:00+00:00"
        provenance = Provenance(source="feedback", who="tech", when=when)
        records.append(Record(path, 64, 64, objects, provenance=provenance))
    write_records(tmp_path / "state" / "feedback" / "records.jsonl", records)
    settings = RetrainSettings(holdout_fraction=0.5, pause_daemon=False, gate={"image_auroc": 1.0})
    result = run_retrain(tmp_path / "state", bundle.path, TAXONOMY, settings, by="tech")
    assert result.promoted, result.reasons
    new = load_bundle(BundleRegistry(tmp_path / "state").active_path())
    section = new.manifest["clip_anomaly"]
    assert section["shots"][:3] == ["a.png", "b.png", "c.png"]  # kept, then the training half's
    assert sorted(section["shots"][3:]) == ["p0.png", "p2.png"]  # good parts
    assert len(list((new.path / "normals").iterdir())) == 5
    with np.load(new.path / "memory.npz") as memory:
        assert memory["cls"].shape[0] == 5 and memory["blocks"].shape[1] == 5
    with np.load(bundle.path / "memory.npz") as old, np.load(new.path / "memory.npz") as memory:
        assert np.allclose(memory["cls"][:3], old["cls"], atol=1e-5)  # kept shots re-read exactly
    assert section["calibration"]["method"] == "leave-one-out"
    assert section["description"] == bundle.manifest["clip_anomaly"]["description"]
    assert new.manifest["enrolment"] == {"parent": bundle.id, "shots": 5, "added": 2}
    assert result.old["image_auroc"] is not None and result.new["image_auroc"] is not None
