"""How closely each quantized variant follows float32, by export/quant_accuracy.py, in a child process.

Run as `python -m bench.accuracy FOLDER --variants int8 int4 --steps N --out FILE`.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

from export.quant_accuracy import quantization_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.accuracy")
    parser.add_argument("folder", type=Path)
    parser.add_argument("--variants", nargs="+", required=True)
    parser.add_argument("--steps", type=int, required=True, help="teacher-forced decoder steps")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    rows = [
        {"variant": v, **asdict(quantization_accuracy(args.folder, v, steps=args.steps))}
        for v in args.variants
    ]
    args.out.write_text(json.dumps({"accuracy": rows}))


if __name__ == "__main__":
    main()
