"""ONNX Runtime backend: sessions on TensorRT → CUDA → CPU, falling back with a log line.

The appliance installs ``onnxruntime-gpu`` only; it runs on CPU too. TensorRT engines are cached in
the state directory in a folder per GPU model and TensorRT version (``tensorrt_cache_key``; ONNX
Runtime's engine file names add the model hash, compute capability and shape profile), so the long
first build happens once per machine (and is logged before it starts).
"""

from __future__ import annotations

import importlib.metadata
import logging
import re
import subprocess
from functools import lru_cache
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)
ORT_NAMES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}


def resolve_providers(
    wanted: list[str], *, cache_dir: Path | None = None, available: list[str] | None = None
) -> list:
    """Map config names to ORT providers that this machine has, in the configured order.

    Pure apart from the default ``available`` lookup; always ends with the CPU provider.
    """
    available = ort.get_available_providers() if available is None else available
    chosen: list = []
    for name in wanted:
        ort_name = ORT_NAMES[name]
        if ort_name not in available:
            log.info("ONNX Runtime provider %s is not available here; falling back", ort_name)
            continue
        if name == "tensorrt" and cache_dir is not None:
            cache = Path(cache_dir) / "tensorrt" / tensorrt_cache_key(*gpu_and_tensorrt())
            cache.mkdir(parents=True, exist_ok=True)
            chosen.append(
                (
                    ort_name,
                    {
                        "trt_engine_cache_enable": True,
                        "trt_engine_cache_path": str(cache),
                        "trt_timing_cache_enable": True,
                        "trt_timing_cache_path": str(cache),
                        "trt_fp16_enable": True,
                    },
                )
            )
        else:
            chosen.append(ort_name)
    if not any(_name(p) == "CPUExecutionProvider" for p in chosen):
        chosen.append("CPUExecutionProvider")
    return chosen


def tensorrt_cache_key(gpu: str, tensorrt_version: str) -> str:
    """The engine-cache folder for one GPU model and TensorRT version: an engine built for another
    GPU or TensorRT release is never loaded (ONNX Runtime's own file names add the model hash,
    compute capability and shape profile). Pure."""
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", gpu).strip("-").lower() or "unknown-gpu"
    return f"{slug}--trt-{re.sub(r'[^0-9A-Za-z.]+', '-', tensorrt_version) or 'unknown'}"


@lru_cache(maxsize=1)
def gpu_and_tensorrt() -> tuple[str, str]:
    """(first GPU's name, TensorRT version) on this machine, "unknown" where not found."""
    try:
        names = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        names = []
    version = "unknown"
    for package in ("tensorrt", "tensorrt-cu12", "tensorrt-cu13", "tensorrt_libs"):
        try:
            version = importlib.metadata.version(package)
            break
        except importlib.metadata.PackageNotFoundError:
            continue
    return (names[0].strip() if names else "unknown"), version


def create_session(
    path: Path, providers: list, *, intra_threads: int | None = None
) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if intra_threads:
        options.intra_op_num_threads = intra_threads
    if any(_name(p) == "TensorrtExecutionProvider" for p in providers):
        log.info(
            "building or loading TensorRT engines for %s; a first build can take minutes", path
        )
    session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    used = session.get_providers()
    if used and used[0] != _name(providers[0]):
        log.warning(
            "ONNX Runtime runs %s on %s (asked for %s first)",
            Path(path).name,
            used[0],
            _name(providers[0]),
        )
    return session


def _name(provider) -> str:
    return provider[0] if isinstance(provider, tuple) else provider
