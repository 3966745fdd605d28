"""Each Dia graph against its torch module, and the torch modules against transformers."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import export_tiny
from reference import hf_model

from dia_ort import Dia
from dia_ort.decoding import encoded_rows, run_at
from dia_ort.engine import Device, Engine
from dia_ort.item import cfg_text_rows
from dia_ort.manifest import Manifest
from dia_ort.text import encode_text
from export.architecture import TINY
from export.checkpoint import random_state
from export.dia_graphs import encoder_samples, encoder_spec, step_inputs, step_samples, step_spec
from export.dia_model import DecoderStepGraph, DiaModel, EncoderGraph
from export.onnx_export import export_graph, verify_graph

TOLERANCE = 1e-4
# Heads of 6: the timescales 10000 ** (i / 3) (21.54..., 464.15...) round in float16, where TINY's
# 1, 10, 100, 1000 do not; a window of 3072 rows puts positions past 1000 and 2048 in reach.
ROPE_ARCH = replace(TINY, decoder=replace(TINY.decoder, head_dim=6, max_length=3072))


@pytest.mark.parametrize("flavour", ["0626", "v0.1"])
def test_graphs_match_torch(tmp_path, tiny_state, flavour):
    """Encoder for 3 text lengths and batches; step for prefill, mid-cache and single rows."""
    model = DiaModel.from_state(TINY.with_flavour(flavour), tiny_state)
    for spec, samples in (
        (encoder_spec(model, "encoder"), encoder_samples(model)),
        (step_spec(model, "step"), step_samples(model)),
    ):
        entry = export_graph(spec, tmp_path)
        # raises past TOLERANCE, as test_verification_fails_loudly_past_tolerance shows
        verify_graph(tmp_path / entry.file.path, spec.module, samples, spec.inputs, TOLERANCE)


def test_float32_step_runs_on_fused_ops(tiny_folder):
    """The lean step (docs/graphs.md section 4): per layer, each residual add is fused with the norm
    after it, RoPE and attention are fused ops, and the cache is written without a transpose."""
    graph = onnx.load(str(tiny_folder / "decoder_step.float32.onnx"), load_external_data=False).graph
    ops = Counter(node.op_type for node in graph.node)
    layers = TINY.decoder.layers
    assert ops["SkipSimplifiedLayerNormalization"] == 3 * layers
    assert ops["MultiHeadAttention"] == ops["RotaryEmbedding"] == 2 * layers
    assert ops["ScatterND"] == 2 * layers
    assert ops["Transpose"] == 0


def test_verification_fails_loudly_past_tolerance(tmp_path, tiny_state):
    model = DiaModel.from_state(TINY, tiny_state)
    spec = encoder_spec(model, "encoder")
    entry = export_graph(spec, tmp_path)
    other = DiaModel.from_state(TINY, {k: v * 1.01 for k, v in tiny_state.items()})
    with pytest.raises(RuntimeError, match="differs from torch"):
        verify_graph(
            tmp_path / entry.file.path, EncoderGraph(other), encoder_samples(model), spec.inputs, TOLERANCE
        )


def test_torch_step_matches_transformers(tiny_state):
    """Prefill and then single steps through the cache give transformers' logits (0626)."""
    hf = hf_model(TINY, tiny_state)
    model = DiaModel.from_state(TINY, tiny_state)
    inputs = step_inputs(model, rows=6, start=0, cache_slots=6, text_length=9, seed=5)
    tokens, _, text_mask = inputs[:3]
    text_ids = torch.randint(3, 256, text_mask.shape, generator=torch.Generator().manual_seed(2)).masked_fill(
        ~text_mask, 0
    )
    with torch.no_grad():
        cross = EncoderGraph(model)(text_ids, text_mask)
        want = hf(input_ids=text_ids, attention_mask=text_mask.long(), decoder_input_ids=tokens).logits
        want = want.view(2, TINY.decoder.num_channels, 6, -1).transpose(1, 2)  # [B, S, C, V]
        step = DecoderStepGraph(model)
        caches = [torch.zeros_like(c) for c in inputs[3 + len(cross) :]]
        out = step(tokens[:, :3], torch.arange(3).expand(2, 3), text_mask, *cross, *caches)
        torch.testing.assert_close(out[0], want[:, 2], rtol=1e-4, atol=1e-4)
        for row in range(3, 6):
            out = step(tokens[:, row : row + 1], torch.tensor([[row], [row]]), text_mask, *cross, *out[1:])
            torch.testing.assert_close(out[0], want[:, row], rtol=1e-4, atol=1e-4)


def test_rows_at_different_positions_step_as_if_alone(tiny_state):
    """One step over rows at positions 5 and 2 gives each row the logits and cache it gets alone."""
    model = DiaModel.from_state(TINY, tiny_state)
    tokens, _, text_mask, *caches = step_inputs(model, rows=1, start=0, cache_slots=8, text_length=9, seed=6)
    layers = 2 * TINY.decoder.layers
    cross, past = caches[:layers], caches[layers:]
    step = DecoderStepGraph(model)
    with torch.no_grad():
        together = step(tokens, torch.tensor([[5], [2]]), text_mask, *cross, *past)
        for row, position in ((0, 5), (1, 2)):
            alone = step(
                tokens[row : row + 1],
                torch.tensor([[position]]),
                text_mask[row : row + 1],
                *(c[row : row + 1] for c in cross),
                *(p[row : row + 1] for p in past),
            )
            torch.testing.assert_close(together[0][row], alone[0][0], rtol=1e-5, atol=1e-5)
            for a, b in zip(together[1:], alone[1:], strict=True):
                torch.testing.assert_close(a[row], b[0])
            assert not torch.equal(together[1][row, :, position], past[0][row, :, position])  # written


