"""The two Dia graphs (text encoder, decoder step): names, dynamic axes and sample inputs."""

from __future__ import annotations

import torch

from dia_ort.manifest import cache_names, cross_names
from export.dia_model import DecoderStepGraph, DiaModel, EncoderGraph
from export.onnx_export import GraphSpec

ENCODER_INPUTS = ("text_ids", "text_mask")
STEP_INPUTS = ("tokens", "positions", "text_mask")
FUSED_OPSETS = {"com.microsoft": 1}  # the domain of ONNX Runtime's fused ops (DiaModel.fused_ops)


def encoder_inputs(
    model: DiaModel, text_length: int, seed: int = 0, batch: int = 2
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch` text rows; the odd rows are shorter, so padding is exercised."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.arch.encoder.vocab_size, (batch, text_length), generator=g)
    mask = torch.ones(batch, text_length, dtype=torch.bool)
    mask[1::2, max(1, text_length // 2) :] = False
    return ids.masked_fill(~mask, 0), mask


def step_inputs(
    model: DiaModel, rows: int, start: int, cache_slots: int, text_length: int, seed: int = 0, batch: int = 2
) -> tuple[torch.Tensor, ...]:
    """Decoder-step inputs for `rows` rows at positions start.. with random cache contents.

    Batch row b starts at `start + b % 3`, so rows at different positions share the step (the other
    rows' slots past their positions hold random values, so the causal mask is exercised).
    """
    arch = model.arch
    g = torch.Generator().manual_seed(seed)
    d = arch.decoder
    tokens = torch.randint(0, d.vocab_size, (batch, rows, d.num_channels), generator=g)
    positions = torch.arange(rows)[None, :] + start + torch.arange(batch)[:, None] % 3
    text_ids, text_mask = encoder_inputs(model, text_length, seed, batch)
    with torch.no_grad():
        cross = EncoderGraph(model)(text_ids, text_mask)
    dtype = model.logits_dense.weight.dtype  # the caches are in the graph's precision
    past = [
        torch.randn(batch, d.kv_heads, cache_slots, d.head_dim, generator=g).to(dtype)
        for _ in range(2 * d.layers)
    ]
    return (tokens, positions, text_mask, *cross, *past)


def encoder_spec(model: DiaModel, name: str) -> GraphSpec:
    layers = model.arch.decoder.layers
    outputs = cross_names(layers)
    axes = {"text_ids": {0: "batch", 1: "text"}, "text_mask": {0: "batch", 1: "text"}}
    axes |= {n: {0: "batch", 2: "text"} for n in outputs}
    return GraphSpec(
        name=name,
        module=EncoderGraph(model),
        example=encoder_inputs(model, 6),
        inputs=ENCODER_INPUTS,
        outputs=outputs,
        dynamic_axes=axes,
        custom_opsets=FUSED_OPSETS if model.fused_ops else {},
    )


def step_spec(model: DiaModel, name: str) -> GraphSpec:
    layers = model.arch.decoder.layers
    past, present = cache_names("past", layers), cache_names("present", layers)
    inputs = (*STEP_INPUTS, *cross_names(layers), *past)
    axes = {
        "tokens": {0: "batch", 1: "rows"},
        "positions": {0: "batch", 1: "rows"},
        "text_mask": {0: "batch", 1: "text"},
        "logits": {0: "batch"},
    }
    axes |= {n: {0: "batch", 2: "text"} for n in cross_names(layers)}
    axes |= {n: {0: "batch", 2: "slots"} for n in (*past, *present)}
    return GraphSpec(
        name=name,
        module=DecoderStepGraph(model),
        example=step_inputs(model, rows=2, start=1, cache_slots=8, text_length=6),
        inputs=inputs,
        outputs=("logits", *present),
        dynamic_axes=axes,
        custom_opsets=FUSED_OPSETS if model.fused_ops else {},
    )


def encoder_samples(model: DiaModel) -> list[tuple[torch.Tensor, ...]]:
    return [encoder_inputs(model, n, seed=n, batch=b) for n, b in ((1, 2), (5, 4), (13, 6))]


def step_samples(model: DiaModel) -> list[tuple[torch.Tensor, ...]]:
    """A prefill from position 0, a multi-row step mid-cache, and single-row steps early and late."""
    return [
        step_inputs(model, rows=4, start=0, cache_slots=20, text_length=7, seed=1, batch=4),
        step_inputs(model, rows=3, start=5, cache_slots=20, text_length=3, seed=2),
        step_inputs(model, rows=1, start=0, cache_slots=4, text_length=9, seed=3),
        step_inputs(model, rows=1, start=18, cache_slots=20, text_length=12, seed=4),
    ]


def calibration_samples(step: DecoderStepGraph) -> list[tuple[torch.Tensor, ...]]:
    """Step inputs on which a QGEMM step measures its MatMuls' activations (export/qgemm.py): a prefill
    of up to 32 rows of a CFG pair against a text of up to 64 bytes."""
    arch = step.model.arch
    rows = min(32, arch.decoder.max_length - 2)  # batch row b starts at b % 3
    text = min(64, arch.encoder.max_length)
    return [step_inputs(step.model, rows=rows, start=0, cache_slots=rows + 2, text_length=text, seed=11)]
