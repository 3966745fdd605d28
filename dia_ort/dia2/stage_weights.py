"""The depformer's per-stage kernels, bound to the stage graph's inputs of the same names.

Each depformer stage reads its weight group's input and attention kernels and its codebook's output
head (export/dia2_model.py, `DepformerStageGraph`). The export stores them stacked in a safetensors
file beside the graph (the manifest's `bound`), its metadata saying which row each stage reads; each
row goes to ONNX Runtime as an OrtValue over the loaded array, so a stage reads its kernels where they
lie instead of a graph copying them out of stacked constants.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dia_ort.integer_gemm import signed_kernel

STAGE_ROWS = "stage_rows"  # the metadata entry: input name -> the row of its stack each stage reads


class StageWeights:
    """Stage -> {input name: OrtValue of its kernel} for a depformer of `depth` stages, each kernel in
    the type its input takes (`input_types`, name -> "tensor(int8)", ...): a signed twin's int8
    kernels are the stored uint8 ones flipped (`dia_ort.integer_gemm`)."""

    def __init__(self, path: Path, depth: int, input_types: Mapping[str, str]) -> None:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as file:
                rows = json.loads((file.metadata() or {})[STAGE_ROWS])
                self.arrays: dict[str, np.ndarray] = {name: file.get_tensor(name) for name in rows}
        except (SafetensorError, KeyError, ValueError) as exc:
            raise ValueError(
                f"{path} holds no depformer stage kernels ({exc!r}); re-export the model"
            ) from exc
        for name, array in self.arrays.items():
            if array.dtype == np.uint8 and input_types.get(name) == "tensor(int8)":
                self.arrays[name] = signed_kernel(array)
        for name, stage_rows in rows.items():
            if len(stage_rows) != depth or not all(0 <= r < len(self.arrays[name]) for r in stage_rows):
                raise ValueError(
                    f"{path}: {name} has no row for each of the {depth} stages; re-export the model"
                )
        self.stages = [
            {name: ort.OrtValue.ortvalue_from_numpy(self.arrays[name][r[stage]]) for name, r in rows.items()}
            for stage in range(depth)
        ]

    def __getitem__(self, stage: int) -> dict[str, ort.OrtValue]:
        return self.stages[stage]
