"""The benchmark's results as markdown: printed, and written to bench/RESULTS.md."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from bench.exports import ExportRun
from bench.machine import Machine
from bench.measure import FRAMES_PER_SECOND, PREFILL_ROWS, EngineResult

GB = 1e9
BUSY_LOAD = 0.25  # load average per core above which the report warns
# The largest relative first-step logits difference of two engines on the same weights, by precision
# (the export's verification tolerances: half precision rounds differently in torch and ONNX Runtime)
SAME_WEIGHTS = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 6e-2}


@dataclass
class SizeResult:
    """Everything measured on one model size."""

    size: str
    folder: Path
    export: ExportRun
    engines: list[EngineResult] = field(default_factory=list)
    # engine name -> ms a step at each measured position needs to read its bytes (weights, text K/V, cache)
    floor_ms: dict[str, tuple[float, ...]] = field(default_factory=dict)
    weight_bytes: dict[str, int] = field(default_factory=dict)  # variant -> decoder step weight bytes
    text_kv_bytes: dict[int, int] = field(default_factory=dict)  # text bytes -> cross K/V a step reads
    batches: dict[str, list[dict]] = field(default_factory=dict)  # engine name -> batch rows
    streams: dict[str, dict] = field(default_factory=dict)  # engine name -> generate_stream figures
    # precision -> max |logits| difference / max(1, max |logits|), reference vs dia-ort
    logits_error: dict[str, float] = field(default_factory=dict)
    sections: list[str] = field(default_factory=list)  # further markdown (quantization accuracy)
    notes: list[str] = field(default_factory=list)


SECTION_MARK = re.compile(r"<!-- (\w+) -->\n.*?\n<!-- /\1 -->", re.DOTALL)


def marked(name: str, markdown: str) -> str:
    """`markdown` between `<!-- name -->` markers: a section a later run finds and replaces."""
    return f"<!-- {name} -->\n{markdown}\n<!-- /{name} -->"


def replace_section(path: Path, name: str, markdown: str) -> None:
    """Put `markdown` between the file's `<!-- name -->` markers (appended when it has none), so a
    benchmark of its own (`python -m bench.serve`) updates its part of the results file alone."""
    block = marked(name, markdown)
    text = path.read_text() if path.exists() else ""
    match = next((m for m in SECTION_MARK.finditer(text) if m.group(1) == name), None)
    if match:
        text = text[: match.start()] + block + text[match.end() :]
    else:
        text = text.rstrip("\n") + ("\n\n" if text else "") + block + "\n"
    path.write_text(text)


def publish_section(path: Path, name: str, markdown: str) -> None:
    """Print a benchmark's own section and put it into the results file (`replace_section`)."""
    print(markdown)
    replace_section(path, name, markdown)
    print(f"written to {path}", file=sys.stderr)


def kept_sections(path: Path, rewritten: tuple[str, ...] = ()) -> list[str]:
    """The marked sections of an existing results file, which `python -m bench` keeps when it rewrites
    it, but for those named in `rewritten` (it writes them anew)."""
    text = path.read_text() if path.exists() else ""
    return [m.group(0) for m in SECTION_MARK.finditer(text) if m.group(1) not in rewritten]


def number(value: float | None, digits: int = 3) -> str:
    """`digits` significant digits without an exponent; a dash for a missing value."""
    if value is None:
        return "–"
    if value == 0 or not math.isfinite(value):
        return str(value)
    decimals = max(0, digits - 1 - math.floor(math.log10(abs(value))))
    return f"{value:.{decimals}f}"


