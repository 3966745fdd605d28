"""`python -m bench.overhead`: the fixed cost of a decoder step, on a model whose layers cost nothing.

A step's time is what it reads from memory plus a fixed cost per step: Python, input binding, and
ONNX Runtime's dispatch of every node. The fixed cost is measured on the one-layer tiny model
(`export.architecture.ONE_LAYER`): the median of the runtime's own one-row CFG step
(the runtime's cache rows, logits back on the host) at position 20. Runs without torch; the table replaces
the overhead section of bench/RESULTS.md (or of --results).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import onnx

from bench.exports import ensure_export
from bench.machine import describe, physical_cores
from bench.measure import EARLY_POSITION, TEXT, RowsStepper, random_codes, step_ms
from bench.process import REPO
from bench.report import number, publish_section, table
from dia_ort.decoding import encoded_rows
from dia_ort.engine import Device, Engine
from dia_ort.item import cfg_text_rows
from dia_ort.manifest import Manifest
from dia_ort.text import encode_text

VARIANTS = ("float32", "int8", "int4")
SECTION = "overhead"


def step_overhead(folder: Path, manifest: Manifest, variant: str, threads: int, steps: int) -> float:
    """Median milliseconds of one-row CFG steps at position 20 and on."""
    engine = Engine(folder, manifest, variant, Device.parse("cpu", threads))
    ids, mask = cfg_text_rows([encode_text(TEXT, manifest.model.text_length)])
    rows = EARLY_POSITION + steps
    stepper = RowsStepper(encoded_rows(engine, ids, mask, slots=rows))
    return step_ms(stepper, random_codes(2, rows, manifest.model.num_channels), EARLY_POSITION, steps)


def node_count(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=physical_cores())
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--re-export", action="store_true", help="export the model again")
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    folder = (REPO / "models" / "bench-one-layer").resolve()
    manifest, _ = ensure_export("one-layer", folder, 0, VARIANTS, args.re_export)
    rows = []
    for variant in VARIANTS:
        ms = step_overhead(folder, manifest, variant, args.threads, args.steps)
        nodes = node_count(folder / manifest.variants[variant]["decoder_step"].file.path)
        print(f"{variant}: {ms:.3f} ms per step, {nodes} nodes", file=sys.stderr)
        rows.append([variant, str(nodes), number(ms)])
    machine = describe(args.threads, "cpu")
    markdown = "\n\n".join(
        [
            "## Fixed cost of a step (`python -m bench.overhead`)",
            f"{machine.date}, {machine.cpu}, {args.threads} threads. The one-layer tiny model, so a step "
            "costs only its overhead: Python, binding and dispatch. Median of "
            f"{args.steps} one-row CFG steps (the runtime's cache rows) from position {EARLY_POSITION}; "
            "nodes: the exported step graph.",
            table(["variant", "graph nodes", "step ms"], rows),
        ]
    )
    publish_section(args.results, SECTION, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
