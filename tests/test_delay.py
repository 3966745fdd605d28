"""The delay pattern (docs/generation.md section 5) against its rule, written out cell by cell:
row t of channel c holds frame t - 1 - d[c], and rows 0..d[c] of channel c hold BOS."""

from __future__ import annotations

import numpy as np
import pytest

from dia_ort.config import ModelConfig
from dia_ort.delay import UNKNOWN, known_prefix, known_rows, undo_delay

CONFIG = ModelConfig(
    flavour="0626",
    text_length=32,
    audio_length=64,
    num_channels=9,
    vocab_size=1028,
    delay_pattern=(0, 8, 9, 10, 11, 12, 13, 14, 15),
    eos_id=1024,
    pad_id=1025,
    bos_id=1026,
    decoder_layers=1,
    kv_heads=1,
    head_dim=4,
    cross_heads=1,
    cross_head_dim=4,
)
D = CONFIG.max_delay


def frames(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, CONFIG.codebook_size, (count, CONFIG.num_channels))


def expected_cell(t: int, c: int, prompt: np.ndarray) -> int:
    d = CONFIG.delay_pattern[c]
    if t <= d:
        return CONFIG.bos_id
    frame = t - 1 - d
    return int(prompt[frame, c]) if frame < len(prompt) else UNKNOWN


@pytest.mark.parametrize("prompt_frames", [0, 1, 5, 20])
def test_known_rows_follow_the_rule(prompt_frames):
    prompt = frames(prompt_frames)
    grid = known_rows(prompt if prompt_frames else None, CONFIG)
    assert grid.shape == (prompt_frames + D + 1, CONFIG.num_channels) and grid.dtype == np.int64
    expected = [[expected_cell(t, c, prompt) for c in range(CONFIG.num_channels)] for t in range(len(grid))]
    np.testing.assert_array_equal(grid, expected)


def test_every_channel_gets_bos_through_its_own_delay():
    """The last channel keeps BOS at row D (the original's off-by-one is not copied)."""
    grid = known_rows(None, CONFIG)
    assert grid[D, -1] == CONFIG.bos_id
    assert (grid[:, 0] == [CONFIG.bos_id] + [UNKNOWN] * D).all()


@pytest.mark.parametrize(("prompt_frames", "prefix"), [(0, 1), (1, 2), (7, 8)])
def test_known_prefix_is_row_0_plus_the_prompt(prompt_frames, prefix):
    assert known_prefix(known_rows(frames(prompt_frames) if prompt_frames else None, CONFIG)) == prefix


def test_known_prefix_of_a_grid_without_unknown_cells_is_its_length():
    assert known_prefix(np.zeros((4, 3), dtype=np.int64)) == 4


@pytest.mark.parametrize("prompt_frames", [0, 3])
def test_undo_delay_reads_frame_k_of_channel_c_from_row_k_plus_1_plus_p_plus_d(prompt_frames):
    out = frames(10, seed=1)
    rows = np.full((1 + prompt_frames + len(out) + D + 2, CONFIG.num_channels), -7)
    for c, d in enumerate(CONFIG.delay_pattern):
        rows[1 + prompt_frames + d : 1 + prompt_frames + d + len(out), c] = out[:, c]
    codes = undo_delay(rows, CONFIG, prompt_frames, len(out))
    assert codes.dtype == np.int64
    np.testing.assert_array_equal(codes, out)
    np.testing.assert_array_equal(undo_delay(rows, CONFIG, prompt_frames, 4), out[:4])


def test_undo_delay_turns_ids_outside_the_codebook_into_0():
    rows = np.zeros((1 + D + 1, CONFIG.num_channels), dtype=np.int64)
    specials = [-1, 1023, 1024, 1025, 1026, 1027, 0, 5, 1022]
    for c, d in enumerate(CONFIG.delay_pattern):
        rows[1 + d, c] = specials[c]
    np.testing.assert_array_equal(undo_delay(rows, CONFIG, 0, 1), [[0, 1023, 0, 0, 0, 0, 0, 5, 1022]])
