"""What the runtime must know about a Dia model: token ids, delay pattern, windows and cache shapes.

This is the semantic part of a checkpoint's config. The export stage derives it from the checkpoint
and writes it into the manifest; the runtime reads it back and never guesses from a model name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

FLAVOURS = ("v0.1", "0626")


@dataclass(frozen=True)
class ModelConfig:
    """Generation semantics and graph sizes of one Dia model (docs/generation.md sections 1 and 5)."""

    flavour: str  # "v0.1" (cross-attention RoPE, plain CFG) or "0626"
    text_length: int  # encoder window in bytes
    audio_length: int  # decoder window in rows
    num_channels: int
    vocab_size: int
    delay_pattern: tuple[int, ...]
    eos_id: int
    pad_id: int
    bos_id: int
    decoder_layers: int
    kv_heads: int
    head_dim: int
    cross_heads: int
    cross_head_dim: int
    default_cfg_filter_top_k: int = 45

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if field.type == "int" and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"model config {field.name} must be a whole number >= 0, got {value!r}")
        if self.flavour not in FLAVOURS:
            raise ValueError(f"unknown Dia flavour {self.flavour!r}; expected one of {FLAVOURS}")
        if len(self.delay_pattern) != self.num_channels:
            raise ValueError(
                f"delay pattern {list(self.delay_pattern)} has {len(self.delay_pattern)} entries "
                f"for {self.num_channels} channels"
            )
        if min(self.delay_pattern) < 0:
            raise ValueError(f"delay pattern {list(self.delay_pattern)} has a negative delay")

    @property
    def max_delay(self) -> int:
        return max(self.delay_pattern)

    @property
    def audio_room(self) -> int:
        """Prompt and output frames one generation holds: the window less BOS, the EOS row and the
        max_delay rows of the EOS tail."""
        return self.audio_length - self.max_delay - 2

    @property
    def codebook_size(self) -> int:
        """Audio code ids are 0..eos_id-1; eos_id and above are special."""
        return self.eos_id

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        values = dict(data)
        values["delay_pattern"] = tuple(int(d) for d in values["delay_pattern"])
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["delay_pattern"] = list(self.delay_pattern)
        return data
