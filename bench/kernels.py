"""`python -m bench.kernels`: how fast ONNX Runtime reads each weight format of a decoder MatMul.

A decoder step reads every weight once for its rows (2, a CFG pair), so a weight format reaches the
memory floor only if its kernel streams the weights at the machine's read bandwidth. For each format
(a float32 `MatMul`, and `MatMulNBits` at 8 and 4 bits, several block sizes, with and without zero
points, accuracy levels 4 and 1, and the int8 QGEMM graphs) this times a graph of MatMuls of one
shape, from a two-row step to a prefill's 1,024 rows, and reports GB/s of weights read against the
bandwidth measured with as many threads. The float32 MatMul is the yardstick: it streams at the
memory's pace for each thread count (one core of a server CPU reads well below the whole socket's
bandwidth). A format slower than it at the same thread count is held back by its kernel's
arithmetic, not by the bytes it reads.

The weights total more than the last-level cache, and every copy holds its own random bytes. Copies
of one array read faster than memory allows on the project's Intel VM (2.5x for 8-bit weights), so
pages with the same bytes are merged somewhere below the guest, whose own KSM is off. The values do
not change the work a kernel does. Runs without torch; the table replaces the kernels section of
bench/RESULTS.md (or of --results).
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from bench.machine import describe, physical_cores, read_bandwidth
from bench.measure import median_ms
from bench.process import REPO
from bench.report import number, publish_section, table
from dia_ort.integer_gemm import signed_sums_exact
from export import qgemm
from export.quantize import nbits_quantizer

SECTION = "kernels"
RUNS = 7  # timed runs of each graph after a warm-up (a level-1 graph takes seconds a run)


@dataclass(frozen=True)
class WeightFormat:
    """One way to store a MatMul's weight: float32, MatMulNBits' bits, block, zero points and level,
    or the int8 variant's QGEMM (export/qgemm.py), in one pass or two."""

    bits: int = 32
    block: int = 0
    zero_points: bool = False
    accuracy_level: int = 4
    qgemm_passes: int = 0
    signed: bool = False  # QGEMM on int8 weights (the signed twin), where VNNI or AMX sum them exactly

    def __str__(self) -> str:
        if self.qgemm_passes:
            weights = "int8" if self.signed else "uint8"
            return f"8-bit QGEMM, {weights}, rows quantized {'once' if self.qgemm_passes == 1 else 'twice'}"
        if self.bits == 32:
            return "float32 MatMul"
        zero = ", zero points" if self.zero_points else ""
        return f"{self.bits}-bit, block {self.block}{zero}, level {self.accuracy_level}"


FORMATS = (
    WeightFormat(),
    WeightFormat(8, qgemm_passes=1),
    WeightFormat(8, qgemm_passes=2),
    WeightFormat(8, qgemm_passes=1, signed=True),
    WeightFormat(8, qgemm_passes=2, signed=True),
    WeightFormat(8, 32),
    WeightFormat(8, 128),
    WeightFormat(8, 128, zero_points=True),
    WeightFormat(8, 128, accuracy_level=1),
    WeightFormat(4, 32),
    WeightFormat(4, 32, zero_points=True),
    WeightFormat(4, 64),
    WeightFormat(4, 128),
    WeightFormat(4, 128, zero_points=True),
    WeightFormat(4, 32, accuracy_level=1),
)


def one_matmul(k: int, n: int) -> onnx.ModelProto:
    """`y = x @ w` with a float32 weight of [k, n] and any number of rows of x."""
    weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32) * 0.02
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")],
        "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", n])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )


def stored(model: onnx.ModelProto, weight: WeightFormat) -> onnx.ModelProto:
    """The model with its weight in `weight`'s format, by ONNX Runtime's own quantizer."""
    if weight.qgemm_passes:
        k = model.graph.input[0].type.tensor_type.shape.dim[1].dim_value
        two_pass = ["matmul"] if weight.qgemm_passes == 2 else []
        rewritten = qgemm.rewrite(copy.deepcopy(model), ["matmul"], {"x": np.ones(k, np.float32)}, two_pass)
        if weight.signed:
            qgemm.sign_weights(rewritten)
        return rewritten
    if weight.bits == 32:
        return model
    nbits = nbits_quantizer()
    config = nbits.DefaultWeightOnlyQuantConfig(
        block_size=weight.block,
        is_symmetric=not weight.zero_points,
        accuracy_level=weight.accuracy_level,
        bits=weight.bits,
    )
    quantizer = nbits.MatMulNBitsQuantizer(copy.deepcopy(model), algo_config=config)
    quantizer.process()
    return quantizer.model.model


