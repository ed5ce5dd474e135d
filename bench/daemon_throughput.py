"""What the daemon costs on top of inspection: throughput ratio and added latency per image.

One set of N procedural parts (half good, half with a scratch, crack or spot; PNG, 320x240 by
default), one run, three measurements:

- **direct**: in-process ``appliance inspect`` (``inspect_cmd.inspect_paths``: read, decode,
  ``Inspector.inspect_batch``, report, schema check) in batches of the daemon's
  ``ingest.batch_size``; timed before and after the daemon phases, the mean is the reference.
- **daemon, flood**: the real daemon (``python -m appliance run``, local Mosquitto) gets all N files
  dropped into its watched folder at once (``.part`` then rename, as cameras do); images/s from the
  first rename to the last report received by an MQTT subscriber. Ratio daemon / direct (target
  at least 0.9).
- **daemon, paced**: the same images (pixel (0, 0) changed so content dedupe does not skip them)
  (the first ``--paced-images``) dropped one by one at ``--pace`` times the flood throughput, so
  the queue stays short; for each,
  added latency = (report arrival at the subscriber - rename into the folder) - the report's own
  ``timings_ms.total``. Flooding would measure queueing instead, so latency comes from this phase.

Both sides use ``narrative = "never"`` unless ``--narrative`` (then "defective") so the ratio
measures the daemon, not the language model. One untimed warm-up batch on each side first.

    python -m bench.daemon_throughput [--images 200] [--size 320x240] [--narrative]
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from bench._common import (
    DaemonProcess,
    ReportSubscriber,
    drop,
    enroll,
    load_average,
    machine,
    png_bytes,
    sample_rgb,
    write_config,
    write_section,
)

HEADING = "## Daemon throughput and added latency"
WARMUP = 4


def make_set(count: int, height: int, width: int, first: int = 0) -> list[tuple[str, bytes, bytes]]:
    """(name, PNG, PNG with pixel (0, 0) changed) for images ``first`` .. ``first + count - 1``."""
    out = []
    for index in range(first, first + count):
        rgb = sample_rgb(index, height=height, width=width)
        variant = rgb.copy()
        variant[0, 0] = (255 - int(rgb[0, 0, 0]), 0x5A, index & 0xFF)
        out.append((f"part_{index:05d}.png", png_bytes(rgb), png_bytes(variant)))
    return out


def direct_rate(folder: Path, images, config, batch: int, narrative: str) -> float:
    """Images/s of in-process ``appliance inspect`` over ``images`` (after one warm-up batch)."""
    from appliance.bundle import load_bundle
    from appliance.inspect_cmd import inspect_paths
    from appliance.inspector import Inspector

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data, _variant in images:
        (folder / name).write_bytes(data)
        paths.append(folder / name)
    taxonomy = config.taxonomy_obj
    inspector = Inspector(
        load_bundle(config.model.bundle), taxonomy=taxonomy, narrative=narrative, heatmaps=False
    )
    try:
        inspect_paths(paths[:WARMUP], inspector, taxonomy)
        started = time.perf_counter()
        for start in range(WARMUP, len(paths), batch):
            inspect_paths(paths[start : start + batch], inspector, taxonomy)
        return (len(paths) - WARMUP) / (time.perf_counter() - started)
    finally:
        inspector.close()


def flood(incoming: Path, sub: ReportSubscriber, images, timeout: float) -> float:
    """Drops every image at once; images/s from the first rename to the last report's arrival."""
    names = [name for name, _data, _variant in images]
    expected = sub.count + len(images)
    first = drop(incoming, names[0], images[0][1])
    for name, data, _variant in images[1:]:
        drop(incoming, name, data)
    if not sub.wait_for(expected, timeout):
        raise TimeoutError(f"flood: {sub.count}/{expected} reports after {timeout}s")
    last = max(sub.arrivals[name][0] for name in names)
    return len(images) / (last - first)


def paced(incoming: Path, sub: ReportSubscriber, images, rate: float, timeout: float) -> list:
    """Drops the variants every 1/rate s; returns (added latency ms, report total ms) per image."""
    dropped = {}
    next_at = time.monotonic()
    for name, _data, variant in images:
        time.sleep(max(0.0, next_at - time.monotonic()))
        paced_name = "paced_" + name
        dropped[paced_name] = drop(incoming, paced_name, variant)
        next_at += 1.0 / rate
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(n not in sub.arrivals for n in dropped):
        sub.wait_for(sub.count + 1, 1.0)
    out = []
    for name, renamed in dropped.items():
        if name not in sub.arrivals:
            raise TimeoutError(f"paced: no report for {name} after {timeout}s")
        arrived, report = sub.arrivals[name]
        total_ms = float(report["timings_ms"]["total"])
        out.append(((arrived - renamed) * 1000.0 - total_ms, total_ms))
    return out


def run_daemon(config: Path, port: int, images, warmup, pace: float, paced_count: int) -> dict:
    incoming = config.parent / "incoming"
    sub = ReportSubscriber(port)
    daemon = DaemonProcess(config)
    try:
        daemon.wait_ready()
        for name, data, _variant in warmup:
            drop(incoming, name, data)
        if not sub.wait_for(len(warmup), 300):
            raise TimeoutError("no reports for the warm-up images; see daemon.log")
        rate = flood(incoming, sub, images, timeout=60 + 10 * len(images))
        print(f"daemon, flood: {rate:.2f} images/s (load {load_average()})", flush=True)
        latencies = paced(incoming, sub, images[:paced_count], rate * pace, timeout=120)
        return {"flood": rate, "paced_rate": rate * pace, "latencies": latencies}
    finally:
        daemon.stop()
        sub.close()


