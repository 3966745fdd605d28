"""Checkpoint loading: every layout and file format to one canonical state, checked against transformers."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

import export.families
from dia_ort import Dia
from dia_ort.manifest import Manifest
from export.architecture import FULL, TINY, DiaArchitecture
from export.checkpoint import (
    checkpoint_files,
    conversion_table,
    expected_shapes,
    load_checkpoint,
    random_state,
    save_checkpoint,
    to_hf_layout,
    to_nari_layout,
)
from export.dac_weights import save_hf_folder

FLAVOURS = ("v0.1", "0626")
# (layout, fmt, shards): every way `save_checkpoint` writes weights
WRITES = [
    ("nari", "pth", 1),
    ("nari", "safetensors", 1),
    ("nari", "safetensors", 3),
    ("hf", "pth", 1),
    ("hf", "safetensors", 1),
    ("hf", "safetensors", 3),
]


def hf_config(arch: DiaArchitecture) -> transformers.DiaConfig:
    return transformers.DiaConfig(
        **{k: v for k, v in arch.to_hf_dict().items() if k not in ("model_type", "architectures")}
    )


@pytest.fixture(scope="module")
def reference() -> transformers.DiaForConditionalGeneration:
    return transformers.DiaForConditionalGeneration(hf_config(TINY)).eval()


@pytest.fixture(scope="module")
def state() -> dict[str, torch.Tensor]:
    return random_state(TINY, seed=0)


@pytest.fixture(scope="module")
def model(state) -> transformers.DiaForConditionalGeneration:
    """The reference model holding `state`, loaded with a strict key check."""
    model = transformers.DiaForConditionalGeneration(hf_config(TINY)).eval()
    model.load_state_dict(state, strict=True)
    return model


def rewrite(path: Path, change) -> None:
    """Edit the tensors of one safetensors file in place."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path)


def test_expected_shapes_are_transformers_state_dict(reference):
    assert expected_shapes(TINY) == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    assert sum(math.prod(shape) for shape in expected_shapes(FULL).values()) == 1_611_160_576


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize(("layout", "fmt", "shards"), WRITES)
def test_round_trip(tmp_path, state, flavour, layout, fmt, shards):
    arch = TINY.with_flavour(flavour)
    save_checkpoint(arch, state, tmp_path, layout=layout, fmt=fmt, shards=shards)
    config = json.loads((tmp_path / "config.json").read_text())
    assert ("data" in config) == (flavour == "v0.1")  # schema A for v0.1, schema B for 0626
    assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) == (shards if shards > 1 else 0)

    loaded_arch, loaded = load_checkpoint(tmp_path)

    assert loaded_arch == arch
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], tensor), key


def test_random_state_gives_nontrivial_logits(model):
    text = torch.randint(0, 256, (1, 10))
    codes = torch.randint(0, 1024, (1, 4, 9))
    with torch.no_grad():
        logits = model(input_ids=text, decoder_input_ids=codes).logits
    assert torch.isfinite(logits).all()
    assert logits.std() > 0.1  # random weights at sane scales give non-trivial logits


def test_nari_conversion_keeps_the_nari_semantics(model, state):
    """Nari kernels contract their leading axes (DenseGeneral); the converted HF modules must agree."""
    nari = to_nari_layout(TINY, state)
    dec, layer = TINY.decoder, model.model.decoder.layers[0]
    x = torch.randn(5, dec.hidden)
    heads_out = torch.randn(5, dec.heads, dec.head_dim)
    with torch.no_grad():
        q = torch.tensordot(x, nari["decoder.layers.0.self_attention.q_proj.weight"], dims=1)
        torch.testing.assert_close(layer.self_attention.q_proj(x), q.flatten(1))
        o = torch.tensordot(heads_out, nari["decoder.layers.0.self_attention.o_proj.weight"], dims=2)
        torch.testing.assert_close(layer.self_attention.o_proj(heads_out.flatten(1)), o)
        fused = torch.tensordot(x, nari["decoder.layers.0.mlp.wi_fused.weight"], dims=1)
        hidden = torch.nn.functional.silu(fused[:, 0]) * fused[:, 1]  # index 0 is the gate
        mlp = torch.tensordot(hidden, nari["decoder.layers.0.mlp.wo.weight"], dims=1)
        torch.testing.assert_close(layer.mlp(x), mlp)
        logits = torch.tensordot(x, nari["decoder.logits_dense.weight"], dims=1)
        torch.testing.assert_close(model.logits_dense(x).view(5, dec.num_channels, dec.vocab_size), logits)
        codes = torch.randint(0, dec.vocab_size, (1, 3, dec.num_channels))
        summed = sum(nari[f"decoder.embeddings.{c}.weight"][codes[..., c]] for c in range(dec.num_channels))
        torch.testing.assert_close(model.model.decoder.embeddings(codes), summed)


