"""DAC weights into `DacCodec`: descript's release `.pth` or a transformers `DacModel` folder (docs/generation.md section 10).

Both layouts store convolutions with weight norm in one of three forms (`weight_g`/`weight_v`,
`parametrizations.weight.original0/original1`, or already folded as `weight`); all are folded to
`weight = g * v / ||v||`, the norm taken over every dimension but the first (torch's `weight_norm`,
dim=0). The HF layout uses `DacCodec`'s own names; descript's is renamed through `descript_names`.
Every load is checked key by key and shape by shape before anything is copied.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from export.dac import DAC_44KHZ, DacArchitecture, DacCodec, Snake1d

# Weight-norm storage forms: (suffix of g, suffix of v) replacing ".weight".
WEIGHT_NORM_FORMS = {
    "weight_g": (".weight_g", ".weight_v"),
    "parametrizations": (".parametrizations.weight.original0", ".parametrizations.weight.original1"),
}
HF_WEIGHT_NORMS = ("parametrizations", "weight_g", "folded")


def load_dac(path_or_dir: str | Path) -> DacCodec:
    """A descript `.pth` file or a transformers `DacModel` folder -> `DacCodec` (eval mode, float32)."""
    path = Path(path_or_dir)
    if not path.exists():
        raise FileNotFoundError(f"DAC weights not found: {path}")
    if path.is_dir():
        return _load_hf_folder(path)
    if path.suffix == ".pth":
        return _load_descript_pth(path)
    raise ValueError(f"{path}: expected descript's .pth file or a transformers DacModel folder")


def random_dac(arch: DacArchitecture = DAC_44KHZ, seed: int = 0) -> DacCodec:
    """Random weights: codebooks N(0, 1), convolutions N(0, gain^2 / fan_in), Snake alphas in [0.5, 1.5].

    The gain is smaller where branches are summed (the codebooks' out_proj, the residual units' and
    the last convolutions), so activations keep a steady size and the audio is not saturated.
    """
    generator = torch.Generator().manual_seed(seed)
    codec = DacCodec(arch).eval()
    with torch.no_grad():
        for name, module in codec.named_modules():
            if isinstance(module, nn.Embedding):
                module.weight.normal_(generator=generator)
            elif isinstance(module, Snake1d):
                module.alpha.uniform_(0.5, 1.5, generator=generator)
            elif isinstance(module, nn.Conv1d | nn.ConvTranspose1d):
                std = _random_gain(name, arch) / math.sqrt(_fan_in(module))
                module.weight.normal_(std=std, generator=generator)
                module.bias.normal_(std=0.01, generator=generator)
    return codec


def save_descript_pth(codec: DacCodec, path: str | Path) -> None:
    """Write `codec` as descript's release file: `{"state_dict": ..., "metadata": {"kwargs": ...}}`."""
    arch = codec.arch
    kwargs = {
        "encoder_dim": arch.encoder_dim,
        "encoder_rates": list(arch.encoder_rates),
        "latent_dim": arch.latent_dim,
        "decoder_dim": arch.decoder_dim,
        "decoder_rates": list(arch.decoder_rates),
        "n_codebooks": arch.n_codebooks,
        "codebook_size": arch.codebook_size,
        "codebook_dim": arch.codebook_dim,
        "quantizer_dropout": 0.0,
        "sample_rate": arch.sample_rate,
    }
    names = descript_names(arch)
    state = {_rename(key, names): value for key, value in _unfold(codec, "weight_g").items()}
    torch.save({"state_dict": state, "metadata": {"kwargs": kwargs}}, path)


