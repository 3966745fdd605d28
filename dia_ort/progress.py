"""How fast generation runs: the seed API's `verbose` report through the package logger, and the
steady step time that the benchmark and the model card measure."""

from __future__ import annotations

import logging
import statistics
import time
from collections.abc import Callable

import numpy as np


def report_speed(steps: int, seconds: float, frame_rate: float) -> None:
    """Log how fast `steps` decoder steps ran, `frame_rate` of them a second of audio; shown even where
    the caller configured no logging."""
    logger = logging.getLogger("dia_ort")
    if not logger.handlers and not logging.getLogger().handlers:
        logger.addHandler(logging.StreamHandler())
        logger.setLevel(logging.INFO)
    rate = steps / seconds if seconds > 0 else float("inf")
    logger.info(
        "generated %d steps in %.2f s: %.1f steps/s, %.3fx realtime",
        steps,
        seconds,
        rate,
        rate / frame_rate,
    )


def steady_step_seconds(generate_codes: Callable[..., object], *args: object, **kwargs: object) -> float:
    """The median time between the decoder steps of a `Dia.generate_codes` call (its callback stamps
    each step): the steady speed, without the encoder and the prefill."""
    stamps: list[float] = []
    generate_codes(*args, callback=lambda step, total: stamps.append(time.perf_counter()), **kwargs)
    return float(statistics.median(np.diff(stamps)))
