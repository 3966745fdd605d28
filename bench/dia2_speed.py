"""`python -m bench.dia2_speed FOLDER`: how fast a Dia2 folder speaks, against its memory floor.

Per frame a Dia2 model runs the backbone step once and the depformer stage once per further codebook,
then Mimi decodes the frame. Reported (2 CFG rows, medians over `--repeats` calls):
- the backbone step at frame `--position`, a depformer stage (the mean of every stage run in turn,
  each reading its own kernels: one stage run again would find them in the cache), Mimi's decode
  per frame;
- the frame: backbone + every stage + decode, as real-time factor (audio seconds per wall second);
- the floor: the bytes a frame must read (the backbone's weights and caches, each stage's weights:
  its group's attention and input kernels, the shared MLP, its output head), in the variant's
  precision (`--dtype`), at the read bandwidth measured in the same run; the frame's time over it;
- from `generate`: time to first audio (`stream` until its first chunk) and the wall time per frame.
Run it as `python -m bench.torch_free bench.dia2_speed FOLDER` to keep torch out of the process.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from bench.machine import describe, read_bandwidth
from bench.measure import median_ms
from bench.process import emit
from bench.roofline import floor_ms, step_weight_bytes
from dia_ort.dia2 import Dia2
from dia_ort.manifest import cache_names

SCRIPT = "[S1] " + " ".join(["the model speaks while the text arrives and the audio comes out"] * 8)


def stage_weight_bytes(model: Dia2, stage: int) -> int:
    """Bytes one depformer stage reads: the stage graph's constants in full (the shared MLP, norms, the
    text projections, which every stage computes though only the first keeps them), and the kernels
    bound for `stage` (its group's input and attention kernels, its codebook's head)."""
    graph = model.folder / model.manifest.variants[model.compute_dtype]["depformer_stage"].file.path
    bound = sum(value.numpy().nbytes for value in model.graphs.stage_weights[stage].values())
    return step_weight_bytes(graph) + bound


def _caches(layers: int, shape: tuple[int, ...]) -> dict[str, np.ndarray]:
    names = cache_names("past", layers)
    return {name: np.zeros(shape, np.float32) for name in names}


def measure(folder: Path, dtype: str, threads: int, position: int, repeats: int) -> dict:
    model = Dia2(folder, device="cpu", threads=threads, compute_dtype=dtype)
    c, rng = model.config, np.random.default_rng(0)
    d, p = c.decoder, c.depformer
    slots = max(256, position + 1)
    backbone_feeds = {
        "tokens": rng.integers(0, c.audio_vocab_limit, (2, 1, c.channels)),
        "positions": np.full((2, 1), position),
        "slots": np.full((2, 1), position),
    } | _caches(d.layers, (2, d.kv_heads, slots, d.head_dim))
    hidden = model.graphs.backbone.run(["hidden"], backbone_feeds)[0]
    stage_feeds = {"previous": np.array([5, 5]), "hidden": hidden}
    stage_feeds |= {"text": np.array([[10, 11]] * 2)} if c.depformer_text_embedding else {}
    stage_feeds |= _caches(p.layers, (2, p.heads, max(c.depth, 1), p.head_dim))
    decoder = model.decoder()
    codes = rng.integers(0, c.audio_vocab_limit, (c.codebooks, 4))
    backbone_ms = median_ms(lambda: model.graphs.backbone.run(["hidden"], backbone_feeds), repeats)

    def run_stages() -> None:  # every stage in turn, each on its own kernels, as a frame runs them
        for stage in range(c.depth):
            binding = model.graphs.depformer.io_binding()
            for name, value in (stage_feeds | {"stage": np.array([stage])}).items():
                binding.bind_cpu_input(name, value)
            for name, value in model.graphs.stage_weights[stage].items():
                binding.bind_ortvalue_input(name, value)
            binding.bind_output("logits")
            model.graphs.depformer.run_with_iobinding(binding)

    stage_ms = median_ms(run_stages, repeats) / c.depth
    decode_ms = median_ms(lambda: decoder.decode(codes), repeats) / 4
    frame_ms = backbone_ms + c.depth * stage_ms + decode_ms

    began = time.perf_counter()
    stream = model.stream(SCRIPT, seed=0)
    next(stream)
    first_audio = time.perf_counter() - began
    for _ in stream:
        pass
    wall = time.perf_counter() - began
    frames = stream.loop.t

    bandwidth = read_bandwidth(threads)
    graph = folder / model.manifest.variants[dtype]["backbone_step"].file.path
    kv = 2 * 2 * d.layers * d.kv_heads * d.head_dim * 4 * (position + 1)  # both rows, K and V, float32
    stages = sum(stage_weight_bytes(model, s) for s in range(c.depth))
    floor_bytes = step_weight_bytes(graph) + kv + stages
    floor = floor_ms(floor_bytes, bandwidth)
    return {
        "folder": str(folder),
        "dtype": dtype,
        "shape": {"backbone": [d.layers, d.hidden], "depformer": [p.layers, p.hidden], "stages": c.depth},
        "backbone_ms": backbone_ms,
        "stage_ms": stage_ms,
        "decode_ms_per_frame": decode_ms,
        "frame_ms": frame_ms,
        "realtime_factor": (1000 / model.frame_rate) / frame_ms,
        "floor_bytes": floor_bytes,
        "floor_ms": floor,
        "frame_over_floor": frame_ms / floor,
        "bandwidth_gb_s": bandwidth / 1e9,
        "first_audio_s": first_audio,
        "generate_ms_per_frame": 1000 * wall / max(frames, 1),
        "generate_realtime_factor": frames / model.frame_rate / wall,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.dia2_speed", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="an exported Dia2 folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "int8"], help="the variant to run")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--position", type=int, default=20, help="the frame the backbone step is timed at")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args(argv)
    result = measure(args.folder, args.dtype, args.threads, args.position, args.repeats)
    machine = describe(args.threads, "cpu")
    result["machine"] = {"cpu": machine.cpu, "date": machine.date, "threads": args.threads}
    emit(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
