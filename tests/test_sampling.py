"""The sampler's rules (docs/generation.md sections 6 and 7) on fixed logits."""

from __future__ import annotations

import numpy as np
import pytest

from dia_ort import GenerationOptions, _sample_next_token
from dia_ort.config import ModelConfig
from dia_ort.sampling import guide, mask_special, next_tokens, top_k_keep

EOS = 6
V = 8


def draws(logits, n=3000, seed=0, **kwargs) -> np.ndarray:
    rows = np.repeat(np.asarray(logits, dtype=np.float32)[None], n, axis=0)
    args = {"temperature": 1.0, "top_p": 1.0, "top_k": None, "audio_eos_value": EOS} | kwargs
    return _sample_next_token(rows, rng=np.random.default_rng(seed), **args)


def test_temperature_zero_is_argmax():
    logits = np.array([[0.1, 3.0, 0.2, -1, 0, 0, 0, 0], [5, 0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
    np.testing.assert_array_equal(_sample_next_token(logits, 0.0, 0.95, None, EOS), [1, 0])


def test_samples_follow_the_softmax():
    logits = np.log(np.array([0.5, 0.25, 0.125, 0.125, 1e-9, 1e-9, 1e-9, 1e-9]))
    counts = np.bincount(draws(logits, n=20000), minlength=V) / 20000
    np.testing.assert_allclose(counts[:4], [0.5, 0.25, 0.125, 0.125], atol=0.015)


def test_temperature_sharpens():
    logits = np.log(np.array([0.6, 0.4, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9, 1e-9]))
    share = (draws(logits, temperature=0.25) == 0).mean()
    assert share > 0.8  # 0.6^4 / (0.6^4 + 0.4^4) = 0.835


def test_eos_is_masked_unless_argmax():
    logits = np.zeros(V)
    logits[[0, EOS]] = [2.0, 1.9]
    assert EOS not in draws(logits)


def test_eos_is_forced_when_argmax_in_0626_only():
    logits = np.zeros(V)
    logits[[0, EOS]] = [1.9, 2.0]
    logits[EOS + 1 :] = -np.inf  # PAD/BOS are masked before sampling, as in the pipeline
    assert (draws(logits) == EOS).all()
    free = draws(logits, force_eos=False)
    assert (free == EOS).any() and (free != EOS).any()


def test_top_k_limits_candidates():
    logits = np.array([3, 2.9, 2.8, 2.7, 0, 0, 0, 0], dtype=np.float32)
    assert set(draws(logits, top_k=2)) == {0, 1}
    assert set(draws(logits, top_k=1)) == {0}


@pytest.mark.parametrize(
    ("top_p", "kept"), [(0.8, {0, 1}), (0.81, {0, 1, 2}), (0.01, {0}), (1.0, {0, 1, 2, 3})]
)
def test_top_p_keeps_smallest_prefix_reaching_mass(top_p, kept):
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05, 1e-12, 1e-12, 1e-12, 1e-12]))
    got = set(draws(logits, n=4000, top_p=top_p))
    assert got == kept


def test_seed_makes_sampling_reproducible():
    logits = np.random.default_rng(1).normal(size=V)
    np.testing.assert_array_equal(draws(logits, seed=5), draws(logits, seed=5))
    assert not np.array_equal(draws(logits, seed=5), draws(logits, seed=6))


def test_top_k_keep_keeps_exactly_k():
    logits = np.random.default_rng(0).normal(size=(3, 50))
    keep = top_k_keep(logits, 7)
    assert (keep.sum(-1) == 7).all()
    assert (np.sort(logits, -1)[:, -7:] == np.sort(np.where(keep, logits, -np.inf), -1)[:, -7:]).all()


def test_guide_0626_picks_candidates_by_cfg_and_keeps_cond_values():
    cond = np.array([[[5.0, 4.0, 0.0, 1.0]]], dtype=np.float32)
    uncond = np.array([[[5.0, 4.0, -3.0, 1.0]]], dtype=np.float32)
    out = guide(cond, uncond, cfg_scale=3.0, filter_top_k=2, flavour="0626")
    # cfg = [5, 4, 9, 1]: the two candidates are ids 2 and 0, with their cond values
    np.testing.assert_array_equal(out, [[[5.0, -np.inf, 0.0, -np.inf]]])


def test_guide_v01_is_plain_cfg():
    cond = np.array([[[1.0, 2.0]]], dtype=np.float32)
    uncond = np.array([[[0.0, 3.0]]], dtype=np.float32)
    np.testing.assert_array_equal(guide(cond, uncond, 2.0, 1, "v0.1"), [[[3.0, 0.0]]])


