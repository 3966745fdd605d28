"""Load a Dia checkpoint folder of any generation and layout into one canonical state dict.

The canonical layout is transformers' `DiaForConditionalGeneration.state_dict()` (docs/generation.md section 2),
in float32. The nari layout (DenseGeneral kernels `[in..., out...]`, nine decoder embeddings) is
converted through one explicit table, `conversion_table`, which also gives every key's shape in both
layouts; a checkpoint is checked against it, key by key and shape by shape, before anything is
converted, so a missing or extra tensor is an error and never a silent default.

Folder contents, in the order they are looked for (transformers' order, then the v0.1 release file):
`model.safetensors`, `model.safetensors.index.json` with its shards, a single `*.pth` torch state dict.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from export.architecture import DiaArchitecture

logger = logging.getLogger(__name__)

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
PTH = "dia-v0_1.pth"
LAYOUTS = ("nari", "hf")
FORMATS = ("pth", "safetensors")

# Non-persistent buffers (RoPE tables, channel offsets) that some writers store anyway: derived from
# the config, never weights.
_BUFFER_SUFFIXES = (
    "rotary_emb.inv_freq",
    "rotary_emb.original_inv_freq",
    "rotary_emb.timescale",
    "embeddings.offsets",
)

# Conversion rules, nari -> HF:
_COPY = "copy"  # same tensor (norms, the byte embedding)
_DENSE = "dense"  # DenseGeneral kernel [in..., out...] -> reshape [in, out] -> transpose -> Linear [out, in]
_CHANNELS = "channels"  # nine [V, E] tables -> rows of one [C*V, E] table, channel c at rows c*V..c*V+V-1


@dataclass(frozen=True)
class Entry:
    """One HF tensor and the nari tensor(s) it is made of."""

    hf: str
    hf_shape: tuple[int, ...]
    nari: tuple[str, ...]
    nari_shape: tuple[int, ...]  # the shape of each nari tensor
    rule: str


def _entry(nari: str, hf: str, in_shape: tuple[int, ...], out_shape: tuple[int, ...] | None) -> Entry:
    """A tensor copied as is (`out_shape` None), or a DenseGeneral(in_shapes, out_features) kernel."""
    if out_shape is None:
        return Entry(hf, in_shape, (nari,), in_shape, _COPY)
    return Entry(hf, (math.prod(out_shape), math.prod(in_shape)), (nari,), in_shape + out_shape, _DENSE)


_Row = tuple[str, str, tuple[int, ...], tuple[int, ...] | None]


def _layers(stack: str, count: int, rows: list[_Row]) -> list[Entry]:
    return [
        _entry(
            f"{stack}.layers.{i}.{nari}.weight", f"model.{stack}.layers.{i}.{hf}.weight", in_shape, out_shape
        )
        for i in range(count)
        for nari, hf, in_shape, out_shape in rows
    ]


def conversion_table(arch: DiaArchitecture) -> list[Entry]:
    """Every tensor of a Dia model: HF key and shape, nari key(s) and shape, and the rule between them."""
    enc, dec = arch.encoder, arch.decoder
    e, d = enc.hidden, dec.hidden
    # (nari name, HF name, nari input dims, nari output dims or None for a tensor copied as is).
    # `wi_fused [in, 2, I]` (0 = gate, 1 = up) flattens to `gate_up_proj` with the gate rows first.
    encoder_layer = [
        ("pre_sa_norm", "pre_sa_norm", (e,), None),
        ("self_attention.q_proj", "self_attention.q_proj", (e,), (enc.heads, enc.head_dim)),
        ("self_attention.k_proj", "self_attention.k_proj", (e,), (enc.heads, enc.head_dim)),
        ("self_attention.v_proj", "self_attention.v_proj", (e,), (enc.heads, enc.head_dim)),
        ("self_attention.o_proj", "self_attention.o_proj", (enc.heads, enc.head_dim), (e,)),
        ("post_sa_norm", "post_sa_norm", (e,), None),
        ("mlp.wi_fused", "mlp.gate_up_proj", (e,), (2, enc.intermediate)),
        ("mlp.wo", "mlp.down_proj", (enc.intermediate,), (e,)),
    ]
    decoder_layer = [
        ("pre_sa_norm", "pre_sa_norm", (d,), None),
        ("self_attention.q_proj", "self_attention.q_proj", (d,), (dec.heads, dec.head_dim)),
        ("self_attention.k_proj", "self_attention.k_proj", (d,), (dec.kv_heads, dec.head_dim)),
        ("self_attention.v_proj", "self_attention.v_proj", (d,), (dec.kv_heads, dec.head_dim)),
        ("self_attention.o_proj", "self_attention.o_proj", (dec.heads, dec.head_dim), (d,)),
        ("pre_ca_norm", "pre_ca_norm", (d,), None),
        ("cross_attention.q_proj", "cross_attention.q_proj", (d,), (dec.cross_heads, dec.cross_head_dim)),
        ("cross_attention.k_proj", "cross_attention.k_proj", (e,), (dec.cross_heads, dec.cross_head_dim)),
        ("cross_attention.v_proj", "cross_attention.v_proj", (e,), (dec.cross_heads, dec.cross_head_dim)),
        ("cross_attention.o_proj", "cross_attention.o_proj", (dec.cross_heads, dec.cross_head_dim), (d,)),
        ("pre_mlp_norm", "pre_mlp_norm", (d,), None),
        ("mlp.wi_fused", "mlp.gate_up_proj", (d,), (2, dec.intermediate)),
        ("mlp.wo", "mlp.down_proj", (dec.intermediate,), (d,)),
    ]
    channels = tuple(f"decoder.embeddings.{c}.weight" for c in range(dec.num_channels))
    return [
        _entry("encoder.embedding.weight", "model.encoder.embedding.weight", (enc.vocab_size, e), None),
        *_layers("encoder", enc.layers, encoder_layer),
        _entry("encoder.norm.weight", "model.encoder.norm.weight", (e,), None),
        Entry(
            "model.decoder.embeddings.embed.weight",
            (dec.num_channels * dec.vocab_size, d),
            channels,
            (dec.vocab_size, d),
            _CHANNELS,
        ),
        *_layers("decoder", dec.layers, decoder_layer),
        _entry("decoder.norm.weight", "model.decoder.norm.weight", (d,), None),
        _entry(
            "decoder.logits_dense.weight", "logits_dense.weight", (d,), (dec.num_channels, dec.vocab_size)
        ),
    ]


def expected_shapes(arch: DiaArchitecture) -> dict[str, tuple[int, ...]]:
    """Every key and shape of the canonical (HF) state dict."""
    return {entry.hf: entry.hf_shape for entry in conversion_table(arch)}


def _nari_shapes(arch: DiaArchitecture) -> dict[str, tuple[int, ...]]:
    return {key: entry.nari_shape for entry in conversion_table(arch) for key in entry.nari}


def check_state(state: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise a `ValueError` naming the missing, unexpected and mis-shaped keys of `state`."""

    def some(items: list[str]) -> str:
        return ", ".join(items[:5]) + (", ..." if len(items) > 5 else "")

    missing = [key for key in expected if key not in state]
    unexpected = sorted(key for key in state if key not in expected)
    wrong = [
        f"{key} {tuple(state[key].shape)} instead of {shape}"
        for key, shape in expected.items()
        if key in state and tuple(state[key].shape) != shape
    ]
    problems = [
        f"{len(items)} {what}: {some(items)}"
        for what, items in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong))
        if items
    ]
    if problems:
        raise ValueError(f"{source} does not match the config's architecture: " + "; ".join(problems))


