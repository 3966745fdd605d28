"""Dia architecture from a checkpoint's config.json, in either schema (docs/generation.md section 2).

Schema A is the v0.1 config (`model`/`data` sections); schema B is transformers' `DiaConfig`, used by
0626. Both are read into one `DiaArchitecture`; `to_hf_dict` writes schema B back out, which is what
transformers needs to build the reference model in the tests.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dia_ort.config import ModelConfig

DEFAULT_DELAY_PATTERN = (0, 8, 9, 10, 11, 12, 13, 14, 15)


@dataclass(frozen=True)
class EncoderDims:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    head_dim: int
    vocab_size: int
    max_length: int  # the text window in bytes


@dataclass(frozen=True)
class DecoderDims:
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    cross_heads: int
    cross_head_dim: int
    vocab_size: int
    num_channels: int
    max_length: int  # the audio window in rows


@dataclass(frozen=True)
class DiaArchitecture:
    """Every size and constant the torch modules and the graphs are built from."""

    encoder: EncoderDims
    decoder: DecoderDims
    flavour: str
    norm_eps: float = 1e-5
    rope_min_timescale: float = 1.0
    rope_max_timescale: float = 10000.0
    delay_pattern: tuple[int, ...] = DEFAULT_DELAY_PATTERN
    eos_id: int = 1024
    pad_id: int = 1025
    bos_id: int = 1026

    def __post_init__(self) -> None:
        if self.decoder.heads % self.decoder.kv_heads:
            raise ValueError(
                f"decoder has {self.decoder.heads} query heads, not a multiple of {self.decoder.kv_heads} KV heads"
            )
        self.model_config()  # validates flavour and delay pattern

    def model_config(self) -> ModelConfig:
        """The runtime's view of this architecture (written into the manifest)."""
        return ModelConfig(
            flavour=self.flavour,
            text_length=self.encoder.max_length,
            audio_length=self.decoder.max_length,
            num_channels=self.decoder.num_channels,
            vocab_size=self.decoder.vocab_size,
            delay_pattern=tuple(self.delay_pattern),
            eos_id=self.eos_id,
            pad_id=self.pad_id,
            bos_id=self.bos_id,
            decoder_layers=self.decoder.layers,
            kv_heads=self.decoder.kv_heads,
            head_dim=self.decoder.head_dim,
            cross_heads=self.decoder.cross_heads,
            cross_head_dim=self.decoder.cross_head_dim,
        )

    def with_flavour(self, flavour: str) -> DiaArchitecture:
        return replace(self, flavour=flavour)

    @classmethod
    def from_file(cls, path: str | Path) -> DiaArchitecture:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path} is not valid JSON: {exc}") from exc
        return cls.from_dict(data, source=str(path))

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> DiaArchitecture:
        """Read schema A (v0.1) or schema B (0626 / transformers) and say which keys are missing."""
        try:
            if "model" in data and "data" in data:
                return _from_schema_a(data)
            if "encoder_config" in data and "decoder_config" in data:
                return _from_schema_b(data)
        except KeyError as exc:
            raise ValueError(f"{source}: Dia config is missing the key {exc}") from exc
        raise ValueError(
            f"{source}: not a Dia config: expected either 'model' and 'data' (v0.1) or "
            f"'encoder_config' and 'decoder_config' (0626 / transformers)"
        )

    def to_hf_dict(self) -> dict[str, Any]:
        """Schema B, as transformers' `DiaConfig` reads it."""
        enc, dec = self.encoder, self.decoder
        rope = {"rope_type": "default", "rope_theta": self.rope_max_timescale}
        return {
            "model_type": "dia",
            "architectures": ["DiaForConditionalGeneration"],
            "delay_pattern": list(self.delay_pattern),
            "norm_eps": self.norm_eps,
            "encoder_config": {
                "model_type": "dia_encoder",
                "hidden_size": enc.hidden,
                "intermediate_size": enc.intermediate,
                "num_hidden_layers": enc.layers,
                "num_attention_heads": enc.heads,
                "num_key_value_heads": enc.heads,
                "head_dim": enc.head_dim,
                "max_position_embeddings": enc.max_length,
                "vocab_size": enc.vocab_size,
                "norm_eps": self.norm_eps,
                "rope_parameters": dict(rope),
            },
            "decoder_config": {
                "model_type": "dia_decoder",
                "hidden_size": dec.hidden,
                "intermediate_size": dec.intermediate,
                "num_hidden_layers": dec.layers,
                "num_attention_heads": dec.heads,
                "num_key_value_heads": dec.kv_heads,
                "head_dim": dec.head_dim,
                "cross_num_attention_heads": dec.cross_heads,
                "cross_num_key_value_heads": dec.cross_heads,
                "cross_head_dim": dec.cross_head_dim,
                "cross_hidden_size": enc.hidden,
                "max_position_embeddings": dec.max_length,
                "num_channels": dec.num_channels,
                "vocab_size": dec.vocab_size,
                "norm_eps": self.norm_eps,
                "rope_parameters": dict(rope),
                "eos_token_id": self.eos_id,
                "pad_token_id": self.pad_id,
                "bos_token_id": self.bos_id,
            },
        }

    def to_schema_a_dict(self) -> dict[str, Any]:
        """Schema A, as the v0.1 release's config.json has it (used to write v0.1 test checkpoints)."""
        enc, dec = self.encoder, self.decoder
        return {
            "version": "0.1",
            "model": {
                "encoder": {
                    "n_layer": enc.layers,
                    "n_embd": enc.hidden,
                    "n_hidden": enc.intermediate,
                    "n_head": enc.heads,
                    "head_dim": enc.head_dim,
                },
                "decoder": {
                    "n_layer": dec.layers,
                    "n_embd": dec.hidden,
                    "n_hidden": dec.intermediate,
                    "gqa_query_heads": dec.heads,
                    "kv_heads": dec.kv_heads,
                    "gqa_head_dim": dec.head_dim,
                    "cross_query_heads": dec.cross_heads,
                    "cross_head_dim": dec.cross_head_dim,
                },
                "src_vocab_size": enc.vocab_size,
                "tgt_vocab_size": dec.vocab_size,
                "dropout": 0.0,
                "normalization_layer_epsilon": self.norm_eps,
                "weight_dtype": "float32",
                "rope_min_timescale": self.rope_min_timescale,
                "rope_max_timescale": self.rope_max_timescale,
            },
            "training": {},
            "data": {
                "text_length": enc.max_length,
                "audio_length": dec.max_length,
                "channels": dec.num_channels,
                "text_pad_value": 0,
                "audio_eos_value": self.eos_id,
                "audio_pad_value": self.pad_id,
                "audio_bos_value": self.bos_id,
                "delay_pattern": list(self.delay_pattern),
            },
        }


