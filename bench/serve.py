"""`python -m bench.serve`: the speech server under 1, 4, 8 and 16 concurrent clients.

For each model size and variant, `dia-ort serve` runs in a subprocess on a loopback port; C client
threads each stream one request at once. Reported: audio seconds produced per wall second over the
round (the server's throughput) and the time from sending a request to its first audio bytes, p50
and p95. The table replaces the serving section of bench/RESULTS.md (or of --results).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import statistics
import sys
import time
from pathlib import Path

import httpx

from bench.exports import ensure_export
from bench.load import percentile
from bench.machine import describe, physical_cores
from bench.measure import TEXT
from bench.process import REPO
from bench.report import number, publish_section, table
from bench.server import Server

SIZES = {"tiny": ("float32",), "full": ("int8", "int4")}
FRAMES = {"tiny": 200, "full": 129}  # per request; full: 1.5 s of audio, so 16 clients finish
CLIENTS = (1, 4, 8, 16)
SECTION = "serve"


def one_request(url: str, frames: int, seed: int) -> tuple[float, float, int]:
    """Stream one request: (seconds to the first audio bytes, seconds to the end, bytes of pcm)."""
    body = {"model": "dia", "voice": "alloy", "input": TEXT, "response_format": "pcm"}
    body |= {"seed": seed, "max_new_tokens": frames}
    began = time.perf_counter()
    first, size = None, 0
    with httpx.stream("POST", f"{url}/v1/audio/speech", json=body, timeout=3600) as response:
        response.raise_for_status()
        for data in response.iter_bytes():
            first = first or time.perf_counter() - began
            size += len(data)
    return first or float("nan"), time.perf_counter() - began, size


def round_of(url: str, clients: int, frames: int) -> dict:
    """C clients at once, one request each."""
    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda i: one_request(url, frames, seed=i), range(clients)))
    wall = time.perf_counter() - began
    firsts = sorted(first for first, _, _ in runs)
    audio = sum(size / 2 / 24000 for _, _, size in runs)
    return {
        "clients": clients,
        "audio_per_wall": audio / wall,
        "first_p50": statistics.median(firsts),
        "first_p95": percentile(firsts, 0.95),
        "wall": wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=sorted(SIZES), default=list(SIZES))
    parser.add_argument("--clients", nargs="+", type=int, default=list(CLIENTS))
    parser.add_argument("--frames", type=int, help="frames per request (default: tiny 200, full 129)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    machine = describe(physical_cores(), "cpu")
    rows = []
    for size in args.sizes:
        folder = (REPO / "models" / f"bench-{size}").resolve()
        ensure_export(size, folder, 0, SIZES[size], re_export=False)
        for variant in SIZES[size]:
            batch = str(max(args.clients))
            flags = ("--dtype", variant, "--max-batch", batch, "--max-queue", str(4 * int(batch)))
            server = Server(folder, *flags, timeout=600)
            url = server.url
            try:
                round_of(url, 1, 20)  # warm-up
                for clients in args.clients:
                    result = round_of(url, clients, args.frames or FRAMES[size])
                    print(f"{size} {variant}: {result}", file=sys.stderr)
                    rows.append(
                        [size, variant, str(clients), number(result["audio_per_wall"])]
                        + [number(result["first_p50"]), number(result["first_p95"]), number(result["wall"])]
                    )
            finally:
                server.stop()
    markdown = "\n\n".join(
        [
            "## Serving (`python -m bench.serve`)",
            f"{machine.date}, {machine.cpu}, {machine.physical_cores} cores. `dia-ort serve` on loopback with "
            "`--max-batch` the largest client count; C clients each stream one request (pcm, seeded "
            "sampling) at once. audio s / wall s is the round's audio over its wall time; time to first "
            "audio runs from sending a request to its first bytes.",
            table(
                [
                    "model",
                    "variant",
                    "clients",
                    "audio s / wall s",
                    "first audio p50 s",
                    "first audio p95 s",
                    "wall s",
                ],
                rows,
            ),
        ]
    )
    publish_section(args.results, SECTION, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
