"""The measurement protocol shared by the runtime and the reference: the input, the positions, timing
and peak memory, so both engines are measured the same way."""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from dia_ort.decoding import Rows, run_at
from dia_ort.manifest import CodecConfig

FRAMES_PER_SECOND = CodecConfig().frame_rate  # 86.13 decoder steps make one second of the DAC's audio
TEXT = (
    "[S1] Dia is an open weights text to dialogue model. [S2] You get full control over scripts and voices."
)
PREFILL_ROWS = (1, 100)  # a first step, and a prompt-like prefill
EARLY_POSITION = 20
LATE_POSITION = 1500  # capped by the cache (tiny models have a 256-row audio window)
REPEATS = 3  # timed runs of the encoder and of each prefill, after one warm-up
SEED = 0


def step_positions(slots: int, steps: int) -> tuple[int, int]:
    """Early and late decoder positions whose `steps` single-row steps fit in `slots` cache rows."""
    late = min(LATE_POSITION, (slots - steps) // 100 * 100)
    if late <= EARLY_POSITION:
        raise ValueError(f"a cache of {slots} rows is too small for {steps} steps at a late position")
    return EARLY_POSITION, late


def random_codes(batch: int, rows: int, channels: int) -> np.ndarray:
    """Audio codes `[batch, rows, channels]` to feed the decoder (its speed does not depend on them)."""
    return np.random.default_rng(SEED).integers(0, 1024, size=(batch, rows, channels), dtype=np.int64)


def median_ms(run: Callable[[], object], repeats: int = REPEATS) -> float:
    """Median wall time of `run` over `repeats` calls after one warm-up call, in milliseconds."""
    run()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        run()
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)


def fastest(runs: dict[str, Callable[[], object]], repeats: int) -> tuple[dict[str, float], dict]:
    """Best wall time and last output of each run over `repeats` rounds after a warm-up round.

    The runs take turns within each round, so load from other processes slows them alike.
    """
    best = dict.fromkeys(runs, math.inf)
    outputs = {}
    for round_ in range(repeats + 1):
        for name, run in runs.items():
            began = time.perf_counter()
            outputs[name] = run()
            if round_:
                best[name] = min(best[name], time.perf_counter() - began)
    return best, outputs


def memory_bytes(field: str, pid: int | str = "self") -> int:
    """A memory figure of /proc/PID/status in bytes: VmRSS (resident now), VmHWM (peak), ..."""
    status = Path(f"/proc/{pid}/status")
    for line in status.read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{status} has no {field} line")


def peak_rss() -> int:
    """This process's peak resident memory in bytes (VmHWM; since the last `reset_peak_rss`)."""
    return memory_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Start the peak over from the current memory, so that setup is not counted (Linux clear_refs)."""
    Path("/proc/self/clear_refs").write_text("5")


class Stepper(Protocol):
    """A decoder with a cache: `step` feeds `[B, S, C]` tokens at rows start..start+S-1 and returns
    the last row's logits `[B, C, V]`."""

    def step(self, tokens: np.ndarray, start: int) -> np.ndarray: ...


@dataclass(frozen=True)
class RowsStepper:
    """The runtime's cache rows (dia_ort.decoding) as a `Stepper`."""

    rows: Rows

    def step(self, tokens: np.ndarray, start: int) -> np.ndarray:
        return run_at(self.rows, tokens, start)


@dataclass(frozen=True)
class EngineResult:
    """One engine's per-phase times on the CFG batch of `TEXT` (2 rows: unconditional, conditional)."""

    name: str
    precision: str  # the weights' precision: a runtime and a reference of the same one are compared
    threads: int
    encoder_ms: float
    prefill_ms: tuple[float, ...]  # for each of PREFILL_ROWS
    positions: tuple[int, ...]
    step_ms: tuple[float, ...]  # median single-row step at each position
    load_s: float | None  # None where loading is not comparable (the reference builds its weights)
    load_peak_rss: int | None  # bytes; the peak while loading
    run_peak_rss: int  # bytes; the peak from the end of loading to the end of the measurements

    @property
    def steps_per_s(self) -> float:
        """Decoding speed over a long generation: the mean of the early and late step times."""
        return 1000 / statistics.mean(self.step_ms)

    @property
    def realtime_factor(self) -> float:
        return self.steps_per_s / FRAMES_PER_SECOND

    @classmethod
    def from_dict(cls, data: dict) -> EngineResult:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def decoder_times(
    stepper: Stepper, channels: int, positions: tuple[int, ...], steps: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(prefill ms for each of PREFILL_ROWS, median step ms at each position) of a CFG pair."""
    rows = random_codes(2, max(*PREFILL_ROWS, *(p + steps for p in positions)), channels)
    prefill = tuple(median_ms(lambda n=n: stepper.step(rows[:, :n], 0)) for n in PREFILL_ROWS)
    return prefill, tuple(step_ms(stepper, rows, p, steps) for p in positions)


def step_ms(stepper: Stepper, rows: np.ndarray, position: int, steps: int) -> float:
    """Median of `steps` single-row steps from `position` on, the cache first filled by one prefill."""
    stepper.step(rows[:, :position], 0)
    times = []
    for row in range(position, position + steps):
        began = time.perf_counter()
        stepper.step(rows[:, row : row + 1], row)
        times.append(time.perf_counter() - began)
    return 1000 * statistics.median(times)
