"""`python -m bench.serve`: the speech server under 1, 4, 8 and 16 concurrent clients.

For each model size and variant (and each Dia2 folder of `--dia2`, whose requests run as long as the
model speaks the text), `dia-ort serve` runs in a subprocess on a loopback port; C clients
(bench.load's) each stream one request at once. Reported: audio seconds produced per wall second over the
round (the server's throughput) and the time from sending a request to its first audio bytes, p50
and p95, each the median over `--rounds` rounds: one client's round is a single request, whose first
audio took 2.51 to 3.08 s from round to round on one server (full int8), too loose for a ratio from one
round. The table replaces the serving section of bench/RESULTS.md (or of --results).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
from pathlib import Path

from bench.exports import ensure_export
from bench.load import run_load
from bench.machine import Machine, describe, physical_cores
from bench.process import REPO
from bench.report import number, publish_section, table
from bench.server import Server
from dia_ort.manifest import Manifest

SIZES = {"tiny": ("float32",), "full": ("int8", "int4")}
FRAMES = {"tiny": 200, "full": 129}  # per request; full: 1.5 s of audio, so 16 clients finish
CLIENTS = (1, 4, 8, 16)
ROUNDS = 3
SECTIONS = {"dia": "serve", "dia2": "serve_dia2"}  # each family's table, a section of its own


def median_round(url: str, clients: int, frames: int | None, rounds: int) -> dict:
    """`rounds` rounds of C clients: the median of each figure."""
    results = [round_of(url, clients, frames) for _ in range(rounds)]
    return {key: statistics.median(r[key] for r in results) for key in results[0]}


def round_of(url: str, clients: int, frames: int | None) -> dict:
    """C clients at once, one request each."""
    report = asyncio.run(
        run_load(url, None, clients, 3600, frames, max_requests=1, kinds=("speech",), timeout=3600)
    )
    completed = report.completed()
    if len(completed) != clients:
        raise RuntimeError(f"{clients - len(completed)} of {clients} requests failed: {report.statuses()}")
    summary = report.summary()
    return {
        "clients": clients,
        "audio_per_wall": sum(o.audio_bytes / 2 / 24000 for o in completed) / report.wall,
        "first_p50": summary["first_audio_p50"],
        "first_p95": summary["first_audio_p95"],
        "wall": report.wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="*", choices=sorted(SIZES), default=list(SIZES))
    parser.add_argument("--clients", nargs="+", type=int, default=list(CLIENTS))
    parser.add_argument("--frames", type=int, help="frames per request (default: tiny 200, full 129)")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="rounds per client count (medians)")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    parser.add_argument("--dia2", nargs="+", type=Path, default=[], help="exported Dia2 folders to serve too")
    args = parser.parse_args(argv)
    machine = describe(physical_cores(), "cpu")
    served = []  # (family, label, folder, variants, frames per request, frames of the warm-up)
    for size in args.sizes:
        folder = (REPO / "models" / f"bench-{size}").resolve()
        ensure_export(size, folder, 0, SIZES[size], re_export=False)
        served.append(("dia", size, folder, SIZES[size], args.frames or FRAMES[size], 20))
    for folder in args.dia2:
        variants = tuple(sorted(Manifest.load(folder).variants))
        served.append(("dia2", folder.name, folder.resolve(), variants, None, None))
    rows: dict[str, list[list[str]]] = {}
    for family, label, folder, variants, frames, warm_up in served:
        for variant in variants:
            batch = str(max(args.clients))
            flags = ("--dtype", variant, "--max-batch", batch, "--max-queue", str(4 * int(batch)))
            server = Server(folder, *flags, timeout=600)
            url = server.url
            try:
                round_of(url, 1, warm_up)
                for clients in args.clients:
                    result = median_round(url, clients, frames, args.rounds)
                    print(f"{label} {variant}: {result}", file=sys.stderr)
                    rows.setdefault(family, []).append(
                        [label, variant, str(clients), number(result["audio_per_wall"])]
                        + [number(result["first_p50"]), number(result["first_p95"]), number(result["wall"])]
                    )
            finally:
                server.stop()
    for family, family_rows in rows.items():
        publish_section(args.results, SECTIONS[family], _section(family, machine, family_rows, args.rounds))
    return 0


def _section(family: str, machine: Machine, rows: list[list[str]], rounds: int) -> str:
    title = "Serving" if family == "dia" else "Serving Dia2"
    length = "" if family == "dia" else " Dia2 requests run as long as the model speaks the load's text."
    same_text = " (on the CPU its unconditional row is encoded once and kept, `batching.HostRows`)"
    same_text = same_text if family == "dia" else ""
    header = ["model", "variant", "clients", "audio s / wall s", "first audio p50 s", "first audio p95 s"]
    return "\n\n".join(
        [
            f"## {title} (`python -m bench.serve`)",
            f"{machine.date}, {machine.cpu}, {machine.physical_cores} cores. `dia-ort serve` on loopback with "
            "`--max-batch` the largest client count; C clients each stream one request (pcm, seeded "
            f"sampling) at once, all with the same text{same_text}. audio s / wall s is the round's audio over "
            "its wall time; time to first audio runs from sending a request to its first bytes. Each figure "
            f"is the median of {rounds} rounds.{length}",
            table([*header, "wall s"], rows),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
