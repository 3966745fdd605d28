"""Generation token for token against transformers (0626) and the SPEC reference (v0.1): greedy, and
sampled with both sides drawing from the same numpy generator (tests/reference.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import export_tiny
from reference import SpecReference, hf_greedy_rows, hf_model, hf_sampled_rows

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
ORIGINAL_FILTER = 45  # the original's cfg_filter_top_k, the manifest's default
EOS_HEAD_SCALE = 5.0  # channel 0's EOS row of the head: both generations end by themselves in 16 to 40 rows


@pytest.fixture(scope="module")
def hf(tiny_state):
    return hf_model(TINY, tiny_state)


@pytest.fixture(scope="module")
def eos_state(tiny_state) -> dict[str, torch.Tensor]:
    """The tiny weights with a large channel-0 EOS logit, so that EOS comes before any budget."""
    head = tiny_state["logits_dense.weight"].clone()
    head[TINY.eos_id] *= EOS_HEAD_SCALE
    return {**tiny_state, "logits_dense.weight": head}


@pytest.fixture(scope="module")
def eos_dia(tmp_path_factory, eos_state, tiny_codec) -> Dia:
    folder = export_tiny(tmp_path_factory.mktemp("eos"), TINY, eos_state, tiny_codec)
    return Dia.from_pretrained(folder, compute_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def eos_hf(eos_state):
    return hf_model(TINY, eos_state)


@pytest.fixture(scope="module")
def eos_v01_dia(tmp_path_factory, v01_arch, eos_state, tiny_codec) -> Dia:
    folder = export_tiny(tmp_path_factory.mktemp("eos_v01"), v01_arch, eos_state, tiny_codec)
    return Dia.from_pretrained(folder, compute_dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def eos_v01_reference(v01_arch, eos_state) -> SpecReference:
    return SpecReference(v01_arch, eos_state)


def run_rows(dia: Dia, texts, prompts=None, options=GREEDY):
    """Our delayed decoder rows per item and the row where each item's EOS was placed."""
    generation = dia.start(texts, prompts, options)
    for _ in generation:
        pass
    return generation


def natural_end(generation, budget: int) -> tuple[np.ndarray, int]:
    """The only item's rows through its EOS tail, and its EOS row, which must come before the budget."""
    item = generation.items[0]
    assert 3 < item.eos_row < budget + 1, f"EOS at row {item.eos_row}: retune EOS_HEAD_SCALE"
    return item.rows[: item.eos_row + D + 1], item.eos_row


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


@pytest.mark.parametrize(("cfg_scale", "cfg_filter_top_k"), [(3.0, None), (1.5, 1), (6.0, 200)])
def test_natural_eos_matches_transformers(eos_dia, eos_hf, cfg_scale, cfg_filter_top_k):
    """Greedy through a natural EOS and its D-row tail, at several guidance scales and filters."""
    options = GenerationOptions(
        temperature=0, max_new_tokens=100, cfg_scale=cfg_scale, cfg_filter_top_k=cfg_filter_top_k
    )
    generation = run_rows(eos_dia, TEXTS[:1], options=options)
    ours, eos = natural_end(generation, 100)
    text = encode_text(TEXTS[0], TINY.encoder.max_length)
    k = cfg_filter_top_k or ORIGINAL_FILTER
    theirs = hf_greedy_rows(eos_hf, TINY, text, 120, cfg_scale=cfg_scale, cfg_filter_top_k=k)
    np.testing.assert_array_equal(ours, theirs[: len(ours)])
    for c, d in enumerate(TINY.delay_pattern):
        assert ours[eos + d, c] == TINY.eos_id
        assert (ours[eos + d + 1 :, c] == TINY.pad_id).all()
    assert generation.codes()[0].shape == (eos - 1, TINY.decoder.num_channels)


