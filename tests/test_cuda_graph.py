"""The fixed-buffer step protocol behind CUDA graph capture (`use_torch_compile=True` on CUDA).

On the CPU the protocol runs without capture, so everything except the capture itself is tested
here: fixed addresses, buffers reused across requests, stale cache contents, prefill beside replay.
The tests at the end run the real capture and skip without a CUDA device.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import export_tiny
from cuda_placement import basic_optimized, host_device_copies

from dia_ort import Dia, GenerationOptions
from dia_ort.codec import CUDA_GRID
from dia_ort.decoding import encoded_rows, open_rows, run_at
from dia_ort.engine import DeviceRows, Engine, StepBuffers
from dia_ort.generation import Generation
from dia_ort.manifest import Manifest
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
    prompts = [prompt, prompt[:5]]  # both items known for 6 rows: a 6-row prefill, then 1-row steps
    plain = generate(tiny_dia, TEXTS, prompts)  # the plain loop is checked against transformers
    fixed = generate(tiny_dia, TEXTS, prompts, cuda_graph=True)
    assert min(item.prefill for item in fixed.items) == 6
    for ours, theirs in zip(fixed.items, plain.items, strict=True):
        np.testing.assert_array_equal(ours.rows, theirs.rows)
        assert ours.eos_row == theirs.eos_row


@pytest.fixture
def own_dia(tiny_folder) -> Dia:
    """A model of its own, for tests that look at every buffer its engine holds."""
    return Dia(tiny_folder, device="cpu")


def test_next_request_of_the_same_shape_reuses_the_buffers(own_dia):
    engine = own_dia.engine
    generate(own_dia, TEXTS[:1], cuda_graph=True)  # leaves its cache rows and cross K/V behind
    (buffers,) = engine.buffers
    addresses = [v.data_ptr() for v in (*buffers.cross, *buffers.caches, buffers.logits)]
    again = generate(own_dia, TEXTS[1:], cuda_graph=True)  # another text of the same bucket
    assert engine.buffers == [buffers]
    assert [v.data_ptr() for v in (*buffers.cross, *buffers.caches, buffers.logits)] == addresses
    np.testing.assert_array_equal(
        again.items[0].rows, generate(own_dia, TEXTS[1:]).items[0].rows
    )  # no stale rows


def test_live_requests_never_share_buffers(tiny_dia):
    ones = [generate(tiny_dia, [t]) for t in TEXTS]
    generations = [
        Generation(
            tiny_dia.engine, [encode_text(t, TINY.encoder.max_length)], [None], GREEDY, cuda_graph=True
        )
        for t in TEXTS
    ]
    running = [iter(g) for g in generations]
    while running:  # one step of each live request in turn, until all have ended
        running = [steps for steps in running if next(steps, None) is not None]
    for generation, one in zip(generations, ones, strict=True):
        np.testing.assert_array_equal(generation.items[0].rows, one.items[0].rows)


def test_free_buffers_are_bounded(own_dia):
    engine = own_dia.engine
    for batch in (1, 2, 3, 4):  # a new shape each time
        encoded_rows(engine, *_text_rows(TEXTS[:1] * batch), slots=40, graph=True).close()
    assert len(engine.buffers) <= StepBuffers.MAX_FREE_BUFFERS
    ids = {b.graph_id for b in engine.buffers}
    assert len(ids) == len(engine.buffers)  # each set of buffers is its own graph


def test_a_cache_past_the_audio_window_is_refused(tiny_dia):
    """RoPE's tables end at the window: a longer cache would index past them."""
    window = TINY.decoder.max_length
    with pytest.raises(ValueError, match=f"audio window holds {window} rows"):
        open_rows(tiny_dia.engine, 2, slots=window + 1, graph=True)
    host = encoded_rows(tiny_dia.engine, *_text_rows(TEXTS[:1]), slots=window + 1)
    run_at(host, np.zeros((2, 1, 9), dtype=np.int64), window - 1)  # the window's last row
    with pytest.raises(ValueError, match=f"audio window holds {window} rows"):
        run_at(host, np.zeros((2, 1, 9), dtype=np.int64), window)


def test_text_and_slots_are_bucketed(tiny_dia):
    rows = encoded_rows(tiny_dia.engine, *_text_rows(TEXTS[:1]), slots=41, graph=True)
    assert isinstance(rows, DeviceRows)
    batch, length, slots = rows.buffers.key
    assert (batch, slots) == (2, DeviceRows.SLOT_BUCKET)
    assert length == min(TINY.encoder.max_length, DeviceRows.TEXT_BUCKET)
    with pytest.raises(ValueError, match="cache holds 41 rows"):
        run_at(rows, np.zeros((2, 1, 9), dtype=np.int64), 41)  # the request's own limit, not the bucket's
    rows.close()


