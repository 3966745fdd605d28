"""Per-request generation options, built by every entry point and validated in one place."""

from __future__ import annotations

import math
from dataclasses import dataclass
from numbers import Integral, Real

# The sampler divides float32 logits by the temperature and scales their guidance difference: past
# these bounds float32 underflows or overflows, and the logits turn to NaN (silent garbage, not audio).
MIN_TEMPERATURE = 1e-6
MAX_SCALE = 1e6


@dataclass(frozen=True)
class GenerationOptions:
    """The seed API's sampling keywords plus `cfg_filter_top_k` and `seed`.

    `temperature=0` is greedy. `top_k=None` means no top-k in sampling; `cfg_filter_top_k=None`
    means the model's default. `use_torch_compile` asks for CUDA graphs where the provider allows.
    """

    top_p: float = 0.95
    temperature: float = 1.0
    top_k: int | None = None
    sample_rate: int = 44100
    max_new_tokens: int = 2048
    use_torch_compile: bool = False
    cfg_scale: float = 3.0
    verbose: bool = False
    cfg_filter_top_k: int | None = None
    seed: int | None = None

    def validate(self) -> GenerationOptions:
        """Raise a `ValueError`/`TypeError` naming the first out-of-range value; return self."""
        _number("temperature", self.temperature)
        _number("top_p", self.top_p)
        _number("cfg_scale", self.cfg_scale)
        if self.temperature != 0 and not MIN_TEMPERATURE <= self.temperature <= MAX_SCALE:
            raise ValueError(
                f"temperature must be 0 (greedy) or from {MIN_TEMPERATURE} to {MAX_SCALE:g}, got {self.temperature}"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.cfg_scale <= MAX_SCALE:
            raise ValueError(f"cfg_scale must be from 0 to {MAX_SCALE:g}, got {self.cfg_scale}")
        for name in ("top_k", "cfg_filter_top_k", "seed"):
            value = getattr(self, name)
            if value is not None:
                _integer(name, value)
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.cfg_filter_top_k is not None and self.cfg_filter_top_k < 1:
            raise ValueError(f"cfg_filter_top_k must be >= 1 or None, got {self.cfg_filter_top_k}")
        if self.seed is not None and self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        _integer("max_new_tokens", self.max_new_tokens)
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        _integer("sample_rate", self.sample_rate)
        if self.sample_rate < 1:
            raise ValueError(f"sample_rate must be a positive number of Hz, got {self.sample_rate}")
        return self


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