def table(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table of already formatted cells."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


def _gb(value: int | None) -> str:
    return number(None if value is None else value / GB)


def engine_table(result: SizeResult) -> str:
    """One row per engine: the per-phase times, speed, floor and memory."""
    positions = result.engines[0].positions
    header = [
        "engine",
        "threads",
        "load s",
        "encoder ms",
        *(f"prefill {n} row{'s' * (n > 1)} ms" for n in PREFILL_ROWS),
        *(f"step @{p} ms" for p in positions),
        "steps/s",
        "RTF",
        *(f"floor @{p} ms" for p in positions),
        *(f"step / floor @{p}" for p in positions),
        "load peak GB",
        "run peak GB",
    ]
    rows = []
    for e in result.engines:
        floors = result.floor_ms.get(e.name) or (None,) * len(positions)
        rows.append(
            [
                e.name,
                str(e.threads),
                number(e.load_s),
                number(e.encoder_ms),
                *map(number, e.prefill_ms),
                *map(number, e.step_ms),
                number(e.steps_per_s),
                number(e.realtime_factor),
                *map(number, floors),
                *(number(None if f is None else step / f) for step, f in zip(e.step_ms, floors, strict=True)),
                _gb(e.load_peak_rss),
                _gb(e.run_peak_rss),
            ]
        )
    return table(header, rows)


def batch_table(batches: dict[str, list[dict]]) -> str:
    """One row per engine and batch size: steady-state step time and audio seconds per wall second."""
    header = ["engine", "batch", "max_new_tokens", "step ms", "audio s / wall s", "peak GB"]
    rows = [
        [
            name,
            str(b["batch"]),
            str(b["max_new_tokens"]),
            number(b["step_ms"]),
            number(b["audio_per_wall"]),
            _gb(b["peak_rss"]),
        ]
        for name, runs in batches.items()
        for b in runs
    ]
    return table(header, rows)


def stream_table(streams: dict[str, dict]) -> str:
    """One row per engine: time to first audio of `generate_stream` and the stream's realtime factor."""
    header = [
        "engine",
        "frames",
        "first chunk frames",
        "steps to first audio",
        "time to first audio s",
        "stream RTF",
        "generate RTF",
        "voice prompt s",
        "time to first audio with it s",
        "its encoding s",
        "with / without",
        "the same voice again s",
        "again / without",
    ]
    rows = [
        [
            name,
            str(s["frames"]),
            str(s["first_chunk_frames"]),
            str(s["steps_to_first_audio"]),
            number(s["first_audio_s"]),
            number(s["stream_rtf"]),
            number(s["generate_rtf"]),
            *(
                [number(s["prompt_seconds"]), number(s["first_audio_prompt_s"]), number(s["prompt_encode_s"])]
                + [number(s["first_audio_prompt_s"] / s["first_audio_s"])]
                + [
                    number(s["first_audio_prompt_again_s"]),
                    number(s["first_audio_prompt_again_s"] / s["first_audio_s"]),
                ]
                if "prompt_seconds" in s
                else ["–"] * 6
            ),
        ]
        for name, s in streams.items()
    ]
    return table(header, rows)


def _speedups(result: SizeResult) -> list[str]:
    """How many times faster each dia-ort engine is than the reference of its precision, by phase."""
    references = {e.precision: e for e in result.engines if e.name.startswith("transformers")}
    lines = []
    for ours in result.engines:
        reference = references.get(ours.precision)
        if reference is None or ours is reference:
            continue
        phases = [("encoder", reference.encoder_ms / ours.encoder_ms)]
        phases += [
            (f"prefill {n}", r / o)
            for n, r, o in zip(PREFILL_ROWS, reference.prefill_ms, ours.prefill_ms, strict=True)
        ]
        phases += [
            (f"step @{p}", r / o)
            for p, r, o in zip(ours.positions, reference.step_ms, ours.step_ms, strict=True)
        ]
        lines.append(
            f"{ours.name} vs {reference.name} (times faster): "
            + ", ".join(f"{name} {number(ratio)}x" for name, ratio in phases)
            + "."
        )
    return lines


def size_section(result: SizeResult) -> str:
    """The markdown of one model size: its export, its tables and what they mean."""
    export = result.export
    if export.seconds is None:
        made = "an existing export, not timed here"
    else:
        how = "reused; its export" if export.reused else "exported now"
        made = f"{how}: `{export.command}`, {number(export.seconds)} s, peak RSS {_gb(export.peak_rss)} GB"
    parts = [f"## {result.size}", f"Model folder `{result.folder}` ({made})."]
    if result.engines:
        parts.append(engine_table(result))
    weights = ", ".join(f"{v} {number(b / 1e6)} MB" for v, b in result.weight_bytes.items())
    if weights:
        parts.append(f"Decoder weights read per step (embedding tables excluded): {weights}.")
    if result.text_kv_bytes:
        texts = ", ".join(f"{number(b / 1e6)} MB for {n} text bytes" for n, b in result.text_kv_bytes.items())
        parts.append(f"The text's cross-attention K/V a step reads, in every variant: {texts}.")
    parts += _speedups(result)
    for precision, error in result.logits_error.items():
        same = error < SAME_WEIGHTS[precision]
        parts.append(
            f"{'Same weights' if same else '**Not the same weights**'}: the first step's logits of dia-ort "
            f"{precision} and transformers {precision} differ by at most {error:.2g} of their scale."
        )
    if result.batches:
        parts += [
            "Batch throughput: `generate_codes` on N copies of the text; step ms is the median time "
            "between steps (steady state); audio s / wall s = N / (86.13 x step s).",
            batch_table(result.batches),
        ]
    if result.streams:
        parts += [
            "Streaming: `generate_stream` with the default chunks. Time to first audio runs from the call "
            "(text, encoder, prefill included) to the first chunk, median of 3 after a warm-up, each as a "
            "text of a length not seen before (the engine's kept unconditional rows cleared); the first "
            "chunk needs max_delay + the codec's first decode block (18 frames on the CPU, 64 on CUDA) in steps. RTF is audio "
            "seconds over wall seconds for the whole request, for the stream and for a plain `generate`. "
            "With a voice prompt given as a waveform, the codec encodes it and its frames are prefilled "
            "(PREFILL_CHUNK rows a call) before the first step; its encoding is timed alone too. The same "
            "voice again: a later call with that clip, whose codes the model kept (`Dia.encode_audio`), so "
            "the codec's encoding is skipped and the text encoder and the prefill remain.",
            stream_table(result.streams),
        ]
    return "\n\n".join(parts + result.sections + result.notes)


def render(machine: Machine, command: str, results: list[SizeResult], sections: list[str]) -> str:
    """The whole report: the machine, one section per size, then `sections` (markdown)."""
    versions = ", ".join(f"{p} {v}" for p, v in machine.versions.items())
    busy = machine.load_average > BUSY_LOAD * machine.logical_cores
    warning = (
        f"**The machine was busy** (load {machine.load_average:.1f} on {machine.logical_cores} cores): "
        "timings are pessimistic, torch's multi-threaded ones especially."
    )
    header = [
        "# dia-ort benchmark",
        f"Reproduce: `{command}`",
        f"- date: {machine.date}\n"
        f"- CPU: {machine.cpu}, {machine.physical_cores} cores ({machine.logical_cores} logical), "
        f"{number(machine.ram_bytes / GB)} GB RAM; 1-minute load average at the start {machine.load_average:.1f}\n"
        f"- memory read bandwidth: {number(machine.bandwidth / GB)} GB/s ({machine.threads} threads)\n"
        + (f"- GPU: {machine.gpu}\n" if machine.gpu else "")
        + f"- Python {machine.python}; {versions}",
        *([warning] if busy else []),
        "Times are medians. steps/s = 1000 / mean(step ms at the early and late positions); RTF = steps/s "
        f"/ {FRAMES_PER_SECOND:.2f} (above 1 is faster than real time). Each step is a CFG pair (2 rows). "
        "floor = the bytes a step must read / read bandwidth: the decoder weights (one row of each "
        "embedding table per token), the text's cross-attention K/V and the cache up to the position, for "
        "both CFG rows. dia-ort's encoder time is `decoding.encoded_rows` "
        "(encoder, cross-attention K/V and cache allocation) for a text of a length not seen before (on "
        "the CPU one seen before skips its unconditional row, `batching.HostRows`); transformers computes "
        "its cross K/V in "
        "the first decoder step. Load time includes hashing the files; run peak RSS counts from the "
        "end of loading.",
    ]
    return "\n\n".join(header + [size_section(r) for r in results] + sections) + "\n"


def accuracy_table(rows: list[dict]) -> str:
    """export/quant_accuracy.py's figures: top-1 agreement with float32 and KL, teacher-forced."""
    header = ["variant", "steps", "top-1 agreement", "worst channel", "KL(float32 ‖ variant) nats"]
    body = [
        [
            r["variant"],
            str(r["steps"]),
            number(r["agreement"]),
            number(min(r["channel_agreement"])),
            f"{r['kl']:.2g}",
        ]
        for r in rows
    ]
    return (
        "Quantization accuracy: each variant reads the float32 greedy token stream (teacher-forced) and "
        "is compared with float32 step by step, after guidance and the special-token masks.\n\n"
        + table(header, body)
    )


def speedup(ratio: float) -> str:
    """A time ratio (theirs / ours) in words that read right on both sides of 1."""
    return f"{number(ratio)}x faster" if ratio >= 1 else f"{number(1 / ratio)}x slower"


def dac_table(dac: dict) -> str:
    """bench/dac_speed.py's figures: realtime factors of both codecs and how closely they agree."""
    rows = [
        [name, number(dac[f"{key}_decode_rtf"]), number(dac[f"{key}_encode_rtf"])]
        for name, key in (("dia-ort (ONNX Runtime)", "ort"), ("transformers DacModel (torch eager)", "torch"))
    ]
    return (
        f"## DAC codec ({dac['device']})\n\n{number(dac['audio_seconds'])} s of audio, best of {dac['repeats']} runs; "
        "RTF = audio seconds / wall seconds.\n\n"
        + table(["codec", "decode RTF", "encode RTF"], rows)
        + f"\n\ndia-ort's time against DacModel's: decoding {speedup(dac['decode_speedup'])}, "
        f"encoding {speedup(dac['encode_speedup'])}; decode max relative difference "
        f"{dac['decode_max_rel_error']:.2g}, encode codes equal {number(100 * dac['encode_codes_equal'])} %."
    )


def dia2_table(preset: str, date: str, export: ExportRun, rows: list[dict], accuracy: dict) -> str:
    """bench/dia2_speed.py's figures for one Dia2 shape measured at `date`, a row per variant, and int8's
    agreement with float32 (bench/dia2_accuracy.py)."""
    shape = rows[0]["shape"]
    columns = {  # header -> bench/dia2_speed.py's figure
        "backbone ms": "backbone_ms",
        "stage ms": "stage_ms",
        "Mimi ms/frame": "decode_ms_per_frame",
        "frame ms": "frame_ms",
        "floor ms": "floor_ms",
        "frame / floor": "frame_over_floor",
        "RTF (frame)": "realtime_factor",
        "RTF (generate)": "generate_realtime_factor",
        "first audio s": "first_audio_s",
    }
    header = ["variant", *columns]
    body = [[r["dtype"], *(number(r[key]) for key in columns.values())] for r in rows]
    made = (
        "reused"
        if export.reused
        else f"exported in {number(export.seconds)} s, peak RSS {_gb(export.peak_rss)} GB"
    )
    return (
        f"## Dia2 {preset}: backbone {shape['backbone'][0]} layers x {shape['backbone'][1]}, depformer "
        f"{shape['depformer'][0]} layers x {shape['depformer'][1]}, {shape['stages']} stages\n\n"
        f"{date}. Random weights (`{export.command}`, {made}). A frame (80 ms of audio) is the backbone step, every "
        "depformer stage and Mimi's decode, for the CFG pair; floor = the bytes the frame reads (each "
        "stage its own kernels and the shared MLP again) / read bandwidth. RTF (frame) = 80 ms / frame "
        "ms; RTF (generate) and first audio come from `Dia2.stream` on a long script, warm.\n\n"
        + table(header, body)
        + f"\n\nint8 picks float32's argmax on {number(100 * accuracy['agreement'])} % of its draws, "
        + ", ".join(f"{kind} {number(100 * share)} %" for kind, share in accuracy["by_kind"].items())
        + f", teacher-forced over {accuracy['frames']} frames (`python -m bench.dia2_accuracy`)."
    )
