"""The two Dia2 decoder graphs (backbone step, depformer stage): names, dynamic axes and sample inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import save_file

from dia_ort.dia2.stage_weights import STAGE_ROWS
from dia_ort.manifest import FileEntry, cache_names
from export.dia2_model import (
    BackboneStepGraph,
    DepformerStageGraph,
    Dia2Model,
    stage_kernels,
    stage_weight_names,
)
from export.onnx_export import GraphSpec

STEP_INPUTS = ("tokens", "positions", "slots")
STEP_OUTPUTS = ("hidden", "action_logits", "cb0_logits")
STAGE_INPUTS = ("stage", "previous", "hidden")  # then "text" where the depformer embeds text
FUSED_OPSETS = {"com.microsoft": 1}


def step_inputs(
    model: Dia2Model, rows: int, start: int, cache_slots: int, seed: int = 0, batch: int = 2, shift: int = 0
) -> tuple[torch.Tensor, ...]:
    """Backbone inputs for `rows` frames from `start`, written `shift` slots past their positions, random
    caches; batch row b starts at start + b % 3 (rows at different positions share a step). Text ids
    include pad on the second stream."""
    config, d = model.config, model.config.decoder
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(0, config.text_vocab_size, (batch, rows, 2), generator=g)
    text[..., 1] = torch.where(torch.rand(batch, rows, generator=g) < 0.5, config.text_pad_id, text[..., 1])
    audio = torch.randint(0, config.audio_vocab_size, (batch, rows, config.codebooks), generator=g)
    positions = torch.arange(rows)[None, :] + start + torch.arange(batch)[:, None] % 3
    dtype = model.transformer.norm.weight.dtype
    past = [
        torch.randn(batch, d.kv_heads, cache_slots, d.head_dim, generator=g).to(dtype)
        for _ in range(2 * d.layers)
    ]
    return (torch.cat([text, audio], dim=-1), positions, positions + shift, *past)


def stage_inputs(model: Dia2Model, stage: int, seed: int = 0, batch: int = 2) -> tuple[torch.Tensor, ...]:
    """Depformer inputs at `stage` with its kernels, random caches and text (the second stream pad on
    odd rows)."""
    config, p = model.config, model.config.depformer
    g = torch.Generator().manual_seed(seed)
    dtype = model.transformer.norm.weight.dtype
    text = torch.randint(0, config.text_vocab_size, (batch, 2), generator=g)
    text[1::2, 1] = config.text_pad_id
    past = [
        torch.randn(batch, p.heads, max(config.depth, 1), p.head_dim, generator=g).to(dtype)
        for _ in range(2 * p.layers)
    ]
    return (
        torch.tensor([stage]),
        torch.randint(0, config.audio_vocab_size - 2, (batch,), generator=g),
        torch.randn(batch, config.decoder.hidden, generator=g).to(dtype),
        *([text] if config.depformer_text_embedding else []),
        *stage_kernels(model, stage).values(),
        *past,
    )


def step_spec(model: Dia2Model, name: str) -> GraphSpec:
    layers = model.config.decoder.layers
    past, present = cache_names("past", layers), cache_names("present", layers)
    axes = {name: {0: "batch", 1: "rows"} for name in STEP_INPUTS}
    axes |= {n: {0: "batch"} for n in STEP_OUTPUTS}
    axes |= {n: {0: "batch", 2: "slots"} for n in (*past, *present)}
    return GraphSpec(
        name=name,
        module=BackboneStepGraph(model),
        example=step_inputs(model, rows=2, start=1, cache_slots=8),
        inputs=(*STEP_INPUTS, *past),
        outputs=(*STEP_OUTPUTS, *present),
        dynamic_axes=axes,
        custom_opsets=FUSED_OPSETS if model.fused_ops else {},
    )


def stage_spec(model: Dia2Model, name: str) -> GraphSpec:
    layers = model.config.depformer.layers
    past, present = cache_names("past", layers), cache_names("present", layers)
    axes = {n: {0: "batch"} for n in ("previous", "hidden", "text", "logits")}
    axes |= {n: {0: "batch"} for n in (*past, *present)}
    return GraphSpec(
        name=name,
        module=DepformerStageGraph(model),
        example=stage_inputs(model, stage=1),
        inputs=(
            *STAGE_INPUTS,
            *(["text"] if model.config.depformer_text_embedding else []),
            *stage_weight_names(layers),
            *past,
        ),
        outputs=("logits", *present),
        dynamic_axes=axes,
        custom_opsets=FUSED_OPSETS if model.fused_ops else {},
    )


def step_samples(model: Dia2Model) -> list[tuple[torch.Tensor, ...]]:
    """A prefill from position 0, a multi-row step mid-cache, and single-row steps early and late."""
    return [
        step_inputs(model, rows=4, start=0, cache_slots=20, seed=1, batch=4),
        step_inputs(model, rows=3, start=5, cache_slots=20, seed=2),
        step_inputs(model, rows=1, start=0, cache_slots=4, seed=3),
        step_inputs(model, rows=1, start=18, cache_slots=20, seed=4),
        step_inputs(model, rows=2, start=9, cache_slots=20, seed=5, shift=1),
    ]


def stage_samples(model: Dia2Model) -> list[tuple[torch.Tensor, ...]]:
    """The first stage (text read), a middle one and the last."""
    depth = model.config.depth
    return [stage_inputs(model, stage, seed=stage) for stage in sorted({0, depth // 2, depth - 1})]


def save_stage_weights(
    kernels: dict[str, np.ndarray], rows: dict[str, list[int]], folder: Path, name: str
) -> FileEntry:
    """The stage graph's kernels, stacked, as the runtime binds them (dia_ort/dia2/stage_weights.py):
    `name`.safetensors, with the row each stage reads of each (`rows`: by kernel; a quantized kernel's
    `{kernel}.scale` and `{kernel}.outliers` go with it)."""
    path = f"{name}.safetensors"
    stage_rows = {tensor: rows[tensor.split(".")[0]] for tensor in kernels}
    save_file(kernels, str(folder / path), metadata={STAGE_ROWS: json.dumps(stage_rows)})
    return FileEntry.of(folder, path)
