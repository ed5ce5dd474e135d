"""Seed 002's multi-scale self-prompted memory (MSSPMM) vs the appliance's memory banks, Magnetic tile.

No pretrained CLIP weights exist on these machines, so the text side (TDDF, eq. 11's D) cannot be
measured; what can be is the memory part of MSSPMM on the appliance's ImageNet EfficientNet-Lite0
backbone (layers s8, s16, 3x3-pooled as the product does). Methods, on identical features, shots
and test images:

* ``plain bank``: the appliance's ``MemoryBank`` with the self-prompt and PatchCore re-weighting
  off (multi-scale nearest-neighbour distance to every shot's patches).
* ``appliance``: the product's scoring (``enroll.scoring_config``: position-aware self-prompt
  weight 0.25, re-weighting on).
* ``MSSPMM eq.10``: ``train.clip_anomaly.msspmm.attention_map``: the shot with the nearest global
  feature (mean-pooled s16 grid, EfficientNet has no CLS token) is the self-prompt and each layer's
  map is 1 − max cosine to that shot's patches; layers averaged at the s8 grid.
* ``MSSPMM w=0.5``: the same, blended half and half with the cosine distance to every shot.

MSSPMM maps are upsampled (bilinear) to the working size and smoothed (sigma 4) like the product's;
the image score is the map maximum. Image and pixel AUROC (scikit-learn) over the test images; cost
per image is the median scoring time after the backbone (same for all), plus the backbone time.

    python -m bench.clip_memory [--normal-step 8 --defect-step 4] [--seeds 5] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from appliance.anomaly.enroll import MAX_PATCHES, load_rgb, scoring_config
from appliance.anomaly.features import DEFAULT_LAYERS, FeatureExtractor
from appliance.anomaly.memory import MemoryBank
from appliance.anomaly.preprocess import batch_to_working
from appliance.anomaly.resample import gaussian_smooth, resize_bilinear
from appliance.taxonomy import Taxonomy
from bench._common import cpu_name, load_average, write_section
from bench.anomaly_quality import DATA, aurocs, eval_pixels, load_split

HEADING = "## CLIP branch memory (MSSPMM) vs memory bank: Magnetic tile"
METHODS = ("plain bank", "appliance", "MSSPMM eq.10", "MSSPMM w=0.5")


def extract(paths: list[Path], extractor: FeatureExtractor, size) -> dict[str, np.ndarray]:
    grids: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(paths), 8):
        batch = batch_to_working([load_rgb(p) for p in paths[start : start + 8]], size)
        for layer, grid in extractor(batch).layers.items():
            grids.setdefault(layer, []).append(grid)
        print(f"\rfeatures {min(start + 8, len(paths))}/{len(paths)}", end="", flush=True)
    print()
    return {k: np.concatenate(v) for k, v in grids.items()}


def bank_scorer(grids, shots, config):
    bank = MemoryBank.from_features(
        [str(i) for i in shots], {k: g[shots] for k, g in grids.items()}, max_patches=MAX_PATCHES
    )

    def score(i: int):
        scored = bank.score({k: g[i] for k, g in grids.items()}, config)
        return scored.score, scored.heatmap

    return score


def msspmm_scorer(grids, shots, size, global_weight: float, sigma: float = 4.0):
    import torch

    from train.clip_anomaly.msspmm import Memory, attention_map

    layers = list(grids)  # finest first
    tensors = {k: torch.from_numpy(g) for k, g in grids.items()}
    memory = Memory.from_features(
        tensors[layers[-1]][shots].mean(dim=(1, 2)), [tensors[k][shots] for k in layers]
    )

    def score(i: int):
        query = [tensors[k][i : i + 1] for k in layers]
        with torch.no_grad():
            attention, _ = attention_map(query[-1].mean(dim=(1, 2)), query, memory, global_weight)
        heatmap = gaussian_smooth(resize_bilinear(attention[0].numpy(), size), sigma)
        return float(heatmap.max()), heatmap

    return score


def scorers(grids, shots, config, size) -> dict:
    plain = replace(config, prompt_weight=0.0, reweight_neighbors=0)
    return {
        "plain bank": bank_scorer(grids, shots, plain),
        "appliance": bank_scorer(grids, shots, config),
        "MSSPMM eq.10": msspmm_scorer(grids, shots, size, 0.0),
        "MSSPMM w=0.5": msspmm_scorer(grids, shots, size, 0.5),
    }


def evaluate(score, test, labels, masks, stride) -> tuple[float, float, float]:
    """(image AUROC, pixel AUROC, median ms per image) of one scorer on the test images."""
    values, maps, times = [], [], []
    for i in test:
        start = time.perf_counter()
        value, heatmap = score(i)
        times.append(time.perf_counter() - start)
        values.append(value)
        maps.append(eval_pixels(heatmap, stride))
    image, pixel = aurocs(labels[test], np.array(values), masks[test], np.stack(maps))
    return image, pixel, float(np.median(times)) * 1000.0


def run(args) -> dict:
    import torch

    from export.efficientnet_lite0 import build_backbone_onnx

    torch.set_num_threads(args.threads)
    size = (args.size, args.size)
    normal, defective, paths, labels, masks = load_split(args, size)
    results: dict = {"rows": {}, "normal": len(normal), "defective": len(defective)}
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = build_backbone_onnx(Path(tmp) / "backbone.onnx")
        extractor = FeatureExtractor(onnx_path, DEFAULT_LAYERS)
        started = time.perf_counter()
        grids = extract(paths, extractor, size)
        results["backbone_ms"] = (time.perf_counter() - started) * 1000.0 / len(paths)
        config = scoring_config(onnx_path, DEFAULT_LAYERS, size)
    for k in args.shots:
        for seed in range(args.seeds):
            shots = np.sort(np.random.default_rng(seed).choice(len(normal), k, replace=False))
            test = np.setdiff1d(np.arange(len(paths)), shots)
            row = {
                name: evaluate(score, test, labels, masks, args.pixel_stride)
                for name, score in scorers(grids, shots, config, size).items()
            }
            results["rows"][(k, seed)] = row
            line = "  ".join(f"{n} {a:.3f}/{b:.3f} {c:.1f}ms" for n, (a, b, c) in row.items())
            print(f"k={k} seed={seed}  {line}", flush=True)
    return results


def format_report(results: dict, args, command: str) -> str:
    rows = results["rows"]
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {cpu_name()} (load {load_average()}; the machine "
        f"was shared), `{command}`: {results['normal']} normal (every {args.normal_step}th "
        f"MT_Free) and {results['defective']} defective (every {args.defect_step}th) images at "
        f"{args.size}x{args.size}, shots drawn from the normals per seed ({args.seeds} seeds), "
        "tested on all other images. Image / pixel AUROC, mean ± std over seeds. No CLIP weights "
        "exist here, so this measures MSSPMM's memory (eqs. 9-10) on the EfficientNet-Lite0 "
        "features, not the text-driven focuser (see docs/clip-anomaly.md). MSSPMM uses cosine "
        "distances (as on CLIP features), the banks Euclidean ones scaled per layer. Timings on a "
        "shared 2-core machine are noisy.",
        "",
        "| k | " + " | ".join(METHODS) + " |",
        "| --- |" + " --- |" * len(METHODS),
    ]
    for k in args.shots:
        cells = []
        for name in METHODS:
            image = [rows[(k, s)][name][0] for s in range(args.seeds)]
            pixel = [rows[(k, s)][name][1] for s in range(args.seeds)]
            cells.append(
                f"{np.mean(image):.3f} ± {np.std(image):.3f} / "
                f"{np.mean(pixel):.3f} ± {np.std(pixel):.3f}"
            )
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Cost per image (median scoring ms after the backbone; backbone "
        f"{results['backbone_ms']:.1f} ms/image at batch 8):",
        "",
    ]
    lines += ["| k | " + " | ".join(METHODS) + " |", "| --- |" + " --- |" * len(METHODS)]
    for k in args.shots:
        cells = [
            f"{np.mean([rows[(k, s)][name][2] for s in range(args.seeds)]):.1f}" for name in METHODS
        ]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def clip_graph_cost(model_name: str, shots: int = 4, runs: int = 10, threads: int = 2) -> dict:
    """ms/image (batch 1, ONNX Runtime CPU) of the exported CLIP branch graph for an open_clip
    ViT with *random* weights: the cost depends on the architecture only, not on the weights."""
    import onnxruntime as ort
    import open_clip
    import torch

    from appliance.anomaly.clip_branch import heatmap_from
    from export.clip_anomaly import export_graph
    from train.clip_anomaly.net import ClipAnomalyNet
    from train.clip_anomaly.train import build_focuser
    from train.clip_anomaly.vvclip import VVClipVision

    torch.set_num_threads(threads)
    clip = open_clip.create_model(model_name, pretrained=None).eval()
    depth = len(clip.visual.transformer.resblocks)
    blocks = (3, 8, 12) if depth == 12 else tuple(round(depth * f) for f in (0.25, 0.67, 1.0))
    tokenizer = open_clip.get_tokenizer(model_name)
    focuser = build_focuser(clip, tokenizer, Taxonomy(labels=()), "tile", len(blocks))
    net = ClipAnomalyNet(VVClipVision(clip.visual, blocks), focuser).eval()
    height, width = net.vision.image_size
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    with tempfile.TemporaryDirectory() as tmp:
        path = export_graph(net, Path(tmp) / "graph.onnx", few_shot=True)
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        memory_cls, memory_blocks = net.enroll(torch.randn(shots, 3, height, width))
        feeds = {"memory_cls": memory_cls.numpy(), "memory_blocks": memory_blocks.numpy()}
        image = np.random.default_rng(0).standard_normal((1, 3, height, width), np.float32)
        times = []
        for run_index in range(runs + 2):
            start = time.perf_counter()
            out = session.run(["anomaly", "score"], {"image": image, **feeds})
            heatmap_from(out[0][0], (height, width), 4.0)
            if run_index >= 2:
                times.append(time.perf_counter() - start)
    return {
        "model": model_name,
        "blocks": blocks,
        "shots": shots,
        "ms": round(float(np.median(times)) * 1e3, 1),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA, help="Magnetic tile root")
    parser.add_argument("--size", type=int, default=224, help="working size (square)")
    parser.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--normal-step", type=int, default=8, help="every n-th normal image")
    parser.add_argument("--defect-step", type=int, default=4, help="every n-th defective image")
    parser.add_argument("--pixel-stride", type=int, default=4, help="pixel AUROC subsampling")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")
    parser.add_argument("--no-write", action="store_true", help="do not update docs/benchmarks.md")
    parser.add_argument(
        "--clip-cost",
        metavar="MODEL",
        help="only time the exported CLIP graph of this open_clip "
        "ViT (random weights), e.g. ViT-B-16",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.clip_cost:
        print(clip_graph_cost(args.clip_cost, threads=args.threads))
        return
    command = "python -m bench.clip_memory " + " ".join(sys.argv[1:] if argv is None else argv)
    body = format_report(run(args), args, command.strip())
    print(body)
    if not args.no_write:
        write_section(HEADING, body)


if __name__ == "__main__":
    main()
