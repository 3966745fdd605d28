"""Export one torch graph-contract module to ONNX and prove ONNX Runtime computes the same thing.

Each graph is traced with the TorchScript exporter (predictable names, custom symbolics such as the
in-place cache write), re-saved with its weights in one external data file next to it, then run in
ONNX Runtime on sample inputs and compared with the torch module; past tolerance the export fails.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
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


def verify_graph(
    path: Path,
    module: torch.nn.Module,
    samples: Sequence[tuple[torch.Tensor, ...]],
    input_names: Sequence[str],
    tolerance: float,
) -> float:
    """Run the graph in ONNX Runtime and the module in torch on each sample; return the worst error.

    The error of a float output is max|ort - torch| / max(1, max|torch|); integer outputs must be
    equal. Raises `RuntimeError` past `tolerance`.
    """
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    worst = 0.0
    for sample in samples:
        with torch.no_grad():
            expected = module(*sample)
        expected = expected if isinstance(expected, tuple) else (expected,)
        feeds = {name: t.numpy() for name, t in zip(input_names, sample, strict=True)}
        got = session.run(None, feeds)
        for name, want, have in zip((o.name for o in session.get_outputs()), expected, got, strict=True):
            want = want.numpy()
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