def _from_schema_a(data: dict[str, Any]) -> DiaArchitecture:
    model, section = data["model"], data["data"]
    enc, dec = model["encoder"], model["decoder"]
    return DiaArchitecture(
        encoder=EncoderDims(
            layers=enc["n_layer"],
            hidden=enc["n_embd"],
            intermediate=enc["n_hidden"],
            heads=enc["n_head"],
            head_dim=enc["head_dim"],
            vocab_size=model.get("src_vocab_size", 256),
            max_length=section["text_length"],
        ),
        decoder=DecoderDims(
            layers=dec["n_layer"],
            hidden=dec["n_embd"],
            intermediate=dec["n_hidden"],
            heads=dec["gqa_query_heads"],
            kv_heads=dec["kv_heads"],
            head_dim=dec["gqa_head_dim"],
            cross_heads=dec["cross_query_heads"],
            cross_head_dim=dec["cross_head_dim"],
            vocab_size=model.get("tgt_vocab_size", 1028),
            num_channels=section["channels"],
            max_length=section["audio_length"],
        ),
        flavour="v0.1",
        norm_eps=float(model.get("normalization_layer_epsilon", 1e-5)),
        rope_min_timescale=float(model.get("rope_min_timescale", 1)),
        rope_max_timescale=float(model.get("rope_max_timescale", 10000)),
        delay_pattern=tuple(section.get("delay_pattern", DEFAULT_DELAY_PATTERN)),
        eos_id=section.get("audio_eos_value", 1024),
        pad_id=section.get("audio_pad_value", 1025),
        bos_id=section.get("audio_bos_value", 1026),
    )


