"""Export one torch graph-contract module to ONNX and prove ONNX Runtime computes the same thing.

Each graph is traced with the TorchScript exporter (predictable names, custom symbolics such as the
in-place cache write), re-saved with its weights in one external data file next to it, then run in
ONNX Runtime on sample inputs and compared with the torch module; past tolerance the export fails.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import external_data_helper

from dia_ort.manifest import FileEntry, GraphEntry

log = logging.getLogger(__name__)

OPSET = 18


@dataclass(frozen=True)
class GraphSpec:
    """What to export: the module, example inputs, names and dynamic axes."""

    name: str  # file stem, e.g. "decoder_step.float32"
    module: torch.nn.Module
    example: tuple[torch.Tensor, ...]
    inputs: Sequence[str]
    outputs: Sequence[str]
    dynamic_axes: dict[str, dict[int, str]]
    custom_opsets: dict[str, int] = field(default_factory=dict)  # op domains beyond ONNX's own


def export_graph(spec: GraphSpec, folder: Path) -> GraphEntry:
    """Trace `spec.module` to `folder/<name>.onnx` (+ `.onnx.data`) and return its manifest entry."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx_file = f"{spec.name}.onnx"
    data_file = f"{onnx_file}.data"
    for stale in (folder / onnx_file, folder / data_file):
        stale.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        traced = Path(tmp) / onnx_file
        with torch.no_grad():
            torch.onnx.export(
                spec.module,
                spec.example,
                str(traced),
                input_names=list(spec.inputs),
                output_names=list(spec.outputs),
                dynamic_axes=spec.dynamic_axes,
                opset_version=OPSET,
                dynamo=False,
                do_constant_folding=True,
                custom_opsets=spec.custom_opsets,
            )
        model = onnx.load(str(traced), load_external_data=False)
        gather_weights(model, Path(tmp), folder / data_file)
    onnx.save_model(model, str(folder / onnx_file))
    data_files = (FileEntry.of(folder, data_file),) if (folder / data_file).exists() else ()
    return GraphEntry(
        file=FileEntry.of(folder, onnx_file),
        inputs=tuple(spec.inputs),
        outputs=tuple(spec.outputs),
        data_files=data_files,
    )


def _weights(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """The graph's initializers and the tensors of its Constant nodes."""
    yield from model.graph.initializer
    for node in model.graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t


def gather_weights(model: onnx.ModelProto, source: Path, data_path: Path, threshold: int = 1024) -> None:
    """Move every tensor of `threshold` bytes or more into one external data file, one at a time.

    The exporter embeds small models and writes large ones (> 2 GB) as one file per tensor next to
    the graph in `source`; either way the result is `<graph>.onnx` + `<graph>.onnx.data`, and memory
    never holds more than one tensor's bytes at once.
    """
    offset = 0
    with open(data_path, "wb") as out:
        for tensor in _weights(model):
            if external_data_helper.uses_external_data(tensor):
                info = external_data_helper.ExternalDataInfo(tensor)
                with open(source / info.location, "rb") as f:
                    f.seek(info.offset or 0)
                    data = f.read(info.length) if info.length else f.read()
            elif len(tensor.raw_data) >= threshold:
                data = tensor.raw_data
            else:
                continue
            out.write(data)
            tensor.ClearField("raw_data")
            del tensor.external_data[:]
            for key, value in (("location", data_path.name), ("offset", offset), ("length", len(data))):
                tensor.external_data.add(key=key, value=str(value))
            tensor.data_location = onnx.TensorProto.EXTERNAL
            offset += len(data)


def widen_bfloat16(model: onnx.ModelProto) -> onnx.ModelProto:
    """The graph with its bfloat16 arithmetic done in float32, for ONNX Runtime's CPU kernels.

    ORT has no bfloat16 kernels on the CPU (they are CUDA's), so a bfloat16 graph is checked in this
    form: its weights stay bfloat16 and are cast to float32 where they are read, every cast to
    bfloat16 becomes a cast to float32, and bfloat16 inputs and outputs become float32. What is left
    of the difference to torch's bfloat16 module is bfloat16 rounding, not the graph's structure.
    """
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    bf16, f32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        raise ValueError("widen_bfloat16 handles flat graphs only; this one has subgraphs (If/Loop/Scan)")
    nodes = []
    for tensor in graph.initializer:
        if tensor.data_type == bf16:
            nodes.append(onnx.helper.make_node("Cast", [f"{tensor.name}/bf16"], [tensor.name], to=f32))
            tensor.name = f"{tensor.name}/bf16"
    for node in graph.node:
        nodes.append(node)
        value = next((a for a in node.attribute if a.type == onnx.AttributeProto.TENSOR), None)
        if node.op_type == "Constant" and value is not None and value.t.data_type == bf16:
            nodes.append(onnx.helper.make_node("Cast", [f"{node.output[0]}/bf16"], [node.output[0]], to=f32))
            node.output[0] = f"{node.output[0]}/bf16"
        elif node.op_type == "ConstantOfShape" and value is not None and value.t.data_type == bf16:
            value.t.CopyFrom(
                onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(value.t).astype(np.float32))
            )
        for attribute in node.attribute:
            if node.op_type == "Cast" and attribute.name == "to" and attribute.i == bf16:
                attribute.i = f32
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    for value in (*graph.input, *graph.output):
        if value.type.tensor_type.elem_type == bf16:
            value.type.tensor_type.elem_type = f32
    return model


