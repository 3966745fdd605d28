"""MatMuls on ONNX Runtime's integer GEMM (QGEMM): 8-bit weights, activations quantized per row at run time.

`MatMulNBits` unpacks its blocks and is compute-bound as soon as a step feeds many rows (concurrent
requests, a voice prompt's prefill, the encoder); MLAS' integer GEMM behind `MatMulInteger` reads a
two-row step at the memory's pace and runs many rows on the CPU's integer dot products. Each
rewritten MatMul becomes, in standard ops:

    m = max(ReduceMax(|x|, last axis), tiny)                         one scale per row
    q = QuantizeLinear(x / m, 1/127, 128)                            uint8, 1..255
    y = Cast(MatMulInteger(q, w, 128, 128)) * m * (w_scale / 127)   w: uint8 per output column

(`DequantizeLinear` on the int32 sums for the column scale, one node where Cast and a Mul are two,
measured slower in alternating runs of the full step, 80-89 ms against 73-77. So did
`MatMulIntegerToFloat` with the column scale, which fuses the Cast and that Mul into the GEMM's
output: one request 55.3-56.5 ms against 54.3-54.7, 16 requests no different, on the AMX Xeon.)
A row's scale depends on that row alone and integer sums are exact, so a row's result does not depend
on the other rows of the batch, nor on the kernel MLAS picks for the row count (batch invariance).
Weights are uint8 around 128 (`-127..127`): MLAS' uint8 x int8 kernel on AVX2 without VNNI sums
products in pairs to int16 (`vpmaddubsw`), which saturates (255 * 127 * 2 > 32767) and gave sums off
by millions on the project's AMD EPYC; its uint8 x uint8 kernels widen to 16 bits first and are exact
on every CPU. 7-bit signed weights would fit too, and cost 0.7 points of agreement (mid, 95.2%).

`two_pass` MatMuls quantize each row twice: the second pass quantizes what the first left (its
rounding error, 254 times finer), both go through one MatMulInteger as rows of their own, so the
weights are read once, and the results are added: about 15 bits of activation for twice the rows.
That is for the MLP's down projection, whose input (a gate times an up projection) has heavy tails
that one scale per row resolves poorly: at one pass it alone cost the mid model 1.1 points.

uint8 x uint8 is also the slow kernel where MLAS has a faster one: on CPUs with VNNI (AVX-512 or AVX)
or AMX its uint8 x int8 kernel sums with `vpdpbusd`, exactly, and ran a two-row MatMul 1.4x and 256
rows 3.6x faster on the project's Intel Xeon (AVX-512 VNNI). So each QGEMM graph has a signed twin
(`signed_twin`) that reads the same weight file: every constant weight goes through `BitwiseXor` with
128 and a `Cast` to int8, which ONNX Runtime folds into int8 constants when the session starts (a
kernel bound at run time is an int8 input, flipped once by the runtime). The
runtime opens the twin where a probe (`probe_model`) finds the uint8 x int8 sums exact
(`dia_ort.integer_gemm`). Both give the same integer sums, so the same results bit for bit.

Activation outliers (a few hidden channels 20-100x larger than the rest, which trained transformers
carry) would set the row's scale and leave the other channels a few levels. They are kept in float,
as LLM.int8() does: channels whose largest |x| over calibration rows (run through the float32 graph)
passes `OUTLIER_RATIO` times the median channel's are zeroed before the quantization and multiplied
by their float32 weight rows in a small MatMul of their own, added to the integer path's result. A
graph without such channels gets no extra node. (SmoothQuant's migration of the outliers' scale into
the weights was measured first: a channel 20-50x larger left the tiny model's step 0.16-0.86 off
torch depending on alpha, against the export's 0.25.)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from dia_ort.integer_gemm import LEVELS, ZERO_POINT

FINER = 254  # the second pass' step: the first's rounding error spans 1/254 of a row's range
OUTLIER_RATIO = 8.0  # a channel this many times the median channel's largest |x| stays float
PROBE_DEPTH = 64  # input channels of the probe graph (probe_model)
MAX_OUTLIER_SHARE = 1 / 8  # at most this share of a MatMul's input channels (the largest) stays float


def _groups(graph: onnx.GraphProto, nodes: Sequence[str]) -> dict[str, list[onnx.NodeProto]]:
    """The MatMuls named in `nodes`, grouped by their input tensor (they share its quantization)."""
    wanted = set(nodes)
    groups = defaultdict(list)
    for node in graph.node:  # in graph order: a group's first MatMul is the first to run
        if node.name in wanted:
            groups[node.input[0]].append(node)
    return dict(groups)


def channel_maxima(
    path: Path, tensors: Sequence[str], feeds: Sequence[Mapping[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Each tensor of the graph at `path` -> its largest |value| per channel (last axis) over `feeds`.

    The graph runs with the tensors as extra outputs, from a copy of its structure saved beside it
    (so its external data resolves).
    """
    if not feeds:
        raise ValueError("a QGEMM recipe needs calibration: at least one feed of the float32 graph")
    model = onnx.load(str(path), load_external_data=False)
    model.graph.output.extend(helper.make_tensor_value_info(t, TensorProto.FLOAT, None) for t in tensors)
    probe = path.with_name(f".{path.stem}.calibration.onnx")
    try:
        onnx.save_model(model, str(probe))
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
    finally:
        probe.unlink(missing_ok=True)
    maxima = {}
    for feed in feeds:
        for name, value in zip(tensors, session.run(list(tensors), dict(feed)), strict=True):
            channels = np.abs(value).reshape(-1, value.shape[-1]).max(axis=0)
            maxima[name] = np.maximum(maxima.get(name, channels), channels)
    return maxima


