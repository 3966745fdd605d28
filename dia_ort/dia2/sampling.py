"""Dia2's guidance and sampler, in numpy (docs/dia2.md section 5).

A port of nari-labs/dia2's `runtime/guidance.py` and `runtime/sampler.py` (8687268). Its guidance
does not sample the guided logits: their top k only pick the candidates, and the conditional row's
logits on those are sampled.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

FLOAT_MIN = np.finfo(np.float32).min
# probabilities Tensor[V] (summing to 1) -> the drawn index; the reference draws with torch.multinomial
Draw = Callable[[np.ndarray], int]


@dataclass(frozen=True)
class SamplingConfig:
    """Temperature (0 or less: the argmax) and top-k (0: every id) of one stream."""

    temperature: float = 0.8
    top_k: int = 50


def lerp(start: np.ndarray, end: np.ndarray, weight: float) -> np.ndarray:
    """torch.lerp's float32 arithmetic: start + w (end - start) for w < 0.5, else end - (end - start)(1 - w)."""
    weight = np.float32(weight)
    difference = end - start
    if weight < 0.5:
        return start + weight * difference
    return end - difference * (np.float32(1) - weight)


def guide(logits: np.ndarray, scale: float, filter_k: int) -> np.ndarray:
    """`[2, V]` logits (conditional, unconditional) -> the conditional row, kept only on the top
    `filter_k` ids of lerp(uncond, cond, scale) (all of it when filter_k is 0). A scale of 1 is no
    guidance: the conditional row as it is."""
    cond = logits[0].astype(np.float32)
    if scale == 1.0:
        return cond
    guided = lerp(logits[1].astype(np.float32), cond, scale)
    if filter_k > 0:
        k = min(filter_k, guided.shape[-1])
        threshold = np.partition(guided, guided.shape[-1] - k)[guided.shape[-1] - k]
        cond = np.where(guided >= threshold, cond, np.float32(-np.inf))
    return cond


def mask_ids(logits: np.ndarray, ids: tuple[int, ...]) -> np.ndarray:
    """The logits with `ids` set to float32's minimum (codebook 0's pad and BOS)."""
    masked = logits.copy()
    masked[[i for i in ids if 0 <= i < logits.shape[-1]]] = FLOAT_MIN
    return masked


def sample(logits: np.ndarray, config: SamplingConfig, draw: Draw) -> int:
    """One id from `[V]` logits: the argmax at temperature 0 or less; else softmax(logits / T),
    renormalised over its top k, and `draw` picks among those (their probabilities in descending order)."""
    logits = logits.astype(np.float32)
    if config.temperature <= 0.0:
        return int(np.argmax(logits))
    with np.errstate(over="ignore"):  # float32's minimum (a masked id) / T < 1 is -inf, as in torch
        scaled = logits / np.float32(max(config.temperature, 1e-6))
    exp = np.exp(scaled - scaled.max())
    probs = np.nan_to_num(exp / exp.sum(), nan=0.0, posinf=0.0, neginf=0.0).clip(min=0.0)
    total = probs.sum()
    if total <= 0:
        probs = np.zeros_like(probs)
        probs[0] = 1.0
    else:
        probs = probs / max(total, 1e-12)
    if 0 < config.top_k < probs.shape[-1]:
        order = np.argsort(-probs, kind="stable")[: config.top_k]
        top = probs[order]
        return int(order[draw(top / max(top.sum(), 1e-12))])
    return draw(probs)


def random_draw(rng: np.random.Generator) -> Draw:
    """Draws by inverse CDF from `rng`."""

    def draw(probs: np.ndarray) -> int:
        return int(
            min(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"), len(probs) - 1)
        )

    return draw
