"""The runtime's speed on one variant of an exported folder, without torch.

Run as `python -m bench.torch_free bench.dia_speed FOLDER --variant V [--device cuda [--cuda-graph]]
--threads N --steps N [--stream-frames N] --out FILE`; writes the `EngineResult`, the batch
throughput, the streaming figures, and the first step's logits (to check that the reference runs the
same weights).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from bench.measure import (
    FRAMES_PER_SECOND,
    SEED,
    TEXT,
    EngineResult,
    RowsStepper,
    decoder_times,
    median_ms,
    peak_rss,
    reset_peak_rss,
    step_positions,
)
from dia_ort import Dia, GenerationOptions
from dia_ort.decoding import encoded_rows
from dia_ort.generation import Generation
from dia_ort.item import cfg_text_rows
from dia_ort.progress import steady_step_seconds
from dia_ort.text import encode_text


def load(folder: Path, variant: str, device: str, threads: int) -> tuple[Dia, float]:
    """The model as a user opens it, and the seconds that took (hash checks included)."""
    began = time.perf_counter()
    dia = Dia(folder, compute_dtype=variant, device=device, threads=threads)
    if dia.compute_dtype != variant:
        raise SystemExit(f"{variant} does not run on {device} (the runtime chose {dia.compute_dtype})")
    return dia, time.perf_counter() - began


def default_slots(dia: Dia, text: np.ndarray) -> int:
    """The cache rows a `generate()` with default options allocates for `text`.

    A window shorter than its 2048 frames (the tiny model's) clamps them with a warning, expected here.
    """
    logger = logging.getLogger("dia_ort.item")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        (item,) = Generation(dia.engine, [text], [None], GenerationOptions()).items
        return item.slots
    finally:
        logger.setLevel(level)


def single_request(
    dia: Dia, name: str, threads: int, load_s: float, steps: int, cuda_graph: bool
) -> tuple[EngineResult, np.ndarray]:
    """Per-phase times of one CFG request on `TEXT`, and the BOS step's logits `[2, C, V]`."""
    load_peak = peak_rss()
    reset_peak_rss()
    config = dia.config
    text = encode_text(TEXT, config.text_length)
    ids, mask = cfg_text_rows([text])
    slots = default_slots(dia, text)
    positions = step_positions(slots, steps)

    def encode() -> None:
        dia.engine.unconditional_rows.clear()  # timed as a text of a length not seen before
        encoded_rows(dia.engine, ids, mask, slots, graph=cuda_graph).close()

    encoder_ms = median_ms(encode)
    stepper = RowsStepper(encoded_rows(dia.engine, ids, mask, slots, graph=cuda_graph))
    logits = stepper.step(np.full((2, 1, config.num_channels), config.bos_id), 0)
    prefill_ms, step_ms = decoder_times(stepper, config.num_channels, positions, steps)
    result = EngineResult(
        name=name,
        precision=dia.compute_dtype,
        threads=threads,
        encoder_ms=encoder_ms,
        prefill_ms=prefill_ms,
        positions=positions,
        step_ms=step_ms,
        load_s=load_s,
        load_peak_rss=load_peak,
        run_peak_rss=peak_rss(),
    )
    return result, logits


def batch_throughput(dia: Dia, batch: int, steps: int, cuda_graph: bool) -> dict:
    """Steady-state speed of `generate_codes` on `batch` texts: the median time between steps."""
    reset_peak_rss()
    request = dict(max_new_tokens=steps, seed=SEED, use_torch_compile=cuda_graph)
    step_s = steady_step_seconds(dia.generate_codes, [TEXT] * batch, **request)
    return {
        "batch": batch,
        "max_new_tokens": steps,
        "step_ms": 1000 * step_s,
        "audio_per_wall": batch / (FRAMES_PER_SECOND * step_s),
        "peak_rss": peak_rss(),
    }


def first_audio(
    dia: Dia, repeats: int, before: Callable[[], None] = lambda: None, **request: object
) -> tuple[float, int, int]:
    """Seconds from the call to the first chunk of `generate_stream` (median of `repeats` streams stopped
    there, after one warm-up; `before` runs before each), and the steps and samples of that chunk's
    stream. Each stream is timed as a text of a length not seen before (the kept unconditional rows
    cleared)."""
    firsts = []
    for _ in range(repeats + 1):
        dia.engine.unconditional_rows.clear()
        before()
        steps: list[int] = []
        began = time.perf_counter()
        stream = dia.generate_stream(TEXT, callback=lambda i, n, steps=steps: steps.append(i), **request)
        chunk = next(stream)
        firsts.append((time.perf_counter() - began, len(steps), len(chunk)))
        stream.close()
    return statistics.median(t for t, _, _ in firsts[1:]), firsts[-1][1], firsts[-1][2]


def prompt_speed(dia: Dia, frames: int, seconds: float, cuda_graph: bool, repeats: int = 3) -> dict:
    """Time to first audio with a voice prompt of `seconds` given as a waveform, the first time (the codec
    encodes it, then its frames are prefilled) and again (its codes are kept: `Dia.encode_audio`), and
    how much of the first the encoding alone takes (medians)."""
    t = np.arange(round(seconds * 44100)) / 44100
    wave = (0.3 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    encoded = []
    for _ in range(repeats + 1):
        dia.encoded_clips.clear()
        began = time.perf_counter()
        dia.encode_audio(wave)
        encoded.append(time.perf_counter() - began)
    request = dict(audio_prompt=wave, seed=SEED, max_new_tokens=frames, use_torch_compile=cuda_graph)
    first_s, _, _ = first_audio(dia, repeats, dia.encoded_clips.clear, **request)
    again_s, _, _ = first_audio(dia, repeats, **request)
    return {
        "prompt_seconds": seconds,
        "first_audio_prompt_s": first_s,
        "first_audio_prompt_again_s": again_s,
        "prompt_encode_s": statistics.median(encoded[1:]),
    }


def stream_speed(
    dia: Dia, frames: int, cuda_graph: bool, prompt_seconds: float = 0.0, repeats: int = 3
) -> dict:
    """Time to first audio of `generate_stream`, without and (`prompt_seconds` > 0) with a voice prompt,
    and the realtime factor of a whole stream and of `generate`, each with the step captured when
    `cuda_graph`."""
    options = dict(seed=SEED, max_new_tokens=frames, use_torch_compile=cuda_graph)
    first_s, first_steps, first_samples = first_audio(dia, repeats, **options)
    began = time.perf_counter()
    samples = sum(len(chunk) for chunk in dia.generate_stream(TEXT, **options))
    stream_s = time.perf_counter() - began
    began = time.perf_counter()
    plain = dia.generate(TEXT, **options)
    plain_s = time.perf_counter() - began
    seconds = samples / 44100
    return {
        "frames": frames,
        "first_chunk_frames": first_samples // 512,
        "steps_to_first_audio": first_steps,
        "first_audio_s": first_s,
        "stream_rtf": seconds / stream_s,
        "generate_rtf": len(plain) / 44100 / plain_s,
    } | (prompt_speed(dia, frames, prompt_seconds, cuda_graph, repeats) if prompt_seconds else {})


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.torch_free bench.dia_speed")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--variant", default="float32")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cuda-graph", action="store_true", help="capture the step (use_torch_compile)")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--steps", type=int, required=True, help="timed single-row steps per position")
    parser.add_argument("--batches", type=int, nargs="*", default=[], help="batch sizes for generate_codes")
    parser.add_argument("--batch-steps", type=int, default=30, help="max_new_tokens of each batch run")
    parser.add_argument("--stream-frames", type=int, default=0, help="frames of the streaming run (0: none)")
    parser.add_argument(
        "--prompt-seconds",
        type=float,
        default=0.0,
        help="voice prompt of the streaming run's second part (0: none)",
    )
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.cuda_graph and args.device != "cuda":
        parser.error("--cuda-graph needs --device cuda")
    dia, load_s = load(args.folder, args.variant, args.device, args.threads)
    name = f"dia-ort {args.variant}" + (" + CUDA graph" if args.cuda_graph else "")
    engine, logits = single_request(dia, name, args.threads, load_s, args.steps, args.cuda_graph)
    batches = [batch_throughput(dia, b, args.batch_steps, args.cuda_graph) for b in args.batches]
    stream = (
        stream_speed(dia, args.stream_frames, args.cuda_graph, args.prompt_seconds)
        if args.stream_frames
        else None
    )
    result = {"engine": asdict(engine), "batches": batches, "stream": stream, "logits": logits.tolist()}
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
