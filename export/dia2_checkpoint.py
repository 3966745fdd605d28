"""Dia2 checkpoints: the published layout read from a folder, and random ones of any shape.

A published repo (nari-labs/Dia2-1B, -2B) holds `config.json` (the `data` / `model` / `runtime` tree),
`model.safetensors` and the tokenizer's files at its root, and may hold `dia2_assets.json` naming the
config, the weights, the tokenizer and Mimi. Random checkpoints are written in the same layout, so the
tests and benchmarks load them the way a user's download is loaded.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from dia_ort.dia2_config import ASSETS_NAME, Dia2Config
from export.dia2_model import Dia2Model
from export.dia_model import Linear

# Sizes the tests use: odd head counts and widths, 4 codebooks, two depformer stages sharing a weight group.
TINY_TREE: dict[str, Any] = {
    "data": {
        "channels": 6,
        "text_vocab_size": 96,
        "audio_vocab_size": 34,  # 32 codes (Mimi's codebook size must be a power of two), BOS, pad
        "action_vocab_size": 5,
        "text_pad_token_id": 3,
        "text_new_word_token_id": 4,
        "text_zero_token_id": 7,
        "action_pad_token_id": 0,
        "action_new_word_token_id": 1,
        "delay_pattern": [1, 2, 2, 3],
        "first_word_min_start": 0,
        "max_pad": 6,
        "second_stream_ahead": 2,
    },
    "model": {
        "decoder": {
            "n_layer": 2,
            "n_embd": 48,
            "n_hidden": 40,
            "gqa_query_heads": 6,
            "kv_heads": 2,
            "gqa_head_dim": 8,
        },
        "depformer": {
            "n_layer": 2,
            "n_embd": 40,
            "n_hidden": 24,
            "gqa_query_heads": 3,
            "kv_heads": 3,
            "gqa_head_dim": 6,
        },
        "linear": {"mlp_activations": ["silu", "linear"]},
        "rope_min_timescale": 1,
        "rope_max_timescale": 10000,
        "normalization_layer_epsilon": 1e-5,
    },
    "runtime": {"weights_schedule": [0, 1, 1], "max_context_steps": 96},
}

# The shape of a public conversion's defaults (issue 23; not checked against the published configs,
# which this machine cannot download): 32 codebooks of 2,050 ids, 28 backbone layers of 2,048.
CONVERSION_DEFAULT_TREE: dict[str, Any] = {
    "data": {
        **TINY_TREE["data"],
        "channels": 34,
        "text_vocab_size": 49280,
        "audio_vocab_size": 2050,
        "delay_pattern": [1] + [2] * 31,  # assumed: every codebook must read audio at frame 0
    },
    "model": {
        **TINY_TREE["model"],
        "decoder": {
            "n_layer": 28,
            "n_embd": 2048,
            "n_hidden": 6144,
            "gqa_query_heads": 16,
            "kv_heads": 8,
            "gqa_head_dim": 128,
        },
        "depformer": {
            "n_layer": 4,
            "n_embd": 1024,
            "n_hidden": 3072,
            "gqa_query_heads": 8,
            "kv_heads": 8,
            "gqa_head_dim": 128,
        },
    },
    "runtime": {"weights_schedule": list(range(31)), "max_context_steps": 1500},
}

# For benchmarks on a 24 GB machine, which cannot export the 2.5 B conversion shape: its depformer, Mimi
# and vocabularies, and 8 of its 28 backbone layers.
BENCH_TREE: dict[str, Any] = copy.deepcopy(CONVERSION_DEFAULT_TREE)
BENCH_TREE["model"]["decoder"]["n_layer"] = 8

PRESETS = {
    "dia2-tiny": TINY_TREE,
    "dia2-conversion-default": CONVERSION_DEFAULT_TREE,
    "dia2-bench": BENCH_TREE,
}


def preset_config(name: str) -> Dia2Config:
    return Dia2Config.from_tree(copy.deepcopy(PRESETS[name]))


def random_state(config: Dia2Config, seed: int) -> dict[str, torch.Tensor]:
    """Random weights under the published names and `[out, in]` kernels: N(0, 1/fan_in), norm gains
    near 1, but those of queries and keys near head_dim^-1/4: attention has no 1/sqrt(head_dim) scale,
    so gains of 1 would give logits of deviation sqrt(head_dim) (11 at 128), a softmax nearly one-hot
    on random caches that turns any rounding into another row (an int8 graph of the bench shape then
    strayed 0.3 from torch); these give logits of deviation about 1, as trained attention has."""
    with torch.device("meta"):  # the shapes only
        model = Dia2Model(config)
    kernels = {name for name, module in model.named_modules() if isinstance(module, Linear)}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, tensor in model.state_dict().items():
        shape = tensor.T.shape if name.removesuffix(".weight") in kernels else tensor.shape
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            state[name] = (1.0 + 0.1 * torch.randn(shape, generator=g)) * shape[-1] ** -0.25
        elif name.endswith("norm.weight"):
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            state[name] = torch.randn(shape, generator=g) / shape[-1] ** 0.5
    return state


def write_checkpoint(folder: Path, config: Dia2Config, state: dict[str, torch.Tensor]) -> Path:
    """`config.json` and `model.safetensors` in the published layout."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config.tree, indent=2) + "\n")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "model.safetensors"))
    return folder


def checkpoint_paths(folder: Path) -> tuple[Path, Path]:
    """The config and weights of a checkpoint folder, by its `dia2_assets.json` when it has one."""
    assets = json.loads((folder / ASSETS_NAME).read_text()) if (folder / ASSETS_NAME).is_file() else {}
    config, weights = (
        folder / assets.get("config", "config.json"),
        folder / assets.get("weights", "model.safetensors"),
    )
    for path in (config, weights):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: a Dia2 checkpoint folder holds config.json and model.safetensors"
            )
    return config, weights


def load_checkpoint(folder: Path) -> tuple[Dia2Config, dict[str, torch.Tensor]]:
    """A Dia2 checkpoint folder -> its config and float32 state (names checked when the model is built)."""
    config_path, weights_path = checkpoint_paths(folder)
    config = Dia2Config.from_tree(json.loads(config_path.read_text()))
    return config, {k: v.float() for k, v in load_file(str(weights_path)).items()}
