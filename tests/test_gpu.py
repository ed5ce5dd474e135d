"""The GPU paths of the vision runtime where a machine has them; skipped elsewhere with the reason.

CI has no GPU, so these skip there. They run on a GPU machine with onnxruntime-gpu and its CUDA
libraries, and, for the TensorRT tests, TensorRT 10 with cuda-python. The llama.cpp offload test
(a CUDA build of llama-cpp-python) sits beside its fixtures in test_export_bundle.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from appliance.backends.onnxrt import (
    create_session,
    gpu_and_tensorrt,
    resolve_providers,
    tensorrt_cache_key,
)
from export.tensorrt import build_vision_engine, tensorrt_status

pytestmark = pytest.mark.gpu
SIZE = 64


def conv_net(path: Path) -> Path:
    """A random two-layer conv net, input ``image`` (N, 3, 64, 64), dynamic batch."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, 0.2, (8, 3, 3, 3)).astype(np.float32), "w1"),
        numpy_helper.from_array(rng.normal(0, 0.2, (16, 8, 3, 3)).astype(np.float32), "w2"),
    ]
    nodes = [
        helper.make_node("Conv", ["image", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["features"], strides=[2, 2], pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes,
        "conv",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, SIZE, SIZE])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, None)],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def pixels(batch: int) -> np.ndarray:
    return np.random.default_rng(1).uniform(-1, 1, (batch, 3, SIZE, SIZE)).astype(np.float32)


def gpu_session_or_skip(path: Path, wanted: list[str], cache_dir: Path | None = None):
    """The product's session on the first wanted provider, or a skip saying why not here."""
    chosen = resolve_providers(wanted, cache_dir=cache_dir)
    first = chosen[0][0] if isinstance(chosen[0], tuple) else chosen[0]
    if first == "CPUExecutionProvider":
        pytest.skip(f"this onnxruntime has no {wanted[0]} provider ({ort.get_device()} build)")
    session = create_session(path, chosen)
    if session.get_providers()[0] != first:
        pytest.skip(
            f"ONNX Runtime's {first} could not start here (no GPU, or its CUDA / cuDNN / "
            f"TensorRT libraries are not on the library path); it ran on {session.get_providers()}"
        )
    return session


def test_cuda_provider_gives_the_cpu_answer(tmp_path):
    path = conv_net(tmp_path / "conv.onnx")
    cuda = gpu_session_or_skip(path, ["cuda", "cpu"])
    cpu = create_session(path, ["CPUExecutionProvider"])
    for batch in (1, 8):
        feed = {"image": pixels(batch)}
        np.testing.assert_allclose(
            cuda.run(None, feed)[0], cpu.run(None, feed)[0], rtol=1e-3, atol=1e-4
        )


def test_tensorrt_provider_caches_its_engine_per_gpu(tmp_path):
    path = conv_net(tmp_path / "conv.onnx")
    session = gpu_session_or_skip(path, ["tensorrt", "cuda", "cpu"], cache_dir=tmp_path)
    out = session.run(None, {"image": pixels(4)})[0]
    reference = create_session(path, ["CPUExecutionProvider"]).run(None, {"image": pixels(4)})[0]
    np.testing.assert_allclose(out, reference, rtol=2e-2, atol=2e-2)  # fp16 engine
    cache = tmp_path / "tensorrt" / tensorrt_cache_key(*gpu_and_tensorrt())
    assert any(cache.iterdir()), f"no engine cached in {cache}"


def test_tensorrt_engines_build_fp16_and_int8(tmp_path):
    reason = tensorrt_status()
    if reason:
        pytest.skip(f"no TensorRT engine build here: {reason}")
    import tensorrt as trt

    path = conv_net(tmp_path / "conv.onnx")
    fp16 = build_vision_engine(path, tmp_path, "fp16", (SIZE, SIZE), gpu_name="test gpu")
    assert (tmp_path / "tensorrt.timing-cache").stat().st_size > 0
    int8 = build_vision_engine(path, tmp_path, "int8", (SIZE, SIZE), gpu_name="test gpu")
    assert (tmp_path / "vision.int8-calibration.cache").stat().st_size > 0
    assert fp16 != int8 and "test-gpu" in fp16.name and ".int8." in int8.name
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    for engine_path in (fp16, int8):
        engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
        assert engine is not None and engine.num_io_tensors == 2
        assert engine.get_tensor_name(0) == "image"
