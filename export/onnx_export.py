"""Export one torch graph-contract module to ONNX and prove ONNX Runtime computes the same thing.

Each graph is traced with the TorchScript exporter (predictable names, custom symbolics such as the
in-place cache write), re-saved with its weights in one external data file next to it, then run in
ONNX Runtime on sample inputs and compared with the torch module; past tolerance the export fails.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

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
        model = onnx.load(str(traced))
    for stale in (folder / onnx_file, folder / data_file):
        stale.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(folder / onnx_file),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_file,
        size_threshold=1024,
    )
    data_files = (FileEntry.of(folder, data_file),) if (folder / data_file).exists() else ()
    return GraphEntry(
        file=FileEntry.of(folder, onnx_file),
        inputs=tuple(spec.inputs),
        outputs=tuple(spec.outputs),
        data_files=data_files,
    )


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
