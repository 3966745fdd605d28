"""`python -m bench`: dia-ort against transformers' Dia on the same random weights, per model size,
and Dia2's shapes beside it (`--dia2`).

Each measurement runs in a child process: the export, the runtime (one per variant, with torch
blocked), the reference (torch), the quantization accuracy, the DAC codec and each Dia2 variant
(bench/dia2_speed.py). This process only orchestrates and writes the report.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

import numpy as np

from bench.exports import QUANTIZED, ensure_export
from bench.machine import describe, physical_cores
from bench.measure import TEXT, EngineResult
from bench.process import REPO, run_child
from bench.report import SizeResult, accuracy_table, dac_table, dia2_table, kept_sections, marked, render
from bench.roofline import floor_ms, step_floor_bytes, step_weight_bytes, text_kv_bytes
from dia_ort.manifest import Manifest
from dia_ort.text import encode_text

SIZES = ("tiny", "mid", "full")
DEVICE_VARIANTS = {"cpu": ("float32", *QUANTIZED), "cuda": ("float16", "bfloat16", "float32")}
REFERENCE_DTYPES = {"cpu": ("float32",), "cuda": ("float16", "bfloat16")}  # transformers' precisions
BATCHES = (1, 4, 16)
BATCH_STEPS = {"tiny": 200, "mid": 100, "full": 30}  # full: enough for a steady state, few enough to finish
STREAM_FRAMES = {"tiny": 200, "mid": 258, "full": 258}  # frames of the streaming run (full: 3 s of audio)
PROMPT_SECONDS = {"tiny": 0.3, "mid": 10.0, "full": 10.0}  # its voice prompt (the tiny window holds 0.4 s)
ACCURACY_STEPS = 200  # the issue asks for 200 steps of text
DAC_SECONDS = 5.0  # audio decoded and encoded per timed run
DIA2_PRESETS = ("dia2-tiny", "dia2-bench", "dia2-conversion-default")  # export/dia2_checkpoint.py
DIA2_VARIANTS = ("float32", "int8")
DIA2_SECTION = "dia2"  # its marked section of the results, kept by a run with no --dia2
RESULTS = REPO / "bench" / "RESULTS.md"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", choices=SIZES, default=list(SIZES))
    parser.add_argument(
        "--device",
        choices=sorted(DEVICE_VARIANTS),
        default="cpu",
        help="where both engines run; cuda measures float16/bfloat16, with and without CUDA graphs",
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        choices=sorted({v for vs in DEVICE_VARIANTS.values() for v in vs}),
        help="precision variants (default: the device's; those the folder lacks are noted)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed single-row steps at each position")
    parser.add_argument(
        "--batch-steps",
        type=int,
        help="max_new_tokens of the batch runs (default: tiny 200, mid 100, full 30)",
    )
    parser.add_argument("--skip-reference", action="store_true", help="do not measure transformers")
    parser.add_argument("--skip-dac", action="store_true", help="do not measure the DAC codec")
    parser.add_argument("--skip-stream", action="store_true", help="do not measure generate_stream")
    parser.add_argument(
        "--stream-frames", type=int, help="frames of the streaming run (default: tiny 200, mid and full 258)"
    )
    parser.add_argument(
        "--dia2",
        nargs="*",
        choices=DIA2_PRESETS,
        help="Dia2 shapes measured beside Dia on the CPU, float32 and int8 (default: dia2-bench on the "
        "CPU, none on cuda; none: skip Dia2)",
    )
    parser.add_argument("--re-export", action="store_true", help="export even where a finished folder exists")
    parser.add_argument(
        "--models", type=Path, default=REPO / "models", help="where the bench-SIZE folders are kept"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="markdown file to write")
    parser.add_argument("--threads", type=int, default=physical_cores(), help="threads of every engine")
    parser.add_argument("--seed", type=int, default=0, help="seed of --random-init (and of the reference)")
    parser.add_argument(
        "--model-folder",
        type=Path,
        help="use this exported folder (one size only) instead of MODELS/bench-SIZE",
    )
    args = parser.parse_args(argv)
    if args.model_folder and len(args.sizes) != 1:
        parser.error("--model-folder needs exactly one --sizes")
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1")
    if args.dia2 is None:
        args.dia2 = [] if args.device == "cuda" else ["dia2-bench"]
    elif args.dia2 and args.device == "cuda":  # bench/dia2_speed.py runs Dia2 on the CPU only
        parser.error("--dia2 measures Dia2 on the CPU; on --device cuda pass --dia2 with no shape")
    return args


def bench_size(size: str, args: argparse.Namespace, bandwidth: float) -> SizeResult:
    """Export (or reuse) the `size` model, then measure each variant, the reference, the extras."""
    folder = (args.model_folder or args.models / f"bench-{size}").resolve()
    wanted = tuple(args.variants or DEVICE_VARIANTS[args.device])
    manifest, export = ensure_export(size, folder, args.seed, wanted, args.re_export)
    result = SizeResult(size=size, folder=folder, export=export)
    variants = [v for v in wanted if v in manifest.variants]
    if len(variants) < len(wanted):
        result.notes.append(
            f"Not measured: {[v for v in wanted if v not in variants]}, not in the folder (it has "
            f"{sorted(manifest.variants)}); `--re-export` writes them."
        )
    logits = {}
    for variant in variants:
        logits[variant] = bench_variant(result, manifest, variant, args, bandwidth)
        if args.device == "cuda":
            bench_variant(result, manifest, variant, args, bandwidth, cuda_graph=True)
    if not args.skip_reference and result.engines:
        for dtype in REFERENCE_DTYPES[args.device]:
            bench_reference(result, args, bandwidth, dtype, logits.get(dtype))
    if variants:
        graph = folder / manifest.variants[variants[0]]["decoder_step"].file.path
        longest = manifest.model.text_length
        # the bench's text, a long one and the longest the model takes
        lengths = {len(encode_text(TEXT, longest)), min(300, longest), longest}
        result.text_kv_bytes = {n: text_kv_bytes(graph, n) for n in sorted(lengths)}
    quantized = [v for v in variants if v in QUANTIZED]
    if quantized:
        result.sections.append(accuracy_section(folder, quantized))
    return result


def bench_variant(
    result: SizeResult,
    manifest: Manifest,
    variant: str,
    args: argparse.Namespace,
    bandwidth: float,
    cuda_graph: bool = False,
) -> np.ndarray:
    """Measure one variant in a torch-free child; add it to `result`; return its first logits.

    The floor (weight bytes / the host's read bandwidth) is a CPU figure, so only CPU rows get one.
    """
    argv = ["-m", "bench.torch_free", "bench.dia_speed", str(result.folder), "--variant", variant]
    argv += ["--device", args.device] + (["--cuda-graph"] if cuda_graph else [])
    argv += ["--threads", str(args.threads), "--steps", str(args.steps), "--batches", *map(str, BATCHES)]
    argv += ["--batch-steps", str(args.batch_steps or BATCH_STEPS[result.size])]
    argv += [
        "--stream-frames",
        str(0 if args.skip_stream else args.stream_frames or STREAM_FRAMES[result.size]),
        "--prompt-seconds",
        str(PROMPT_SECONDS[result.size]),
    ]
    measured = run_child(argv, f"dia-ort {variant} on {args.device} ({result.folder})").result
    engine = EngineResult.from_dict(measured["engine"])
    graph = result.folder / manifest.variants[variant]["decoder_step"].file.path
    weights = step_weight_bytes(graph)
    result.engines.append(engine)
    result.weight_bytes[variant] = weights
    if args.device == "cpu":
        text_bytes = len(encode_text(TEXT, manifest.model.text_length))
        result.floor_ms[engine.name] = tuple(
            floor_ms(step_floor_bytes(graph, weights, text_bytes, p), bandwidth) for p in engine.positions
        )
    result.batches[engine.name] = measured["batches"]
    if measured["stream"]:
        result.streams[engine.name] = measured["stream"]
    return np.asarray(measured["logits"])


def bench_reference(
    result: SizeResult,
    args: argparse.Namespace,
    bandwidth: float,
    dtype: str,
    our_logits: np.ndarray | None,
) -> None:
    """Measure transformers' Dia in `dtype` at the positions the runtime used, on the folder's weights.

    `our_logits`: the runtime's first logits in the same precision, to check both run the same weights.
    """
    seed = weights_seed(result.folder, args.seed)
    positions = result.engines[0].positions
    argv = ["-m", "bench.torch_speed", result.size, "--seed", str(seed), "--positions", *map(str, positions)]
    argv += ["--threads", str(args.threads), "--steps", str(args.steps)]
    argv += ["--device", args.device, "--dtype", dtype]
    measured = run_child(argv, f"transformers' Dia ({result.size}, {dtype} on {args.device})").result
    engine = EngineResult.from_dict(measured["engine"])
    result.engines.append(engine)
    ours = next((e.name for e in result.engines if e.name == f"dia-ort {dtype}"), None)
    if args.device == "cpu" and ours in result.floor_ms:  # the same bytes to read, on the same weights
        result.floor_ms[engine.name] = result.floor_ms[ours]
    if our_logits is not None:
        reference = np.asarray(measured["logits"])
        scale = max(1.0, float(np.abs(reference).max()))  # relative, as the export's verification
        result.logits_error[dtype] = float(np.abs(reference - our_logits).max()) / scale


def accuracy_section(folder: Path, variants: list[str]) -> str:
    """Teacher-forced agreement of the quantized variants with float32 (export/quant_accuracy.py)."""
    argv = ["-m", "bench.accuracy", str(folder), "--variants", *variants, "--steps", str(ACCURACY_STEPS)]
    return accuracy_table(run_child(argv, "quantization accuracy").result["accuracy"])


def dac_section(folder: Path, seed: int, device: str) -> str:
    """DAC decode and encode speed against transformers' DacModel, by bench/dac_speed.py.

    Every exported folder holds the real-shape DAC of `random_dac(seed)`, so one size is enough.
    """
    argv = ["-m", "bench.dac_speed", "--folder", str(folder), "--seed", str(seed)]
    argv += ["--seconds", str(DAC_SECONDS), "--device", device]
    return dac_table(json.loads(run_child(argv, "DAC speed", json_out=False).stdout))


def dia2_section(preset: str, args: argparse.Namespace, date: str) -> str:
    """A Dia2 shape's frame against its floor, realtime factor and first audio, per variant, measured
    at `date` (the section stays in later reports that skip Dia2)."""
    folder = (args.models / f"bench-{preset}").resolve()
    _, export = ensure_export(preset, folder, args.seed, DIA2_VARIANTS, args.re_export)
    rows = []
    for variant in DIA2_VARIANTS:
        argv = ["-m", "bench.torch_free", "bench.dia2_speed", str(folder), "--dtype", variant]
        argv += ["--threads", str(args.threads)]
        rows.append(run_child(argv, f"Dia2 {preset} {variant}").result)
    argv = ["-m", "bench.torch_free", "bench.dia2_accuracy", str(folder), "--threads", str(args.threads)]
    return dia2_table(preset, date, export, rows, run_child(argv, f"Dia2 {preset} int8 accuracy").result)


def weights_seed(folder: Path, default: int) -> int:
    """The seed of the folder's random weights: as a `--random-init` export records it, else `default`."""
    return int(Manifest.load(folder).source.get("seed", default))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    machine = describe(args.threads, args.device)
    results = [bench_size(size, args, machine.bandwidth) for size in args.sizes]
    first = results[0].folder
    dac = (
        "DAC: not measured (--skip-dac)."
        if args.skip_dac
        else dac_section(first, weights_seed(first, args.seed), args.device)
    )
    dia2 = (
        [marked(DIA2_SECTION, "\n\n".join(dia2_section(p, args, machine.date) for p in args.dia2))]
        if args.dia2
        else []
    )
    kept = kept_sections(args.results, (DIA2_SECTION,) if args.dia2 else ())  # e.g. bench.serve's table
    markdown = render(machine, shlex.join(["python", "-m", "bench", *argv]), results, [*dia2, dac, *kept])
    print(markdown)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(markdown)
    print(f"written to {args.results}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
