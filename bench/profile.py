"""`python -m bench.profile FOLDER --variant V [--requests N]`: where a decoder step's time goes.

Runs single-row CFG steps of N requests at once (1 by default) with ONNX Runtime's profiler on the
optimized step graph and prints the node count and the operator types that take the most kernel time
(JSON with `--out`). Run it torch-free: `python -m bench.torch_free bench.profile ...`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import onnxruntime as ort

from bench.measure import TEXT, RowsStepper, random_codes, step_ms
from dia_ort.decoding import encoded_rows
from dia_ort.engine import Device, Engine
from dia_ort.item import cfg_text_rows
from dia_ort.manifest import Manifest
from dia_ort.text import encode_text


def profile_step(
    folder: Path, variant: str, threads: int, steps: int, position: int, requests: int = 1
) -> dict:
    """Kernel time per operator type over `steps` one-row steps at `position` of `requests` CFG pairs
    at once (the batch a server steps), and the node count."""
    manifest = Manifest.load(folder)
    with tempfile.TemporaryDirectory(prefix="dia-profile-") as tmp:
        engine = Engine(folder, manifest, variant, Device.parse("cpu", threads))
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "step")
        engine.step = ort.InferenceSession(str(engine.step_path), options, providers=["CPUExecutionProvider"])
        ids, mask = cfg_text_rows([encode_text(TEXT, manifest.model.text_length)] * requests)
        stepper = RowsStepper(encoded_rows(engine, ids, mask, slots=position + steps))
        step_ms(
            stepper,
            random_codes(2 * requests, position + steps, manifest.model.num_channels),
            position,
            steps,
        )
        trace = json.loads(Path(engine.step.end_profiling()).read_text())
    kernels = [e for e in trace if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    runs = [e for e in trace if e.get("name") == "model_run"]
    per_op: dict[str, float] = defaultdict(float)
    nodes: Counter[str] = Counter()
    for event in kernels[-len(kernels) // (steps + 1) * steps :]:  # the one-row steps, not the prefill
        per_op[event["args"]["op_name"]] += event["dur"] / 1000 / steps
    for event in kernels[-len(kernels) // (steps + 1) :]:  # one step's nodes
        nodes[event["args"]["op_name"]] += 1
    total = sum(per_op.values())
    return {
        "variant": variant,
        "requests": requests,
        "position": position,
        "nodes": sum(nodes.values()),
        "step_ms": float(np.median([e["dur"] for e in runs[1:]]) / 1000) if len(runs) > 1 else None,
        "kernel_ms": total,
        "ops": [
            {"op": op, "nodes": nodes[op], "ms": ms, "share": ms / total}
            for op, ms in sorted(per_op.items(), key=lambda item: -item[1])
        ],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--variant", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--position", type=int, default=20)
    parser.add_argument("--requests", type=int, default=1, help="CFG pairs stepped at once")
    parser.add_argument("--top", type=int, default=10, help="operator types to print")
    parser.add_argument("--out", type=Path, help="write the whole profile as JSON")
    args = parser.parse_args()
    result = profile_step(args.folder, args.variant, args.threads, args.steps, args.position, args.requests)
    print(
        f"{args.folder.name} {result['variant']} @{result['position']}, {args.requests} requests: "
        f"{result['nodes']} nodes, "
        f"step {result['step_ms']:.2f} ms, kernels {result['kernel_ms']:.2f} ms"
    )
    for op in result["ops"][: args.top]:
        print(f"  {op['op']:<28} {op['nodes']:>5} nodes  {op['ms']:8.3f} ms  {100 * op['share']:5.1f} %")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
