"""The export formats, in one table (name, flag, suffix, where it runs).

Every exporter returns the path it wrote; the bundle's manifest records which formats it holds.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ExportFormat:
    name: str
    flag: str  # the ``appliance export`` option that selects it
    suffix: str
    cpu: bool  # runs on a machine without a GPU
    gpu: bool
    what: str


EXPORT_FORMATS: tuple[ExportFormat, ...] = (
    ExportFormat("onnx", "(always)", ".onnx", True, True, "vision encoder + pool + projector"),
    ExportFormat("tensorrt", "--tensorrt fp16|int8", ".engine", False, True, "vision engine"),
    ExportFormat("gguf-f32", "--quant F32", ".F32.gguf", True, True, "language model, float32"),
    ExportFormat("gguf-f16", "--quant F16", ".F16.gguf", True, True, "language model, float16"),
    ExportFormat("gguf-q8_0", "--quant Q8_0", ".Q8_0.gguf", True, True, "language model, 8-bit"),
    ExportFormat("gguf-q5_k_m", "--quant Q5_K_M", ".Q5_K_M.gguf", True, True, "5-bit K-quant"),
    ExportFormat("gguf-q4_k_m", "--quant Q4_K_M", ".Q4_K_M.gguf", True, True, "4-bit K-quant"),
)
QUANT_TYPES = ("F32", "F16", "Q8_0", "Q5_K_M", "Q4_K_M")
TENSORRT_PRECISIONS = ("fp16", "int8")


def export_formats_table() -> str:
    """The table as markdown (for ``appliance export --formats`` and the docs)."""
    rows = ["| name | flag | suffix | CPU | GPU | what |", "| --- | --- | --- | --- | --- | --- |"]
    for f in EXPORT_FORMATS:
        cpu, gpu = ("yes" if f.cpu else "no"), ("yes" if f.gpu else "no")
        rows.append(f"| {f.name} | `{f.flag}` | `{f.suffix}` | {cpu} | {gpu} | {f.what} |")
    return "\n".join(rows)
