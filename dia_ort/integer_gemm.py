"""Which of a QGEMM graph's twins this CPU runs: uint8 x uint8 weights, exact everywhere, or the signed
twin (int8 weights, export/qgemm.py), which MLAS runs on VNNI or AMX dot products, several times
faster on many rows, but sums wrongly on CPUs without them (pairs of products saturate at int16).

A probe graph built as the twins are (`export.qgemm.probe_model`, shipped beside this module) is run
once per process with rows that saturate such pairs; the signed twin is used only where its sums come
out exact. `DIA_ORT_INTEGER_GEMM=unsigned` keeps the uint8 graphs (to compare the two).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dia_ort.manifest import GraphEntry

PROBE = Path(__file__).with_name("integer_gemm_probe.onnx")
PROBE_ROW_COUNTS = (1, 2, 64)  # MLAS takes a vector kernel for one row, its GEMM kernels for more
LEVELS = 127  # QGEMM's weights and activations (export/qgemm.py): each side of zero...
ZERO_POINT = 128  # ... stored as uint8 around 128
OVERRIDE = "DIA_ORT_INTEGER_GEMM"


@functools.cache
def signed_sums_exact() -> bool:
    """Whether ONNX Runtime's uint8 x int8 GEMM gives exact sums on this CPU (the probe's)."""
    session = ort.InferenceSession(str(PROBE), providers=["CPUExecutionProvider"])
    depth = session.get_inputs()[0].shape[1]
    want = np.array([LEVELS * LEVELS * depth, -LEVELS * LEVELS * depth], np.int32)
    for count in PROBE_ROW_COUNTS:
        rows = np.full((count, depth), ZERO_POINT + LEVELS, np.uint8)  # 255: its pairs pass int16
        (sums,) = session.run(None, {"rows": rows})
        if not (sums == want).all():
            return False
    return True


def graph_file(entry: GraphEntry, on_cpu: bool) -> str:
    """The file of `entry` to open: its signed twin on a CPU whose uint8 x int8 sums are exact."""
    signed = entry.signed is not None and on_cpu and os.environ.get(OVERRIDE, "") != "unsigned"
    return entry.signed.path if signed and signed_sums_exact() else entry.file.path


def signed_kernel(kernel: np.ndarray) -> np.ndarray:
    """A uint8 kernel around 128 as the int8 one (the same values) a signed twin's bound input takes."""
    return (kernel ^ np.uint8(ZERO_POINT)).view(np.int8)
