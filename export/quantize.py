"""Weight-only int8/int4 decoder steps for the CPU, made with ONNX Runtime's own quantizer.

Decoding reads every weight once per step, so smaller weights make faster steps. Each MatMul with a
constant weight becomes a `MatMulNBits`: symmetric round-to-nearest, one scale per block of
`BLOCK_SIZE` input rows. `accuracy_level=4` lets the CPU kernel quantize the activations to int8 and
use integer dot products; without it the kernel dequantizes the weights and is slower than float32.

The settings were chosen on a random 8-layer decoder (hidden 1024), teacher-forced against float32
over 200 steps (export/quant_accuracy.py): block 32 agrees more with float32 than 64 or 128 (int8
98% of top-1 ids vs 97%, int4 79% vs 78% and 74%) for ~15% more step time than 128; keeping the output
head (the MatMul the logits come from) float32 halves the KL divergence for ~5% of step time.
The embedding tables (Gather) stay float32: a step reads one row of them per token. The encoder is
left float32 (see export/pipeline.py): quantizing it cost int8 0.7 and int4 9 points of agreement.
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import ModuleType

import onnx

from dia_ort.manifest import FileEntry, GraphEntry

log = logging.getLogger(__name__)

QUANTIZED_BITS = {"int8": 8, "int4": 4}  # the quantized variants and their weight bits
BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations: the CPU kernel's fast path


def head_matmul(graph: onnx.GraphProto, output: str = "logits") -> str | None:
    """The name of the MatMul that `output` is computed from (following data inputs), if any."""
    producers = {name: node for node in graph.node for name in node.output}
    node = producers.get(output)
    while node is not None and node.op_type != "MatMul":
        node = producers.get(node.input[0])
    return None if node is None else node.name


def _nbits_quantizer() -> ModuleType:
    """ORT's quantizer module, imported so that it leaves the caller's logging alone.

    On import it calls `logging.basicConfig(level=INFO)`, which would configure the root logger of
    every program that imports the export stage; a handler on the root logger makes that a no-op.
    It also logs one INFO line per graph node, so its own logger is set to WARNING.
    """
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer
    finally:
        root.removeHandler(guard)
    logging.getLogger(matmul_nbits_quantizer.__name__).setLevel(logging.WARNING)
    return matmul_nbits_quantizer


def quantize_graph(src_onnx: Path, dst_folder: Path, name: str, bits: int) -> GraphEntry:
    """Quantize the float32 graph `src_onnx` to `dst_folder/<name>.onnx` (+ `.onnx.data`).

    `bits`: 8 or 4, the exported variants (ORT's quantizer also writes 2 bits, too coarse for Dia).
    """
    if bits not in QUANTIZED_BITS.values():
        raise ValueError(f"bits must be one of {sorted(QUANTIZED_BITS.values())}, got {bits}")
    model = onnx.load(str(src_onnx))
    head = head_matmul(model.graph)
    nbits = _nbits_quantizer()
    config = nbits.DefaultWeightOnlyQuantConfig(
        block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL, bits=bits
    )
    quantizer = nbits.MatMulNBitsQuantizer(model, nodes_to_exclude=[head] if head else [], algo_config=config)
    quantizer.process()
    quantized = quantizer.model.model
    onnx_file, data_file = f"{name}.onnx", f"{name}.onnx.data"
    dst_folder.mkdir(parents=True, exist_ok=True)
    for stale in (dst_folder / onnx_file, dst_folder / data_file):
        stale.unlink(missing_ok=True)
    onnx.save_model(
        quantized,
        str(dst_folder / onnx_file),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_file,
        size_threshold=1024,
    )
    log.info("quantized %s to %d bits (%s kept float32)", src_onnx.name, bits, head or "no head")
    data_files = (FileEntry.of(dst_folder, data_file),) if (dst_folder / data_file).exists() else ()
    return GraphEntry(
        file=FileEntry.of(dst_folder, onnx_file),
        inputs=tuple(i.name for i in quantized.graph.input),
        outputs=tuple(o.name for o in quantized.graph.output),
        data_files=data_files,
    )
