"""Quantized decoder steps for the CPU: int8 on ONNX Runtime's integer GEMM (export/qgemm.py), int4
weight-only with ONNX Runtime's own quantizer.

Decoding reads every weight once per step, so smaller weights make faster steps. A recipe's `kernel`
says how each MatMul with a constant weight is replaced. `nbits`: a `MatMulNBits`, symmetric
round-to-nearest, one scale per block of input rows (the recipe's `block8`/`block4`);
`accuracy_level=4` lets the CPU kernel quantize the activations to int8 and use integer dot
products; without it the kernel dequantizes the weights and is slower than float32. `qgemm`:
8-bit weights per column and activations per row on `MatMulInteger`, which stays fast when a step
feeds many rows, where `MatMulNBits` is compute-bound (export/qgemm.py says how and why).

The settings were chosen on a random 8-layer decoder (hidden 1024), teacher-forced against float32
over 200 steps (export/quant_accuracy.py). For MatMulNBits, blocks of 128 rows make the step ~18%
faster than blocks of 32 (less scale arithmetic per weight). At 8 bits they cost little: int8 agreed
on 97.2% of top-1 ids against 98.0%, and the int4 recipe's 8-bit weights at 128 left it at 85.8%
against 85.2% (noise), 8% faster. At 4 bits they cost too much (int4 recipe 81.9% at 128, 82.7% at
64), and blocks of 16 gain 1.7 points for 30% more time, so 4-bit weights keep blocks of 32. A zero
point per block (asymmetric) measured no better (int4 80.1% vs 79.5%). The int8 variant keeps the
output head (the MatMul the logits come from) float32, which halves its KL divergence for ~5% of
step time; int4 is a mixed recipe that keeps the tensors that hurt agreement most at 8 bits
(`RECIPES`). On QGEMM (2026-12-03, mid): 97.2% with the down projection's activations in two passes,
95.9% in one (keeping down float32 instead: 97.1%), 95.2% with 7-bit signed weights.
The embedding tables (Gather) stay float32: a step reads one row of them per token. The encoder is
left float32 (see export/pipeline.py); a quantized one must keep each row's result independent of the
other rows (no per-tensor activation scale), since the runtime reuses unconditional rows across
batches (`dia_ort.batching`).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import numpy as np
import onnx

from dia_ort.manifest import FileEntry, GraphEntry
from export import qgemm

log = logging.getLogger(__name__)

BLOCK_SIZE = 32
ACCURACY_LEVEL = 4  # int8 activations: the CPU kernel's fast path

# The MatMul kinds of a decoder step, told apart by their weight's name: Dia's (export/dia_model.py),
# and Dia2's backbone step and depformer stage (export/dia2_model.py), whose per-stage kernels are
# graph inputs the runtime binds.
KIND_PATTERNS = {
    "qkv": r"self_attention\.\d+\.qkv$|^in_proj_\d+$",
    "o": r"self_attention\.\d+\.o$|^out_proj_\d+$",
    "cross_q": r"cross_attention\.q_proj\.weight$",
    "cross_o": r"cross_attention\.o_proj\.weight$",
    "gate_up": r"mlp\.(gate_up_proj|wi)\.weight$",
    "down": r"mlp\.(down_proj|wo)\.weight$",
    "head": r"(logits_dense|action_head|cb0_head)\.weight$",
    # Dia2's depformer heads, one per stage: a frame reads 31 of them, where it reads Dia's head once
    "stage_head": r"^logits_head$",
    "text_in": r"text_embed\.(main|second)_proj\.weight$",  # Dia2's text embeddings into the stream
    "stage_in": r"^depformer_in$",  # Dia2: the backbone's hidden state into a depformer stage
}


def _parse(entry: str) -> tuple[str, tuple[int, ...]]:
    """A recipe entry "KIND" or "KIND@L1,L2,..." -> (kind, layer indices; none: every layer)."""
    kind, _, at = entry.partition("@")
    if kind not in KIND_PATTERNS or (at and not re.fullmatch(r"-?\d+(,-?\d+)*", at)):
        raise ValueError(
            f"recipe entry {entry!r} is not KIND or KIND@LAYER,...; kinds: {list(KIND_PATTERNS)}"
        )
    return kind, tuple(int(n) for n in at.split(",")) if at else ()


@dataclass(frozen=True)
class Recipe:
    """How a quantized variant stores each MatMul's weight, by kind (`KIND_PATTERNS`).

    Each weight is stored at `bits`, except that the entries of `float32` stay float32 and those of
    `int8` take 8 bits (`float32` wins where both name a weight). An entry names a kind, or a kind in
    some layers: "down@0,-1" is the down projection of the first and the last layer.
    """

    bits: int
    int8: tuple[str, ...] = ()
    float32: tuple[str, ...] = ("head",)
    block8: int = BLOCK_SIZE  # input rows per scale of the 8-bit weights
    block4: int = BLOCK_SIZE  # and of the 4-bit ones
    kernel: str = "nbits"  # MatMulNBits (weight-only), or "qgemm": export/qgemm.py, 8 bits throughout
    two_pass: tuple[str, ...] = ()  # qgemm: entries whose activations are quantized twice

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 8 or 4, got {self.bits}")
        if self.kernel not in ("nbits", "qgemm") or (
            self.kernel == "qgemm" and (self.bits, self.int8) != (8, ())
        ):
            raise ValueError(
                f"kernel must be nbits, or qgemm with 8 bits throughout; got {self.kernel} at {self.bits}"
            )
        for block in (self.block8, self.block4):
            if block not in (16, 32, 64, 128, 256):
                raise ValueError(f"a block size must be a power of two from 16 to 256, got {block}")
        if self.two_pass and self.kernel != "qgemm":
            raise ValueError("two_pass is for the qgemm kernel")
        for entry in (*self.int8, *self.float32, *self.two_pass):
            _parse(entry)

    def bits_of(self, kind: str, layer: int | None, layers: int) -> int | None:
        """The bits of the weight of `kind` in `layer` (of `layers`), or None to keep it float32."""
        if _names(self.float32, kind, layer, layers):
            return None
        return 8 if _names(self.int8, kind, layer, layers) else self.bits


def _names(entries: tuple[str, ...], kind: str, layer: int | None, layers: int) -> bool:
    """Whether a recipe's `entries` name the weight of `kind` in `layer` (of `layers`)."""
    for entry in entries:
        name, indices = _parse(entry)
        if any(not -layers <= n < layers for n in indices):
            raise ValueError(f"recipe entry {entry!r} names a layer outside the model's {layers}")
        if name == kind and (not indices or layer in {n % layers for n in indices}):
            return True
    return False


