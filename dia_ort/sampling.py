"""Turning one step's logits into tokens: CFG, the channel filters and the sampler (docs/generation.md sections 6 and 7).

Small pure numpy functions, each tested alone; `next_tokens` chains them in the reference order.
"""

from __future__ import annotations

import numpy as np

from dia_ort.config import ModelConfig
from dia_ort.options import GenerationOptions

NEG_INF = np.float32(-np.inf)


def top_k_keep(logits: np.ndarray, k: int) -> np.ndarray:
    """Bool mask of the k largest entries of each row of `[..., V]` (all when k >= V)."""
    if k >= logits.shape[-1]:
        return np.ones(logits.shape, dtype=bool)
    top = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    keep = np.zeros(logits.shape, dtype=bool)
    np.put_along_axis(keep, top, True, axis=-1)
    return keep


def guide(
    cond: np.ndarray, uncond: np.ndarray, cfg_scale: float, filter_top_k: int | None, flavour: str
) -> np.ndarray:
    """Classifier-free guidance over `[B, C, V]` logits.

    0626: the top `filter_top_k` ids of `cfg = cond + s*(cond - uncond)` pick the candidates and the
    cond logits on them are kept. v0.1: cfg itself is sampled (its top-k is applied in sampling).
    """
    cfg = cond + np.float32(cfg_scale) * (cond - uncond)
    if flavour == "v0.1" or filter_top_k is None:
        return cfg.astype(np.float32)
    return np.where(top_k_keep(cfg, filter_top_k), cond, NEG_INF).astype(np.float32)


def mask_special(logits: np.ndarray, eos_id: int, flavour: str) -> np.ndarray:
    """Forbid PAD/BOS everywhere and EOS on channels 1.. of `[B, C, V]`; v0.1 damps EOS by 0.8."""
    logits = logits.copy()
    logits[..., eos_id + 1 :] = NEG_INF
    logits[:, 1:, eos_id:] = NEG_INF
    if flavour == "v0.1":
        logits[:, 0, eos_id] *= np.float32(0.8)
    return logits


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def _sample_next_token(
    logits_BCxV: np.ndarray,
    temperature: float,
    top_p: float,
    top_k: int | None,
    audio_eos_value: int,
    rng: np.random.Generator | None = None,
    force_eos: bool = True,
) -> np.ndarray:
    """Sample one id per row of `[BC, V]` logits, as the original `_sample_next_token` does.

    temperature 0 is argmax. Otherwise: divide by temperature; EOS is masked unless it is the row's
    argmax (and, with `force_eos` as in 0626, forced when it is); top-k; top-p keeps each id of the
    sorted distribution while the mass before it is at most top_p (at least one id); then draw.
    """
    logits_BCxV = np.asarray(logits_BCxV, dtype=np.float32)
    if temperature == 0:
        return logits_BCxV.argmax(axis=-1)
    logits = logits_BCxV / np.float32(temperature)
    if audio_eos_value is not None and audio_eos_value >= 0:
        eos_top = logits.argmax(axis=-1) == audio_eos_value
        logits[~eos_top, audio_eos_value] = NEG_INF
        if force_eos:
            logits[eos_top, :audio_eos_value] = NEG_INF
    if top_k is not None:
        logits = np.where(top_k_keep(logits, top_k), logits, NEG_INF)
    probs = _softmax(logits)
    if top_p < 1.0:
        order = np.argsort(-probs, axis=-1, kind="stable")
        sorted_probs = np.take_along_axis(probs, order, axis=-1)
        remove = np.cumsum(sorted_probs, axis=-1) > top_p
        remove[:, 1:] = remove[:, :-1].copy()
        remove[:, 0] = False
        drop = np.zeros_like(remove)
        np.put_along_axis(drop, order, remove, axis=-1)
        probs = _softmax(np.where(drop, NEG_INF, logits))
    rng = rng if rng is not None else np.random.default_rng()
    cumulative = np.cumsum(probs, axis=-1)
    draws = rng.random((probs.shape[0], 1)) * cumulative[:, -1:]
    ids = (cumulative <= draws).sum(axis=-1)
    return np.minimum(ids, probs.shape[-1] - 1)


def next_tokens(
    cond: np.ndarray,
    uncond: np.ndarray,
    options: GenerationOptions,
    config: ModelConfig,
    rng: np.random.Generator,
) -> np.ndarray:
    """One step for every item: `[B, C, V]` cond and uncond logits -> `[B, C]` ids."""
    filter_top_k = options.cfg_filter_top_k or config.default_cfg_filter_top_k
    logits = guide(cond, uncond, options.cfg_scale, filter_top_k, config.flavour)
    logits = mask_special(logits, config.eos_id, config.flavour)
    top_k = options.top_k
    if config.flavour == "v0.1":  # the original v0.1 sampled cfg with top_k = cfg_filter_top_k
        top_k = filter_top_k if top_k is None else min(top_k, filter_top_k)
    batch, channels, vocab = logits.shape
    ids = _sample_next_token(
        logits.reshape(batch * channels, vocab),
        options.temperature,
        options.top_p,
        top_k,
        config.eos_id,
        rng=rng,
        force_eos=config.flavour == "0626",
    )
    return ids.reshape(batch, channels)
