"""`python -m export`: turn a Dia checkpoint and the DAC codec into a dia-ort model folder."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from dia_ort.manifest import FLOAT_DTYPES, QUANTIZED_DTYPES
from export.architecture import PRESETS
from export.dia2_checkpoint import PRESETS as DIA2_PRESETS
from export.dia2_pipeline import dia2_random_sources, export_dia2
from export.families import export_checkpoint_folder
from export.pipeline import DEFAULT_DAC, DEFAULT_MODEL, export_model, random_sources


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m export",
        description="Export Dia (any checkpoint generation and layout) and the DAC codec to ONNX graphs.",
    )
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local checkpoint folder")
    parser.add_argument("--revision", default=None, help="Hub revision of --model")
    parser.add_argument(
        "--dac", default=DEFAULT_DAC, help="Dia's codec: Hub id, HF-layout folder or descript .pth file"
    )
    parser.add_argument(
        "--mimi", help="Dia2's codec: Hub id or folder (default: the checkpoint's, else kyutai/mimi)"
    )
    parser.add_argument("--out", help="output model folder (default: models/<name of --model>)")
    parser.add_argument(
        "--dtype", nargs="+", default=["float32"], choices=FLOAT_DTYPES, help="precision variants"
    )
    parser.add_argument(
        "--quantize", nargs="+", default=[], choices=QUANTIZED_DTYPES, help="quantized CPU variants"
    )
    parser.add_argument(
        "--random-init",
        metavar="{" + ",".join([*PRESETS, *DIA2_PRESETS]) + ",CONFIG.json}",
        help="random weights of this architecture instead of a checkpoint (offline tests and benchmarks)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-init")
    parser.add_argument(
        "--outlier-channels",
        type=int,
        default=0,
        metavar="N",
        help="with --random-init: N hidden channels of the decoder's norms 20-50x larger (activation outliers)",
    )
    args = parser.parse_args(argv)
    if args.outlier_channels < 0 or (args.outlier_channels and not args.random_init):
        parser.error("--outlier-channels takes a count of 0 or more, with --random-init")
    if args.out is None:
        if args.random_init:
            parser.error("--random-init needs --out DIR")
        args.out = str(Path("models") / Path(args.model.rstrip("/")).name)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    began = time.perf_counter()
    try:
        dtypes = tuple(args.dtype) + tuple(args.quantize)
        if args.random_init in DIA2_PRESETS:
            export_dia2(dia2_random_sources(args.random_init, args.seed), args.out, dtypes)
        elif args.random_init:
            sources = random_sources(args.random_init, args.seed, outlier_channels=args.outlier_channels)
            export_model(sources, args.out, dtypes)
        else:
            export_checkpoint_folder(args.model, args.revision, args.mimi, args.dac, args.out, dtypes)
    except (ValueError, FileNotFoundError, ConnectionError) as exc:
        print(f"export failed: {exc}", file=sys.stderr)
        return 2
    print(f"exported to {args.out} in {time.perf_counter() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