# int4: the mixed recipe, in the spirit of llama.cpp's Q4_K_M, chosen with `python -m bench.accuracy
# --sweep` (200 teacher-forced steps, top-1 agreement with float32). Plain int4 agrees 79.5% on the
# mid model and 75.6% on the full one. The output head is what hurts most at 4 bits (8 points); at 8
# bits it is 3.6x smaller than float32 for no measurable loss, and the bytes it saves pay for the
# attention projections at 8 bits: 85.2% (mid) and 85.3% (full) at -7% and +13.5% bytes. gate_up at 8
# bits as well reached 90% on both, but its bytes grow with the model: +13.5% on mid, +42% on full,
# where the step was then no faster than int8's. Each 8-bit kind earns its bytes (mid, 2026-12-01):
# put back at 4 bits, o costs 3.2 points, cross_o 2.9, qkv 2.6 and cross_q 0.8 (0.94 to 0.25 points
# per MB saved), while the next candidates gain less per MB: gate_up of the first and last layers
# +1.5 (0.22/MB), down everywhere +1.2 (0.09/MB), ORT's HQQ (zero points) for the 4-bit weights +0.7
# for 11% more bytes. int8 keeps its head float32, the quality option: at 8 bits the head cost 0.8
# points on mid (97.0 -> 96.2%, a step ~1 ms or 7% faster) and 0.2 on full (97.6 -> 97.4%), where the
# step was no faster within the noise (2026-12-01).
RECIPES = {  # the quantized variants `python -m export --quantize` writes
    "int8": Recipe(bits=8, kernel="qgemm", two_pass=("down",)),  # MatMulNBits at 128: 97.0% on mid
    "int4": Recipe(bits=4, int8=("head", "qkv", "o", "cross_q", "cross_o"), float32=(), block8=128),
    "int4-plain": Recipe(bits=4),
}


