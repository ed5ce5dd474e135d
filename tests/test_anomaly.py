"""Tests of the few-shot anomaly detector: the maths on literals, then the whole path on a tiny
random ONNX backbone and synthetic textures with a drawn-in defect."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from appliance.anomaly import (
    AnomalyDetector,
    EnrollError,
    MemoryBank,
    ScoringConfig,
    enroll,
    heatmap_png,
    load_rgb,
)
from appliance.anomaly.calibrate import calibrate, image_threshold, leave_one_out, pixel_threshold
from appliance.anomaly.distance import (
    greedy_coreset,
    local_distance,
    nn_distance,
    self_excluded_nn,
)
from appliance.anomaly.features import FeatureExtractor, fuse
from appliance.anomaly.geometry import cell_offsets
from appliance.anomaly.memory import blend_maps, patchcore_weight, peak_cell
from appliance.anomaly.preprocess import box_to_original, to_working
from appliance.anomaly.regions import find_regions, region_score
from appliance.anomaly.resample import avg_pool3x3, bilinear_matrix, resize_bilinear
from appliance.anomaly.settings import AnomalySettings
from appliance.bundle import BundleError, load_bundle, write_manifest
from appliance.taxonomy import Taxonomy

WORKING = (128, 128)
ORIGINAL = (200, 320)  # (height, width): not square, not the working aspect ratio
DEFECT = (120, 200, 28)  # centre y, centre x, radius in original pixels


# ---------------------------------------------------------------- helpers


def tiny_backbone(path: Path, seed: int = 0) -> Path:
    """A random strided-conv ONNX net with the real backbone's input/output names and strides.

    4x4 kernels, stride 2, padding 1: output cell i is centred on input 2i + 0.5, the geometry that
    bilinear upsampling with align_corners=False assumes, so heatmaps line up with the image.
    """
    rng = np.random.default_rng(seed)
    plan = [("stem", 3, 8, None), ("c4", 8, 8, "s4"), ("c8", 8, 12, "s8"), ("c16", 12, 16, "s16")]
    nodes, inits, current = [], [], "image"
    for name, cin, cout, out in plan:
        weight = rng.normal(0.0, np.sqrt(2.0 / (16 * cin)), (cout, cin, 4, 4)).astype(np.float32)
        bias = rng.normal(0.0, 0.1, cout).astype(np.float32)
        inits += [
            numpy_helper.from_array(weight, f"{name}_w"),
            numpy_helper.from_array(bias, f"{name}_b"),
        ]
        conv = f"{name}_conv"
        nodes.append(
            helper.make_node(
                "Conv",
                [current, f"{name}_w", f"{name}_b"],
                [conv],
                strides=[2, 2],
                pads=[1, 1, 1, 1],
            )
        )
        current = out or f"{name}_relu"
        nodes.append(helper.make_node("Relu", [conv], [current]))
    outputs = [
        helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", c, f"h{n}", f"w{n}"])
        for n, c in (("s4", 8), ("s8", 12), ("s16", 16))
    ]
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])
    graph = helper.make_graph(nodes, "tiny_backbone", [image], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def texture(seed: int, size: tuple[int, int] = ORIGINAL) -> np.ndarray:
    """A striped, noisy grey texture; each seed shifts the stripes and redraws the noise."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0 : size[0], 0 : size[1]].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 35 * np.sin(2 * np.pi * (xs + 0.5 * ys) / 14.0 + phase)
    grey = 140 + stripes + rng.normal(0, 6, size)
    return np.repeat(np.clip(grey, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def with_defect(rgb: np.ndarray, defect=DEFECT) -> np.ndarray:
    cy, cx, radius = defect
    ys, xs = np.mgrid[0 : rgb.shape[0], 0 : rgb.shape[1]]
    out = rgb.copy()
    out[(ys - cy) ** 2 + (xs - cx) ** 2 <= radius**2] = 15
    return out


def iou(a, b) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union


def save_png(rgb: np.ndarray, path: Path) -> Path:
    Image.fromarray(rgb).save(path)
    return path


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    return tiny_backbone(tmp_path_factory.mktemp("backbone") / "tiny.onnx")


@pytest.fixture(scope="module")
def bundle_dir(tmp_path_factory, backbone) -> Path:
    shots_dir = tmp_path_factory.mktemp("shots")
    paths = [save_png(texture(seed), shots_dir / f"normal_{seed}.png") for seed in range(4)]
    out = tmp_path_factory.mktemp("bundles") / "tile"
    enroll(paths, out, taxonomy=Taxonomy(labels=("scratch",)), backbone_onnx=backbone, size=WORKING)
    return out


@pytest.fixture(scope="module")
def detector(bundle_dir) -> AnomalyDetector:
    return AnomalyDetector(load_bundle(bundle_dir))


# ---------------------------------------------------------------- pure maths on literals


def test_nn_distance_on_literals_in_any_chunking():
    queries = np.array([[0, 0], [3, 4]], np.float32)
    bank = np.array([[0, 1], [3, 0], [6, 8]], np.float32)
    np.testing.assert_allclose(nn_distance(queries, bank), [1.0, 4.0], atol=1e-5)
    np.testing.assert_allclose(nn_distance(queries, bank, chunk_elements=1), [1.0, 4.0], atol=1e-5)


def test_nn_distance_matches_brute_force():
    rng = np.random.default_rng(1)
    queries, bank = rng.normal(size=(50, 7)), rng.normal(size=(300, 7))
    brute = np.sqrt(((queries[:, None] - bank[None]) ** 2).sum(-1)).min(1)
    np.testing.assert_allclose(nn_distance(queries, bank, chunk_elements=64), brute, atol=1e-4)


def test_local_distance_searches_only_the_window():
    query = np.array([[[0.0], [5.0], [0.0]]], np.float32)  # (1, 3, 1)
    reference = np.array([[[[5.0], [0.0], [0.0]]]], np.float32)  # (1, 1, 3, 1)
    np.testing.assert_allclose(local_distance(query, reference, radius=0)[0], [[5, 5, 0]])
    np.testing.assert_allclose(local_distance(query, reference, radius=1)[0], [[0, 0, 0]])


def test_self_excluded_nn_skips_the_own_window():
    grid = np.array([[[0.0], [1.0], [10.0], [12.0]]], np.float32)
    np.testing.assert_allclose(self_excluded_nn(grid, radius=0), [[1, 1, 2, 2]], atol=1e-3)
    np.testing.assert_allclose(self_excluded_nn(grid, radius=1), [[10, 11, 10, 11]], atol=1e-3)


def test_greedy_coreset_covers_every_cluster():
    rng = np.random.default_rng(0)
    centres = np.array([[0, 0], [100, 0], [0, 100]], np.float32)
    points = np.concatenate([c + rng.normal(0, 1, (40, 2)) for c in centres]).astype(np.float32)
    chosen = greedy_coreset(points, 3)
    assert sorted(set(chosen // 40)) == [0, 1, 2]


def test_bilinear_matches_align_corners_false():
    np.testing.assert_allclose(bilinear_matrix(4, 2) @ np.array([0.0, 1.0]), [0, 0.25, 0.75, 1])
    grid = np.full((3, 5, 2), 7.0, np.float32)
    np.testing.assert_allclose(resize_bilinear(grid, (8, 9)), 7.0, rtol=1e-6)


def test_resize_offset_shifts_the_map_by_that_many_pixels():
    grid = np.random.default_rng(0).normal(size=(4, 4)).astype(np.float32)
    plain = resize_bilinear(grid, (16, 16))
    shifted = resize_bilinear(grid, (16, 16), offset=(4.0, 2.0))
    np.testing.assert_allclose(shifted[4:, 2:], plain[:-4, :-2], atol=1e-6)
    np.testing.assert_allclose(shifted[0], shifted[1])  # the edge is replicated


def same_upper_net(path: Path, plan) -> Path:
    """A chain of Conv nodes (kernel, stride, auto_pad or explicit pads) emitting ``s{n}`` outputs."""
    nodes, inits, current, stride, outputs = [], [], "image", 1, []
    for i, (kernel, step, pads) in enumerate(plan):
        weight = np.ones((1, 1 if i else 3, kernel, kernel), np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        stride *= step
        out = f"s{stride}" if step > 1 else f"t{i}"
        options = {"auto_pad": pads} if isinstance(pads, str) else {"pads": pads}
        nodes.append(
            helper.make_node("Conv", [current, f"w{i}"], [out], strides=[step, step], **options)
        )
        relu = f"r{i}"
        nodes.append(helper.make_node("Relu", [out], [relu]))
        outputs.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, None))
        current = relu
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W"])
    graph = helper.make_graph(nodes, "net", [image], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_cell_offsets_of_tf_same_padding(tmp_path):
    # 3x3 stride 2 SAME_UPPER on an even axis pads only after: cell i centred on pixel 2i + 1.5,
    # 0.5 px after (i + 0.5) * 2; twice: 4i + 3.5 vs 4i + 2, so 1.5 px; a 5x5 stride-1 SAME adds 0.
    net = same_upper_net(
        tmp_path / "same.onnx", [(3, 2, "SAME_UPPER"), (3, 2, "SAME_UPPER"), (5, 1, "SAME_UPPER")]
    )
    offsets = cell_offsets(net, ["s2", "s4", "t2"], (32, 48))
    assert offsets == {"s2": (0.5, 0.5), "s4": (1.5, 1.5), "t2": (1.5, 1.5)}
    # Symmetric 3x3 pads 1 (PyTorch style) put cell i on 2i + 0.5: 0.5 px before the assumption.
    sym = same_upper_net(tmp_path / "sym.onnx", [(3, 2, [1, 1, 1, 1])])
    assert cell_offsets(sym, ["s2"], (32, 32)) == {"s2": (-0.5, -0.5)}
    with pytest.raises(ValueError, match="cannot trace"):
        cell_offsets(net, ["s64"], (32, 32))


def test_cell_offsets_of_the_tiny_backbone_are_zero(backbone):
    # 4x4 kernels, stride 2, padding 1: exactly the align_corners=False geometry.
    assert cell_offsets(backbone, ["s8", "s16"], WORKING) == {"s8": (0.0, 0.0), "s16": (0.0, 0.0)}


def test_avg_pool_counts_zero_padding_like_patchcore():
    pooled = avg_pool3x3(np.ones((1, 3, 3, 1), np.float32))[0, :, :, 0]
    assert pooled[1, 1] == pytest.approx(1.0)
    assert pooled[0, 0] == pytest.approx(4 / 9)
    assert pooled[0, 1] == pytest.approx(6 / 9)


def test_fuse_upsamples_coarse_layers_to_the_finest_grid():
    fused = fuse(
        {"s16": np.ones((2, 4, 4, 3), np.float32), "s8": np.zeros((2, 8, 8, 5), np.float32)}
    )
    assert fused.shape == (2, 8, 8, 8)
    assert fused[..., :5].max() == 0.0 and fused[..., 5:].min() == pytest.approx(1.0)


def test_preprocess_normalises_and_resizes():
    white = np.full((40, 60, 3), 255, np.uint8)
    out = to_working(white, (32, 16))
    assert out.shape == (3, 32, 16) and out.dtype == np.float32
    np.testing.assert_allclose(out, 1.0)
    assert to_working(np.zeros((5, 5, 3), np.uint8), (8, 8)).min() == -1.0
    with pytest.raises(ValueError, match="uint8"):
        to_working(np.zeros((5, 5, 3), np.float32))


def test_box_to_original_scales_each_axis_and_clamps():
    assert box_to_original([10, 20, 30, 40], (100, 100), (200, 400)) == (40, 40, 120, 80)
    assert box_to_original([-5, 0, 120, 100], (100, 100), (50, 80)) == (0, 0, 80, 50)


def test_thresholds_follow_their_documented_rules():
    value, rule = image_threshold([1.0, 3.0, 2.0], margin=1.1)
    assert value == pytest.approx(3.3) and "max" in rule
    maps = [np.arange(1000, dtype=np.float32).reshape(10, 100)]
    assert pixel_threshold(maps, 50.0, 2.0)[0] == pytest.approx(999.0)


def test_regions_boxes_in_original_pixels_sorted_and_filtered():
    heat = np.zeros((64, 64), np.float32)
    heat[10:20, 30:50] = 1.0  # 200 px, peak 1.0
    heat[40:50, 5:15] = 0.8  # 100 px, peak 0.8
    heat[60:62, 60:62] = 5.0  # 4 px: noise below min_area
    regions = find_regions(heat, 0.5, (128, 256), score_reference=0.5, min_area=16)
    assert [r.bbox for r in regions] == [(120, 20, 200, 40), (20, 80, 60, 100)]
    assert regions[0].score == pytest.approx(region_score(1.0, 0.5))
    assert 0.5 < regions[1].score < regions[0].score < 1.0
    assert len(find_regions(heat, 0.5, (128, 256), max_regions=1)) == 1
    assert region_score(0.5, 0.5) == pytest.approx(0.5)


# ---------------------------------------------------------------- memory bank


def grids(seed: int, shape=(6, 6)) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"s8": rng.normal(size=(*shape, 4)), "s16": rng.normal(size=(3, 3, 5))}


def bank_of(seeds, **kwargs) -> MemoryBank:
    per_shot = [grids(s) for s in seeds]
    shots = {k: np.stack([g[k] for g in per_shot]).astype(np.float32) for k in ("s8", "s16")}
    return MemoryBank.from_features([f"n{s}.png" for s in seeds], shots, **kwargs)


def test_self_prompt_picks_the_truly_nearest_normal():
    bank = bank_of([10, 11, 12, 13])
    config = ScoringConfig(working_size=(48, 48))
    for index, seed in enumerate([10, 11, 12, 13]):
        noisy = {
            k: v + np.random.default_rng(99).normal(0, 0.05, v.shape)
            for k, v in grids(seed).items()
        }
        assert bank.nearest_shot(noisy, config) == index
        assert bank.score(noisy, config).nearest == index


def test_score_of_a_shot_in_the_bank_is_near_zero_and_grows_with_change():
    bank = bank_of([1, 2])
    config = ScoringConfig(working_size=(48, 48), prompt_weight=0.5, sigma=0)
    same = bank.score(grids(1), config)
    assert same.score < 1e-2
    changed = grids(1)
    changed["s8"][2, 2] += 10.0
    scored = bank.score(changed, config)
    assert scored.score > 1.0
    y, x = np.unravel_index(np.argmax(scored.heatmap), scored.heatmap.shape)
    assert 14 <= y <= 26 and 14 <= x <= 26  # grid cell (2, 2) of 6 covers pixels 16..24


def test_cell_offsets_move_the_heatmap_peak_down_right():
    bank = bank_of([1, 2])
    changed = grids(1)
    changed["s8"][2, 2] += 10.0
    plain = ScoringConfig(working_size=(48, 48), prompt_weight=0.0, sigma=0)
    shifted = replace(plain, cell_offsets={"s8": (8.0, 8.0), "s16": (8.0, 8.0)})
    peak = np.unravel_index(np.argmax(bank.score(changed, plain).heatmap), (48, 48))
    moved = np.unravel_index(np.argmax(bank.score(changed, shifted).heatmap), (48, 48))
    assert (moved[0] - peak[0], moved[1] - peak[1]) == (8, 8)
    assert shifted.offsets(["s8", "s4"]) == [(8.0, 8.0), (0.0, 0.0)]


# The smallest valid manifest "anomaly" section, as an older bundle (no optional keys) has it.
MINIMAL_SETTINGS = {
    "backbone": "b.onnx",
    "memory": "m.npz",
    "working_size": [64, 64],
    "layers": ["s8", "s16"],
    "image_threshold": 1.0,
    "pixel_threshold": 0.5,
    "calibration": {},
}


def test_settings_read_cell_offsets_strictly():
    base = dict(MINIMAL_SETTINGS)
    assert AnomalySettings.from_dict(base).scoring().cell_offsets == {}  # older bundles
    settings = AnomalySettings.from_dict({**base, "cell_offsets": {"s8": [3.5, 3.5]}})
    assert settings.scoring().cell_offsets == {"s8": (3.5, 3.5)}
    assert settings.to_dict()["cell_offsets"] == {"s8": [3.5, 3.5]}
    with pytest.raises(BundleError, match="cell_offsets"):
        AnomalySettings.from_dict({**base, "cell_offsets": {"s4": [1, 1]}})
    with pytest.raises(BundleError, match=r"cell_offsets\.s8"):
        AnomalySettings.from_dict({**base, "cell_offsets": {"s8": [1]}})


def test_patchcore_weight_on_literals():
    bank = np.array([[0.0], [1.0], [3.0], [10.0]], dtype=np.float32)
    # Query 2: distances 2, 1, 1, 8 -> m* = row 1 (first nearest); the 3 rows nearest m* are rows
    # 1, 0, 2 (0, 1, 2 away), 1, 2, 1 from the query: w = 1 - e^1 / (e^1 + e^2 + e^1) = 1 - 1/(2+e).
    assert patchcore_weight(np.array([2.0]), bank, 3) == pytest.approx(1 - 1 / (2 + np.e))
    # More neighbours than rows: all four, distances 1, 2, 1, 8 from the query.
    all_four = 1 - np.e / (2 * np.e + np.e**2 + np.e**8)
    assert patchcore_weight(np.array([2.0]), bank, 9) == pytest.approx(all_four)
    # One neighbour is m* alone: softmax 1, weight 0 (anomalib's num_neighbors=1 skips weighting).
    assert patchcore_weight(np.array([2.0]), bank, 1) == 0.0
    # m* counts first even when an exact duplicate ties it: query 0.9, m* = row 0 (0.1 away).
    dup = np.array([[1.0, 0.0], [1.0, 0.0], [5.0, 0.0]])
    assert patchcore_weight(np.array([0.9, 0.0]), dup, 2) == pytest.approx(0.5)
    assert patchcore_weight(np.array([0.9, 0.0]), dup, 3) == pytest.approx(
        1 - np.exp(0.1) / (2 * np.exp(0.1) + np.exp(4.1))
    )


def test_peak_cell_maps_the_heatmap_maximum_to_each_grid():
    heatmap = np.zeros((8, 8))
    heatmap[5, 2] = 1.0
    assert peak_cell(heatmap, (8, 8)) == (5, 2)
    assert peak_cell(heatmap, (4, 4)) == (2, 1)
    assert peak_cell(heatmap, (2, 2)) == (1, 0)


def spotted_against_bank():
    """A bank of two shots and a third image with one strong s8 outlier at cell (2, 2)."""
    changed = grids(3)
    changed["s8"][2, 2] += 10.0
    return bank_of([1, 2]), changed


def test_reweighted_score_is_the_maximum_times_the_mean_layer_weight():
    bank, changed = spotted_against_bank()
    plain = ScoringConfig(working_size=(48, 48), reweight_neighbors=0, score_sigma=None)
    weighted = replace(plain, reweight_neighbors=9)
    assert ScoringConfig().reweight_neighbors == 9  # the product default
    base, scored = bank.score(changed, plain), bank.score(changed, weighted)
    np.testing.assert_array_equal(scored.heatmap, base.heatmap)  # pixels are not re-weighted
    weights = []
    for layer in bank.layers:
        cell = peak_cell(base.heatmap, changed[layer].shape[:2])
        weights.append(patchcore_weight(changed[layer][cell], bank.bank(layer), 9))
    expected = np.mean(weights)
    assert 8 / 9 <= expected < 1
    assert scored.score == pytest.approx(base.score * expected)
    # One shot: the weight is taken against the image's own patches outside the window.
    one = bank_of([1])
    self_plain, self_weighted = one.self_score(0, plain), one.self_score(0, weighted)
    assert 8 / 9 * self_plain.score <= self_weighted.score < self_plain.score


def test_settings_read_reweight_neighbors_strictly():
    base = dict(MINIMAL_SETTINGS)
    assert AnomalySettings.from_dict(base).scoring().reweight_neighbors == 0  # older bundles
    settings = AnomalySettings.from_dict({**base, "reweight_neighbors": 9})
    assert settings.scoring().reweight_neighbors == 9
    assert settings.to_dict()["reweight_neighbors"] == 9
    for bad in (-1, 2.5, True, "9"):
        with pytest.raises(BundleError, match="reweight_neighbors"):
            AnomalySettings.from_dict({**base, "reweight_neighbors": bad})


def test_save_load_round_trip_keeps_scores(tmp_path):
    bank = bank_of([1, 2, 3], max_patches=50)
    assert bank.bank("s8").shape[0] == 50 and bank.bank("s16").shape[0] == 27
    bank.save(tmp_path / "memory.npz")
    loaded = MemoryBank.load(tmp_path / "memory.npz")
    assert loaded.names == bank.names and loaded.layers == bank.layers
    assert loaded.scales == bank.scales
    np.testing.assert_array_equal(loaded.bank("s8"), bank.bank("s8"))
    config = ScoringConfig(working_size=(48, 48))
    assert loaded.score(grids(7), config).score == pytest.approx(bank.score(grids(7), config).score)


def test_leave_one_out_and_one_shot_calibration():
    config = ScoringConfig(working_size=(48, 48))
    scored, method = leave_one_out(bank_of([1, 2, 3]), config)
    assert method == "leave-one-out" and len(scored) == 3 and min(s.score for s in scored) > 0.1
    one, method = leave_one_out(bank_of([1]), config)
    assert method == "self-excluded" and one[0].score > 0.1
    thresholds = calibrate(scored, method)
    assert thresholds.image == pytest.approx(max(s.score for s in scored) * 1.05)
    assert 0 < thresholds.pixel <= thresholds.image


# ---------------------------------------------------------------- end to end on the tiny backbone


def test_feature_extractor_shapes_and_bad_layer(backbone):
    extractor = FeatureExtractor(backbone, ("s8", "s16"))
    features = extractor(np.zeros((2, 3, 64, 96), np.float32))
    assert features.layers["s8"].shape == (2, 8, 12, 12)
    assert features.layers["s16"].shape == (2, 4, 6, 16)
    with pytest.raises(ValueError, match="no output"):
        FeatureExtractor(backbone, ("s32",))


def test_defect_scores_above_threshold_and_held_out_normal_below(detector):
    normal = detector.detect(texture(seed=100))
    defective = detector.detect(with_defect(texture(seed=101)))
    assert normal.score < normal.threshold and not normal.is_anomalous and normal.regions == []
    assert defective.score > defective.threshold and defective.is_anomalous
    assert defective.score > 1.5 * normal.score


def test_box_covers_the_defect_in_original_pixels(detector):
    result = detector.detect(with_defect(texture(seed=102)))
    cy, cx, r = DEFECT
    truth = (cx - r, cy - r, cx + r, cy + r)
    best = result.regions[0]
    assert iou(best.bbox, truth) > 0.3, (best.bbox, truth)
    assert 0.5 < best.score <= 1.0
    x1, y1, x2, y2 = best.bbox
    assert 0 <= x1 < x2 <= ORIGINAL[1] and 0 <= y1 < y2 <= ORIGINAL[0]


def test_detect_result_fields_and_batch_agree(detector):
    images = [texture(seed=103), with_defect(texture(seed=104))]
    batch = detector.detect_batch(images)
    single = detector.detect(images[1])
    assert batch[1].score == pytest.approx(single.score, rel=1e-4)
    assert single.heatmap.dtype == np.float32 and single.heatmap.shape == WORKING
    assert single.nearest_normal in {f"normal_{s}.png" for s in range(4)}
    assert set(single.timings_ms) == {"preprocess", "vision", "anomaly"}
    assert all(v >= 0 for v in single.timings_ms.values())


def test_heatmap_png_keeps_the_original_aspect(detector):
    result = detector.detect(with_defect(texture(seed=105)))
    png = heatmap_png(result, ORIGINAL)
    image = Image.open(io.BytesIO(png))
    assert image.format == "PNG" and image.size == (256, 160)
    pixels = np.asarray(image.convert("RGB")).astype(int)
    cy, cx = DEFECT[0] * 160 // 200, DEFECT[1] * 256 // 320
    assert pixels[cy, cx, 0] > pixels[cy, cx, 2]  # red-ish on the defect
    assert pixels[5, 5, 2] > pixels[5, 5, 0]  # blue-ish far from it


def test_manifest_records_thresholds_and_preprocessing(bundle_dir):
    manifest = json.loads((bundle_dir / "manifest.json").read_text())
    section = manifest["anomaly"]
    assert manifest["kind"] == "memory-bank"
    assert section["working_size"] == list(WORKING) and section["layers"] == ["s8", "s16"]
    assert section["calibration"]["method"] == "leave-one-out"
    models = {f for f in manifest["files"] if not f.startswith("normals/")}
    assert section["image_threshold"] > 0 and models == {"backbone.onnx", "memory.npz"}
    assert len(manifest["files"]) - len(models) == len(section["shots"])  # normals kept
    assert manifest["preprocessing"]["size_hw"] == list(WORKING)
    assert section["cell_offsets"] == {}  # off by default (CORRECT_OFFSETS)
    assert section["reweight_neighbors"] == 9  # on by default (REWEIGHT_NEIGHBORS)
    assert section["layer_weights"] == {"s16": 2.0}  # LAYER_WEIGHTS
    assert section["score_sigma"] == 2.0  # SCORE_SIGMA


def test_one_shot_enrolment_detects_the_defect(tmp_path, backbone):
    path = save_png(texture(seed=0), tmp_path / "only.png")
    bundle = enroll(
        [path], tmp_path / "b", taxonomy=Taxonomy(labels=()), backbone_onnx=backbone, size=WORKING
    )
    assert bundle.section("anomaly")["calibration"]["method"] == "self-excluded"
    result = AnomalyDetector(load_bundle(tmp_path / "b")).detect(with_defect(texture(seed=7)))
    assert result.is_anomalous and result.nearest_normal == "only.png"


def test_enrolment_with_offset_correction_records_the_offsets(tmp_path):
    net = same_upper_net(
        tmp_path / "same.onnx", [(4, 2, [1, 1, 1, 1])] + [(3, 2, "SAME_UPPER")] * 3
    )
    paths = [save_png(texture(seed=s), tmp_path / f"{s}.png") for s in range(2)]
    bundle = enroll(
        paths,
        tmp_path / "b",
        taxonomy=Taxonomy(labels=()),
        backbone_onnx=net,
        size=WORKING,
        layers=("s8", "s16"),
        correct_offsets=True,
    )
    # Centres: 2i + 1 after the symmetric conv (no offset), then 2c + 1 per SAME_UPPER conv in the
    # previous cells c: 8i + 7 at s8 (assumed 8i + 4), 16i + 15 at s16 (assumed 16i + 8).
    assert bundle.section("anomaly")["cell_offsets"] == {"s8": [3.0, 3.0], "s16": [7.0, 7.0]}
    detector = AnomalyDetector(load_bundle(tmp_path / "b"))
    assert detector.scoring.cell_offsets == {"s8": (3.0, 3.0), "s16": (7.0, 7.0)}


def test_enrolment_records_and_serves_the_reweighting_choice(tmp_path, backbone):
    paths = [save_png(texture(seed=s), tmp_path / f"{s}.png") for s in range(2)]
    taxonomy = Taxonomy(labels=())
    bundle = enroll(
        paths,
        tmp_path / "b",
        taxonomy=taxonomy,
        backbone_onnx=backbone,
        size=WORKING,
        reweight_neighbors=0,
        layer_weights={"s4": 3.0},  # a layer not enrolled: dropped
        score_sigma=None,
    )
    section = bundle.section("anomaly")
    assert section["reweight_neighbors"] == 0
    assert (section["layer_weights"], section["score_sigma"]) == ({}, None)
    detector = AnomalyDetector(load_bundle(tmp_path / "b"))
    assert detector.scoring.reweight_neighbors == 0
    assert (detector.scoring.layer_weights, detector.scoring.score_sigma) == ({}, None)
    assert detector.detect(with_defect(texture(seed=7))).is_anomalous


def test_holdout_calibration(tmp_path, backbone):
    paths = [save_png(texture(seed=s), tmp_path / f"{s}.png") for s in range(3)]
    bundle = enroll(
        paths,
        tmp_path / "b",
        taxonomy=Taxonomy(labels=()),
        backbone_onnx=backbone,
        size=WORKING,
        holdout=1,
    )
    section = bundle.section("anomaly")
    assert section["calibration"]["method"] == "holdout" and section["shots"] == ["0.png", "1.png"]


def test_enroll_errors_name_the_problem(tmp_path, backbone):
    taxonomy = Taxonomy(labels=())
    with pytest.raises(EnrollError, match="at least 1"):
        enroll([], tmp_path / "a", taxonomy=taxonomy, backbone_onnx=backbone)
    bad = tmp_path / "bad.png"
    bad.write_text("not an image")
    with pytest.raises(EnrollError, match="bad.png"):
        enroll([bad], tmp_path / "b", taxonomy=taxonomy, backbone_onnx=backbone)
    with pytest.raises(EnrollError, match="no such file"):
        enroll([tmp_path / "gone.png"], tmp_path / "c", taxonomy=taxonomy, backbone_onnx=backbone)


def test_load_rgb_applies_exif_orientation(tmp_path):
    image = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees on display
    image.save(tmp_path / "r.jpg", exif=exif)
    assert load_rgb(tmp_path / "r.jpg").shape == (30, 10, 3)


def test_detector_refuses_other_bundle_kinds(tmp_path):
    bundle = write_manifest(tmp_path, kind="vlm", taxonomy=Taxonomy(labels=()), sections={})
    with pytest.raises(BundleError, match="memory-bank"):
        AnomalyDetector(bundle)


def test_layer_weights_give_a_weighted_mean_of_the_layer_maps():
    coarse, fine = np.full((3, 3), 3.0, np.float32), np.full((6, 6), 6.0, np.float32)
    assert blend_maps([fine, coarse], (12, 12)) == pytest.approx(np.full((12, 12), 4.5))
    weighted = blend_maps([fine, coarse], (12, 12), weights=[1.0, 2.0])
    assert weighted == pytest.approx(np.full((12, 12), (6.0 + 2 * 3.0) / 3))
    assert blend_maps([fine, coarse], (12, 12), weights=[0.0, 1.0]) == pytest.approx(3.0)
    for bad in ([1.0], [-1.0, 2.0], [0.0, 0.0]):
        with pytest.raises(ValueError, match="layer weights"):
            blend_maps([fine, coarse], (12, 12), weights=bad)
    # Through the bank: weighting s16 moves the fused map towards the s16 map alone.
    bank = bank_of([1, 2])
    changed = grids(3)
    plain = ScoringConfig(working_size=(48, 48), layer_weights={}, score_sigma=None, sigma=0)
    nearest = bank.nearest_shot(changed, plain)
    maps = [bank.layer_map(layer, changed[layer], nearest, plain) for layer in bank.layers]
    s16_only = replace(plain, layer_weights={"s8": 0.0})
    np.testing.assert_allclose(
        bank.score(changed, s16_only).heatmap, resize_bilinear(maps[1], (48, 48)), rtol=1e-6
    )
    twice = replace(plain, layer_weights={"s16": 2.0})
    expected = (resize_bilinear(maps[0], (48, 48)) + 2 * resize_bilinear(maps[1], (48, 48))) / 3
    np.testing.assert_allclose(bank.score(changed, twice).heatmap, expected, rtol=1e-5)
    assert ScoringConfig().weights(["s8", "s16"]) == [1.0, 2.0]  # the product default


def test_score_sigma_smooths_the_score_map_and_leaves_the_heatmap():
    bank, changed = spotted_against_bank()
    base = ScoringConfig(working_size=(48, 48), reweight_neighbors=0, score_sigma=None)
    narrow = replace(base, score_sigma=0.0)
    as_heatmap, from_raw = bank.score(changed, base), bank.score(changed, narrow)
    np.testing.assert_array_equal(from_raw.heatmap, as_heatmap.heatmap)
    assert as_heatmap.score == pytest.approx(float(as_heatmap.heatmap.max()))
    raw = bank.score(changed, replace(base, sigma=0.0)).heatmap  # the unsmoothed fused map
    assert from_raw.score == pytest.approx(float(raw.max()))
    assert from_raw.score > as_heatmap.score  # smoothing lowers an isolated peak
    assert replace(base, score_sigma=4.0).score_sigma == base.sigma
    assert bank.score(changed, replace(base, score_sigma=4.0)).score == as_heatmap.score
    # Leave-one-out (self_score) scores the same way.
    one = bank_of([1])
    assert one.self_score(0, narrow).score >= one.self_score(0, base).score
    assert ScoringConfig().score_sigma == 2.0  # the product default


def test_settings_read_layer_weights_and_score_sigma_strictly():
    base = dict(MINIMAL_SETTINGS)
    older = AnomalySettings.from_dict(base).scoring()  # bundles enrolled before the keys
    assert (older.layer_weights, older.score_sigma, older.sigma) == ({}, None, 4.0)
    settings = AnomalySettings.from_dict({**base, "layer_weights": {"s16": 2}, "score_sigma": 2})
    assert settings.scoring().layer_weights == {"s16": 2.0}
    assert settings.scoring().score_sigma == 2
    assert AnomalySettings.from_dict(settings.to_dict()) == settings
    for bad in ({"s4": 1.0}, {"s16": -1}, {"s16": "2"}, {"s16": True}, [2.0]):
        with pytest.raises(BundleError, match="layer_weights"):
            AnomalySettings.from_dict({**base, "layer_weights": bad})
    with pytest.raises(BundleError, match="layer_weights"):
        AnomalySettings.from_dict({**base, "layer_weights": {"s8": 0, "s16": 0}})
    for bad in (-1, "2", True):
        with pytest.raises(BundleError, match="score_sigma"):
            AnomalySettings.from_dict({**base, "score_sigma": bad})