def to_hf_layout(
    arch: DiaArchitecture, state: dict[str, torch.Tensor], source: str = "state"
) -> dict[str, torch.Tensor]:
    """Nari layout -> canonical HF layout, after a strict key and shape check of the nari state."""
    check_state(state, _nari_shapes(arch), f"{source} (nari layout)")
    out = {}
    for entry in conversion_table(arch):
        parts = [state[key].float() for key in entry.nari]
        if entry.rule == _CHANNELS:
            out[entry.hf] = torch.cat(parts, dim=0)
        elif entry.rule == _DENSE:
            out[entry.hf] = parts[0].reshape(entry.hf_shape[::-1]).T.contiguous()
        else:
            out[entry.hf] = parts[0]
    return out


def to_nari_layout(arch: DiaArchitecture, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Canonical HF layout -> nari layout (the inverse of `to_hf_layout`), for writing checkpoints."""
    check_state(state, expected_shapes(arch), "state (HF layout)")
    out = {}
    for entry in conversion_table(arch):
        tensor = state[entry.hf].float()
        if entry.rule == _CHANNELS:
            parts = tensor.split(entry.nari_shape[0])
            out.update((key, part.clone()) for key, part in zip(entry.nari, parts, strict=True))
        elif entry.rule == _DENSE:
            out[entry.nari[0]] = tensor.T.reshape(entry.nari_shape).contiguous()
        else:
            out[entry.nari[0]] = tensor
    return out


def _detect_layout(state: dict[str, torch.Tensor], source: str) -> str:
    if "logits_dense.weight" in state or any(key.startswith("model.") for key in state):
        return "hf"
    if any(key.startswith(("encoder.", "decoder.")) for key in state):
        return "nari"
    raise ValueError(
        f"{source}: unrecognised weight layout: expected nari keys (encoder.*, decoder.*) or transformers "
        f"keys (model.*, logits_dense.weight), found {sorted(state)[:5]}"
    )


def _checked_folder(folder: str | Path) -> Path:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {folder} does not exist")
    if not (folder / CONFIG).is_file():
        raise FileNotFoundError(f"checkpoint folder {folder} has no {CONFIG}")
    return folder


def _weight_files(folder: Path) -> list[Path]:
    """The files that hold the weights; for a sharded checkpoint the index first, then its shards."""
    if (folder / SAFETENSORS).is_file():
        return [folder / SAFETENSORS]
    index = folder / INDEX
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ValueError(f"{index} has no 'weight_map'")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names shards that are not in {folder}: {missing}")
        return [index, *shards]
    pths = sorted(folder.glob("*.pth"))
    if len(pths) > 1:
        raise ValueError(f"{folder} holds several .pth files, cannot tell which are the weights: {pths}")
    if not pths:
        raise FileNotFoundError(f"no Dia weights in {folder}: looked for {SAFETENSORS}, {INDEX} and *.pth")
    return pths


def _load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A torch state dict, possibly wrapped in a training dict under 'model' or 'state_dict'."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ValueError(f"{path} is not a torch state dict")
    return state


def _read_weights(files: list[Path]) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for path in files:
        if path.suffix == ".safetensors":
            state.update(load_file(path))
        elif path.suffix == ".pth":
            state.update(_load_pth(path))
    return state


def load_checkpoint(folder: str | Path) -> tuple[DiaArchitecture, dict[str, torch.Tensor]]:
    """The architecture from `config.json` and every weight in the canonical HF layout, float32."""
    folder = _checked_folder(folder)
    arch = DiaArchitecture.from_file(folder / CONFIG)
    files = _weight_files(folder)
    state = {key: value for key, value in _read_weights(files).items() if not key.endswith(_BUFFER_SUFFIXES)}
    layout = _detect_layout(state, str(folder))
    logger.info("loading %s (%s layout, %s)", folder, layout, ", ".join(path.name for path in files))
    if layout == "nari":
        return arch, to_hf_layout(arch, state, str(folder))
    check_state(state, expected_shapes(arch), f"{folder} (HF layout)")
    return arch, {key: value.float() for key, value in state.items()}


def random_state(arch: DiaArchitecture, seed: int, outlier_channels: int = 0) -> dict[str, torch.Tensor]:
    """Random canonical weights with sane scales (kernels 1/sqrt(fan_in), embeddings 1, norms near 1),
    so that a randomly initialised model gives non-trivial logits.

    Dia's attention has no 1/sqrt(head_dim) scale: trained query kernels absorb it, so the random ones
    do too. Attention logits then have about unit variance instead of saturating every softmax, which
    would amplify float32 rounding (and quantization error) far beyond what real weights show.

    With `outlier_channels`, that many hidden channels of every decoder norm get gains from 20 to 50,
    the same channels in each: the activation outliers of trained transformers, which quantizing the
    activations must survive (export/qgemm.py). The kernels that read a norm's output get those
    channels' rows divided by the gains, as a trained model's weights meet its outliers: random rows
    at full size would let a few channels steer every projection, a model so ill-conditioned that float32
    weights with 0.2 % noise pick another token on 9 % of the steps of mid with 4 such channels.
    """
    generator = torch.Generator().manual_seed(seed)
    picker = torch.Generator().manual_seed(seed)  # its own draws: the weights stay those of `seed`
    channels = torch.randperm(arch.decoder.hidden, generator=picker)[:outlier_channels]
    gains = torch.linspace(20.0, 50.0, outlier_channels)
    state = {}
    for entry in conversion_table(arch):
        tensor = torch.randn(entry.hf_shape, generator=generator)
        if len(entry.hf_shape) == 1:
            tensor = 1.0 + 0.1 * tensor
            if entry.hf.startswith("model.decoder.") and entry.hf.endswith("norm.weight"):
                tensor[channels] *= gains
        elif entry.rule == _DENSE:
            tensor = tensor / math.sqrt(entry.hf_shape[1])
            if entry.hf.endswith("q_proj.weight"):
                tensor = tensor / math.sqrt(_head_dim(arch, entry.hf))
        state[entry.hf] = tensor
    for reader in _norm_readers(arch):
        state[reader][:, channels] /= gains
    return state


def _norm_readers(arch: DiaArchitecture) -> list[str]:
    """The kernels `[out, in]` that read a decoder norm's output (attention, MLP and the head)."""
    kernels = ("self_attention.q_proj", "self_attention.k_proj", "self_attention.v_proj")
    kernels += ("cross_attention.q_proj", "mlp.gate_up_proj")
    layers = range(arch.decoder.layers)
    return [f"model.decoder.layers.{i}.{k}.weight" for i in layers for k in kernels] + ["logits_dense.weight"]


def _head_dim(arch: DiaArchitecture, key: str) -> int:
    if ".encoder." in key:
        return arch.encoder.head_dim
    return arch.decoder.cross_head_dim if "cross_attention" in key else arch.decoder.head_dim


def _save_shards(weights: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    """Split the tensors, in order, into `shards` files named and indexed the way transformers does."""
    keys = list(weights)
    names = [f"model-{k + 1:05d}-of-{shards:05d}.safetensors" for k in range(shards)]
    weight_map = {key: names[k * shards // len(keys)] for k, key in enumerate(keys)}
    for name in names:
        save_file(
            {key: weights[key] for key in keys if weight_map[key] == name}, folder / name, {"format": "pt"}
        )
    total = sum(tensor.numel() * tensor.element_size() for tensor in weights.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")


def save_checkpoint(
    arch: DiaArchitecture,
    state: dict[str, torch.Tensor],
    folder: str | Path,
    *,
    layout: str,
    fmt: str,
    shards: int = 1,
) -> Path:
    """Write a canonical state as a checkpoint folder the way the releases lay it out: config.json in
    schema A for v0.1, schema B otherwise; weights in `layout` ("nari"/"hf") as `fmt` ("pth"/"safetensors"),
    safetensors sharded with an index when `shards` > 1."""
    if layout not in LAYOUTS or fmt not in FORMATS:
        raise ValueError(f"layout must be one of {LAYOUTS} and fmt one of {FORMATS}, got {layout!r}, {fmt!r}")
    if shards < 1 or (shards > 1 and fmt != "safetensors"):
        raise ValueError(f"shards={shards}: only safetensors checkpoints can be split, into at least 1 file")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = arch.to_schema_a_dict() if arch.flavour == "v0.1" else arch.to_hf_dict()
    (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if layout == "nari":
        weights = to_nari_layout(arch, state)
    else:
        check_state(state, expected_shapes(arch), "state (HF layout)")
        weights = {key: value.float().contiguous() for key, value in state.items()}
    if fmt == "pth":
        torch.save(weights, folder / PTH)
    elif shards == 1:
        save_file(weights, folder / SAFETENSORS, metadata={"format": "pt"})
    else:
        _save_shards(weights, folder, shards)
    return folder


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def checkpoint_files(folder: str | Path) -> dict[str, str]:
    """sha256 of config.json and of each weight file `load_checkpoint` reads (provenance for the manifest)."""
    folder = _checked_folder(folder)
    return {path.name: _sha256(path) for path in [folder / CONFIG, *_weight_files(folder)]}
