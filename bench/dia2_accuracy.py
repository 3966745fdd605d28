"""`python -m bench.dia2_accuracy FOLDER`: how often Dia2's int8 variant picks what float32 picks.

Teacher-forced, as Dia's quantization accuracy is (export/quant_accuracy.py): float32 speaks the script
picking the argmax of each guided distribution (the text action, codebook 0, then each depformer
stage's codebook, every frame); int8 then runs the same generation with each pick forced to
float32's (the draw is substituted), so both see the same tokens, and each of its distributions'
argmax is compared with float32's pick. Sampling runs at temperature 1 without a top-k filter, so
the draw sees every id; guidance (cfg_scale, cfg_filter_k) is the reference's default.
Run it as `python -m bench.torch_free bench.dia2_accuracy FOLDER` to keep torch out of the process.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from bench.dia2_speed import SCRIPT
from bench.process import emit
from dia_ort.dia2 import Dia2, GenerationConfig, SamplingConfig

UNFILTERED = GenerationConfig(text=SamplingConfig(1.0, 0), audio=SamplingConfig(1.0, 0))
KINDS = ("text", "codebook 0", "depformer")  # a frame's picks in order: action, codebook 0, each stage


class Picks:
    """A draw that takes each distribution's argmax (`forced` None), or float32's pick (`forced`),
    noting whether the argmax agreed."""

    def __init__(self, forced: list[int] | None = None) -> None:
        self.forced, self.picks, self.agreed = forced, [], []

    def __call__(self, probs: np.ndarray) -> int:
        best = int(np.argmax(probs))
        if self.forced is None:
            self.picks.append(best)
            return best
        pick = self.forced[len(self.agreed)]
        self.agreed.append(best == pick)
        return pick


def measure(folder: Path, threads: int) -> dict:
    float32 = Picks()
    Dia2(folder, device="cpu", threads=threads).generate(SCRIPT, UNFILTERED, draw=float32)
    int8 = Picks(float32.picks)
    model = Dia2(folder, device="cpu", threads=threads, compute_dtype="int8")
    model.generate(SCRIPT, UNFILTERED, draw=int8)
    if len(int8.agreed) != len(float32.picks):
        raise RuntimeError("the forced int8 run made other draws than float32's: the runs diverged")
    agreed = np.array(int8.agreed)
    per_frame = 2 + model.config.depth
    kind = np.minimum(np.arange(len(agreed)) % per_frame, 2)
    return {
        "folder": str(folder),
        "frames": len(agreed) // per_frame,
        "agreement": float(agreed.mean()),
        "by_kind": {name: float(agreed[kind == i].mean()) for i, name in enumerate(KINDS)},
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dia2_accuracy", description=__doc__.splitlines()[0]
    )
    parser.add_argument("folder", type=Path, help="an exported Dia2 folder with float32 and int8")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the figures as JSON here too")
    args = parser.parse_args(argv)
    emit(measure(args.folder, args.threads), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
