"""Exported inspector vs the trained model: vision ms/image, LM decode tokens/s, latency breakdown.

A real-size small inspector is built and trained one step so that it is a real checkpoint:
EfficientNet-Lite0 vision (the package's ImageNet weights), a 4 x 4 image grid, and SmolLM2-135M
dequantised from its GGUF with LoRA r=16. It is exported once per quantization type; for each:

* vision ms/image, torch vs ONNX Runtime (CPU), batch 8, and the ratio;
* LM decode tokens/s, transformers (fp32) vs llama.cpp on the same prompt, image embeddings and
  continuation tokens (teacher-forced, one token per step, KV cache), and the ratio;
* the GGUF's size and its logit drift against F16 (from the export's parity probe);
* the served per-image latency split (preprocess, vision, prefill, decode with and without the
  report grammar) through the appliance's own ``VisionLanguageInspector``.

    python bench/export_speed.py [--quants F16,Q8_0,Q4_K_M] [--tokens 48] [--threads N]

Prints the tables and writes the section "Export: trained inspector speed" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench._common import machine, write_section  # noqa: E402

HEADING = "## Export: trained inspector speed"


def make_checkpoint(work: Path) -> Path:
    """Train one step of the real-size small inspector on generated images."""
    from appliance.models import default_narrative_gguf
    from examples.tiny.make_data import make_dataset
    from train.recipe import parse_recipe
    from train.sft import train_stage

    gguf = default_narrative_gguf()
    records = make_dataset(work / "data", per_kind=1)
    recipe = {
        "model": {
            "vision": "efficientnet_lite0",
            "image_grid": 4,
            "projector_hidden": 512,
            "lm": {"path": str(gguf.parent), "gguf_file": gguf.name},
            "lora": {"r": 16, "alpha": 32},
        },
        "data": {"path": str(records), "labels": ["scratch", "crack", "spot"]},
        "training": {"batch_size": 1, "precision": "fp32", "detect": {"max_steps": 1}},
    }
    out = work / "ckpt"
    train_stage(parse_recipe(recipe, records.parent), "detect", out, progress=False)
    return out


def timed(fn, runs: int) -> float:
    fn()  # warm-up
    samples = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def vision_speed(model, bundle, batch: int = 8) -> tuple[float, float]:
    from appliance.vlm import open_vlm

    size = tuple(bundle.manifest["vlm"]["preprocess"]["input_size"])
    pixels = np.random.default_rng(0).uniform(-1, 1, (batch, 3, size[1], size[0]))
    pixels = pixels.astype(np.float32)
    with torch.no_grad():
        t_torch = timed(lambda: model.encode_images(torch.from_numpy(pixels)), 5)
    inspector = open_vlm(bundle)
    t_ort = timed(lambda: inspector.vision.run(None, {"pixels": pixels}), 5)
    inspector.close()
    return t_torch * 1e3 / batch, t_ort * 1e3 / batch


def hf_decode_speed(model, segments, probe, tokens: list[int], runs: int = 3) -> float:
    """transformers tokens/s over ``tokens``, one token per step with the KV cache (the prompt
    is read before the clock starts)."""
    from export.language import _embeddings

    table = model.lm.get_input_embeddings()
    samples = []
    with torch.no_grad():
        for _ in range(runs + 1):
            out = model.lm(inputs_embeds=_embeddings(model, segments, probe).unsqueeze(0))
            start = time.perf_counter()
            for token in tokens:
                step = table(torch.tensor([[token]]))
                out = model.lm(inputs_embeds=step, past_key_values=out.past_key_values)
            samples.append(time.perf_counter() - start)
    return len(tokens) / statistics.median(samples[1:])


def llama_decode_speed(bundle, probe: np.ndarray, tokens: list[int], threads, runs: int = 3):
    """llama.cpp tokens/s on the same continuation (prompt time excluded)."""
    from appliance.vlm import open_vlm

    inspector = open_vlm(bundle, n_threads=threads)
    samples = []
    for _ in range(runs + 1):
        timings: dict = {}
        inspector.decoder.probe_logits(probe, tokens, timings)
        samples.append(timings["decode_s"])
    inspector.close()
    return len(tokens) / statistics.median(samples[1:])


def latency_split(bundle, threads) -> dict:
    """Median per-image ms of each stage over 4 sample images, with and without the grammar."""
    from appliance.imaging import decode_image
    from appliance.samples import make_sample
    from appliance.vlm import open_vlm
    from bench._common import png_bytes

    images = [decode_image(png_bytes(make_sample(i, defect="scratch").rgb)) for i in range(4)]
    out = {}
    for constrained in (True, False):
        inspector = open_vlm(bundle, n_threads=threads, constrained=constrained)
        inspector.max_tokens = 48
        rows = []
        for image in images:
            embedded, prep, vision = inspector.embed([image.rgb])
            generation = inspector.decoder.generate(embedded[0], 48, constrained=constrained)
            rows.append(
                {
                    "preprocess": prep,
                    "vision": vision,
                    "prefill": generation.timings_ms["prefill"],
                    "decode": generation.timings_ms["decode"],
                    "tokens": len(generation.tokens),
                }
            )
        inspector.close()
        out["grammar" if constrained else "free"] = {
            k: statistics.median(r[k] for r in rows) for k in rows[0]
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quants", default="F16,Q8_0,Q4_K_M")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--no-docs", action="store_true")
    args = parser.parse_args()
    from appliance.bundle import load_bundle
    from export.inspector_bundle import export_bundle
    from train.checkpoint import load_inspector

    torch.set_num_threads(args.threads or torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ckpt = make_checkpoint(work)
        model, _, _ = load_inspector(ckpt, trainable=False)
        model.lm = model.lm.merge_and_unload()
        model.eval()
        bundles = {}
        for quant in args.quants.split(","):
            export_bundle(ckpt, work / quant, quant=quant, max_tokens=64)
            bundles[quant] = load_bundle(work / quant)
        first = next(iter(bundles.values()))
        segments = first.manifest["vlm"]["prompt"]["segments"]
        size = tuple(first.manifest["vlm"]["preprocess"]["input_size"])
        pixels = np.random.default_rng(1).uniform(-1, 1, (1, 3, size[1], size[0]))
        with torch.no_grad():
            probe = model.encode_images(torch.from_numpy(pixels.astype(np.float32)))[0]
        tokens = list(range(1000, 1000 + args.tokens))
        torch_ms, ort_ms = vision_speed(model, first)
        hf_tps = hf_decode_speed(model, segments, probe, tokens)
        rows = [
            "| LM | GGUF size | logit drift vs F16 (max abs / min cos / top-1) | decode tok/s "
            "| vs transformers fp32 |",
            "| --- | ---: | --- | ---: | ---: |",
            f"| transformers fp32 | - | - | {hf_tps:.1f} | 1.00 |",
        ]
        for quant, bundle in bundles.items():
            gguf = bundle.file(bundle.manifest["vlm"]["language_model"])
            tps = llama_decode_speed(bundle, probe.numpy(), tokens, args.threads)
            drift = bundle.manifest["parity"].get(quant) or bundle.manifest["parity"]["F16"]
            label = "(vs transformers)" if quant == "F16" else ""
            rows.append(
                f"| llama.cpp {quant} | {gguf.stat().st_size / 2**20:.0f} MiB | "
                f"{drift['max_abs_diff']:.3f} / {drift['min_cosine']:.4f} / "
                f"{drift['top1_agreement']:.2f} {label} | {tps:.1f} | {tps / hf_tps:.2f} |"
            )
        split = latency_split(bundles[args.quants.split(",")[-1]], args.threads)
    vision = (
        f"| vision (EfficientNet-Lite0 + pool + projector) | torch {torch_ms:.1f} ms/image | "
        f"ONNX Runtime {ort_ms:.1f} ms/image | ratio torch/ORT {torch_ms / ort_ms:.2f} |\n"
        "| --- | --- | --- | --- |"
    )
    stages = ["preprocess", "vision", "prefill", "decode", "tokens"]
    lat = ["| decoding | " + " | ".join(stages) + " |", "|---" * (len(stages) + 1) + "|"]
    for mode, s in split.items():
        lat.append(f"| {mode} | " + " | ".join(f"{s[k]:.1f}" for k in stages) + " |")
    body = (
        f"SmolLM2-135M + EfficientNet-Lite0 inspector (LoRA r=16, 4x4 image tokens), one training "
        f"step, exported per type; {machine()}; `python bench/export_speed.py`. Decode tok/s is "
        f"teacher-forced over {args.tokens} tokens after the prompt (prefill subtracted).\n\n"
        + vision
        + "\n\n"
        + "\n".join(rows)
        + f"\n\nPer-image latency (ms, median of 4 sample images, {args.quants.split(',')[-1]}, "
        "48 tokens at most; I/O and the report are in the daemon benchmark):\n\n" + "\n".join(lat)
    )
    print(body)
    if not args.no_docs:
        write_section(HEADING, body)


if __name__ == "__main__":
    main()
