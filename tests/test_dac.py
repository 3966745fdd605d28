"""The DAC codec: equal to transformers' `DacModel`, every weight layout loads the same, bad files are
refused by name, and the exported ONNX graphs compute what the torch modules compute."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import DacConfig, DacModel

from export.dac import DAC_44KHZ, TINY_DAC, DacArchitecture, DacCodec, DacDecodeGraph, DacEncodeGraph
from export.dac_weights import HF_WEIGHT_NORMS, load_dac, random_dac, save_descript_pth, save_hf_folder

HOP = TINY_DAC.hop_length


def hf_dac(arch: DacArchitecture) -> DacModel:
    config = DacConfig(
        encoder_hidden_size=arch.encoder_dim,
        downsampling_ratios=list(arch.encoder_rates),
        decoder_hidden_size=arch.decoder_dim,
        n_codebooks=arch.n_codebooks,
        codebook_size=arch.codebook_size,
        codebook_dim=arch.codebook_dim,
        sampling_rate=arch.sample_rate,
    )
    return DacModel(config).eval()


def random_codes(arch: DacArchitecture, batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, arch.codebook_size, (batch, arch.n_codebooks, frames), generator=generator)


def random_audio(batch: int, frames: int, seed: int = 0) -> torch.Tensor:
    return 0.3 * torch.randn(batch, frames * HOP, generator=torch.Generator().manual_seed(seed))


def assert_matches_transformers(hf: DacModel, codec: DacCodec, frames: int) -> None:
    """Decode within 1e-4 of `DacModel.decode`, encode to the same codes as `DacModel.encode`."""
    codes = random_codes(codec.arch, batch=2, frames=frames)
    audio = random_audio(batch=2, frames=frames)
    with torch.no_grad():
        want_wave = hf.decode(audio_codes=codes).audio_values
        have_wave = DacDecodeGraph(codec)(codes)
        want_codes = hf.encode(audio[:, None]).audio_codes
        have_codes = DacEncodeGraph(codec)(audio)
    assert have_wave.shape == (2, frames * HOP)
    assert 0.05 < have_wave.abs().mean() < 0.9  # neither silent nor saturated
    assert (have_wave - want_wave).abs().max() < 1e-4
    assert have_codes.dtype == torch.int64
    assert torch.equal(have_codes, want_codes)


def assert_same_weights(codec: DacCodec, reference: DacCodec) -> None:
    assert codec.arch == reference.arch
    want = reference.state_dict()
    have = codec.state_dict()
    assert have.keys() == want.keys()
    for key, value in want.items():
        torch.testing.assert_close(have[key], value, rtol=1e-6, atol=1e-7, msg=key)


@pytest.fixture(scope="module")
def hf_tiny_folder(tmp_path_factory, tiny_codec) -> tuple[DacModel, Path]:
    """transformers' DacModel with tiny_codec's weights, saved by transformers with weight norm applied."""
    hf = hf_dac(TINY_DAC)
    hf.load_state_dict(tiny_codec.state_dict())
    hf.apply_weight_norm()
    folder = tmp_path_factory.mktemp("hf_tiny_dac")
    hf.save_pretrained(folder)
    return hf, folder


def test_tiny_matches_transformers(hf_tiny_folder):
    hf, folder = hf_tiny_folder
    assert_matches_transformers(hf, load_dac(folder), frames=7)


def test_full_size_matches_transformers():
    codec = random_dac(DAC_44KHZ, seed=1)
    hf = hf_dac(DAC_44KHZ)
    hf.load_state_dict(codec.state_dict())  # strict: our names are DacModel's
    assert_matches_transformers(hf, codec, frames=4)


@pytest.mark.parametrize("weight_norm", HF_WEIGHT_NORMS)
def test_hf_weight_norm_forms_load_the_same_weights(tiny_codec, tmp_path, weight_norm):
    save_hf_folder(tiny_codec, tmp_path, weight_norm)
    stored = load_file(tmp_path / "model.safetensors")
    marker = {"parametrizations": ".parametrizations.weight.original0", "weight_g": ".weight_g"}
    assert any(marker.get(weight_norm, "conv1.weight") in key for key in stored)
    assert_same_weights(load_dac(tmp_path), tiny_codec)


def test_descript_pth_loads_the_same_weights(tiny_codec, tmp_path):
    path = tmp_path / "weights.pth"
    save_descript_pth(tiny_codec, path)
    stored = torch.load(path, weights_only=True)["state_dict"]
    for key in (
        "encoder.block.0.weight_g",  # first conv
        "encoder.block.1.block.2.block.1.weight_v",  # third residual unit's dilated conv
        "encoder.block.4.block.3.alpha",  # snake before the strided conv
        "encoder.block.4.block.4.weight_g",  # strided conv
        "encoder.block.5.alpha",
        "encoder.block.6.bias",
        "decoder.model.0.weight_v",
        "decoder.model.1.block.1.weight_g",  # transposed conv
        "decoder.model.4.block.4.block.3.bias",
        "decoder.model.5.alpha",
        "decoder.model.6.weight_v",
        "quantizer.quantizers.8.out_proj.weight_g",
        "quantizer.quantizers.8.codebook.weight",
    ):
        assert key in stored
    assert_same_weights(load_dac(path), tiny_codec)


def drop_key(state: dict) -> None:
    del state["decoder.conv2.bias"]


def add_key(state: dict) -> None:
    state["decoder.extra.weight"] = torch.zeros(3)


def reshape_key(state: dict) -> None:
    state["quantizer.quantizers.0.codebook.weight"] = torch.zeros(1024, 4)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (drop_key, r"missing: decoder\.conv2\.bias"),
        (add_key, r"unexpected: decoder\.extra\.weight"),
        (reshape_key, r"wrong shape: quantizer\.quantizers\.0\.codebook\.weight \[1024, 4\]"),
    ],
)
def test_bad_checkpoint_is_refused_by_name(tiny_codec, tmp_path, edit, message):
    save_hf_folder(tiny_codec, tmp_path, "folded")
    state = load_file(tmp_path / "model.safetensors")
    edit(state)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=message):
        load_dac(tmp_path)


def test_missing_files_are_refused(tiny_codec, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        load_dac(tmp_path / "nowhere.pth")
    save_hf_folder(tiny_codec, tmp_path, "folded")
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_dac(tmp_path)


def export_onnx(module: torch.nn.Module, example: torch.Tensor, names: tuple[str, str], path: Path) -> None:
    """Trace with dynamic batch and length axes, as the export stage does."""
    dynamic = {name: {0: "batch", 1 if name == "waveform" else 2: "length"} for name in names}
    with torch.no_grad():
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[names[0]],
            output_names=[names[1]],
            dynamic_axes=dynamic,
            opset_version=18,
            dynamo=False,
        )


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_decoder_matches_torch(tiny_codec, tmp_path):
    graph = DacDecodeGraph(tiny_codec)
    path = tmp_path / "dac_decoder.onnx"
    export_onnx(graph, random_codes(TINY_DAC, 1, 3), ("codes", "waveform"), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, frames in ((1, 5), (2, 11)):
        codes = random_codes(TINY_DAC, batch, frames, seed=frames)
        with torch.no_grad():
            want = graph(codes).numpy()
        (have,) = session.run(None, {"codes": codes.numpy()})
        assert have.shape == (batch, frames * HOP)
        assert np.abs(have - want).max() < 1e-4


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_encoder_matches_torch(tiny_codec, tmp_path):
    graph = DacEncodeGraph(tiny_codec)
    path = tmp_path / "dac_encoder.onnx"
    export_onnx(graph, random_audio(1, 3), ("waveform", "codes"), path)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch, frames in ((1, 5), (2, 11)):
        audio = random_audio(batch, frames, seed=frames)
        with torch.no_grad():
            want = graph(audio).numpy()
        (have,) = session.run(None, {"waveform": audio.numpy()})
        assert have.dtype == np.int64
        np.testing.assert_array_equal(have, want)