def test_conversion_table_and_inverse(state):
    nari = to_nari_layout(TINY, state)
    assert len(nari) == len(state) + TINY.decoder.num_channels - 1
    assert nari["decoder.logits_dense.weight"].shape == (48, 9, 1028)
    assert nari["encoder.layers.0.self_attention.o_proj.weight"].shape == (4, 8, 32)
    assert nari["decoder.layers.1.cross_attention.k_proj.weight"].shape == (32, 4, 8)
    assert all(torch.equal(a, state[k]) for k, a in to_hf_layout(TINY, nari).items())
    assert {entry.rule for entry in conversion_table(TINY)} == {"copy", "dense", "channels"}


@pytest.mark.parametrize("max_shard_size", ["1GB", "100KB"])
def test_transformers_save_pretrained_loads(tmp_path, reference, max_shard_size):
    reference.save_pretrained(tmp_path, max_shard_size=max_shard_size)
    config = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in config["decoder_config"]  # the newer config style

    arch, loaded = load_checkpoint(tmp_path)

    assert arch == TINY
    for key, tensor in reference.state_dict().items():
        assert torch.equal(loaded[key], tensor), key
    files = checkpoint_files(tmp_path)
    weights = sorted(name for name in files if name.endswith(".safetensors"))
    assert weights == sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert ("model.safetensors.index.json" in files) == (len(weights) > 1)
    assert files["config.json"] == hashlib.sha256((tmp_path / "config.json").read_bytes()).hexdigest()


def test_older_transformers_config_parses(tmp_path, state):
    save_checkpoint(TINY, state, tmp_path, layout="hf", fmt="safetensors")
    config = TINY.to_hf_dict()
    for section in ("encoder_config", "decoder_config"):
        del config[section]["rope_parameters"]
        config[section]["rope_theta"] = 5000.0
    for key, value in (("eos_token_id", 1000), ("pad_token_id", 1001), ("bos_token_id", 1002)):
        del config["decoder_config"][key]
        config[key] = value
    (tmp_path / "config.json").write_text(json.dumps(config))

    arch, _ = load_checkpoint(tmp_path)

    assert (arch.eos_id, arch.pad_id, arch.bos_id) == (1000, 1001, 1002)
    assert arch.rope_max_timescale == 5000.0


def test_stored_buffers_are_ignored(tmp_path, state):
    save_checkpoint(TINY, state, tmp_path, layout="hf", fmt="safetensors")
    offsets = torch.arange(9) * 1028
    rewrite(tmp_path / "model.safetensors", lambda t: t.update({"model.decoder.embeddings.offsets": offsets}))
    assert load_checkpoint(tmp_path)[1].keys() == state.keys()


def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")


def test_missing_config(tmp_path, state):
    save_checkpoint(TINY, state, tmp_path, layout="hf", fmt="safetensors")
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_checkpoint(tmp_path)


def test_missing_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    with pytest.raises(FileNotFoundError) as error:
        load_checkpoint(tmp_path)
    for looked_for in ("model.safetensors", "model.safetensors.index.json", "*.pth", str(tmp_path)):
        assert looked_for in str(error.value)


def test_missing_tensor(tmp_path, state):
    save_checkpoint(TINY, state, tmp_path, layout="nari", fmt="safetensors")
    rewrite(tmp_path / "model.safetensors", lambda t: t.pop("decoder.embeddings.3.weight"))
    with pytest.raises(ValueError, match=r"nari layout.*1 missing: decoder\.embeddings\.3\.weight") as error:
        load_checkpoint(tmp_path)
    assert str(tmp_path) in str(error.value)


def test_extra_tensor(tmp_path, state):
    save_checkpoint(TINY, state, tmp_path, layout="hf", fmt="safetensors")
    rewrite(tmp_path / "model.safetensors", lambda t: t.update({"model.decoder.extra.weight": torch.ones(3)}))
    with pytest.raises(ValueError, match=r"HF layout.*1 unexpected: model\.decoder\.extra\.weight"):
        load_checkpoint(tmp_path)


