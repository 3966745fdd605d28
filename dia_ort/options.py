"""Per-request generation options, built by every entry point and validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from numbers import Integral, Real
from typing import Any

# The sampler divides float32 logits by the temperature and scales their guidance difference: past
# these bounds float32 underflows or overflows, and the logits turn to NaN (silent garbage, not audio).
MIN_TEMPERATURE = 1e-6
MAX_SCALE = 1e6
MAX_COUNT = 2**31 - 1  # counts (tokens, frames, Hz) stay int32
MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Bound:
    """An option's range: `low` to `high`, `low` itself excluded when `open_low`."""

    low: float
    high: float
    open_low: bool = False

    def holds(self, value: float) -> bool:
        return (self.low < value if self.open_low else self.low <= value) and value <= self.high

    def text(self) -> str:
        low, high = (f"{v:g}" if isinstance(v, float) else str(v) for v in (self.low, self.high))
        return f"in ({low}, {high}]" if self.open_low else f"from {low} to {high}"


def option(default: object, help: str, bound: Bound | None = None) -> Any:
    """A GenerationOptions field: its default, what it does (the CLI's help) and its range."""
    return field(default=default, metadata={"help": help, "bound": bound})


@dataclass(frozen=True)
class GenerationOptions:
    """The seed API's sampling keywords plus `cfg_filter_top_k` and `seed`: each one's default, help
    and range, from which `Dia.generate`'s signature, the CLI's flags and the server's schema take theirs.

    `temperature=0` is greedy. `top_k=None` means no top-k in sampling; `cfg_filter_top_k=None`
    means the model's default. `use_torch_compile` asks for CUDA graphs where the provider allows.
    """

    top_p: float = option(
        0.95, "nucleus sampling: sample among the likeliest tokens up to this mass", Bound(0, 1, True)
    )
    temperature: float = option(1.0, "sampling temperature; 0 is greedy", Bound(0, MAX_SCALE))
    top_k: int | None = option(
        None, "sample among the k likeliest tokens (default: all)", Bound(1, MAX_COUNT)
    )
    sample_rate: int = option(44100, "output sample rate in Hz", Bound(1, MAX_COUNT))
    max_new_tokens: int = option(2048, "at most this many frames (86 a second)", Bound(1, MAX_COUNT))
    use_torch_compile: bool = option(False, "run one-row steps as a captured CUDA graph (device cuda)")
    cfg_scale: float = option(3.0, "classifier-free guidance scale", Bound(0, MAX_SCALE))
    verbose: bool = option(False, "log the speed once generation ends")
    cfg_filter_top_k: int | None = option(
        None, "guidance keeps the k likeliest guided tokens (default: the model's)", Bound(1, MAX_COUNT)
    )
    seed: int | None = option(None, "make sampling reproducible", Bound(0, MAX_SEED))

    def validate(self) -> GenerationOptions:
        """Raise a `ValueError`/`TypeError` naming the first out-of-range value; return self."""
        for f in fields(self):
            value, bound = getattr(self, f.name), f.metadata["bound"]
            if bound is None or (value is None and f.default is None):
                continue
            (_integer if "int" in f.type else _number)(f.name, value)
            if f.name == "temperature" and value != 0 and not MIN_TEMPERATURE <= value <= MAX_SCALE:
                raise ValueError(
                    f"temperature must be 0 (greedy) or from {MIN_TEMPERATURE} to {MAX_SCALE:g}, got {value}"
                )
            if not bound.holds(value):
                raise ValueError(f"{f.name} must be {bound.text()}, got {value}")
        return self


DEFAULTS = GenerationOptions()
OPTIONS = {f.name: f for f in fields(GenerationOptions)}


def _number(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if value != value:  # NaN
        raise ValueError(f"{name} must not be NaN")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def _integer(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