def copies(model: onnx.ModelProto, total_bytes: int, seed: int = 0) -> tuple[onnx.ModelProto, int]:
    """The model's nodes side by side over the same input, as many times as fit in `total_bytes`, each
    copy with its own random weight bytes (constants of more than 64 values; scalars and axes stay as
    they are); and the weight bytes in all."""
    graph = model.graph
    weights = list(graph.initializer)
    arrays = [numpy_helper.to_array(w) for w in weights]
    per_copy = sum(a.nbytes for a in arrays)
    count = max(1, total_bytes // per_copy)
    rng = np.random.default_rng(seed)
    inputs = {i.name for i in graph.input}
    nodes, initializers, outputs = [], [], []
    for index in range(count):

        def renamed(name: str, index: int = index) -> str:
            return name if name in inputs or not name else f"{name}_{index}"

        for node in graph.node:
            copied = copy.deepcopy(node)
            copied.name = renamed(node.name)
            copied.input[:] = [renamed(i) for i in node.input]
            copied.output[:] = [renamed(o) for o in node.output]
            nodes.append(copied)
        for weight, array in zip(weights, arrays, strict=True):
            if array.size <= 64:
                fresh = array
            elif array.dtype == np.uint8:  # packed or uint8 weights: any byte is a valid one
                fresh = rng.integers(0, 256, array.shape, dtype=np.uint8)
            else:
                fresh = (array * rng.uniform(0.5, 1.5, array.shape)).astype(array.dtype)
            initializers.append(numpy_helper.from_array(fresh, renamed(weight.name)))
        outputs += [
            helper.make_tensor_value_info(renamed(o.name), TensorProto.FLOAT, ["rows", None])
            for o in graph.output
        ]
    side_by_side = helper.make_graph(nodes, "copies", list(graph.input), outputs, initializers)
    return helper.make_model(side_by_side, opset_imports=list(model.opset_import)), count * per_copy


def measure(
    k: int, n: int, total_bytes: int, threads: list[int], rows: list[int], formats: list[str]
) -> list[dict]:
    """GB/s of weights read by each format named in `formats` (substrings), thread count and row count
    (int8 QGEMM where its sums are exact)."""
    results = []
    base = one_matmul(k, n)
    for weight in FORMATS:
        if (weight.signed and not signed_sums_exact()) or not any(text in str(weight) for text in formats):
            continue
        graph, nbytes = copies(stored(base, weight), total_bytes)
        for count in threads:
            options = ort.SessionOptions()
            options.intra_op_num_threads = count
            session = ort.InferenceSession(
                graph.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
            for row_count in rows:
                x = np.random.default_rng(1).standard_normal((row_count, k), dtype=np.float32)
                ms = median_ms(partial(session.run, None, {"x": x}), RUNS)
                results.append(
                    {"format": str(weight), "threads": count, "rows": row_count, "bytes": nbytes, "ms": ms}
                )
                print(
                    f"{weight}: {count} threads, {row_count} rows: {nbytes / ms / 1e6:.1f} GB/s",
                    file=sys.stderr,
                )
            del session
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape",
        type=int,
        nargs=2,
        default=(2048, 16384),
        metavar=("K", "N"),
        help="the weight's shape (default: the full model's gate/up projection)",
    )
    parser.add_argument("--gigabytes", type=float, default=0.5, help="weight bytes per graph, past the cache")
    parser.add_argument("--threads", type=int, nargs="+", default=[physical_cores()])
    parser.add_argument("--rows", type=int, nargs="+", default=[2, 32, 256, 1024])
    parser.add_argument(
        "--formats", nargs="+", default=[""], metavar="TEXT", help="only the formats whose name holds a TEXT"
    )
    parser.add_argument("--results", type=Path, default=REPO / "bench" / "RESULTS.md")
    args = parser.parse_args(argv)
    # before the graphs: after gigabytes of them came and went, numpy read at half the rate
    machine = describe(max(args.threads), "cpu")
    bandwidth = {count: read_bandwidth(count) for count in args.threads}
    results = measure(*args.shape, int(args.gigabytes * 1e9), args.threads, args.rows, args.formats)
    rows = [
        [
            r["format"],
            str(r["threads"]),
            str(r["rows"]),
            number(r["ms"]),
            number(r["bytes"] / r["ms"] / 1e6),
            number(bandwidth[r["threads"]] / 1e9),
            number(r["bytes"] / r["ms"] * 1000 / bandwidth[r["threads"]]),
        ]
        for r in results
    ]
    k, n = args.shape
    markdown = "\n\n".join(
        [
            "## Weight formats (`python -m bench.kernels`)",
            f"{machine.date}, {machine.cpu}, {machine.physical_cores} cores; 1-minute load average at the "
            f"start {machine.load_average:.1f}; onnxruntime {machine.versions['onnxruntime']}. MatMuls of a "
            f"[{k}, {n}] weight side by side, {args.gigabytes:g} GB of weights in all, each copy its own "
            "random bytes; median time of a run. GB/s = weight bytes / time; bandwidth: numpy's read "
            "with as many threads; share = GB/s / bandwidth (1 is the memory floor).",
            table(["format", "threads", "rows", "ms", "GB/s", "bandwidth GB/s", "share"], rows),
        ]
    )
    publish_section(args.results, SECTION, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
