"""What a chained long-form part's prefill costs against that part's decoding.

    python -m bench.torch_free bench.longform FOLDER [--variant int8] [--frames 861] [--threads N]

Each part of a long-form script after the first is prompted with the previous part's codes
(dia_ort/longform.py): before it speaks, it prefills them, PREFILL_CHUNK rows a call, about 860 frames
for a part of the default length (LONG_FORM_SECONDS). This runs one such part on random prompt codes
of `--frames` frames for as many new frames, as `generate_codes` runs it, and the same text without a
prompt. The prefill is the time to the end of the prompt's last chunk less the time to the first step
without a prompt (both include the text encoder); the part's decoding is the time of the steps after
the prefill. Issue 20 asks the prefill to cost at most 10% of the decoding. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from bench.dia_speed import load
from bench.machine import physical_cores
from bench.measure import SEED, TEXT, random_codes
from dia_ort import Dia, GenerationOptions
from dia_ort.item import prefill_chunks
from dia_ort.script import LONG_FORM_SECONDS


def step_stamps(dia: Dia, prompt: np.ndarray | None, frames: int) -> tuple[list[float], int]:
    """Seconds from the call to the end of each step of `generate_codes` on TEXT, and how many of the
    first steps were prefill chunks."""
    options = GenerationOptions(seed=SEED, max_new_tokens=frames)
    began = time.perf_counter()
    generation = dia.start([TEXT], [prompt], options)
    chunks = len(prefill_chunks(generation.items[0].prefill))
    stamps = [time.perf_counter() - began for _ in generation]
    return stamps, chunks


def measure(folder: Path, variant: str, frames: int | None, threads: int, repeats: int = 3) -> dict:
    """The prefill of `frames` prompt frames (None: a part of LONG_FORM_SECONDS) and the decoding of as
    many new ones, in seconds (the median of `repeats` prefills after a warm-up; one decoding run)."""
    dia, _ = load(folder, variant, "cpu", threads)
    frames = frames or round(LONG_FORM_SECONDS * dia.engine.frame_rate)
    prompt = random_codes(1, frames, dia.config.num_channels)[0]
    step_stamps(dia, prompt, 2)  # warm-up: sessions, buffers
    unprompted = statistics.median(step_stamps(dia, None, 1)[0][0] for _ in range(repeats))
    prefills = []
    for _ in range(repeats - 1):
        stamps, chunks = step_stamps(dia, prompt, 1)
        prefills.append(stamps[chunks - 1] - unprompted)
    stamps, chunks = step_stamps(dia, prompt, frames)
    prefills.append(stamps[chunks - 1] - unprompted)
    prefill_s = statistics.median(prefills)
    steps = len(stamps) - chunks
    decode_s = stamps[-1] - stamps[chunks - 1]
    return {
        "variant": variant,
        "prompt_frames": frames,
        "prefill_chunks": chunks,
        "prefill_s": prefill_s,
        "decode_steps": steps,
        "decode_s": decode_s,
        "step_ms": 1000 * decode_s / steps,
        "prefill_share": prefill_s / decode_s,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.longform", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an exported model folder")
    parser.add_argument("--variant", default="int8")
    parser.add_argument(
        "--frames",
        type=int,
        help="frames of the previous part (the prompt) and of this one (default: a part's)",
    )
    parser.add_argument("--threads", type=int, default=physical_cores())
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.folder, args.variant, args.frames, args.threads), indent=2))


if __name__ == "__main__":
    main()
