"""The floor of a decoder step: the bytes of weights it must read, at the machine's read bandwidth."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper


def _nbytes(tensor: onnx.TensorProto) -> int:
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


def step_weight_bytes(graph_path: Path) -> int:
    """Bytes of the initializers one step reads in full: all but the tables that are only gathered
    (the embeddings, of which a step reads one row per token). Sizes come from the graph's
    metadata; the external weight data is not loaded."""
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    return sum(_nbytes(t) for t in graph.initializer if readers.get(t.name, set()) != {"Gather"})


def floor_ms(weight_bytes: int, bandwidth: float) -> float:
    """The time to read `weight_bytes` once at `bandwidth` bytes/s."""
    return 1000 * weight_bytes / bandwidth