def test_use_torch_compile_on_the_cpu_runs_the_plain_loop(tiny_dia, caplog):
    with caplog.at_level(logging.INFO, logger="dia_ort"):
        codes = tiny_dia.generate_codes(TEXTS[0], temperature=0, max_new_tokens=10, use_torch_compile=True)
    assert "needs device='cuda'" in caplog.text
    assert codes[0].shape == (10, 9)


def _text_rows(texts):
    from dia_ort.item import cfg_text_rows

    return cfg_text_rows([encode_text(t, TINY.encoder.max_length) for t in texts])


# -- on a CUDA device -------------------------------------------------------------------------------

cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs onnxruntime-gpu and a CUDA device")


@pytest.fixture(scope="module")
def cuda_folder(tmp_path_factory, tiny_state, tiny_codec):
    return export_tiny(
        tmp_path_factory.mktemp("tiny_cuda"), TINY, tiny_state, tiny_codec, ("float32", "float16", "bfloat16")
    )


def teacher_forced_logits(engine: Engine, graph: bool, prompt) -> list[np.ndarray]:
    """The logits of a prefill of the prompt rows and then 20 one-row steps of fixed tokens."""
    text_ids, text_mask = _text_rows(TEXTS)
    rows = np.repeat(np.random.default_rng(7).integers(0, 1024, size=(2, 28, 9)), 2, axis=0)
    cache = encoded_rows(engine, text_ids, text_mask, slots=40, graph=graph)
    logits = [run_at(cache, rows[:, : len(prompt)], 0)]
    logits += [run_at(cache, rows[:, row : row + 1], row) for row in range(len(prompt), 28)]
    cache.close()
    return logits


# ONNX Runtime's CUDA kernels may use TF32 for float32 and reduce in another order than the CPU;
# a stale or misbound buffer would be off by the logits' whole scale
CUDA_TOLERANCE = {"float32": 1e-2, "float16": 2e-2, "bfloat16": 6e-2}


@cuda
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_cuda_plain_and_captured_steps_track_the_cpu(cuda_folder, tiny_dia, dtype, prompt):
    dia = Dia(cuda_folder, compute_dtype=dtype, device="cuda")
    assert dia.compute_dtype == dtype
    want = teacher_forced_logits(tiny_dia.engine, False, prompt)
    for graph in (False, True, True):  # the second captured request replays the first one's graph
        have = teacher_forced_logits(dia.engine, graph, prompt)
        for w, h in zip(want, have, strict=True):
            np.testing.assert_allclose(h, w, atol=CUDA_TOLERANCE[dtype] * np.abs(w).max())
    assert dia.engine.cuda_graph, dia.engine.cuda_graph_error


@cuda
def test_use_torch_compile_on_cuda_generates(cuda_folder):
    dia = Dia(cuda_folder, compute_dtype="float16", device="cuda")
    codes = dia.generate_codes(TEXTS, temperature=0, max_new_tokens=12, use_torch_compile=True)
    assert [c.shape for c in codes] == [(12, 9)] * 2
    assert dia.engine.cuda_graph and len(dia.engine.buffers) == 1


@cuda
def test_cuda_codec_decodes_at_one_width_and_streams_what_it_decodes(cuda_folder, tiny_dia):
    """On CUDA every decoder call is one block of CUDA_GRID's width; the audio tracks the CPU's and a
    stream is bit-identical to decoding the whole item."""
    dia = Dia(cuda_folder, compute_dtype="float16", device="cuda")
    assert dia.codec.grid == CUDA_GRID
    codes = np.random.default_rng(2).integers(0, 1024, size=(150, TINY.decoder.num_channels))
    want = dia.codec.decode(codes)
    np.testing.assert_allclose(want, tiny_dia.codec.decode(codes), atol=1e-2)
    stream = dia.codec.stream()
    pieces = [stream.decode(codes[:n]) for n in range(10, 150, 10)] + [stream.decode(codes, last=True)]
    np.testing.assert_array_equal(np.concatenate(pieces), want)


def test_step_graph_needs_no_host_device_copies(tiny_folder):
    """ONNX Runtime captures a CUDA graph only where no tensor crosses between host and device
    inside it; modelled on the CPU (tests/cuda_placement.py), since the capture itself needs a GPU."""
    manifest = Manifest.load(tiny_folder)
    model = basic_optimized(tiny_folder / manifest.variants["float32"]["decoder_step"].file.path)
    assert host_device_copies(model) == []
    # the model does see a copy: a shape-derived value added to the data moves the Add to the host
    node = onnx.helper.make_node
    probe = onnx.helper.make_graph(
        [node("Shape", ["x"], ["s"]), node("Cast", ["s"], ["f"], to=1), node("Add", ["x", "f"], ["y"])],
        "probe",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n"])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
    )
    assert host_device_copies(onnx.helper.make_model(probe)) == ["x -> Add  input 0"]