def save_hf_folder(codec: DacCodec, folder: str | Path, weight_norm: str) -> None:
    """Write `codec` as a transformers `DacModel` folder, weight norm stored as `weight_norm` (see HF_WEIGHT_NORMS)."""
    if weight_norm not in HF_WEIGHT_NORMS:
        raise ValueError(f"weight_norm must be one of {HF_WEIGHT_NORMS}, got {weight_norm!r}")
    arch = codec.arch
    if arch.latent_dim != _default_latent_dim(arch.encoder_dim, arch.encoder_rates):
        raise ValueError(
            f"transformers' DacModel requires latent_dim = encoder_dim * 2**{len(arch.encoder_rates)}"
        )
    config = {
        "model_type": "dac",
        "architectures": ["DacModel"],
        "encoder_hidden_size": arch.encoder_dim,
        "downsampling_ratios": list(arch.encoder_rates),
        "upsampling_ratios": list(arch.decoder_rates),
        "decoder_hidden_size": arch.decoder_dim,
        "hidden_size": arch.latent_dim,
        "n_codebooks": arch.n_codebooks,
        "codebook_size": arch.codebook_size,
        "codebook_dim": arch.codebook_dim,
        "sampling_rate": arch.sample_rate,
        "hop_length": arch.hop_length,
    }
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    state = codec.state_dict() if weight_norm == "folded" else _unfold(codec, weight_norm)
    save_file({key: value.contiguous() for key, value in state.items()}, folder / "model.safetensors")


def descript_names(arch: DacArchitecture) -> dict[str, str]:
    """`DacCodec` module path -> descript's, for every module whose name differs (the quantizer's do not)."""
    names = {"encoder.conv1": "encoder.block.0"}
    for i in range(len(arch.encoder_rates)):
        ours, theirs = f"encoder.block.{i}", f"encoder.block.{i + 1}.block"
        names |= _residual_unit_names(ours, theirs, first=0)
        names |= {f"{ours}.snake1": f"{theirs}.3", f"{ours}.conv1": f"{theirs}.4"}
    last = len(arch.encoder_rates)
    names |= {"encoder.snake1": f"encoder.block.{last + 1}", "encoder.conv2": f"encoder.block.{last + 2}"}
    names["decoder.conv1"] = "decoder.model.0"
    for i in range(len(arch.decoder_rates)):
        ours, theirs = f"decoder.block.{i}", f"decoder.model.{i + 1}.block"
        names |= {f"{ours}.snake1": f"{theirs}.0", f"{ours}.conv_t1": f"{theirs}.1"}
        names |= _residual_unit_names(ours, theirs, first=2)
    last = len(arch.decoder_rates)
    names |= {"decoder.snake1": f"decoder.model.{last + 1}", "decoder.conv2": f"decoder.model.{last + 2}"}
    return names


def _residual_unit_names(ours: str, theirs: str, first: int) -> dict[str, str]:
    """`res_unit{1,2,3}.{snake1,conv1,snake2,conv2}` -> `{first+j}.block.{0,1,2,3}`."""
    layers = ("snake1", "conv1", "snake2", "conv2")
    return {
        f"{ours}.res_unit{j + 1}.{layer}": f"{theirs}.{first + j}.block.{k}"
        for j in range(3)
        for k, layer in enumerate(layers)
    }


def _rename(key: str, modules: dict[str, str]) -> str:
    """Rename the module part of a parameter key; keys of modules not in `modules` stay as they are."""
    module, leaf = key.rsplit(".", 1)
    return f"{modules.get(module, module)}.{leaf}"


def _fan_in(conv: nn.Conv1d | nn.ConvTranspose1d) -> float:
    """Inputs summed into one output sample (a transposed conv spreads each input over `stride` outputs)."""
    taps = conv.in_channels * conv.kernel_size[0]
    return taps / conv.stride[0] if isinstance(conv, nn.ConvTranspose1d) else taps


def _random_gain(name: str, arch: DacArchitecture) -> float:
    if name.endswith("out_proj"):
        return 1 / math.sqrt(arch.n_codebooks)
    return 0.3 if name.endswith("conv2") else 1.0


def _default_latent_dim(encoder_dim: int, encoder_rates: tuple[int, ...]) -> int:
    return encoder_dim * 2 ** len(encoder_rates)