def test_mask_special_channels_and_v01_damping():
    logits = np.full((1, 3, V), 2.0, dtype=np.float32)
    out = mask_special(logits, EOS, "0626")
    assert np.isneginf(out[:, :, EOS + 1 :]).all()
    assert out[0, 0, EOS] == 2.0 and np.isneginf(out[0, 1:, EOS]).all()
    assert np.isfinite(out[:, :, :EOS]).all()
    assert mask_special(logits, EOS, "v0.1")[0, 0, EOS] == pytest.approx(1.6)
    assert logits[0, 0, EOS] == 2.0  # the input is not modified


def test_rows_far_apart_in_scale_each_follow_their_softmax():
    """The softmax shifts each row by its own maximum: neither huge nor very negative logits overflow
    or vanish, and one row's scale does not change another's draws."""
    base = np.log(np.array([0.5, 0.25, 0.125, 0.125, 1e-9, 1e-9, 1e-9, 1e-9]))
    for offset in (-800.0, 0.0, 800.0):
        rows = np.repeat(np.stack([base + offset, base - offset]).astype(np.float32), 10000, axis=0)
        ids = _sample_next_token(rows, 1.0, 1.0, None, EOS, rng=np.random.default_rng(0))
        for half in (ids[0::2], ids[1::2]):
            np.testing.assert_allclose(
                np.bincount(half, minlength=V)[:4] / 10000, [0.5, 0.25, 0.125, 0.125], atol=0.02
            )


def tiny_config(flavour: str, default_cfg_filter_top_k: int = 2) -> ModelConfig:
    return ModelConfig(
        flavour=flavour,
        text_length=8,
        audio_length=16,
        num_channels=2,
        vocab_size=V,
        delay_pattern=(0, 1),
        eos_id=EOS,
        pad_id=EOS + 1,
        bos_id=EOS + 1,
        decoder_layers=1,
        kv_heads=1,
        head_dim=4,
        cross_heads=1,
        cross_head_dim=4,
        default_cfg_filter_top_k=default_cfg_filter_top_k,
    )


def step_draws(flavour: str, cond_row, n: int = 2000, **options) -> np.ndarray:
    """`next_tokens` ids `[n, C]` for n items whose channels all have the logits `cond_row` (uncond 0)."""
    cond = np.broadcast_to(np.asarray(cond_row, dtype=np.float32), (n, 2, V)).copy()
    opts = GenerationOptions(**({"top_p": 1.0, "cfg_scale": 0.0} | options))
    return next_tokens(cond, np.zeros_like(cond), opts, tiny_config(flavour), np.random.default_rng(0))


DESCENDING = [3.0, 2.9, 2.8, 2.7, 2.6, 2.5, -9.0, 0.0]  # EOS (6) far below: never the argmax


@pytest.mark.parametrize("flavour", ["0626", "v0.1"])
def test_next_tokens_takes_the_models_cfg_filter_top_k_unless_given(flavour):
    """0626 keeps cfg_filter_top_k candidates; v0.1 samples with it as top-k (docs section 7)."""
    assert set(step_draws(flavour, DESCENDING).flat) == {0, 1}
    assert set(step_draws(flavour, DESCENDING, cfg_filter_top_k=3).flat) == {0, 1, 2}


def test_v01_top_k_is_the_smaller_of_top_k_and_cfg_filter_top_k():
    assert set(step_draws("v0.1", DESCENDING, top_k=1).flat) == {0}
    assert set(step_draws("v0.1", DESCENDING, top_k=5).flat) == {0, 1}
    assert set(step_draws("0626", DESCENDING, top_k=5, cfg_filter_top_k=4).flat) == {0, 1, 2, 3}


def test_next_tokens_forces_eos_in_0626_only_and_on_channel_0_only():
    logits = [1.9, 0, 0, 0, 0, 0, 3.0, 0]  # EOS the argmax, still after v0.1's damping (2.4)
    new = step_draws("0626", logits)
    assert (new[:, 0] == EOS).all() and EOS not in new[:, 1]
    old = step_draws("v0.1", logits)
    assert (old[:, 0] == EOS).any() and (old[:, 0] != EOS).any() and EOS not in old[:, 1]


def test_next_tokens_keeps_items_and_channels_apart():
    cond = np.full((3, 2, V), -1.0, dtype=np.float32)
    best = np.array([[0, 1], [2, 3], [4, 5]])
    np.put_along_axis(cond, best[..., None], 1.0, axis=-1)
    ids = next_tokens(
        cond, cond, GenerationOptions(temperature=0), tiny_config("0626"), np.random.default_rng(0)
    )
    np.testing.assert_array_equal(ids, best)


def test_next_tokens_draws_from_the_generator_it_is_given():
    np.testing.assert_array_equal(step_draws("0626", DESCENDING), step_draws("0626", DESCENDING))