def outlier_channels(activation_max: np.ndarray) -> np.ndarray:
    """The channels to keep in float, ascending: past `OUTLIER_RATIO` x the median, the largest first."""
    limit = OUTLIER_RATIO * np.median(activation_max)
    candidates = np.flatnonzero(activation_max > limit)
    largest = candidates[np.argsort(-activation_max[candidates], kind="stable")]
    return np.sort(largest[: int(len(activation_max) * MAX_OUTLIER_SHARE)])


def quantize_columns(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float `[..., K, N]` weight -> uint8 `[..., K, N]` around 128 (-127..127) and its float32 scale
    per column `[..., N]`."""
    scale = np.abs(weight).max(axis=-2) / LEVELS
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(weight / scale[..., None, :]), -LEVELS, LEVELS) + ZERO_POINT
    return q.astype(np.uint8), scale


def _node(op: str, inputs: list[str], output: str, **attributes) -> onnx.NodeProto:
    return helper.make_node(op, inputs, [output], name=output, **attributes)


def _quantize_rows(x: str, prefix: str, outliers: np.ndarray, size: int, two_pass: bool) -> tuple[list, list]:
    """Nodes and constants that make `{prefix}.q` (uint8 rows; with `two_pass`, the second pass' rows
    after the first's) and `{prefix}.scale` (one per row) from x, the outlier channels zeroed first
    and gathered into `{prefix}.outlier_x`."""
    source, nodes, constants = x, [], []
    if len(outliers):
        mask = np.ones(size, np.float32)
        mask[outliers] = 0.0
        constants += [
            numpy_helper.from_array(mask, f"{prefix}.inliers"),
            numpy_helper.from_array(outliers.astype(np.int64), f"{prefix}.outliers"),
        ]
        nodes += [
            _node("Mul", [x, f"{prefix}.inliers"], f"{prefix}.x"),
            _node("Gather", [source, f"{prefix}.outliers"], f"{prefix}.outlier_x", axis=-1),
        ]
        x = f"{prefix}.x"
    first = f"{prefix}.q1" if two_pass else f"{prefix}.q"
    nodes += [
        _node("Abs", [x], f"{prefix}.abs"),
        _node("ReduceMax", [f"{prefix}.abs", "qgemm.last_axis"], f"{prefix}.rowmax"),
        _node("Max", [f"{prefix}.rowmax", "qgemm.tiny"], f"{prefix}.scale"),
        _node("Div", [x, f"{prefix}.scale"], f"{prefix}.unit"),
        _node("QuantizeLinear", [f"{prefix}.unit", "qgemm.step", "qgemm.zero_point"], first),
    ]
    if two_pass:
        nodes += [
            _node("DequantizeLinear", [first, "qgemm.step", "qgemm.zero_point"], f"{prefix}.rounded"),
            _node("Sub", [f"{prefix}.unit", f"{prefix}.rounded"], f"{prefix}.error"),
            _node(
                "QuantizeLinear", [f"{prefix}.error", "qgemm.finer_step", "qgemm.zero_point"], f"{prefix}.q2"
            ),
            _node("Concat", [first, f"{prefix}.q2"], f"{prefix}.q", axis=0),
        ]
    return nodes, constants


def _integer_matmul(
    node: onnx.NodeProto,
    weight: np.ndarray,
    prefix: str,
    outliers: np.ndarray,
    two_pass: bool,
    names: tuple[str, str, str],
) -> tuple[list, dict[str, np.ndarray]]:
    """The nodes that stand for MatMul `node` of `weight` (`[K, N]`, or stacked `[R, K, N]` for a weight
    the runtime binds), reading `_quantize_rows`' outputs, and the tensors they read by `names`: the
    uint8 weight, its column scale and its outlier rows."""
    name = f"{node.name}.qgemm"
    weight_name, scale_name, outlier_name = names
    inliers = weight.copy()
    inliers[..., outliers, :] = (
        0.0  # their channels of x are zeroed: their rows must not set a column's scale
    )
    q, scale = quantize_columns(inliers)
    tensors = {weight_name: q, scale_name: scale / LEVELS}
    sums = f"{name}.float"
    nodes = [
        _node(
            "MatMulInteger",
            [f"{prefix}.q", weight_name, "qgemm.zero_point", "qgemm.zero_point"],
            f"{name}.sums",
        ),
        _node("Cast", [f"{name}.sums"], sums, to=TensorProto.FLOAT),
    ]
    if two_pass:  # the first pass' rows, then the second's (FINER times finer)
        nodes += [
            helper.make_node(
                "Split",
                [sums],
                [f"{name}.first", f"{name}.second"],
                name=f"{name}.split",
                axis=0,
                num_outputs=2,
            ),
            _node("Mul", [f"{name}.second", "qgemm.finer"], f"{name}.second_scaled"),
            _node("Add", [f"{name}.first", f"{name}.second_scaled"], f"{name}.both"),
        ]
        sums = f"{name}.both"
    result = f"{name}.inliers" if len(outliers) else node.output[0]
    nodes += [
        _node("Mul", [sums, f"{prefix}.scale"], f"{name}.row"),
        _node("Mul", [f"{name}.row", scale_name], result),
    ]
    if len(outliers):
        tensors[outlier_name] = np.take(weight, outliers, axis=-2)
        nodes += [
            _node("MatMul", [f"{prefix}.outlier_x", outlier_name], f"{name}.outliers"),
            helper.make_node("Add", [result, f"{name}.outliers"], list(node.output), name=f"{name}.sum"),
        ]
    return nodes, tensors


def _bound_inputs(graph: onnx.GraphProto, name: str, tensors: dict[str, np.ndarray]) -> None:
    """Graph input `name` replaced by inputs for `tensors` (stacked: each input is one row of them)."""
    at = next(i for i, value in enumerate(graph.input) if value.name == name)
    del graph.input[at]
    for offset, (tensor, stacked) in enumerate(tensors.items()):
        value_type = helper.np_dtype_to_tensor_dtype(stacked.dtype)
        graph.input.insert(at + offset, helper.make_tensor_value_info(tensor, value_type, stacked.shape[1:]))


def rewrite(
    model: onnx.ModelProto,
    nodes: Sequence[str],
    activation_max: Mapping[str, np.ndarray],
    two_pass: Collection[str] = (),
    bound: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """`model` (weights loaded) with the MatMuls named in `nodes` on QGEMM, their outlier channels
    found in `activation_max` (input tensor -> per-channel max |x|, from `channel_maxima`). MatMuls
    reading one tensor share its quantization: all quantize it twice when one is in `two_pass`. In place.

    A MatMul whose weight is a graph input that the runtime binds reads it from `bound` (input name ->
    its kernels stacked `[R x K x N]`), which is rewritten in place too: the input's entry becomes its
    uint8 kernels, and its column scales `{name}.scale` (and outlier rows `{name}.outliers`) join it,
    each a graph input of its own."""
    bound = {} if bound is None else bound
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    constants = [
        numpy_helper.from_array(np.array([-1], np.int64), "qgemm.last_axis"),
        numpy_helper.from_array(np.float32(np.finfo(np.float32).tiny), "qgemm.tiny"),
        numpy_helper.from_array(np.float32(1 / LEVELS), "qgemm.step"),
        numpy_helper.from_array(np.uint8(ZERO_POINT), "qgemm.zero_point"),
    ]
    if set(two_pass) & set(nodes):
        constants += [
            numpy_helper.from_array(np.float32(1 / (LEVELS * FINER)), "qgemm.finer_step"),
            numpy_helper.from_array(np.float32(1 / FINER), "qgemm.finer"),
        ]
    removed = set()
    replaced: dict[str, list[onnx.NodeProto]] = {}  # MatMul name -> the nodes standing in its place
    for x, group in _groups(graph, nodes).items():
        prefix = f"{group[0].name}.rows"
        outliers = outlier_channels(activation_max[x])
        twice = any(node.name in two_pass for node in group)
        replaced[group[0].name], added = _quantize_rows(x, prefix, outliers, len(activation_max[x]), twice)
        constants += added
        for node in group:
            kernel = node.input[1]
            if kernel in bound:
                names = (kernel, f"{kernel}.scale", f"{kernel}.outliers")
                stand_in, tensors = _integer_matmul(node, bound.pop(kernel), prefix, outliers, twice, names)
                _bound_inputs(graph, kernel, tensors)
                bound.update(tensors)
            else:
                removed.add(kernel)
                weight = numpy_helper.to_array(weights[kernel])
                weights[kernel].ClearField("raw_data")  # the float bytes go as their quantized ones come
                names = (
                    f"{node.name}.qgemm.weight",
                    f"{node.name}.qgemm.weight_scale",
                    f"{node.name}.qgemm.outlier_weight",
                )
                stand_in, tensors = _integer_matmul(node, weight, prefix, outliers, twice, names)
                constants += [numpy_helper.from_array(t, n) for n, t in tensors.items()]
            replaced.setdefault(node.name, []).extend(stand_in)
    kept = [t for t in graph.initializer if t.name not in removed]
    del graph.initializer[:]
    graph.initializer.extend([*kept, *constants])
    ordered = []
    for node in graph.node:
        ordered += replaced.get(node.name, [node])
    del graph.node[:]
    graph.node.extend(ordered)
    return model


def _signed_weight(weight: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes that make uint8 weight `weight` (around 128) an int8 one (the same values), and its name."""
    flipped = f"{weight}.signed"
    return [
        _node("BitwiseXor", [weight, "qgemm.sign_bit"], f"{weight}.xor"),
        _node("Cast", [f"{weight}.xor"], flipped, to=TensorProto.INT8),  # bits kept: x ^ 128 is x - 128
    ], flipped


def _signed_constants() -> list[onnx.TensorProto]:
    return [
        numpy_helper.from_array(np.uint8(ZERO_POINT), "qgemm.sign_bit"),
        numpy_helper.from_array(np.int8(0), "qgemm.signed_zero_point"),
    ]


def sign_weights(model: onnx.ModelProto) -> bool:
    """Make each MatMulInteger of `model` read its weight as int8 with zero point 0: a constant one
    through `_signed_weight` (folded when a session starts), one bound at run time as an int8 input
    (the runtime flips it once, `dia_ort.integer_gemm.signed_kernel`). In place; False when no
    MatMulInteger has a uint8 weight."""
    graph = model.graph
    constants = {t.name for t in graph.initializer}
    bound = {i.name: i for i in graph.input if i.type.tensor_type.elem_type == TensorProto.UINT8}
    nodes, signed_any = [], False
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMulInteger" else None
        if weight in constants:
            flip, node.input[1] = _signed_weight(weight)
            nodes += flip
        elif weight in bound:
            bound[weight].type.tensor_type.elem_type = TensorProto.INT8
        if weight in constants or weight in bound:
            node.input[3] = "qgemm.signed_zero_point"
            signed_any = True
        nodes.append(node)
    if not signed_any:
        return False
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(_signed_constants())
    return True


def signed_twin(path: Path) -> Path | None:
    """Write `<stem>.signed.onnx` beside the QGEMM graph at `path`, on its weights signed
    (`sign_weights`) and read from its data file. None (and no file) when it has nothing to sign."""
    model = onnx.load(str(path), load_external_data=False)
    if not sign_weights(model):
        return None
    twin = path.with_name(f"{path.stem}.signed.onnx")
    onnx.save_model(model, str(twin))  # its weights stay where they are: in `path`'s data file
    return twin


def probe_model() -> onnx.ModelProto:
    """The graph `dia_ort.integer_gemm` runs to learn whether uint8 x int8 sums are exact here: rows of
    255 against int8 weights of +-127 built as `signed_twin` builds them. Pairs of such products pass
    int16, where MLAS' kernels without VNNI saturate; each row count takes another kernel path."""
    depth = PROBE_DEPTH
    weight = np.tile(np.array([[ZERO_POINT + LEVELS, ZERO_POINT - LEVELS]], np.uint8), (depth, 1))
    flip, signed = _signed_weight("weight")
    graph = helper.make_graph(
        [
            *flip,
            _node("MatMulInteger", ["rows", signed, "qgemm.zero_point", "qgemm.signed_zero_point"], "sums"),
        ],
        "integer_gemm_probe",
        [helper.make_tensor_value_info("rows", TensorProto.UINT8, ["count", depth])],
        [helper.make_tensor_value_info("sums", TensorProto.INT32, ["count", 2])],
        [
            numpy_helper.from_array(weight, "weight"),
            numpy_helper.from_array(np.uint8(ZERO_POINT), "qgemm.zero_point"),
            *_signed_constants(),
        ],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
