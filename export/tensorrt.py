"""TensorRT engines for the vision graph (TensorRT 10 API), built where TensorRT and a GPU exist.

``build_vision_engine`` parses the ONNX graph, sets one optimisation profile over the batch size,
and builds an fp16 or int8 engine. int8 uses an entropy calibrator over N preprocessed images (or
the fixed probes) and writes a calibration cache beside the engine, so a rebuild skips calibration;
a timing cache makes rebuilds on the same GPU fast. The engine file name carries the GPU name,
TensorRT version, precision and profile: an engine is only valid for that combination.

TensorRT cannot be installed on the development machines (its libraries come from NVIDIA's index);
``tensorrt_status()`` says why a build is not possible and the tests skip with that reason.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
PROFILE_BATCH = (1, 4, 16)  # min, opt, max batch of the optimisation profile
WORKSPACE_BYTES = 2 << 30


class TensorRTUnavailable(RuntimeError):
    pass


def tensorrt_status() -> str | None:
    """None when an engine can be built here, else the reason it cannot."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt package is not installed (pip install tensorrt, on a GPU machine)"
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        return "cuda-python (cuda.bindings) is not installed; it provides the calibration buffers"
    err, count = cudart.cudaGetDeviceCount()
    if int(err) != 0 or count == 0:
        return "no CUDA GPU is visible"
    return None


def engine_name(gpu: str, trt_version: str, precision: str, input_size: tuple[int, int]) -> str:
    """A file name that says what the engine is valid for."""
    width, height = input_size
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    lo, opt, hi = PROFILE_BATCH
    return f"vision.{slug}.trt{trt_version}.{precision}.b{lo}-{opt}-{hi}.{width}x{height}.engine"


class _Calibrator:
    """Feeds calibration batches to TensorRT (IInt8EntropyCalibrator2) from host arrays."""

    def __new__(cls, batches: list[np.ndarray], cache: Path):
        import tensorrt as trt
        from cuda.bindings import runtime as cudart

        class Calibrator(trt.IInt8EntropyCalibrator2):
            def __init__(self) -> None:
                super().__init__()
                self.batches, self.cache, self.index = batches, cache, 0
                nbytes = max(b.nbytes for b in batches)
                err, self.device = cudart.cudaMalloc(nbytes)
                if int(err) != 0:
                    raise RuntimeError(f"cudaMalloc({nbytes}) failed: {err}")

            def get_batch_size(self) -> int:
                return int(self.batches[0].shape[0])

            def get_batch(self, names):
                if self.index >= len(self.batches):
                    return None
                batch = np.ascontiguousarray(self.batches[self.index], dtype=np.float32)
                self.index += 1
                cudart.cudaMemcpy(
                    self.device,
                    batch.ctypes.data,
                    batch.nbytes,
                    cudart.cudaMemcpyKind.cudaMemcpyHostToDevice,
                )
                return [int(self.device)]

            def read_calibration_cache(self):
                return self.cache.read_bytes() if self.cache.is_file() else None

            def write_calibration_cache(self, data) -> None:
                self.cache.write_bytes(bytes(data))

        return Calibrator()


def build_vision_engine(
    onnx_path: Path,
    out_dir: Path,
    precision: str,
    input_size: tuple[int, int],
    *,
    calibration: list[np.ndarray] | None = None,
    gpu_name: str = "gpu",
) -> Path:
    """Build and serialise the engine into ``out_dir``; returns the engine path."""
    reason = tensorrt_status()
    if reason:
        raise TensorRTUnavailable(f"cannot build a TensorRT engine here: {reason}")
    import tensorrt as trt

    if precision not in ("fp16", "int8"):
        raise ValueError(f"precision {precision!r} is not fp16 or int8")
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, WORKSPACE_BYTES)
    timing_path = Path(out_dir) / "tensorrt.timing-cache"
    timing = config.create_timing_cache(timing_path.read_bytes() if timing_path.is_file() else b"")
    config.set_timing_cache(timing, ignore_mismatch=False)
    width, height = input_size
    profile = builder.create_optimization_profile()
    name = network.get_input(0).name
    shapes = [(b, 3, height, width) for b in PROFILE_BATCH]
    profile.set_shape(name, *shapes)
    config.add_optimization_profile(profile)
    config.set_flag(trt.BuilderFlag.FP16)
    if precision == "int8":
        from export.vision import probe_pixels

        batches = calibration or [
            probe_pixels(input_size, n=PROFILE_BATCH[1], seed=s) for s in range(8)
        ]
        config.set_flag(trt.BuilderFlag.INT8)
        config.set_calibration_profile(profile)
        config.int8_calibrator = _Calibrator(
            batches, Path(out_dir) / "vision.int8-calibration.cache"
        )
    log.info("building a TensorRT %s engine for %s; this can take minutes", precision, onnx_path)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise RuntimeError("TensorRT failed to build the engine (see its log above)")
    timing_path.write_bytes(bytes(config.get_timing_cache().serialize()))
    path = Path(out_dir) / engine_name(gpu_name, trt.__version__, precision, input_size)
    path.write_bytes(bytes(serialized))
    return path