@pytest.mark.parametrize("k", [1, 2, 7, 49, 50, 53])
def test_top_k_keep_is_the_k_largest_of_each_row(k):
    logits = np.random.default_rng(k).normal(size=(40, 50)).astype(np.float32)
    keep = top_k_keep(logits, k)
    assert keep.dtype == bool and keep.shape == logits.shape
    threshold = np.sort(logits, axis=-1)[:, -min(k, 50)][:, None]  # distinct values: no ties
    np.testing.assert_array_equal(keep, logits >= threshold)


@pytest.mark.parametrize("flavour", ["0626", "v0.1"])
def test_guide_gives_float32_logits(flavour):
    """The sampler works on float32 logits, as the graphs give them and the reference samples them."""
    cond, uncond = np.zeros((1, 2, V)), np.ones((1, 2, V))
    assert guide(cond, uncond, 3.0, 4, flavour).dtype == np.float32


def test_float64_logits_are_rounded_to_float32_first():
    logits = np.array([[1.0, 1.0 + 1e-12, 0, 0, 0, 0, 0, 0]])  # equal in float32: the first wins
    assert _sample_next_token(logits, 0.0, 1.0, None, EOS)[0] == 0


@pytest.mark.parametrize("eos", [None, -1])
def test_no_eos_rule_without_an_eos_id(eos):
    logits = np.zeros(V)
    logits[[0, EOS]] = [2.0, 1.9]
    assert EOS in draws(logits, audio_eos_value=eos)


def test_eos_id_0_is_an_eos_id():
    logits = np.zeros(V)
    logits[[0, 1]] = [1.9, 2.0]
    assert 0 not in draws(logits, audio_eos_value=0)


def test_top_p_keeps_an_id_while_the_mass_before_it_is_at_most_top_p():
    """The reference's rule (cumulative mass > top_p, shifted by one): with four ids of exactly 1/4,
    top_p = 0.5 keeps the third, whose mass before it is exactly 0.5."""
    logits = np.array([0, 0, 0, 0, -np.inf, -np.inf, -np.inf, -np.inf])
    assert set(draws(logits, top_p=0.5)) == {0, 1, 2}


def test_top_p_cuts_a_tie_at_the_lower_ids():
    """A stable sort: among equally likely ids at the cut, the lower ones stay, on every platform."""
    weights = np.where(np.arange(64) % 4 == 0, 2.0, 1.0)  # 16 ids of 2/80, 48 of 1/80
    got = set(draws(np.log(weights), n=6000, top_p=0.505, audio_eos_value=-1))
    assert got == set(range(0, 64, 4)) | {1, 2, 3, 5, 6, 7, 9, 10, 11}


def test_top_p_applies_to_each_row_alone():
    rows = np.log(np.array([[0.5, 0.3, 0.15, 0.05] + [1e-12] * 4, [0.05, 0.15, 0.3, 0.5] + [1e-12] * 4]))
    ids = _sample_next_token(np.tile(rows, (2000, 1)), 1.0, 0.7, None, EOS, rng=np.random.default_rng(0))
    assert set(ids[0::2]) == {0, 1} and set(ids[1::2]) == {3, 2}


def test_one_row_without_a_generator_is_sampled():
    """rng=None takes fresh entropy; a lone row may draw any of its ids."""
    logits = np.full((1, V), -np.inf, dtype=np.float32)
    logits[0, 3] = 0.0
    assert _sample_next_token(logits, 1.0, 0.95, None, EOS).tolist() == [3]


def test_v01_samples_cfg_itself_and_damps_eos():
    """v0.1 takes the argmax of cfg (0626 would rank cfg's candidates by cond), and multiplies channel
    0's EOS logit by 0.8 before sampling (docs sections 6 and 7)."""
    cond = np.zeros((1, 2, V), dtype=np.float32)
    cond[0, :, :2] = [2.0, 1.0]
    uncond = cond.copy()
    uncond[0, :, 1] = -2.0  # cfg = [2, 10, 0, ...]: id 1 by cfg, id 0 by cond
    greedy = GenerationOptions(temperature=0)
    ids = next_tokens(cond, uncond, greedy, tiny_config("v0.1"), np.random.default_rng(0))
    assert ids.tolist() == [[1, 1]]
    assert next_tokens(cond, uncond, greedy, tiny_config("0626"), np.random.default_rng(0)).tolist() == [
        [0, 0]
    ]
    eos = np.zeros((1, 2, V), dtype=np.float32)
    eos[0, 0, [0, EOS]] = [1.9, 2.0]  # damped, EOS (1.6) falls below id 0
    ids = next_tokens(eos, eos, GenerationOptions(temperature=0, cfg_scale=0.0), tiny_config("v0.1"), None)
    assert ids[0, 0] == 0