@pytest.mark.parametrize(
    ("temperature", "cfg_filter_top_k", "top_p", "seed"), [(1.0, 20, 0.9, 0), (1.5, None, 0.95, 1)]
)
def test_sampled_stream_matches_transformers(eos_dia, eos_hf, temperature, cfg_filter_top_k, top_p, seed):
    """Seeded sampling through a natural EOS: guidance filter, temperature, EOS forcing and top-p as
    transformers applies them, its draws taken from the same generator."""
    options = GenerationOptions(
        temperature=temperature, top_p=top_p, cfg_filter_top_k=cfg_filter_top_k, seed=seed, max_new_tokens=100
    )
    ours, _ = natural_end(run_rows(eos_dia, TEXTS[:1], options=options), 100)
    text = encode_text(TEXTS[0], TINY.encoder.max_length)
    k = cfg_filter_top_k or ORIGINAL_FILTER
    theirs = hf_sampled_rows(eos_hf, TINY, text, 120, seed, top_k=k, top_p=top_p, temperature=temperature)
    np.testing.assert_array_equal(ours, theirs[: len(ours)])


def test_top_k_one_samples_the_greedy_stream(eos_dia, eos_hf):
    """top_k=1 below the guidance filter leaves one candidate: sampling gives transformers' greedy rows."""
    options = GenerationOptions(temperature=1.0, top_k=1, cfg_filter_top_k=10, seed=0, max_new_tokens=100)
    ours, _ = natural_end(run_rows(eos_dia, TEXTS[:1], options=options), 100)
    text = encode_text(TEXTS[0], TINY.encoder.max_length)
    theirs = hf_greedy_rows(eos_hf, TINY, text, 120, cfg_filter_top_k=10)
    np.testing.assert_array_equal(ours, theirs[: len(ours)])


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


@pytest.mark.parametrize("cfg_scale", [1.5, 3.0])
def test_v01_matches_spec_reference(eos_v01_dia, eos_v01_reference, cfg_scale):
    """Greedy v0.1 (cross-attention RoPE, plain CFG, the EOS damping) through a natural EOS and its tail."""
    options = GenerationOptions(temperature=0, max_new_tokens=100, cfg_scale=cfg_scale)
    ours, _ = natural_end(run_rows(eos_v01_dia, TEXTS[:1], options=options), 100)
    text = encode_text(TEXTS[0], TINY.encoder.max_length)
    want = eos_v01_reference.rows(text, 100, cfg_scale=cfg_scale)
    np.testing.assert_array_equal(ours, want)


@pytest.mark.parametrize(
    ("temperature", "cfg_filter_top_k", "top_k", "seed"), [(1.0, 10, None, 9), (1.5, 30, 4, 6)]
)
def test_v01_sampled_matches_spec_reference(
    eos_v01_dia, eos_v01_reference, temperature, cfg_filter_top_k, top_k, seed
):
    """Seeded v0.1 sampling through a natural EOS: top-k is cfg_filter_top_k (or top_k when smaller) and EOS is
    never forced. These seeds reach a row where EOS is channel 0's argmax and another id is drawn."""
    options = GenerationOptions(
        temperature=temperature, cfg_filter_top_k=cfg_filter_top_k, top_k=top_k, seed=seed, max_new_tokens=100
    )
    ours, _ = natural_end(run_rows(eos_v01_dia, TEXTS[:1], options=options), 100)
    text = encode_text(TEXTS[0], TINY.encoder.max_length)
    want = eos_v01_reference.rows(
        text,
        100,
        cfg_filter_top_k=cfg_filter_top_k,
        top_k=top_k,
        temperature=temperature,
        top_p=0.95,
        seed=seed,
    )
    np.testing.assert_array_equal(ours, want)


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
    from dia_ort import engine

    once = tiny_dia.generate_codes(TEXTS[:2], temperature=0, max_new_tokens=NEW)
    monkeypatch.setattr(engine, "CACHE_GROWTH", 8)
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