def _is_bfloat16(model: onnx.ModelProto) -> bool:
    """Whether any weight, input or output of the graph is bfloat16."""
    graph, bf16 = model.graph, onnx.TensorProto.BFLOAT16
    values = (*graph.input, *graph.output)
    return any(t.data_type == bf16 for t in graph.initializer) or any(
        v.type.tensor_type.elem_type == bf16 for v in values
    )


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A torch tensor as numpy; bfloat16 (which numpy lacks) is widened to float32 exactly."""
    return (tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy()


def feeds(input_names: Sequence[str], sample: Sequence[torch.Tensor]) -> dict[str, np.ndarray]:
    """A sample of torch inputs as the graph's feeds, by input name."""
    return {name: _numpy(t) for name, t in zip(input_names, sample, strict=True)}


def _cpu_session(path: Path) -> ort.InferenceSession:
    """A CPU session on the graph at `path`; a bfloat16 graph runs widened (see `widen_bfloat16`)."""
    model = onnx.load(str(path), load_external_data=False)
    if not _is_bfloat16(model):
        return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    options = ort.SessionOptions()
    # no constant folding: it would turn the weight casts into a float32 copy of every weight
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    widened = path.with_name(f".{path.stem}.widened.onnx")  # beside the graph, so its data file resolves
    try:
        onnx.save_model(widen_bfloat16(model), str(widened))
        return ort.InferenceSession(str(widened), sess_options=options, providers=["CPUExecutionProvider"])
    finally:
        widened.unlink(missing_ok=True)


def verify_graph(
    path: Path,
    module: torch.nn.Module,
    samples: Sequence[tuple[torch.Tensor, ...]],
    input_names: Sequence[str],
    tolerance: float,
    bound: Callable[[tuple[torch.Tensor, ...]], dict[str, np.ndarray]] | None = None,
) -> float:
    """Run the graph in ONNX Runtime and the module in torch on each sample; return the worst error.
    `bound`: a sample -> the feeds the runtime binds in its place (quantized kernels), where they differ.

    The error of a float output is max|ort - torch| / max(1, max|torch|); integer outputs must be
    equal. Raises `RuntimeError` past `tolerance`. A bfloat16 graph runs widened (`widen_bfloat16`).
    """
    session = _cpu_session(path)
    worst = 0.0
    for sample in samples:
        with torch.no_grad():
            expected = module(*sample)
        expected = expected if isinstance(expected, tuple) else (expected,)
        got = session.run(None, feeds(input_names, sample) | (bound(sample) if bound else {}))
        for name, want, have in zip((o.name for o in session.get_outputs()), expected, got, strict=True):
            want = _numpy(want)
            if np.issubdtype(want.dtype, np.integer):
                error = 0.0 if np.array_equal(want, have) else float("inf")
            else:
                scale = max(1.0, float(np.abs(want).max(initial=0.0)))
                error = (
                    float(np.abs(want.astype(np.float64) - have.astype(np.float64)).max(initial=0.0)) / scale
                )
            worst = max(worst, error)
            if not error <= tolerance:
                raise RuntimeError(
                    f"{path.name}: output {name} differs from torch by {error:.3g} (tolerance {tolerance:g}) "
                    f"for input shapes {[tuple(t.shape) for t in sample]}"
                )
    log.info("%s matches torch: worst relative error %.3g", path.name, worst)
    return worst