def _load_descript_pth(path: Path) -> DacCodec:
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "metadata" not in checkpoint:
        raise ValueError(f"{path}: not a descript DAC file (expected the keys 'state_dict' and 'metadata')")
    kwargs = checkpoint["metadata"]["kwargs"]
    rates = tuple(kwargs["encoder_rates"])
    arch = DacArchitecture(
        encoder_dim=kwargs["encoder_dim"],
        encoder_rates=rates,
        latent_dim=kwargs.get("latent_dim") or _default_latent_dim(kwargs["encoder_dim"], rates),
        decoder_dim=kwargs["decoder_dim"],
        decoder_rates=tuple(kwargs["decoder_rates"]),
        n_codebooks=kwargs["n_codebooks"],
        codebook_size=kwargs["codebook_size"],
        codebook_dim=kwargs["codebook_dim"],
        sample_rate=kwargs["sample_rate"],
    )
    ours = {theirs: name for name, theirs in descript_names(arch).items()}
    state = {_rename(key, ours): value for key, value in _fold(checkpoint["state_dict"]).items()}
    return _build(arch, state, path)


def _load_hf_folder(folder: Path) -> DacCodec:
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} is not a transformers DacModel folder: {name} is missing")
    config = json.loads((folder / "config.json").read_text())
    rates = tuple(config["downsampling_ratios"])
    encoder_dim = config["encoder_hidden_size"]
    arch = DacArchitecture(
        encoder_dim=encoder_dim,
        encoder_rates=rates,
        latent_dim=config.get("hidden_size", _default_latent_dim(encoder_dim, rates)),
        decoder_dim=config["decoder_hidden_size"],
        decoder_rates=tuple(config.get("upsampling_ratios", rates[::-1])),
        n_codebooks=config["n_codebooks"],
        codebook_size=config["codebook_size"],
        codebook_dim=config["codebook_dim"],
        sample_rate=config["sampling_rate"],
    )
    return _build(arch, _fold(load_file(folder / "model.safetensors")), folder)


def _fold(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Replace every (g, v) weight-norm pair, in either form, with the folded `weight`."""
    folded = dict(state)
    for g_suffix, v_suffix in WEIGHT_NORM_FORMS.values():
        for g_key in [key for key in state if key.endswith(g_suffix)]:
            base = g_key.removesuffix(g_suffix)
            if base + v_suffix in folded:
                g, v = folded.pop(g_key), folded.pop(base + v_suffix)
                folded[base + ".weight"] = v * (g / _norm_except_first(v))
    return folded


def _unfold(codec: DacCodec, form: str) -> dict[str, Tensor]:
    """`codec`'s state with each convolution weight w stored as g = ||w|| and v = s * w, per dim-0 slice.

    The scale s (0.5 to 2, random per slice) makes v differ from w as in a trained checkpoint, where
    g != ||v||: a loader that took v for the weight, or forgot to divide by ||v||, loads other weights.
    """
    g_suffix, v_suffix = WEIGHT_NORM_FORMS[form]
    generator = torch.Generator().manual_seed(0)
    convolutions = {
        f"{name}.weight"
        for name, module in codec.named_modules()
        if isinstance(module, nn.Conv1d | nn.ConvTranspose1d)
    }
    state = {}
    for key, value in codec.state_dict().items():
        if key in convolutions:
            base = key.removesuffix(".weight")
            scale = 0.5 + 1.5 * torch.rand((len(value),) + (1,) * (value.dim() - 1), generator=generator)
            state[base + g_suffix] = _norm_except_first(value)
            state[base + v_suffix] = value * scale
        else:
            state[key] = value
    return state


def _listing(items: list[str], shown: int = 10) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more


def _norm_except_first(w: Tensor) -> Tensor:
    return torch.linalg.vector_norm(w, dim=tuple(range(1, w.dim())), keepdim=True)


def _build(arch: DacArchitecture, state: dict[str, Tensor], source: Path) -> DacCodec:
    """Check `state` against a fresh `DacCodec(arch)` by key and shape, then load it."""
    codec = DacCodec(arch).eval()
    expected = codec.state_dict()
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    misshaped = [
        f"{key} {list(state[key].shape)} (expected {list(expected[key].shape)})"
        for key in sorted(expected.keys() & state.keys())
        if state[key].shape != expected[key].shape
    ]
    problems = [
        f"{label}: {_listing(items)}"
        for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshaped))
        if items
    ]
    if problems:
        raise ValueError(
            f"{source}: DAC weights do not match {arch} (keys named as in transformers' DacModel); "
            + "; ".join(problems)
        )
    codec.load_state_dict({key: value.float() for key, value in state.items()})
    return codec
