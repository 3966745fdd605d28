"""The floor of a decoder step: the bytes it must read, at the machine's read bandwidth.

A CFG step (two rows) reads every weight once, one row of each gathered embedding table per token,
the text's cross-attention K/V, and the self-attention cache up to its position.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper


def _nbytes(tensor: onnx.TensorProto) -> int:
    itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(tensor.data_type)).itemsize
    return int(np.prod(tensor.dims, dtype=np.int64)) * itemsize


INDEXING_OPS = {"Gather", "RotaryEmbedding"}  # ops that read a few rows of a table, not all of it


def step_weight_bytes(graph_path: Path) -> int:
    """Bytes of the initializers one step reads in full: all but the tables it only reads rows of
    (the embeddings, one row per token; RoPE's cos and sin, one row per position). Sizes come from
    the graph's metadata; the external weight data is not loaded."""
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    readers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, set()).add(node.op_type)
    return sum(_nbytes(t) for t in graph.initializer if not readers.get(t.name, set()) <= INDEXING_OPS)


def step_floor_bytes(graph_path: Path, weight_bytes: int, text_bytes: int, position: int) -> int:
    """Bytes one CFG step (2 rows) of the graph must read at `position` for a text of `text_bytes`."""
    graph = onnx.load(str(graph_path), load_external_data=False).graph
    shapes = {v.name: v.type.tensor_type for v in graph.input}
    tables = [
        t
        for t in graph.initializer
        if t.name not in {n for node in graph.node if node.op_type != "Gather" for n in node.input}
    ]
    gathered = sum(_nbytes(t) // t.dims[0] for t in tables if t.dims) * 9  # one row per channel's token

    def per_slot(name: str) -> int:  # bytes of one position of one row of a K or V input, all layers
        kind = shapes[name]
        heads, dim = (d.dim_value for d in kind.shape.dim[1:4:2])
        layers = sum(1 for n in shapes if n.startswith(name.rsplit("_", 1)[0] + "_"))
        itemsize = np.dtype(helper.tensor_dtype_to_np_dtype(kind.elem_type)).itemsize
        return 2 * layers * heads * dim * itemsize  # K and V

    rows = 2
    return weight_bytes + rows * (
        gathered + text_bytes * per_slot("cross_key_0") + (position + 1) * per_slot("past_key_0")
    )


def text_kv_bytes(graph_path: Path, text_bytes: int) -> int:
    """Bytes of the text's cross-attention K/V one CFG step reads: what `text_bytes` add to the floor."""
    return step_floor_bytes(graph_path, 0, text_bytes, 0) - step_floor_bytes(graph_path, 0, 0, 0)


def floor_ms(weight_bytes: int, bandwidth: float) -> float:
    """The time to read `weight_bytes` once at `bandwidth` bytes/s."""
    return 1000 * weight_bytes / bandwidth
