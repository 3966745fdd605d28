"""The fixed-buffer step protocol behind CUDA graph capture (`use_torch_compile=True` on CUDA).

On the CPU the protocol runs without capture, so everything except the capture itself is tested
here: fixed addresses, buffers reused across requests, stale cache contents, prefill beside replay.
The tests at the end run the real capture and skip without a CUDA device.
"""

from __future__ import annotations

import logging

import numpy as np
import onnxruntime as ort
import pytest
from conftest import export_tiny

from dia_ort import Dia, GenerationOptions
from dia_ort.engine import GraphDecoderState, StepBuffers
from dia_ort.generation import Generation
from dia_ort.text import encode_text
from export.architecture import TINY

TEXTS = ["[S1] Hello there. [S2] Hi!", "[S2] A somewhat longer line, so that the batch pads. [S1] Yes."]
GREEDY = GenerationOptions(temperature=0, max_new_tokens=30)
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()


def generate(dia: Dia, texts, prompts=None, cuda_graph: bool = False) -> Generation:
    ids = [encode_text(t, dia.config.text_length) for t in texts]
    generation = Generation(dia.engine, ids, prompts or [None] * len(texts), GREEDY, cuda_graph=cuda_graph)
    for _ in generation:
        pass
    return generation


@pytest.fixture(scope="module")
def prompt():
    return np.random.default_rng(5).integers(0, 1024, size=(7, TINY.decoder.num_channels))


def test_fixed_buffers_give_the_plain_loops_tokens(tiny_dia, prompt):
    plain = generate(tiny_dia, TEXTS, [prompt, None])  # the plain loop is checked against transformers
    fixed = generate(
        tiny_dia, TEXTS, [prompt, None], cuda_graph=True
    )  # a prefill of 8 rows, then 1-row steps
    np.testing.assert_array_equal(fixed.rows, plain.rows)
    assert fixed.eos_row == plain.eos_row


def test_next_request_of_the_same_shape_reuses_the_buffers(tiny_dia):
    engine = tiny_dia.engine
    engine.buffers.clear()
    generate(tiny_dia, TEXTS[:1], cuda_graph=True)  # leaves its cache rows and cross K/V behind
    (buffers,) = engine.buffers
    addresses = [v.data_ptr() for v in (*buffers.cross, *buffers.caches, buffers.logits)]
    again = generate(tiny_dia, TEXTS[1:], cuda_graph=True)  # another text of the same bucket
    assert engine.buffers == [buffers]
    assert [v.data_ptr() for v in (*buffers.cross, *buffers.caches, buffers.logits)] == addresses
    np.testing.assert_array_equal(again.rows, generate(tiny_dia, TEXTS[1:]).rows)  # nothing stale leaks


def test_live_requests_never_share_buffers(tiny_dia):
    ones = [generate(tiny_dia, [t]) for t in TEXTS]
    generations = [
        Generation(
            tiny_dia.engine, [encode_text(t, TINY.encoder.max_length)], [None], GREEDY, cuda_graph=True
        )
        for t in TEXTS
    ]
    for _ in zip(*generations, strict=False):  # interleaved step by step
        pass
    for generation in generations:
        for _ in generation:  # run whichever is left to its end
            pass
    for generation, one in zip(generations, ones, strict=True):
        np.testing.assert_array_equal(generation.rows, one.rows)


def test_free_buffers_are_bounded(tiny_dia):
    engine = tiny_dia.engine
    for slots in (300, 600, 900, 1200):  # a new slot bucket each time
        engine.start(*_text_rows(TEXTS[:1]), slots=slots, graph=True)
    assert len(engine.buffers) <= StepBuffers.MAX_FREE_BUFFERS
    ids = {b.graph_id for b in engine.buffers}
    assert len(ids) == len(engine.buffers)  # each set of buffers is its own graph


def test_text_and_slots_are_bucketed(tiny_dia):
    state = tiny_dia.engine.start(*_text_rows(TEXTS[:1]), slots=41, graph=True)
    assert isinstance(state, GraphDecoderState)
    batch, length, slots = state.buffers.key
    assert (batch, slots) == (2, GraphDecoderState.SLOT_BUCKET)
    assert length == min(TINY.encoder.max_length, GraphDecoderState.TEXT_BUCKET)
    with pytest.raises(ValueError, match="cache holds 41 rows"):
        state.step(np.zeros((2, 1, 9), dtype=np.int64), 41)  # the request's own limit, not the bucket's


def test_use_torch_compile_on_the_cpu_runs_the_plain_loop(tiny_dia, caplog):
    with caplog.at_level(logging.INFO, logger="dia_ort"):
        codes = tiny_dia.generate_codes(TEXTS[0], temperature=0, max_new_tokens=10, use_torch_compile=True)
    assert "needs device='cuda'" in caplog.text
    assert codes[0].shape == (10, 9)


def _text_rows(texts):
    from dia_ort.generation import cfg_text_rows

    return cfg_text_rows([encode_text(t, TINY.encoder.max_length) for t in texts])


# -- on a CUDA device -------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")


@pytest.fixture(scope="module")
def cuda_folder(tmp_path_factory, tiny_state, tiny_codec):
    return export_tiny(
        tmp_path_factory.mktemp("tiny_cuda"), TINY, tiny_state, tiny_codec, ("float32", "float16", "bfloat16")
    )


@cuda
def test_cuda_float32_matches_the_cpu(cuda_folder, tiny_dia):
    dia = Dia(cuda_folder, compute_dtype="float32", device="cuda")
    np.testing.assert_array_equal(generate(dia, TEXTS).rows, generate(tiny_dia, TEXTS).rows)


@cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_captured_graph_gives_the_uncaptured_tokens(cuda_folder, dtype, prompt):
    dia = Dia(cuda_folder, compute_dtype=dtype, device="cuda")
    assert dia.compute_dtype == dtype
    plain = generate(dia, TEXTS, [prompt, None])
    for _ in range(2):  # the second request replays the graph captured in the first
        captured = generate(dia, TEXTS, [prompt, None], cuda_graph=True)
        np.testing.assert_array_equal(captured.rows, plain.rows)
    assert dia.engine.cuda_graph
