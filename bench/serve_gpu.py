"""Serving on one GPU: llama.cpp decode of 3B/7B-shaped models against the memory-bandwidth limit,
the vision engine on ONNX Runtime's GPU providers vs torch, and the peak GPU memory of vision engine
+ language model + KV cache against a 24 GB budget.

The language models are Qwen2.5-3B / 7B *shapes* with random weights written straight in Q4_K_M,
Q8_0 or F16 (``bench/gguf_random.py``: same tensor types and sizes as llama.cpp's quantizer gives),
because decode speed and memory depend on shape and types, not values. Decoding runs through
llama-cpp-python with every layer offloaded (``n_gpu_layers = -1``), greedy, after a prefill of
``--prompt`` tokens, ``n_ctx`` 4096 as the daemon configures it. The bandwidth limit is
(weight bytes one token reads) / (the GPU's measured device-to-device copy bandwidth).

Three steps, so that the GPU machine needs only numpy, gguf, llama-cpp-python (a CUDA build),
onnxruntime-gpu and (for the torch column and the bandwidth probe) torch:

    python bench/serve_gpu.py lm --out lm.json [--sizes 3b,7b] [--types Q4_K_M,Q8_0,F16]
    python bench/serve_gpu.py vision --onnx backbone.onnx --lm MODEL.gguf --out vision.json
    python bench/serve_gpu.py report lm.json vision.json     # here: docs/benchmarks.md

Each measurement of a model runs in a fresh process (``one``), so its GPU memory is its own: the
peak is the device's used memory (nvidia-smi) after prefill and decode, minus what was used before
the process started, so it includes the process's CUDA context as the daemon's would.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

from bench.gguf_random import (  # noqa: E402
    FILE_TYPES,
    SHAPES,
    bytes_per_token,
    weight_bytes,
    write_random_gguf,
)

HEADING = "## Serving on one GPU: llama.cpp decode, vision providers, memory"
BUDGET_GIB = 24.0
RTX_4090_GBPS = 1008.0  # datasheet memory bandwidth, for the projection
N_CTX = 4096


def query_gpu(fields: str) -> list[str] | None:
    """The first GPU's values of nvidia-smi's ``--query-gpu`` fields (None: no nvidia-smi)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", f"--query-gpu={fields}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return [part.strip() for part in out.splitlines()[0].split(",")]


def gpu_used_mib() -> float | None:
    """The first GPU's used memory (None where there is no nvidia-smi: a CPU smoke run)."""
    values = query_gpu("memory.used")
    return None if values is None else float(values[0])


def gpu_info() -> dict:
    values = query_gpu("name,driver_version,memory.total")
    if values is None:
        return {"gpu": "none", "driver": "none", "memory_total_mib": 0.0}
    name, driver, total = values
    return {"gpu": name, "driver": driver, "memory_total_mib": float(total)}


