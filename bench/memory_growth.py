"""Does the daemon's resident memory grow with the number of images it has inspected?

Runs the real daemon (``python -m appliance run``, local Mosquitto, narrative never, batch size 8)
and feeds it ``--images`` small images through its watched folder, reading VmRSS of the daemon
process from /proc at checkpoints (after 100, 1000, 5000 and 10000 reports by default). The target
is growth below 10% between the first and the last checkpoint.

Feeding: a pool of ``--pool`` distinct procedural parts (half good, half defective), each copy made
unique by one pixel (the copy's index written into pixel (0, 0)) so that content dedupe never skips
it. At most ``--window`` images are in flight (dropped but not yet reported on MQTT), so the feed
runs at whatever rate the daemon sustains and the queue stays short. An input file is deleted once
its report has arrived, as a camera folder's clean-up would, so the folder stays small; reports
and heatmaps accumulate in the outbox, and rows in SQLite, as in production.

    python -m bench.memory_growth [--images 10000] [--pool 200] [--size 160x120]
        [--working-size 128] [--window 16]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

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

HEADING = "## Memory: resident size under load"
BATCH = 8


def unique_copy(pool: list, index: int) -> bytes:
    """PNG of pool image ``index % len(pool)`` with ``index`` written into pixel (0, 0)."""
    rgb = pool[index % len(pool)].copy()
    rgb[0, 0] = (index & 0xFF, (index >> 8) & 0xFF, (index >> 16) & 0xFF)
    return png_bytes(rgb)


def feed(daemon, sub, incoming: Path, args, checkpoints: list[int]) -> list[dict]:
    """Drops ``args.images`` images, keeping ``args.window`` in flight; RSS at each checkpoint."""
    height, width = args.size
    pool = [sample_rgb(i, height=height, width=width) for i in range(args.pool)]
    samples: list[dict] = []
    waiting: list[str] = []  # dropped, report not yet seen: deleted once it is
    dropped = 0
    started = time.monotonic()
    todo = list(checkpoints)
    while todo:
        while dropped < args.images and dropped - sub.count < args.window:
            name = f"part_{dropped:06d}.png"
            drop(incoming, name, unique_copy(pool, dropped))
            waiting.append(name)
            dropped += 1
        if not sub.wait_for(min(sub.count + 1, args.images), timeout=300):
            raise TimeoutError(f"no report for 300 s after {sub.count}; see the daemon.log")
        done = [n for n in waiting if n in sub.arrivals]
        for name in done:
            (incoming / name).unlink(missing_ok=True)
        waiting = [n for n in waiting if n not in sub.arrivals]
        if sub.count >= todo[0]:
            elapsed = time.monotonic() - started
            samples.append(
                {
                    "images": todo.pop(0),
                    "reports": sub.count,
                    "rss_kib": daemon.rss_kib(),
                    "elapsed_s": elapsed,
                    "load": load_average(),
                }
            )
            print(
                f"{samples[-1]['images']:>6} images: RSS {samples[-1]['rss_kib'] / 1024:.1f} MiB"
                f" ({sub.count / elapsed:.1f} images/s so far, load {samples[-1]['load']})",
                flush=True,
            )
        if daemon.process.poll() is not None:
            raise RuntimeError("the daemon exited during the run; see its daemon.log")
    return samples


def results_table(samples: list[dict]) -> str:
    base = samples[0]["rss_kib"]
    lines = [
        "| images inspected | VmRSS MiB | vs first | elapsed s | load average (1/5/15 min) |",
        "|---:|---:|---:|---:|---|",
    ]
    for s in samples:
        growth = (s["rss_kib"] - base) / base * 100.0
        lines.append(
            f"| {s['images']} | {s['rss_kib'] / 1024:.1f} | {growth:+.1f}% | "
            f"{s['elapsed_s']:.0f} | {s['load']} |"
        )
    total = (samples[-1]["rss_kib"] - base) / base * 100.0
    verdict = "meets" if total < 10.0 else "misses"
    return "\n".join(lines) + (
        f"\n\nGrowth from {samples[0]['images']} to {samples[-1]['images']} images: "
        f"**{total:+.1f}%** ({verdict} the < 10% target)."
    )


def parse_size(text: str) -> tuple[int, int]:
    width, height = (int(v) for v in text.lower().split("x"))
    return height, width


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--pool", type=int, default=200, help="distinct images before copies")
    parser.add_argument("--size", type=parse_size, default=(120, 160), help="WIDTHxHEIGHT")
    parser.add_argument(
        "--working-size",
        type=int,
        default=128,
        help="enrolment --size (square); 256 is its default",
    )
    parser.add_argument("--window", type=int, default=2 * BATCH, help="most images in flight")
    parser.add_argument("--workdir", type=Path, default=None, help="default: a temporary folder")
    parser.add_argument("--no-docs", action="store_true", help="print only, leave the docs alone")
    args = parser.parse_args(argv)
    checkpoints = sorted({c for c in (100, 1000, 5000, 10_000) if c < args.images} | {args.images})

    from appliance.localbroker import LocalBroker

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="bench-memory-"))
    height, width = args.size
    bundle = enroll(workdir / "enroll", height=height, width=width, working_size=args.working_size)
    broker = LocalBroker(workdir / "broker").start()
    config = write_config(
        workdir / "ws", bundle, port=broker.port, narrative="never", batch_size=BATCH
    )
    sub = ReportSubscriber(broker.port)
    daemon = DaemonProcess(config)
    try:
        daemon.wait_ready()
        print(f"daemon pid {daemon.pid} ready; workspace {workdir}", flush=True)
        samples = feed(daemon, sub, workdir / "ws" / "incoming", args, checkpoints)
    finally:
        daemon.stop()
        sub.close()
        broker.stop()
    table = results_table(samples)
    print(table)
    command = "python -m bench.memory_growth " + shlex.join(sys.argv[1:] if argv is None else argv)
    body = (
        f"{table}\n\n"
        f'The real daemon (`python -m appliance run`, local Mosquitto, `narrative = "never"`, '
        f"`ingest.batch_size = {BATCH}`, other settings default, CPU provider) fed {args.images} "
        f"images of {width}x{height} (bundle enrolled at a working size of "
        f"{args.working_size}x{args.working_size} to make the run shorter) through its watched "
        "folder (`.part` then rename): a pool of "
        f"{args.pool} distinct parts, half defective, each copy made unique by one pixel so dedupe "
        f"skips none; at most {args.window} in flight, each input deleted once its report arrived "
        "on MQTT (reports, heatmaps and SQLite rows accumulate as in production). VmRSS of the "
        "daemon process from `/proc/PID/status` when the subscriber had seen that many reports.\n\n"
        f"Date {date.today().isoformat()}; machine: {machine()}; load average at the end "
        f"{load_average()} (other jobs share the machine).\n\n"
        f"Command: `{command.strip()}`"
    )
    if not args.no_docs:
        write_section(HEADING, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
