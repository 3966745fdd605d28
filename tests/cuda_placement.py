"""ONNX Runtime's CUDA node placement, modelled on the CPU: which nodes it moves to the host, and
which tensors would then cross between host and device inside the graph.

ONNX Runtime refuses CUDA graph capture for a graph that needs such copies. Its rule
(`GetCpuPreferredNodes`, onnxruntime/core/framework/fallback_cpu_capability.cc): starting from the
consumers of host outputs (Shape, Size), a node moves to the host when every input is a host
tensor, an initializer or a graph input, except where the CUDA kernel takes that input on the host
anyway (the shape of a Reshape, the bounds of a Range, ...). Placement runs after the basic
optimizations (constant folding), so the graph is first optimized with those on the CPU.
"""

from __future__ import annotations

import heapq
import tempfile
from pathlib import Path

import onnx
import onnxruntime as ort

# inputs that ONNX Runtime's CUDA kernels read from host memory (OrtMemTypeCPUInput), by op type
HOST_INPUTS = {
    "Reshape": {1},
    "Expand": {1},
    "Slice": {1, 2, 3, 4},
    "Range": {0, 1, 2},
    "ConstantOfShape": {0},
    "Unsqueeze": {1},
    "Squeeze": {1},
    "ReduceSum": {1},
    "ReduceMean": {1},
    "Split": {1},
    "Tile": {1},
}
HOST_OUTPUT_OPS = {"Shape", "Size"}


def basic_optimized(path: Path) -> onnx.ModelProto:
    """The graph after ONNX Runtime's basic optimizations (constant folding), without its weights."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
        options.optimized_model_filepath = str(Path(tmp) / "optimized.onnx")
        options.add_session_config_entry(
            "session.optimized_model_external_initializers_file_name", "optimized.onnx.data"
        )
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return onnx.load(options.optimized_model_filepath, load_external_data=False)


def host_device_copies(model: onnx.ModelProto) -> list[str]:
    """The tensors that would cross between host and device if the graph ran on the CUDA provider."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    constants = {t.name for t in graph.initializer}
    constants |= {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    host_tensors: set[str] = set()
    candidates: list[int] = []
    for node in graph.node:
        if node.op_type in HOST_OUTPUT_OPS:
            host_tensors.update(node.output)
            for name in node.output:
                candidates += consumers.get(name, [])
    heapq.heapify(candidates)  # topological order: the exporter writes nodes in that order
    host_nodes: set[int] = set()
    while candidates:
        index = heapq.heappop(candidates)
        node = graph.node[index]
        if index in host_nodes or node.op_type in HOST_OUTPUT_OPS:
            continue
        if all(
            not name
            or name in constants
            or name in inputs
            or (name in host_tensors and i not in HOST_INPUTS.get(node.op_type, ()))
            for i, name in enumerate(node.input)
        ):
            host_nodes.add(index)
            host_tensors.update(node.output)
            for name in node.output:
                for consumer in consumers.get(name, []):
                    heapq.heappush(candidates, consumer)
    copies = []
    for index, node in enumerate(graph.node):
        on_host = index in host_nodes or node.op_type in HOST_OUTPUT_OPS
        for i, name in enumerate(node.input):
            if not name or name in constants or (node.op_type in HOST_OUTPUT_OPS and i == 0):
                continue
            from_host = name in host_tensors and name not in inputs
            wants_host = index in host_nodes or i in HOST_INPUTS.get(node.op_type, ())
            if from_host != wants_host or (name in inputs and on_host):
                copies.append(f"{name} -> {node.op_type} {node.name} input {i}")
    return copies