def test_half_variants_track_float32(tmp_path, tiny_state, tiny_codec):
    """The float16 graphs (for CUDA) run in ONNX Runtime and stay close to float32, step after step.

    bfloat16 is exported and verified too, but ONNX Runtime runs it on CUDA only (see the next test).
    """
    folder = export_tiny(tmp_path, TINY, tiny_state, tiny_codec, dtypes=("float32", "float16", "bfloat16"))
    manifest = Manifest.load(folder)
    assert set(manifest.variants) == {"float32", "float16", "bfloat16"}
    text_ids, text_mask = cfg_text_rows([encode_text("[S1] Hello there.", TINY.encoder.max_length)])
    tokens = np.random.default_rng(0).integers(0, 1024, size=(2, 4, TINY.decoder.num_channels))
    logits = {}
    for dtype in ("float32", "float16"):
        rows = encoded_rows(Engine(folder, manifest, dtype, Device("cpu")), text_ids, text_mask, slots=8)
        logits[dtype] = [run_at(rows, tokens[:, row : row + 1], row) for row in range(4)]
        assert rows.caches[0].dtype == {"float32": np.float32, "float16": np.float16}[dtype]
    for want, have in zip(logits["float32"], logits["float16"], strict=True):
        assert have.dtype == np.float32
        np.testing.assert_allclose(have, want, atol=1e-2 * np.abs(want).max())
    for dtype in ("float16", "bfloat16"):
        model = Dia(folder, compute_dtype=dtype, device="cpu")  # the CPU runs float32 instead
        assert model.compute_dtype == "float32"


def test_bfloat16_graphs_compute_the_torch_modules(tmp_path, tiny_state):
    """Widened to float32 arithmetic, the bfloat16 graphs equal the torch modules run in float32 on
    the same bfloat16-rounded weights: the graphs' structure is exact, only rounding differs."""
    bf16 = DiaModel.from_state(TINY, tiny_state).to(torch.bfloat16)
    rounded = DiaModel.from_state(TINY, {k: v.to(torch.bfloat16).float() for k, v in tiny_state.items()})
    for spec, module, samples in (
        (encoder_spec(bf16, "encoder"), EncoderGraph(rounded), encoder_samples(rounded)),
        (step_spec(bf16, "step"), DecoderStepGraph(rounded), step_samples(rounded)),
    ):
        path = tmp_path / export_graph(spec, tmp_path).file.path
        graph = onnx.load(str(path))
        assert {o.type.tensor_type.elem_type for o in graph.graph.output[-1:]} == {onnx.TensorProto.BFLOAT16}
        assert all(t.data_type == onnx.TensorProto.BFLOAT16 for t in graph.graph.initializer if t.dims)
        assert verify_graph(path, module, samples, spec.inputs, TOLERANCE) < 1e-6
    assert not list(tmp_path.glob(".*"))  # the widened copy is not left behind


def test_float16_step_rotates_in_float32_far_into_the_window(tmp_path):
    """The key the float16 step caches at position p is its key at position 0 rotated by p / timescale_i
    (docs/generation.md section 3), to float16's rounding of the result. A float16 angle would be off by
    up to a radian at these positions; the cos and sin tables themselves are float32 constants."""
    arch, d = ROPE_ARCH, ROPE_ARCH.decoder
    model = DiaModel.from_state(arch, random_state(arch, seed=4)).to(torch.float16)
    spec = step_spec(model, "step")
    path = tmp_path / export_graph(spec, tmp_path).file.path
    graph = onnx.load(str(path)).graph
    constants = [
        *graph.initializer,
        *(a.t for n in graph.node if n.op_type == "Constant" for a in n.attribute),
    ]
    tables = [t for t in constants if list(t.dims) == [d.max_length, d.head_dim // 2]]
    assert len(tables) == 2 and all(t.data_type == onnx.TensorProto.FLOAT for t in tables)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    positions = np.array([[0], [1001], [2047], [3001]])
    tokens, _, text_mask, *cache = step_inputs(model, rows=1, start=0, cache_slots=1, text_length=5, batch=1)
    empty = torch.zeros(1, d.kv_heads, d.max_length, d.head_dim, dtype=torch.float16)
    values = (tokens, positions, text_mask, *cache[: 2 * d.layers], *[empty] * (2 * d.layers))
    feeds = {
        name: np.repeat(np.asarray(v), len(positions) // len(v), axis=0)
        for name, v in zip(spec.inputs, values, strict=True)
    }
    keys = session.run(["present_key_0"], feeds)[0]  # layer 0's key depends on the row only
    key0 = keys[0, :, 0].astype(np.float64)  # position 0 is the identity rotation
    x1, x2 = np.split(key0, 2, axis=-1)
    lo, hi = arch.rope_min_timescale, arch.rope_max_timescale
    timescale = lo * (hi / lo) ** (2 * np.arange(d.head_dim // 2) / d.head_dim)
    for b, p in enumerate(positions[:, 0]):
        cos, sin = np.cos(p / timescale), np.sin(p / timescale)
        want = np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1)
        error = np.abs(keys[b, :, p] - want).max() / np.abs(key0).max()
        assert error < 2e-3, f"position {p}: {error}"
