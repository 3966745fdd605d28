"""What a Dia2 checkpoint's `config.json` says, read as nari-labs/dia2 reads it.

A published Dia2 repo holds `config.json` as a `data` / `model` / `runtime` tree. This module reads that
tree with the reference's defaults (`dia2/config.py` at 8687268) into one frozen `Dia2Config`; the
export builds its torch modules from it, and the manifest keeps the tree itself, so the runtime reads
the same file the same way and never guesses from a model name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ASSETS_NAME = "dia2_assets.json"  # a published repo's optional list of its config, weights, tokenizer, Mimi
ACTIVATIONS = ("silu", "swish", "swiglu", "gelu", "geglu", "relu", "linear")
DEFAULT_ACTIVATIONS = ("silu", "linear")
STACK_KEYS = (
    "n_layer",
    "n_embd",
    "n_hidden",
    "gqa_query_heads",
    "kv_heads",
    "gqa_head_dim",
)  # StackDims' order


@dataclass(frozen=True)
class StackDims:
    """One transformer stack (the backbone or the depformer)."""

    layers: int
    hidden: int  # n_embd
    intermediate: int  # n_hidden: each of the MLP's two branches
    heads: int
    kv_heads: int
    head_dim: int
    activations: tuple[str, str]  # the MLP's gate and up branches

    @classmethod
    def read(cls, block: dict[str, Any], activations: list[str], name: str) -> StackDims:
        values = [block[key] for key in STACK_KEYS]
        for key, value in zip(STACK_KEYS, values, strict=True):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"Dia2 config model.{name}.{key} must be a whole number >= 1, got {value!r}")
        unknown = [a for a in activations if str(a).lower() not in ACTIVATIONS]
        if len(activations) != 2 or unknown:
            raise ValueError(
                f"Dia2 config model.{name}: mlp_activations must be two of {ACTIVATIONS}, got {activations!r}"
            )
        dims = cls(*values, activations=tuple(str(a).lower() for a in activations))
        if dims.heads % dims.kv_heads:
            raise ValueError(
                f"Dia2 {name}: {dims.heads} query heads are not a multiple of {dims.kv_heads} KV heads"
            )
        if dims.head_dim % 2:
            raise ValueError(f"Dia2 {name}: RoPE needs an even head_dim, got {dims.head_dim}")
        return dims


@dataclass(frozen=True)
class Dia2Config:
    """Sizes, token ids and runtime limits of one Dia2 checkpoint; `tree` is the config.json it came from."""

    tree: dict[str, Any]
    channels: int  # 2 text streams + the audio codebooks
    text_vocab_size: int
    audio_vocab_size: int
    action_vocab_size: int
    text_pad_id: int
    text_new_word_id: int
    text_zero_id: int
    audio_pad_id: int
    audio_bos_id: int
    delay_pattern: tuple[int, ...]
    second_stream_ahead: int
    decoder: StackDims
    depformer: StackDims
    text_low_rank_dim: int | None
    depformer_rope: bool
    depformer_text_embedding: bool
    rope_min_timescale: float
    rope_max_timescale: float
    norm_eps: float
    weights_schedule: tuple[int, ...]  # the depformer stage -> its attention and input weight group
    max_context_steps: int
    tokenizer: str | None
    mimi: str | None

    @property
    def codebooks(self) -> int:
        return self.channels - 2

    @property
    def depth(self) -> int:
        """Depformer stages per frame: every codebook after the first."""
        return max(self.codebooks - 1, 0)

    @property
    def weight_groups(self) -> tuple[int, ...]:
        """The depformer's weight groups, as the checkpoint names them (`in_proj.{group}`)."""
        return tuple(sorted(set(self.weights_schedule)))

    @property
    def audio_vocab_limit(self) -> int:
        """Depformer logits cover ids below this (the reference cuts off pad and BOS)."""
        return min(self.audio_pad_id, self.audio_bos_id)

    def to_dict(self) -> dict[str, Any]:
        """The config.json tree it was read from (what a manifest keeps)."""
        return self.tree

    @classmethod
    def from_tree(cls, tree: dict[str, Any]) -> Dia2Config:
        """Read a published `config.json` tree; ValueError names what is missing or wrong."""
        if not isinstance(tree, dict) or not {"data", "model"} <= set(tree):
            raise ValueError("not a Dia2 config: config.json needs `data` and `model` sections")
        if tree.get("runtime") is None:
            raise ValueError("Dia2 config is missing its `runtime` section (nari-labs/dia2 refuses it too)")
        data, model, runtime = tree["data"], tree["model"], tree["runtime"]
        try:
            channels = int(data["channels"])
            audio_vocab = int(data["audio_vocab_size"])
            decoder = StackDims.read(
                model["decoder"],
                model.get("linear", {}).get("mlp_activations", list(DEFAULT_ACTIVATIONS)),
                "decoder",
            )
            dep = model["depformer"]
            depformer = StackDims.read(
                dep, dep.get("mlp_activations", list(DEFAULT_ACTIVATIONS)), "depformer"
            )
            config = cls(
                tree=tree,
                channels=channels,
                text_vocab_size=int(data["text_vocab_size"]),
                audio_vocab_size=audio_vocab,
                action_vocab_size=int(data["action_vocab_size"]),
                text_pad_id=int(data["text_pad_token_id"]),
                text_new_word_id=int(data["text_new_word_token_id"]),
                text_zero_id=int(data.get("text_zero_token_id", 7)),
                audio_pad_id=int(data.get("audio_pad_token_id", audio_vocab - 1)),
                audio_bos_id=int(data.get("audio_bos_token_id", audio_vocab - 2)),
                delay_pattern=tuple(int(d) for d in data.get("delay_pattern", [])),
                second_stream_ahead=int(data.get("second_stream_ahead", 0)),
                decoder=decoder,
                depformer=depformer,
                text_low_rank_dim=model["decoder"].get("low_rank_dim"),
                depformer_rope=bool(dep.get("apply_rope", True)),
                depformer_text_embedding=bool(dep.get("text_embedding", True)),
                rope_min_timescale=float(model.get("rope_min_timescale", 1)),
                rope_max_timescale=float(model.get("rope_max_timescale", 10000)),
                norm_eps=float(model.get("normalization_layer_epsilon", 1e-5)),
                weights_schedule=tuple(
                    int(g) for g in runtime.get("weights_schedule", range(max(channels - 3, 0)))
                ),
                max_context_steps=int(runtime.get("max_context_steps", 1500)),
                tokenizer=(tree.get("assets") or {}).get("tokenizer") or data.get("tokenizer_path"),
                mimi=(tree.get("assets") or {}).get("mimi"),
            )
        except KeyError as missing:
            raise ValueError(f"Dia2 config is missing {missing.args[0]!r}") from None
        config._check()
        return config

    def _check(self) -> None:
        if self.codebooks < 1:
            raise ValueError(f"Dia2 config has {self.channels} channels; it needs 2 text streams and audio")
        if len(self.delay_pattern) != self.codebooks or min(self.delay_pattern, default=0) < 0:
            raise ValueError(
                f"Dia2 delay pattern {list(self.delay_pattern)} must give {self.codebooks} delays >= 0"
            )
        if len(self.weights_schedule) != self.depth or min(self.weights_schedule, default=0) < 0:
            raise ValueError(
                f"Dia2 weights schedule {list(self.weights_schedule)} must give a weight group >= 0 for each "
                f"of the {self.depth} depformer stages"
            )
        if self.depformer.kv_heads != self.depformer.heads:
            raise ValueError(
                f"Dia2 depformer has {self.depformer.kv_heads} KV heads for {self.depformer.heads} query heads; "
                "its fused q/k/v projection (and nari-labs/dia2) needs them equal"
            )
        if self.max_context_steps < 1:
            raise ValueError(f"Dia2 runtime.max_context_steps must be >= 1, got {self.max_context_steps}")


def is_dia2_checkpoint(folder: Path) -> bool:
    """Whether a local folder holds a Dia2 checkpoint (its config is the `data` / `model` / `runtime`
    tree, or it lists its assets)."""
    config = folder / "config.json"
    if (folder / ASSETS_NAME).is_file():
        return True
    if not config.is_file():
        return False
    tree = json.loads(config.read_text())
    return isinstance(tree, dict) and {"data", "model", "runtime"} <= set(tree)