def matmul_weights(graph: onnx.GraphProto, bound: Collection[str] = ()) -> dict[str, tuple[str, int | None]]:
    """Each MatMul with a constant weight, or one of the `bound` inputs: node name -> (kind, layer
    index or None)."""
    weights = {t.name for t in graph.initializer} | set(bound)
    found = {}
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights:
            continue
        name = node.input[1]
        kind = next((k for k, pattern in KIND_PATTERNS.items() if re.search(pattern, name)), None)
        if kind is None:
            raise ValueError(f"MatMul {node.name} has a weight {name!r} of no known kind")
        layer = re.search(r"\.(\d+)\.|_(\d+)$", name)
        found[node.name] = (kind, int(layer.group(1) or layer.group(2)) if layer else None)
    return found


def nbits_quantizer() -> ModuleType:
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


def quantize_graph(
    src_onnx: Path,
    dst_folder: Path,
    name: str,
    recipe: Recipe,
    calibration: Sequence[Mapping[str, np.ndarray]] = (),
    bound: dict[str, np.ndarray] | None = None,
) -> GraphEntry:
    """Quantize the float32 graph `src_onnx` by `recipe` to `dst_folder/<name>.onnx` (+ `.onnx.data`).

    MatMulNBits: one pass of ONNX Runtime's quantizer per bit width, each on the MatMuls the recipe
    gives it. QGEMM (export/qgemm.py): the MatMuls' inputs are measured on `calibration`, feeds of the
    float32 graph, to keep their outlier channels in float. `bound`: the stacked kernels of weight
    inputs the runtime binds (Dia2's depformer stage), quantized in place (`qgemm.rewrite`).
    """
    if bound and recipe.kernel != "qgemm":
        raise ValueError(
            "weights bound at run time are quantized on QGEMM only (MatMulNBits needs constants)"
        )
    structure = onnx.load(str(src_onnx), load_external_data=False)
    weights = matmul_weights(structure.graph, bound or ())
    layers = 1 + max((layer for _, layer in weights.values() if layer is not None), default=0)
    bits_of = {n: recipe.bits_of(kind, layer, layers) for n, (kind, layer) in weights.items()}
    if recipe.kernel == "qgemm":
        nodes = [n for n, bits in bits_of.items() if bits == 8]
        two_pass = {n for n in nodes if _names(recipe.two_pass, *weights[n], layers)}
        inputs = sorted({node.input[0] for node in structure.graph.node if node.name in nodes})
        maxima = qgemm.channel_maxima(src_onnx, inputs, calibration)
        model = qgemm.rewrite(onnx.load(str(src_onnx)), nodes, maxima, two_pass, bound)
    else:
        model = onnx.load(str(src_onnx))
        nbits = nbits_quantizer()
        for bits in (8, 4):
            exclude = [n for n, b in bits_of.items() if b != bits]
            if len(exclude) == len(weights):
                continue
            config = nbits.DefaultWeightOnlyQuantConfig(
                block_size=recipe.block8 if bits == 8 else recipe.block4,
                is_symmetric=True,
                accuracy_level=ACCURACY_LEVEL,
                bits=bits,
            )
            quantizer = nbits.MatMulNBitsQuantizer(model, nodes_to_exclude=exclude, algo_config=config)
            quantizer.process()
            model = quantizer.model.model
    onnx_file, data_file, signed_file = f"{name}.onnx", f"{name}.onnx.data", f"{name}.signed.onnx"
    dst_folder.mkdir(parents=True, exist_ok=True)
    for stale in (dst_folder / onnx_file, dst_folder / data_file, dst_folder / signed_file):
        stale.unlink(missing_ok=True)
    onnx.save_model(
        model,
        str(dst_folder / onnx_file),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location=data_file,
        size_threshold=1024,
    )
    log.info("quantized %s by %s", src_onnx.name, recipe)
    data_files = (FileEntry.of(dst_folder, data_file),) if (dst_folder / data_file).exists() else ()
    twin = qgemm.signed_twin(dst_folder / onnx_file) if recipe.kernel == "qgemm" else None
    return GraphEntry(
        file=FileEntry.of(dst_folder, onnx_file),
        inputs=tuple(i.name for i in model.graph.input),
        outputs=tuple(o.name for o in model.graph.output),
        data_files=data_files,
        signed=FileEntry.of(dst_folder, twin.name) if twin else None,
    )
