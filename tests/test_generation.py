"""Greedy generation token for token against transformers (0626) and the SPEC reference (v0.1)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import export_tiny
from reference import SpecReference, hf_greedy_rows, hf_model

from dia_ort import Dia, GenerationOptions
from dia_ort.text import encode_text
from export.architecture import TINY
from export.checkpoint import load_checkpoint, save_checkpoint

TEXTS = [
    "[S1] Hello there. [S2] Hi!",
    "[S1] A much longer line of text, so that the batch needs padding. (laughs) [S2] Right.",
    "[S2] Short.",
]
NEW = 40  # frames asked of the runtime
D = max(TINY.delay_pattern)
GREEDY = GenerationOptions(temperature=0, max_new_tokens=NEW)


@pytest.fixture(scope="module")
def hf(tiny_state):
    return hf_model(TINY, tiny_state)


def run_rows(dia: Dia, texts, prompts=None, options=GREEDY):
    """Our delayed decoder rows per item and the row where each item's EOS was placed."""
    generation = dia.start(texts, prompts, options)
    for _ in generation:
        pass
    return generation


def assert_rows_match_before_budget(ours: np.ndarray, eos_row: int, theirs: np.ndarray) -> int:
    """Rows before the budget's forced EOS are identical (docs/generation.md section 14); returns frames compared."""
    assert len(theirs) > eos_row, "transformers stopped before our budget"
    np.testing.assert_array_equal(ours[:eos_row], theirs[:eos_row])
    np.testing.assert_array_equal(ours[eos_row, 1:], theirs[eos_row, 1:])
    return eos_row


def test_single_text_matches_transformers(tiny_dia, hf):
    generation = run_rows(tiny_dia, TEXTS[:1])
    eos = generation.items[0].eos_row
    assert eos == NEW + 1  # the random model never ends by itself: the budget ends it
    theirs = hf_greedy_rows(hf, TINY, encode_text(TEXTS[0], TINY.encoder.max_length), NEW + D + 5)
    assert assert_rows_match_before_budget(generation.items[0].rows, eos, theirs) > 0
    codes = generation.codes()[0]
    assert codes.shape == (NEW, TINY.decoder.num_channels)
    for c, d in enumerate(TINY.delay_pattern):  # frame k of channel c is row k + 1 + d[c]
        k = eos - 1 - d  # frames whose rows are before our forced EOS
        np.testing.assert_array_equal(codes[:k, c], theirs[1 + d : 1 + d + k, c])


def test_batch_of_different_lengths_matches_single_runs(tiny_dia, hf):
    generation = run_rows(tiny_dia, TEXTS)
    for i, text in enumerate(TEXTS):
        theirs = hf_greedy_rows(hf, TINY, encode_text(text, TINY.encoder.max_length), NEW + D + 5)
        assert_rows_match_before_budget(generation.items[i].rows, generation.items[i].eos_row, theirs)


def test_audio_prompts_differing_per_item_match_transformers(tiny_dia, hf):
    """A batch with two different prompts and none: every item is its own transformers run."""
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, 1024, size=(frames, TINY.decoder.num_channels)) for frames in (12, 5)]
    batch = [prompts[0], None, prompts[1]]
    generation = run_rows(tiny_dia, TEXTS, batch)
    for i, (text, prompt) in enumerate(zip(TEXTS, batch, strict=True)):
        theirs = hf_greedy_rows(
            hf, TINY, encode_text(text, TINY.encoder.max_length), NEW + D + 5 + 12, prompt=prompt
        )
        item = generation.items[i]
        assert item.eos_row == (0 if prompt is None else len(prompt)) + 1 + NEW
        assert_rows_match_before_budget(item.rows, item.eos_row, theirs)
    for codes in generation.codes():
        assert codes.shape == (NEW, TINY.decoder.num_channels)  # the prompt is not part of the output


def test_natural_eos_matches_transformers(tmp_path, tiny_state, tiny_codec):
    """Weights whose EOS logit on channel 0 is large: EOS comes before the budget, then the D-row tail."""
    state = dict(tiny_state)
    head = state["logits_dense.weight"].clone()
    head[TINY.eos_id] *= 2.5
    state["logits_dense.weight"] = head
    dia = Dia.from_pretrained(
        export_tiny(tmp_path, TINY, state, tiny_codec), compute_dtype="float32", device="cpu"
    )
    generation = run_rows(dia, TEXTS[:1], options=GenerationOptions(temperature=0, max_new_tokens=100))
    eos = generation.items[0].eos_row
    assert 3 < eos < 100, f"EOS at row {eos}: retune the head scale"
    theirs = hf_greedy_rows(hf_model(TINY, state), TINY, encode_text(TEXTS[0], TINY.encoder.max_length), 120)
    tail = eos + D + 1
    np.testing.assert_array_equal(generation.items[0].rows[:tail], theirs[:tail])
    for c, d in enumerate(TINY.delay_pattern):
        assert generation.items[0].rows[eos + d, c] == TINY.eos_id
        assert (generation.items[0].rows[eos + d + 1 : tail, c] == TINY.pad_id).all()
    assert generation.codes()[0].shape == (eos - 1, TINY.decoder.num_channels)


