"""The seed API's `verbose`: one report of speed and realtime factor, through the package logger."""

from __future__ import annotations

import logging


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
