"""Backend selection by name: ONNX Runtime providers in the configured order, CPU always last."""

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper

from appliance.backends.onnxrt import (
    create_session,
    gpu_and_tensorrt,
    resolve_providers,
    tensorrt_cache_key,
)

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_configured_order_is_kept_when_everything_is_available(tmp_path):
    chosen = resolve_providers(["tensorrt", "cuda", "cpu"], cache_dir=tmp_path, available=ALL)
    assert [p[0] if isinstance(p, tuple) else p for p in chosen] == ALL
    trt_options = chosen[0][1]
    assert trt_options["trt_engine_cache_enable"] is True
    key = tensorrt_cache_key(*gpu_and_tensorrt())
    assert trt_options["trt_engine_cache_path"] == str(tmp_path / "tensorrt" / key)
    assert (tmp_path / "tensorrt" / key).is_dir()


def test_engine_cache_is_keyed_by_gpu_and_tensorrt_version():
    assert tensorrt_cache_key("NVIDIA GeForce RTX 4090", "10.7.0.23") == (
        "nvidia-geforce-rtx-4090--trt-10.7.0.23"
    )
    assert tensorrt_cache_key("NVIDIA H100 80GB HBM3", "10.7.0") != tensorrt_cache_key(
        "NVIDIA GeForce RTX 4090", "10.7.0"
    )
    assert tensorrt_cache_key("", "") == "unknown-gpu--trt-unknown"


def test_missing_providers_fall_back_with_a_log_line(caplog):
    with caplog.at_level(logging.INFO, logger="appliance.backends.onnxrt"):
        chosen = resolve_providers(["tensorrt", "cuda"], available=["CPUExecutionProvider"])
    assert chosen == ["CPUExecutionProvider"]
    assert "TensorrtExecutionProvider is not available" in caplog.text
    assert "CUDAExecutionProvider is not available" in caplog.text


def test_session_runs_on_this_machine(tmp_path):
    node = helper.make_node("Relu", ["x"], ["y"])
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "relu.onnx")
    session = create_session(tmp_path / "relu.onnx", resolve_providers(["tensorrt", "cuda", "cpu"]))
    out = session.run(None, {"x": np.array([-1.0, 2.0], dtype=np.float32)})[0]
    assert out.tolist() == [0.0, 2.0]