def test_nari_and_hf_layouts_give_identical_output(tmp_path, tiny_state, tiny_codec, tiny_dia):
    reference = tiny_dia.generate_codes(TEXTS[:2], temperature=0, max_new_tokens=NEW)
    for layout, fmt, shards in (("nari", "safetensors", 1), ("hf", "safetensors", 3)):
        checkpoint = save_checkpoint(
            TINY, tiny_state, tmp_path / layout / "ckpt", layout=layout, fmt=fmt, shards=shards
        )
        arch, state = load_checkpoint(checkpoint)
        folder = export_tiny(tmp_path / layout / "onnx", arch, state, tiny_codec)
        dia = Dia.from_pretrained(folder, compute_dtype="float32", device="cpu")
        for ours, want in zip(
            dia.generate_codes(TEXTS[:2], temperature=0, max_new_tokens=NEW), reference, strict=True
        ):
            np.testing.assert_array_equal(ours, want)


def test_v01_matches_spec_reference(v01_dia, v01_arch, tiny_state):
    """Cross-attention RoPE, plain CFG and the EOS damping of v0.1 against docs/generation.md section 14 in torch."""
    steps = 30
    generation = run_rows(v01_dia, TEXTS[:1], options=GenerationOptions(temperature=0, max_new_tokens=steps))
    reference = SpecReference(v01_arch, tiny_state)
    with torch.no_grad():
        want = reference.greedy_rows(encode_text(TEXTS[0], TINY.encoder.max_length), steps)
    eos = generation.items[0].eos_row
    np.testing.assert_array_equal(
        generation.items[0].rows[: min(eos, len(want))], want[: min(eos, len(want))]
    )


def test_v01_differs_from_0626(v01_dia, tiny_dia):
    """Same weights, other generation: the flavour really changes the output."""
    a = tiny_dia.generate_codes(TEXTS[:1], temperature=0, max_new_tokens=20)[0]
    b = v01_dia.generate_codes(TEXTS[:1], temperature=0, max_new_tokens=20)[0]
    assert not np.array_equal(a, b)


def test_seeded_sampling_is_reproducible(tiny_dia):
    kwargs = dict(temperature=1.0, top_p=0.9, max_new_tokens=25, seed=7)
    first = tiny_dia.generate_codes(TEXTS[:1], **kwargs)[0]
    again = tiny_dia.generate_codes(TEXTS[:1], **kwargs)[0]
    other = tiny_dia.generate_codes(TEXTS[:1], **{**kwargs, "seed": 8})[0]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_callback_counts_steps(tiny_dia):
    calls = []
    tiny_dia.generate_codes(
        TEXTS[:1], temperature=0, max_new_tokens=10, callback=lambda s, t: calls.append((s, t))
    )
    # one call per decoder step: the budget's 10 frames, the EOS row, then max_delay steps to flush
    assert calls == [(step, 10 + D + 1) for step in range(1, 10 + D + 2)]


def test_cache_growth_keeps_rows(tiny_dia, monkeypatch):
    """Buffers that grow every 8 rows (a copy each time) give the same tokens as one allocation."""
    from dia_ort.engine import DecoderState

    once = tiny_dia.generate_codes(TEXTS[:2], temperature=0, max_new_tokens=NEW)
    monkeypatch.setattr(DecoderState, "GROWTH", 8)
    grown = tiny_dia.generate_codes(TEXTS[:2], temperature=0, max_new_tokens=NEW)
    for a, b in zip(once, grown, strict=True):
        np.testing.assert_array_equal(a, b)


def test_verbose_reports_speed(tiny_dia, caplog):
    caplog.set_level("INFO", logger="dia_ort")
    tiny_dia.generate("[S1] Hi.", max_new_tokens=4, seed=0, verbose=True)
    assert "steps/s" in caplog.text and "realtime" in caplog.text


def test_a_seeded_batch_samples_each_item_as_alone(tiny_dia):
    """Batching never changes a result: sampled with a seed, item i equals `generate(texts[i], seed)`."""
    kwargs = dict(temperature=1.0, top_p=0.9, max_new_tokens=25, seed=11)
    batch = tiny_dia.generate_codes(TEXTS[:3], **kwargs)
    for text, codes in zip(TEXTS[:3], batch, strict=True):
        np.testing.assert_array_equal(codes, tiny_dia.generate_codes([text], **kwargs)[0])
    twice = tiny_dia.generate_codes([TEXTS[0], TEXTS[0]], **kwargs)
    np.testing.assert_array_equal(twice[0], twice[1])