def test_wrong_shape(tmp_path, state):
    save_checkpoint(TINY, state, tmp_path, layout="hf", fmt="safetensors")
    rewrite(
        tmp_path / "model.safetensors",
        lambda t: t.update({"logits_dense.weight": t["logits_dense.weight"].T.contiguous()}),
    )
    with pytest.raises(
        ValueError, match=r"1 with the wrong shape: logits_dense\.weight \(48, 9252\) instead of"
    ):
        load_checkpoint(tmp_path)


def test_many_missing_tensors_are_counted(tmp_path, state):
    save_checkpoint(TINY, state, tmp_path, layout="hf", fmt="safetensors")
    rewrite(tmp_path / "model.safetensors", lambda t: [t.pop(k) for k in list(t) if "decoder.layers" in k])
    with pytest.raises(ValueError, match=r"26 missing: .*, \.\.\."):
        load_checkpoint(tmp_path)


def test_index_names_a_missing_shard(tmp_path, state):
    save_checkpoint(TINY, state, tmp_path, layout="hf", fmt="safetensors", shards=3)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model-00002-of-00003.safetensors"):
        load_checkpoint(tmp_path)


def test_unknown_layout(tmp_path, state):
    save_checkpoint(TINY, state, tmp_path, layout="hf", fmt="safetensors")
    rewrite(tmp_path / "model.safetensors", lambda t: [t.update({"net." + k: t.pop(k)}) for k in list(t)])
    with pytest.raises(ValueError, match="unrecognised weight layout"):
        load_checkpoint(tmp_path)


def test_several_pth_files_are_ambiguous(tmp_path, state):
    save_checkpoint(TINY, state, tmp_path, layout="nari", fmt="pth")
    (tmp_path / "other.pth").write_bytes((tmp_path / "dia-v0_1.pth").read_bytes())
    with pytest.raises(ValueError, match="several .pth files"):
        load_checkpoint(tmp_path)


def test_wrapped_pth_loads(tmp_path, state):
    save_checkpoint(TINY, state, tmp_path, layout="nari", fmt="pth")
    path = tmp_path / "dia-v0_1.pth"
    torch.save({"model": torch.load(path, weights_only=True), "step": 1}, path)
    assert torch.equal(load_checkpoint(tmp_path)[1]["logits_dense.weight"], state["logits_dense.weight"])


def test_bad_write_options(tmp_path, state):
    with pytest.raises(ValueError, match="layout must be one of"):
        save_checkpoint(TINY, state, tmp_path, layout="jax", fmt="safetensors")
    with pytest.raises(ValueError, match="only safetensors checkpoints can be split"):
        save_checkpoint(TINY, state, tmp_path, layout="nari", fmt="pth", shards=2)


def test_from_pretrained_exports_a_checkpoint_with_the_variant_asked(
    tmp_path, tiny_state, tiny_codec, monkeypatch
):
    """A torch checkpoint is exported on first use with the variant asked for, which a later call adds to."""
    save_hf_folder(tiny_codec, tmp_path / "dac", "folded")
    monkeypatch.setattr(export.families, "DEFAULT_DAC", str(tmp_path / "dac"))  # the real one is on the Hub
    checkpoint = save_checkpoint(TINY, tiny_state, tmp_path / "ckpt", layout="nari", fmt="safetensors")
    cache = tmp_path / "cache"
    dia = Dia.from_pretrained(checkpoint, compute_dtype="float16", device="cpu", cache_dir=cache)
    assert dia.compute_dtype == "float32"  # half precision is for CUDA: the CPU export is float32 alone
    assert set(Manifest.load(dia.folder).variants) == {"float32"}
    dia = Dia.from_pretrained(checkpoint, compute_dtype="int8", device="cpu", cache_dir=cache)
    assert dia.compute_dtype == "int8"
    assert set(Manifest.load(dia.folder).variants) == {"float32", "int8"}
    assert dia.generate_codes("[S1] Hi.", temperature=0, max_new_tokens=4)[0].shape == (4, 9)
    dia = Dia.from_pretrained(checkpoint, compute_dtype="int4", device="cpu", cache_dir=cache)
    assert set(Manifest.load(dia.folder).variants) == {"float32", "int8", "int4"}  # int8 is kept
    with pytest.raises(ValueError, match="compute_dtype must be one of"):  # refused before any export
        Dia.from_pretrained(checkpoint, compute_dtype="float64", device="cpu", cache_dir=cache)
