"""Stage-1 LoRA step time and peak GPU memory for 3B- and 7B-shaped inspectors (GPU only).

The question a site asks before buying hardware: does fine-tuning fit one 24 GB RTX 4090? The
language models are Qwen2.5-3B / 7B *shapes* with random weights (the cost of a step does not depend
on the values), bf16, LoRA r=16 on every projection, gradient checkpointing, the EfficientNet-Lite0
vision tower and projector of ``train.model`` at the recipe's default 4 x 4 image grid, one image
and a 256-token answer per micro-batch. The optimizer is torch's fused AdamW over the trainable
parameters (bitsandbytes' 8-bit AdamW, where installed, is smaller still).

    python bench/train_gpu.py [--steps 5] [--sizes 3b,7b] [--answer 256]

Prints a table and writes the "Training on one GPU" section of docs/benchmarks.md. The GPU that
ran it is named; step times on an H100/H200 are faster than on a 4090, peak memory is comparable
(same kernels, same allocator), and the 24 GB verdict is against that peak.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

SHAPES = {  # Qwen2.5 configs (hidden, layers, heads, kv heads, intermediate, vocab)
    "3b": (2048, 36, 16, 2, 11008, 151936),
    "7b": (3584, 28, 28, 4, 18944, 152064),
    "tiny": (64, 2, 4, 2, 128, 1000),  # a smoke test of this script on a CPU (--cpu)
}
BUDGET_GIB = 24.0


def build(size: str, grid: int, device: str):
    import timm
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from train.model import FrozenVision, Inspector, add_lora
    from train.recipe import Lora

    hidden, layers, heads, kv, inter, vocab = SHAPES[size]
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        intermediate_size=inter,
        max_position_embeddings=4096,
        tie_word_embeddings=size == "3b",
    )
    with torch.device(device):
        lm = Qwen2ForCausalLM(config).to(torch.bfloat16)
        body = timm.create_model("tf_efficientnet_lite0", pretrained=False, num_classes=0)
    lm.gradient_checkpointing_enable()
    lm.enable_input_require_grads()
    lm = add_lora(lm, Lora(r=16, alpha=32, dropout=0.0))
    vision = FrozenVision(body.to(device), body.num_features)
    model = Inspector(vision, lm, image_grid=grid, projector_hidden=1024).to(device)
    model.projector.to(torch.bfloat16)
    return model


def step_stats(model, steps: int, answer: int, grid: int, device: str) -> dict:
    from train.model import IGNORE, IMAGE_ID

    prompt = 48
    n = prompt + grid * grid + answer
    cuda = device == "cuda"
    ids = torch.randint(0, 1000, (1, n), device=device)
    ids[0, prompt : prompt + grid * grid] = IMAGE_ID
    labels = ids.clone()
    labels[0, : prompt + grid * grid] = IGNORE
    mask = torch.ones_like(ids)
    pixels = torch.randn(1, 3, 320, 320, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=cuda)
    times = []
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.empty_cache()  # drop the fp32 initialisation's cached blocks
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps + 2):
        sync()
        start = time.perf_counter()
        with torch.autocast(device, dtype=torch.bfloat16):
            loss = model(ids, mask, pixels.to(torch.bfloat16), labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        if i >= 2:
            times.append(time.perf_counter() - start)
    return {
        "tokens": n,
        "trainable_m": sum(p.numel() for p in params) / 1e6,
        "total_b": sum(p.numel() for p in model.parameters()) / 1e9,
        "step_s": sorted(times)[len(times) // 2],
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else 0.0,
    }


def grpo_stats(model, answer: int, grid: int, device: str, generations: int = 4) -> dict:
    """A GRPO-shaped step as TRL runs it: sample ``generations`` completions of ``answer`` tokens
    (KV cache), a reference forward without LoRA, then the policy forward/backward over them."""
    from train.model import IGNORE, IMAGE_ID

    prompt = 48 + grid * grid
    ids = torch.randint(0, 1000, (generations, prompt), device=device)
    ids[:, 48:prompt] = IMAGE_ID
    pixels = torch.randn(generations, 3, 320, 320, device=device, dtype=torch.bfloat16)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16):
        embeds, mask = model.embed(ids, torch.ones_like(ids), pixels)
        out = model.lm.generate(
            inputs_embeds=embeds,
            attention_mask=mask,
            max_new_tokens=answer,
            min_new_tokens=answer,
            do_sample=True,
        )
    sampled = time.perf_counter()
    full = torch.cat([ids, out[:, -answer:]], 1)
    labels = full.clone()
    labels[:, :prompt] = IGNORE
    mask = torch.ones_like(full)
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16), model.lm.disable_adapter():
        model(full, mask, pixels)
    with torch.autocast(device, dtype=torch.bfloat16):
        model(full, mask, pixels, labels=labels).loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
    done = time.perf_counter()
    return {
        "generate_s": sampled - start,
        "step_s": done - start,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else 0.0,
        "reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if device == "cuda" else 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--sizes", default="3b,7b")
    parser.add_argument("--answer", type=int, default=256)
    parser.add_argument("--grid", type=int, default=4)
    parser.add_argument("--no-docs", action="store_true")
    parser.add_argument("--table", help="also write the table (markdown) to this file")
    parser.add_argument("--cpu", action="store_true", help="smoke-test on the CPU (--sizes tiny)")
    args = parser.parse_args()
    device = "cpu" if args.cpu else "cuda"
    if not args.cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: this benchmark runs on a GPU machine only")
    gpu = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    rows = []
    for size in args.sizes.split(","):
        model = build(size, args.grid, device)
        stats = step_stats(model, args.steps, args.answer, args.grid, device)
        model.zero_grad(set_to_none=True)
        stats["grpo"] = grpo_stats(model, args.answer, args.grid, device)
        rows.append((size, stats))
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    head = "| model | params | LoRA+projector | tokens/step | step (s) | peak alloc | peak reserved | fits 24 GB |"
    lines = [head, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for size, s in rows:
        fits = "yes" if s["reserved_gib"] <= BUDGET_GIB else "no"
        lines.append(
            f"| {size.upper()}-shaped (Qwen2.5) | {s['total_b']:.2f} B | {s['trainable_m']:.1f} M | "
            f"{s['tokens']} | {s['step_s']:.3f} | {s['peak_gib']:.1f} GiB | "
            f"{s['reserved_gib']:.1f} GiB | {fits} |"
        )
    lines += [
        "",
        "| model | GRPO-shaped step: 4 samples x answer | of which sampling (s) | step (s) | peak alloc | peak reserved | fits 24 GB |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for size, s in rows:
        g = s["grpo"]
        fits = "yes" if g["reserved_gib"] <= BUDGET_GIB else "no"
        lines.append(
            f"| {size.upper()}-shaped | 4 x {args.answer} tokens | {g['generate_s']:.2f} | "
            f"{g['step_s']:.2f} | {g['peak_gib']:.1f} GiB | {g['reserved_gib']:.1f} GiB | {fits} |"
        )
    table = "\n".join(lines)
    print(f"GPU: {gpu}\n{table}")
    if args.table:
        Path(args.table).write_text(f"GPU: {gpu}\n\n{table}\n")
    if not args.no_docs:
        from bench._common import write_section

        write_section(
            "## Training on one GPU",
            f"Stage-1 LoRA micro-step (bf16, r=16, gradient checkpointing, fused AdamW, batch 1, "
            f"{args.grid}x{args.grid} image tokens, {args.answer}-token answer), random weights, "
            f"on {gpu} (`python bench/train_gpu.py`). Median of {args.steps} steps after 2 "
            f"warm-ups.\n\n{table}",
        )


if __name__ == "__main__":
    main()
