"""Where each feature cell of the ONNX backbone sits in the input image.

Bilinear upsampling with ``align_corners=False`` assumes that cell ``i`` of a stride-``s`` grid is
centred on input pixel coordinate ``(i + 0.5) * s``. That holds for symmetric padding with even
kernels, but not for TF "SAME" padding (``auto_pad=SAME_UPPER``, EfficientNet-Lite0): every strided
convolution pads only at the bottom/right, so cells sit 3.5 px (stride 8) and 7.5 px (stride 16)
down-right of that assumption, and an uncorrected heatmap points up-left of the defect.

``cell_offsets`` reads the offsets from the graph itself (strides, kernels, pads of the
convolutions and pools on the way to each output) at a given input size, so the runtime derives them
from the artefact it serves instead of assuming an architecture.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import onnx

WINDOW_OPS = {"Conv", "MaxPool", "AveragePool"}
DROP_OPS = {"GlobalAveragePool", "GlobalMaxPool", "Flatten", "Gemm", "MatMul", "Reshape"}


@dataclass(frozen=True)
class Axis:
    """Cell ``i`` on this axis is centred on input coordinate ``step * i + start`` (pixels)."""

    step: float
    start: float
    length: int

    @property
    def offset(self) -> float:
        """Shift of the true cell centre from the ``align_corners=False`` assumption, in pixels."""
        return self.start - self.step / 2


def pad_before(length: int, extent: int, stride: int, mode: str, explicit: int) -> tuple[int, int]:
    """(padding before, output length) of a window of ``extent`` pixels on an axis of ``length``."""
    if mode in ("SAME_UPPER", "SAME_LOWER"):
        out = -(-length // stride)
        total = max((out - 1) * stride + extent - length, 0)
        return (total // 2 if mode == "SAME_UPPER" else total - total // 2), out
    if mode == "VALID":
        return 0, (length - extent) // stride + 1
    before, after = explicit
    return before, (length + before + after - extent) // stride + 1


def window_axis(axis: Axis, kernel: int, stride: int, dilation: int, mode: str, pads) -> Axis:
    """The axis after a sliding window (convolution or pooling)."""
    extent = (kernel - 1) * dilation + 1
    before, length = pad_before(axis.length, extent, stride, mode, pads)
    centre = -before + (kernel - 1) * dilation / 2  # input cell under output cell 0's centre
    return Axis(axis.step * stride, axis.step * centre + axis.start, length)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _window(node: onnx.NodeProto, shapes: dict, axes: tuple[Axis, Axis]) -> tuple[Axis, Axis]:
    attrs = _attrs(node)
    kernel = attrs.get("kernel_shape") or shapes[node.input[1]][2:]
    strides = attrs.get("strides", [1, 1])
    dilations = attrs.get("dilations", [1, 1])
    mode = attrs.get("auto_pad", b"NOTSET")
    mode = mode.decode() if isinstance(mode, bytes) else mode
    pads = attrs.get("pads", [0, 0, 0, 0])
    return tuple(
        window_axis(axes[d], kernel[d], strides[d], dilations[d], mode, (pads[d], pads[d + 2]))
        for d in range(2)
    )


def cell_offsets(
    onnx_path: Path, outputs: Sequence[str], size: tuple[int, int], input_name: str = "image"
) -> dict[str, tuple[float, float]]:
    """(dy, dx) offset in input pixels of each output's cell centres, for an input of ``size``."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    shapes = {init.name: list(init.dims) for init in model.graph.initializer}
    geometry = {input_name: (Axis(1.0, 0.5, size[0]), Axis(1.0, 0.5, size[1]))}
    for node in model.graph.node:
        known = [geometry[name] for name in node.input if name in geometry]
        if not known or node.op_type in DROP_OPS:
            continue
        moved = _window(node, shapes, known[0]) if node.op_type in WINDOW_OPS else known[0]
        for name in node.output:
            geometry[name] = moved
    missing = [name for name in outputs if name not in geometry]
    if missing:
        raise ValueError(f"{onnx_path}: cannot trace output(s) {missing} back to {input_name!r}")
    return {name: (geometry[name][0].offset, geometry[name][1].offset) for name in outputs}
