"""Mimi weights: a `kyutai/mimi` folder (transformers' config.json and model.safetensors), or random ones."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from export.mimi import MIMI, Codebook, LayerScale, MimiArchitecture, MimiCodec

DEFAULT_MIMI = "kyutai/mimi"


def load_mimi(folder: Path) -> MimiCodec:
    """A folder in the Hub's layout: `config.json` (transformers' MimiConfig) and `model.safetensors`."""
    config, weights = folder / "config.json", folder / "model.safetensors"
    for path in (config, weights):
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} is missing: a Mimi folder holds config.json and model.safetensors"
            )
    arch = MimiArchitecture.from_config(json.loads(config.read_text()))
    return MimiCodec.from_state(arch, load_file(str(weights)))


def random_mimi(arch: MimiArchitecture = MIMI, seed: int = 0) -> MimiCodec:
    """Random weights: codebook vectors N(0, 1) with usage counts in [0.5, 1.5], convolutions and
    projections N(0, 1 / fan_in), layer scales in [0, 0.5], norms near 1."""
    generator = torch.Generator().manual_seed(seed)
    codec = MimiCodec(arch).eval()
    with torch.no_grad():
        for module in codec.modules():
            if isinstance(module, Codebook):
                module.embed_sum.normal_(generator=generator)
                module.cluster_usage.uniform_(0.5, 1.5, generator=generator)
            elif isinstance(module, LayerScale):
                module.scale.uniform_(0.0, 0.5, generator=generator)
            elif isinstance(module, nn.LayerNorm):
                module.weight.normal_(1.0, 0.1, generator=generator)
                module.bias.normal_(0.0, 0.1, generator=generator)
            elif isinstance(module, nn.Conv1d | nn.ConvTranspose1d | nn.Linear):
                fan_in = module.weight[0].numel()  # for a transposed conv, an output channel group's taps
                module.weight.normal_(std=fan_in**-0.5, generator=generator)
                if module.bias is not None:
                    module.bias.normal_(std=0.01, generator=generator)
    return codec


def save_mimi(codec: MimiCodec, folder: Path) -> Path:
    """`codec` as a folder in the Hub's layout (published names), as `load_mimi` reads it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(
        json.dumps({"model_type": "mimi", **codec.arch.to_config()}, indent=2) + "\n"
    )
    save_file(
        {name: tensor.contiguous() for name, tensor in codec.state_dict().items()},
        str(folder / "model.safetensors"),
    )
    return folder