def percentiles(values: list[float]) -> dict[str, float]:
    p50, p95, p99 = np.percentile(values, [50, 95, 99])
    return {"p50": p50, "p95": p95, "p99": p99}


def results_table(direct: list[float], daemon: dict) -> str:
    reference = statistics.mean(direct)
    ratio = daemon["flood"] / reference
    added = percentiles([a for a, _total in daemon["latencies"]])
    totals = percentiles([t for _a, t in daemon["latencies"]])
    verdict = "meets" if ratio >= 0.9 else "misses"
    return "\n".join(
        [
            "| measurement | value |",
            "|---|---:|",
            f"| direct `inspect_batch`, before the daemon | {direct[0]:.2f} images/s |",
            f"| direct `inspect_batch`, after the daemon | {direct[1]:.2f} images/s |",
            "| daemon, flood (first drop to last report on MQTT) | "
            f"{daemon['flood']:.2f} images/s |",
            f"| **ratio daemon / direct (mean)** | **{ratio:.2f}** ({verdict} >= 0.9) |",
            f"| paced phase: drop rate | {daemon['paced_rate']:.2f} images/s |",
            "| paced: report `timings_ms.total` p50 / p95 / p99 | "
            f"{totals['p50']:.0f} / {totals['p95']:.0f} / {totals['p99']:.0f} ms |",
            "| **paced: added latency p50 / p95 / p99** | "
            f"**{added['p50']:.0f} / {added['p95']:.0f} / {added['p99']:.0f} ms** |",
        ]
    )


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return height, width


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--size", type=parse_size, default=(240, 320), help="WIDTHxHEIGHT")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the daemon's")
    parser.add_argument("--pace", type=float, default=0.5, help="paced rate / flood rate")
    parser.add_argument("--paced-images", type=int, default=100, help="first K of the set")
    parser.add_argument("--narrative", action="store_true", help='narrative = "defective"')
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--no-docs", action="store_true", help="print only, leave the docs alone")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from appliance.config import load_config
    from appliance.localbroker import LocalBroker

    narrative = "defective" if args.narrative else "never"
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-throughput-"))
    height, width = args.size
    images = make_set(args.images, height, width)
    warmup = make_set(WARMUP, height, width, first=args.images)
    bundle = enroll(workdir / "enroll", height=height, width=width)
    broker = LocalBroker(workdir / "broker").start()
    try:
        config_path = write_config(
            workdir / "ws",
            bundle,
            port=broker.port,
            narrative=narrative,
            batch_size=args.batch_size,
        )
        config = load_config(config_path)
        batch = config.ingest.batch_size
        direct = [direct_rate(workdir / "direct", warmup + images, config, batch, narrative)]
        print(f"direct: {direct[0]:.2f} images/s (load {load_average()})", flush=True)
        daemon = run_daemon(config_path, broker.port, images, warmup, args.pace, args.paced_images)
        direct.append(direct_rate(workdir / "direct", warmup + images, config, batch, narrative))
        print(f"direct again: {direct[1]:.2f} images/s (load {load_average()})", flush=True)
    finally:
        broker.stop()
    table = results_table(direct, daemon)
    print(table)
    command = "python -m bench.daemon_throughput " + shlex.join(
        sys.argv[1:] if argv is None else argv
    )
    body = describe(table, args, batch, narrative, command)
    if not args.no_docs:
        write_section(HEADING, body)
    return 0


def describe(table: str, args, batch: int, narrative: str, command: str) -> str:
    height, width = args.size
    return (
        f"{table}\n\n"
        f"{args.images} procedural parts ({width}x{height} PNG, half good, half "
        "scratch/crack/spot), "
        f'`narrative = "{narrative}"` on both sides, batch size {batch} (the daemon\'s '
        "`ingest.batch_size`), CPU provider, bundle enrolled on 6 good parts at the default "
        "working size. Direct = in-process `appliance inspect` (`inspect_paths`: read, decode, "
        "`Inspector.inspect_batch`, report, schema check; no heatmap PNGs, as `inspect` does), "
        "timed before and after the daemon phases; the ratio uses their mean. Daemon = "
        "`python -m appliance run` with a local Mosquitto and default settings (heatmap PNGs on, "
        "fsynced report files, SQLite queue), all images dropped at once (`.part` then rename); "
        "time from the first rename to the last report received by an MQTT subscriber. Latency "
        "comes from a separate paced phase (the first "
        f"{min(args.paced_images, args.images)} images at {args.pace:g} x the flood rate, one at "
        "a time, "
        "pixel (0, 0) changed so dedupe skips none): (arrival on MQTT - rename) - the report's "
        "`timings_ms.total`, i.e. what the daemon adds around inspection (folder event, queue, "
        "batch-mates' share of the batch, heatmap PNG, outbox fsync, publish and PUBACK "
        "bookkeeping, broker hop).\n\n"
        f"Date {date.today().isoformat()}; machine: {machine()}; load average at the end "
        f"{load_average()} (other jobs share the machine).\n\n"
        f"Command: `{command.strip()}`"
    )


if __name__ == "__main__":
    sys.exit(main())
