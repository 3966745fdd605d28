"""The delay pattern: laying audio frames into decoder rows and reading them back (docs/generation.md section 5).

Row t of channel c holds frame t-1-d[c]; rows 0..d[c] of channel c hold BOS.
"""

from __future__ import annotations

import numpy as np

from dia_ort.config import ModelConfig

UNKNOWN = -1


def known_rows(prompt: np.ndarray | None, config: ModelConfig) -> np.ndarray:
    """The cells fixed before generation starts: `[P + D + 1, C]` ids, UNKNOWN where free.

    BOS at rows 0..d[c] of every channel c (all of them: the original's off-by-one on the last
    channel is not copied), then the P prompt frames shifted by d[c].
    """
    frames = 0 if prompt is None else len(prompt)
    grid = np.full((frames + config.max_delay + 1, config.num_channels), UNKNOWN, dtype=np.int64)
    for c, d in enumerate(config.delay_pattern):
        grid[: d + 1, c] = config.bos_id
        if frames:
            grid[d + 1 : d + 1 + frames, c] = prompt[:, c]
    return grid


def known_prefix(grid: np.ndarray) -> int:
    """How many leading rows of `grid` are fully known (these are prefilled in one call)."""
    unknown = (grid == UNKNOWN).any(axis=1)
    return int(unknown.argmax()) if unknown.any() else len(grid)


def undo_delay(rows: np.ndarray, config: ModelConfig, prompt_frames: int, frames: int) -> np.ndarray:
    """Decoder rows `[R, C]` -> the `[frames, C]` audio codes after the prompt; specials become 0."""
    out = np.zeros((frames, config.num_channels), dtype=np.int64)
    for c, d in enumerate(config.delay_pattern):
        start = 1 + prompt_frames + d
        out[:, c] = rows[start : start + frames, c]
    out[(out < 0) | (out >= config.codebook_size)] = 0
    return out