def copy_bandwidth_gbps(gib: float = 4.0) -> float | None:
    """Device-to-device copy through torch, bytes read + written per second (None: no torch)."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    n = int(gib * 2**30)
    src = torch.empty(n, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(10):
        dst.copy_(src)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / 10
    del src, dst
    torch.cuda.empty_cache()
    return 2 * n / seconds / 1e9


def decode(path: Path, prompt: int, tokens: int, vision_onnx: Path | None = None) -> dict:
    """One process: (vision session and a batch), then load the GGUF fully offloaded, prefill
    ``prompt`` token ids, decode ``tokens`` greedily; timings and the GPU memory then in use."""
    result: dict = {}
    if vision_onnx is not None:
        result["vision"] = vision_session_run(vision_onnx)
    from llama_cpp import Llama

    start = time.perf_counter()
    llm = Llama(str(path), n_gpu_layers=-1, n_ctx=N_CTX, n_batch=512, n_ubatch=512, verbose=False)
    result["load_s"] = time.perf_counter() - start
    span = min(5000, llm.n_vocab() - 300)  # ordinary pieces, past the byte tokens
    ids = [1] + [300 + (i * 7919) % span for i in range(prompt - 1)]
    llm.eval(ids[:8])  # warm-up: kernels, graph allocation
    llm.reset()
    start = time.perf_counter()
    llm.eval(ids)
    result["prefill_s"] = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(tokens):
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        llm.eval([token])
    result["decode_s"] = time.perf_counter() - start
    result["prompt"], result["tokens"] = prompt, tokens
    result["used_mib"] = gpu_used_mib()
    llm.close()
    return result


def vision_session_run(onnx: Path) -> dict:
    """The product's provider chain (TensorRT → CUDA → CPU) on the vision graph, one batch."""
    import logging

    from appliance.backends.onnxrt import create_session, resolve_providers

    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("appliance.backends.onnxrt").addHandler(Keep())
    logging.getLogger("appliance.backends.onnxrt").setLevel(logging.INFO)
    providers = resolve_providers(["tensorrt", "cuda", "cpu"], cache_dir=Path("/tmp/trt-cache"))
    session = create_session(onnx, providers)
    feed = np.zeros((8, 3, 224, 224), np.float32)
    session.run(None, {session.get_inputs()[0].name: feed})
    return {"providers": session.get_providers(), "log": records}


def run_one(args) -> None:
    vision = Path(args.vision) if args.vision else None
    print(json.dumps(decode(Path(args.model), args.prompt, args.tokens, vision)))


