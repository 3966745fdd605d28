"""`python -m bench.ray_scale`: `dia-ort serve --ray` with 1 and with 2 replicas on this machine.

C clients stream speech for a fixed time through Ray's HTTP proxy (bench.load's bounded client, only
well-formed requests). Reported per replica count: completed requests per minute and time to first
audio, p50 and p95. Then a paper estimate for N machines from the measured one-replica throughput:
replicas share nothing but the proxy, so a cluster serves about N times one machine's rate, less
what the proxy costs (measured here as the gap between the plain server and one Ray replica).
The table replaces the Ray section of bench/RESULTS.md (or of --results).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path

from bench.exports import ensure_export
from bench.load import run_load
from bench.machine import describe, physical_cores
from bench.process import REPO
from bench.report import number, publish_section, table
from bench.server import Server

SECTION = "ray"
MACHINES = (1, 4, 16)  # cluster sizes of the paper estimate


def measure(folder: Path, flags: list[str], clients: int, seconds: float, frames: int) -> dict:
    server = Server(folder, *flags, timeout=600)
    try:
        asyncio.run(
            run_load(server.url, None, clients=2, seconds=1, frames=8, max_requests=1, kinds=("speech",))
        )
        report = asyncio.run(run_load(server.url, None, clients, seconds, frames, kinds=("speech",)))
    finally:
        server.stop()
    return report.summary()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.ray_scale", description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny", choices=("tiny", "mid", "full"))
    parser.add_argument("--dtype", default="int8")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60)
    parser.add_argument("--frames", type=int, default=86, help="max_new_tokens of each request (86: 1 s)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    folder = (REPO / "models" / f"bench-{args.size}").resolve()
    dtype = "float32" if args.size == "tiny" else args.dtype
    ensure_export(args.size, folder, 0, (dtype,), re_export=False)
    common = ["--dtype", dtype, "--max-batch", "8", "--max-queue", "32"]
    runs = {"plain server": measure(folder, common, args.clients, args.seconds, args.frames)}
    for replicas in (1, 2):
        flags = [*common, "--ray", "--replicas", str(replicas)]
        runs[f"Ray, {replicas} replica{'s' * (replicas > 1)}"] = measure(
            folder, flags, args.clients, args.seconds, args.frames
        )
    print(json.dumps(runs, indent=1), file=sys.stderr)

    machine = describe(physical_cores(), "cpu")
    rows = [
        [
            name,
            number(run["completed_per_minute"]),
            number(run["first_audio_p50"]),
            number(run["first_audio_p95"]),
        ]
        for name, run in runs.items()
    ]
    one = runs["Ray, 1 replica"]["completed_per_minute"]
    estimate = [[str(n), number(n * one)] for n in MACHINES]
    markdown = "\n\n".join(
        [
            "## Scale-out on Ray Serve (`python -m bench.ray_scale`)",
            f"{machine.date}, {machine.cpu}, {machine.physical_cores} cores. Model `{args.size}` ({dtype}); "
            f"{args.clients} clients stream requests of {args.frames} frames for {args.seconds:.0f} s "
            "through Ray's HTTP proxy on loopback; max batch 8 per replica. With 2 replicas each gets "
            "half the cores, so on one machine a second replica cannot add compute: it shows that "
            "requests spread and what the split costs, not a speed-up.",
            table(["server", "requests / min", "first audio p50 s", "first audio p95 s"], rows),
            "Paper estimate: a cluster of N such machines, one replica each, serves N times one replica's "
            "rate (the replicas share nothing; Ray's proxy runs on every node).",
            table(["machines", "requests / min"], estimate),
        ]
    )
    publish_section(args.results, SECTION, markdown)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