def rope_theta(section: dict[str, Any]) -> float:
    """Older configs write `rope_theta`; newer transformers write `rope_parameters: {rope_theta}`."""
    if "rope_theta" in section:
        return float(section["rope_theta"])
    return float((section.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def _token_id(data: dict[str, Any], dec: dict[str, Any], key: str, default: int) -> int:
    """Token ids may sit at the top level, inside `decoder_config`, or both (docs/generation.md section 2)."""
    value = data.get(key)
    if value is None:
        value = dec.get(key)
    if isinstance(value, list):
        value = value[0]
    return default if value is None else int(value)


def _from_schema_b(data: dict[str, Any]) -> DiaArchitecture:
    enc, dec = data["encoder_config"], data["decoder_config"]
    heads = dec["num_attention_heads"]
    return DiaArchitecture(
        encoder=EncoderDims(
            layers=enc["num_hidden_layers"],
            hidden=enc["hidden_size"],
            intermediate=enc["intermediate_size"],
            heads=enc["num_attention_heads"],
            head_dim=enc.get("head_dim") or enc["hidden_size"] // enc["num_attention_heads"],
            vocab_size=enc.get("vocab_size", 256),
            max_length=enc.get("max_position_embeddings", 1024),
        ),
        decoder=DecoderDims(
            layers=dec["num_hidden_layers"],
            hidden=dec["hidden_size"],
            intermediate=dec["intermediate_size"],
            heads=heads,
            kv_heads=dec.get("num_key_value_heads") or heads,
            head_dim=dec.get("head_dim") or dec["hidden_size"] // heads,
            cross_heads=dec.get("cross_num_attention_heads", heads),
            cross_head_dim=dec.get("cross_head_dim", 128),
            vocab_size=dec.get("vocab_size", 1028),
            num_channels=dec.get("num_channels", 9),
            max_length=dec.get("max_position_embeddings", 3072),
        ),
        flavour="0626",
        norm_eps=float(dec.get("norm_eps", data.get("norm_eps", 1e-5))),
        rope_max_timescale=rope_theta(dec),
        delay_pattern=tuple(data.get("delay_pattern") or DEFAULT_DELAY_PATTERN),
        eos_id=_token_id(data, dec, "eos_token_id", 1024),
        pad_id=_token_id(data, dec, "pad_token_id", 1025),
        bos_id=_token_id(data, dec, "bos_token_id", 1026),
    )


TINY = DiaArchitecture(
    encoder=EncoderDims(
        layers=2, hidden=32, intermediate=64, heads=4, head_dim=8, vocab_size=256, max_length=128
    ),
    decoder=DecoderDims(
        layers=2,
        hidden=48,
        intermediate=96,
        heads=4,
        kv_heads=2,
        head_dim=8,
        cross_heads=4,
        cross_head_dim=8,
        vocab_size=1028,
        num_channels=9,
        max_length=256,
    ),
    flavour="0626",
)

# Between the two: the decoder of the issue that measured the quantized variants (8 x 1024, GQA 4:1),
# 592 MB of float32 step weights, for benchmarks that want the real layer shapes in a few minutes.
MID = DiaArchitecture(
    encoder=EncoderDims(
        layers=4, hidden=512, intermediate=2048, heads=8, head_dim=64, vocab_size=256, max_length=1024
    ),
    decoder=DecoderDims(
        layers=8,
        hidden=1024,
        intermediate=4096,
        heads=8,
        kv_heads=2,
        head_dim=128,
        cross_heads=8,
        cross_head_dim=128,
        vocab_size=1028,
        num_channels=9,
        max_length=3072,
    ),
    flavour="0626",
)

FULL = DiaArchitecture(
    encoder=EncoderDims(
        layers=12, hidden=1024, intermediate=4096, heads=16, head_dim=128, vocab_size=256, max_length=1024
    ),
    decoder=DecoderDims(
        layers=18,
        hidden=2048,
        intermediate=8192,
        heads=16,
        kv_heads=4,
        head_dim=128,
        cross_heads=16,
        cross_head_dim=128,
        vocab_size=1028,
        num_channels=9,
        max_length=3072,
    ),
    flavour="0626",
)

# One layer of each stack at the tiny shape: a step that costs nothing but its fixed overhead (Python,
# binding, dispatch), which `python -m bench.overhead` measures.
ONE_LAYER = replace(TINY, encoder=replace(TINY.encoder, layers=1), decoder=replace(TINY.decoder, layers=1))

PRESETS = {
    "tiny": TINY,
    "mid": MID,
    "full": FULL,
    "one-layer": ONE_LAYER,
}  # `python -m export --random-init NAME`