def child(model: Path, prompt: int, tokens: int, vision: Path | None = None) -> dict:
    command = [sys.executable, __file__, "one", str(model), "--prompt", str(prompt)]
    command += ["--tokens", str(tokens)]
    if vision is not None:
        command += ["--vision", str(vision)]
    before = gpu_used_mib()
    out = subprocess.run(command, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise SystemExit(f"{model.name}: {out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["before_mib"] = before
    if before is not None and result["used_mib"] is not None:
        result["peak_mib"] = result["used_mib"] - before
    return result


def measure_lm(args) -> None:
    import llama_cpp

    results = {
        **gpu_info(),
        "copy_gbps": copy_bandwidth_gbps(),
        "llama_cpp_python": llama_cpp.__version__,
        "supports_gpu_offload": bool(llama_cpp.llama_supports_gpu_offload()),
        "rows": [],
    }
    print(json.dumps({k: v for k, v in results.items() if k != "rows"}), flush=True)
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    for file_type in args.types.split(","):
        for size in args.sizes.split(","):
            shape = SHAPES[size]
            path = folder / f"{size}-{file_type}.gguf"
            start = time.perf_counter()
            if not path.exists():
                write_random_gguf(path, shape, file_type)
            written = time.perf_counter() - start
            row = child(path, args.prompt, args.tokens)
            row.update(
                size=size,
                type=file_type,
                file_bytes=path.stat().st_size,
                weight_bytes=weight_bytes(shape, file_type),
                bytes_per_token=bytes_per_token(shape, file_type),
                write_s=written,
            )
            results["rows"].append(row)
            print(json.dumps(row), flush=True)
            Path(args.out).write_text(json.dumps(results, indent=1))
            if args.drop and path.stem not in args.keep.split(","):
                path.unlink()


def timed(run, repeats: int) -> float:
    run()
    run()
    start = time.perf_counter()
    for _ in range(repeats):
        run()
    return (time.perf_counter() - start) / repeats


def measure_vision(args) -> None:
    """ms/image of the vision graph: ORT CUDA EP, ORT CPU EP, torch (timm) fp32 and fp16 on the
    GPU; then one process holding the product's vision session and the LM (peak memory)."""
    import onnxruntime as ort

    results: dict = {**gpu_info(), "onnxruntime": ort.__version__, "rows": []}
    onnx = Path(args.onnx)
    for batch in (1, 8):
        feed = np.random.default_rng(0).standard_normal((batch, 3, 224, 224), dtype=np.float32)
        row = {"batch": batch}
        for name, providers in (
            ("ort_cuda", ["CUDAExecutionProvider"]),
            ("ort_cpu", ["CPUExecutionProvider"]),
        ):
            session = ort.InferenceSession(str(onnx), providers=providers)
            if session.get_providers()[0] != providers[0]:
                row[name] = None
                continue
            feeds = {session.get_inputs()[0].name: feed}
            repeats = 50 if name == "ort_cuda" else 5
            row[name] = timed(lambda s=session, f=feeds: s.run(None, f), repeats) * 1000 / batch
        row.update(torch_ms(feed))
        results["rows"].append(row)
        print(json.dumps(row), flush=True)
    if args.lm:
        results["together"] = child(Path(args.lm), args.prompt, args.tokens, onnx)
        results["together"]["model"] = Path(args.lm).name
        print(json.dumps(results["together"]), flush=True)
    Path(args.out).write_text(json.dumps(results, indent=1))


def torch_ms(feed) -> dict:
    try:
        import timm
        import torch
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    model = model.eval().cuda()
    x = torch.from_numpy(feed).cuda()
    out = {}
    for name, dtype in (("torch_fp32", torch.float32), ("torch_fp16", torch.float16)):
        m, xi = model.to(dtype), x.to(dtype)

        def run(m=m, xi=xi):
            with torch.no_grad():
                m(xi)
            torch.cuda.synchronize()

        out[name] = timed(run, 50) * 1000 / len(feed)
    return out


def report(args) -> None:
    from bench._common import write_section

    lm = json.loads(Path(args.lm_json).read_text())
    vision = json.loads(Path(args.vision_json).read_text()) if args.vision_json else None
    body = format_report(lm, vision)
    print(body)
    if not args.no_write:
        write_section(HEADING, body)


def format_report(lm: dict, vision: dict | None) -> str:
    gbps = lm["copy_gbps"]
    lines = [
        f"GPU: {lm['gpu']} ({lm['memory_total_mib'] / 1024:.0f} GiB, driver {lm['driver']}); "
        f"llama-cpp-python {lm['llama_cpp_python']} built with CUDA for sm_90 "
        "(`CMAKE_ARGS='-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90'`; flash attention kernels "
        f"not built, so off). Measured device-to-device copy bandwidth {gbps:.0f} GB/s "
        "(read + written, torch), the denominator of the limit below. Random-weight Qwen2.5 "
        "shapes (`bench/gguf_random.py`), every layer offloaded, n_ctx 4096, greedy; "
        f"prefill of {lm['rows'][0]['prompt']} tokens, then {lm['rows'][0]['tokens']} decoded "
        "tokens timed one `eval` per token (Python overhead included, as the daemon has it).",
        "",
        "| model | type | GGUF | weight bytes / token | prefill tok/s | decode tok/s "
        "| ms / token | bandwidth limit tok/s | of limit | 4090 limit tok/s "
        "| GPU memory (process) | fits 24 GB |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for row in lm["rows"]:
        per_token = row["bytes_per_token"]
        limit = gbps * 1e9 / per_token
        decode = row["tokens"] / row["decode_s"]
        peak = row["peak_mib"] / 1024
        lines.append(
            f"| {row['size']} | {row['type']} | {row['file_bytes'] / 1e9:.2f} GB "
            f"| {per_token / 1e9:.2f} GB | {row['prompt'] / row['prefill_s']:.0f} "
            f"| {decode:.0f} | {1000 / decode:.2f} | {limit:.0f} | {decode / limit:.0%} "
            f"| {RTX_4090_GBPS * 1e9 / per_token:.0f} | {peak:.2f} GiB "
            f"| {'yes' if peak < BUDGET_GIB else 'no'} |"
        )
    lines += [
        "",
        '"GPU memory (process)" is the device\'s used memory after prefill and decode minus '
        "before the process started: weights, KV cache (f16, n_ctx 4096), compute buffers and "
        f"the CUDA context. The 4090 column is its datasheet bandwidth ({RTX_4090_GBPS:.0f} GB/s) "
        "over the bytes per token: an upper bound; expect the same fraction of it as measured "
        "here at best.",
    ]
    if vision:
        lines += ["", *vision_lines(vision)]
    lines += [
        "",
        "Commands (on the GPU machine, then here): `python bench/serve_gpu.py lm --out lm.json "
        "--drop --keep 7b-Q4_K_M`; `python bench/serve_gpu.py vision --onnx backbone.onnx --lm "
        "/tmp/serve_gpu/7b-Q4_K_M.gguf --out vision.json`; `python bench/serve_gpu.py report "
        "lm.json vision.json` (this run's JSON is kept in `docs/runs/`).",
    ]
    return "\n".join(lines) + "\n"


def vision_lines(vision: dict) -> list[str]:
    lines = [
        f"Vision graph (the embedded EfficientNet-Lite0 backbone ONNX, 224x224, fp32), ms/image "
        f"on the same GPU, onnxruntime-gpu {vision['onnxruntime']}; torch = timm "
        "`tf_efficientnet_lite0` (same architecture), eager, no compile:",
        "",
        "| batch | ORT CUDA EP | ORT CPU EP (16 cores) | torch fp32 GPU | torch fp16 GPU "
        "| torch fp32 / ORT CUDA |",
        "|---:|---:|---:|---:|---:|---:|",
    ]

    def cell(value):
        return "n/a" if value is None else f"{value:.2f}"

    for row in vision["rows"]:
        ratio = (
            f"{row['torch_fp32'] / row['ort_cuda']:.2f}x"
            if row.get("torch_fp32") and row.get("ort_cuda")
            else "n/a"
        )
        lines.append(
            f"| {row['batch']} | {cell(row.get('ort_cuda'))} | {cell(row.get('ort_cpu'))} "
            f"| {cell(row.get('torch_fp32'))} | {cell(row.get('torch_fp16'))} | {ratio} |"
        )
    together = vision.get("together")
    if together:
        v = together["vision"]
        lines += [
            "",
            f"One process as the daemon holds them: the product's provider chain "
            f"(`resolve_providers(['tensorrt', 'cuda', 'cpu'])` + `create_session`) ran the "
            f"vision graph on {v['providers'][0]}"
            + (f' (logged: "{v["log"][-1]}")' if v["log"] else "")
            + f", then {together['model']} fully offloaded with n_ctx 4096: "
            f"{together['peak_mib'] / 1024:.2f} GiB of GPU memory in all, against a "
            f"{BUDGET_GIB:.0f} GB budget.",
        ]
    return lines


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    lm = sub.add_parser("lm", help="decode speed and memory per model (GPU)")
    lm.add_argument("--out", required=True)
    lm.add_argument("--dir", default="/tmp/serve_gpu", help="where the GGUFs are written")
    lm.add_argument("--sizes", default="3b,7b")
    lm.add_argument("--types", default=",".join(FILE_TYPES))
    lm.add_argument("--drop", action="store_true", help="delete each GGUF after its run")
    lm.add_argument("--keep", default="", help="with --drop: GGUFs to keep (e.g. 7b-Q4_K_M)")
    vision = sub.add_parser("vision", help="vision providers and vision + LM memory (GPU)")
    vision.add_argument("--onnx", required=True)
    vision.add_argument("--lm", help="a GGUF to hold beside the vision session")
    vision.add_argument("--out", required=True)
    one = sub.add_parser("one", help=argparse.SUPPRESS)
    one.add_argument("model")
    one.add_argument("--vision")
    for p in (lm, vision, one):
        p.add_argument("--prompt", type=int, default=256)
        p.add_argument("--tokens", type=int, default=128)
    rep = sub.add_parser("report", help="write docs/benchmarks.md from the JSON results")
    rep.add_argument("lm_json")
    rep.add_argument("vision_json", nargs="?")
    rep.add_argument("--no-write", action="store_true")
    return parser.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    {"lm": measure_lm, "vision": measure_vision, "one": run_one, "report": report}[args.command](
        args
    )


if __name__ == "__main__":
    main()
