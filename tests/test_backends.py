"""Backend selection by name: ONNX Runtime providers in the configured order, CPU always last."""

import logging

import numpy as np
import onnx
from onnx import TensorProto, helper

from appliance.backends.onnxrt import create_session, resolve_providers

ALL = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]


def test_configured_order_is_kept_when_everything_is_available(tmp_path):
    chosen = resolve_providers(["tensorrt", "cuda", "cpu"], cache_dir=tmp_path, available=ALL)
    assert [p[0] if isinstance(p, tuple) else p for p in chosen] == ALL
    trt_options = chosen[0][1]
    assert trt_options["trt_engine_cache_enable"] is True
    assert trt_options["trt_engine_cache_path"] == str(tmp_path / "tensorrt")
    assert (tmp_path / "tensorrt").is_dir()


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
