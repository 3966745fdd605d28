"""The DAC codec: equal to transformers' `DacModel`, every weight layout loads the same, bad files are
refused by name, and the exported ONNX graphs compute what the torch modules compute."""

from __future__ import annotations

import datetime
import json
import pickle
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, DacConfig, DacModel

from export.dac import DAC_44KHZ, TINY_DAC, DacArchitecture, DacCodec, DacDecodeGraph, DacEncodeGraph
from export.dac_weights import HF_WEIGHT_NORMS, load_dac, random_dac, save_descript_pth, save_hf_folder
from export.onnx_export import export_graph
from export.pipeline import codec_specs

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
        have_wave = codec.decode(codes)
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


def stream_decode(decoder: DacDecodeGraph, codes: torch.Tensor, ends: list[int], run=None) -> torch.Tensor:
    """`codes [B, C, T]` decoded by `decoder` (torch, or `run` given its feeds) in blocks ending at
    `ends` and T, then a block of padding; the audio of the item's samples."""
    batch, _, frames = codes.shape
    run = run or decoder
    contexts = [torch.zeros(batch, c, k) for c, k in decoder.contexts]
    padding = torch.zeros(batch, codes.shape[1], -(-decoder.delay // HOP), dtype=torch.long)
    waves = []
    for start, end in zip([0, *ends, frames], [*ends, frames, None], strict=True):
        block, real = (codes[..., start:end], end - start) if start < frames else (padding, 0)
        wave, *contexts = run(
            block, torch.full((batch,), start), torch.full((batch,), start + real), *contexts
        )
        waves.append(wave)
    wave = torch.cat(waves, dim=-1)
    return wave[:, decoder.delay : decoder.delay + frames * HOP]


@pytest.mark.parametrize("ends", [[], [1, 2, 3], [5, 6, 15], [8]])
def test_streamed_decoder_equals_the_whole_item_at_once(tiny_codec, ends):
    """Blocks of any size, each after the contexts of the one before, decode what DacModel decodes."""
    hf = hf_dac(TINY_DAC)
    hf.load_state_dict(tiny_codec.state_dict())
    codes = random_codes(TINY_DAC, batch=2, frames=16, seed=len(ends))
    with torch.no_grad():
        have = stream_decode(DacDecodeGraph(tiny_codec), codes, ends)
        want = hf.decode(audio_codes=codes).audio_values
    assert have.shape == want.shape == (2, 16 * HOP)
    assert (have - want).abs().max() < 1e-4


def test_streamed_decoder_delay_is_its_lookahead(tiny_codec):
    """The real DAC's rates and kernels: output lags by 4757 samples, and no context is wider than the
    widest dilated kernel sees."""
    decoder = DacDecodeGraph(tiny_codec)
    assert decoder.delay == DacDecodeGraph(random_dac(DAC_44KHZ, seed=0)).delay == 4757
    assert max(k for _, k in decoder.contexts) == 6 * 9 and len(decoder.contexts) == 18
    with pytest.raises(ValueError, match="even rates"):
        DacDecodeGraph(DacCodec(replace(TINY_DAC, decoder_rates=(8, 8, 4, 3))))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_decoder_matches_torch(tiny_codec, tmp_path):
    spec, samples = codec_specs(tiny_codec)[0]
    session = ort.InferenceSession(str(tmp_path / export_graph(spec, tmp_path).file.path))
    for sample in samples:  # a first block, a later one, one of padding past the end
        with torch.no_grad():
            want = [t.numpy() for t in spec.module(*sample)]
        have = session.run(None, {name: t.numpy() for name, t in zip(spec.inputs, sample, strict=True)})
        for a, b in zip(have, want, strict=True):
            assert a.shape == b.shape and np.abs(a - b).max() < 1e-4

    def run(*feeds: torch.Tensor) -> list[torch.Tensor]:
        out = session.run(None, {name: t.numpy() for name, t in zip(spec.inputs, feeds, strict=True)})
        return [torch.from_numpy(a) for a in out]

    codes = random_codes(TINY_DAC, batch=2, frames=11, seed=3)
    with torch.no_grad():
        want = tiny_codec.decode(codes)
    assert (stream_decode(spec.module, codes, [4], run) - want).abs().max() < 1e-4


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


# An architecture where no size is a default: a loader that drops or swaps one builds another codec.
ODD_DAC = DacArchitecture(
    encoder_dim=2,
    encoder_rates=(2, 3),
    latent_dim=12,
    decoder_dim=8,
    decoder_rates=(3, 2),
    n_codebooks=3,
    codebook_size=16,
    codebook_dim=4,
    sample_rate=16000,
)
# descript's DAC constructor arguments, as its release files store them under metadata.kwargs
DESCRIPT_KWARGS = {
    "encoder_dim",
    "encoder_rates",
    "latent_dim",
    "decoder_dim",
    "decoder_rates",
    "n_codebooks",
    "codebook_size",
    "codebook_dim",
    "quantizer_dropout",
    "sample_rate",
}


def descript_keys(arch: DacArchitecture) -> dict[str, int]:
    """descript's parameter names, written out from its module tree (dac/model/dac.py), with the kernel
    size of each weight-normed convolution on its `weight_v` (None for other parameters)."""
    keys: dict[str, int | None] = {}

    def conv(prefix: str, kernel: int) -> None:
        keys.update({f"{prefix}.weight_g": None, f"{prefix}.weight_v": kernel, f"{prefix}.bias": None})

    def residual(prefix: str) -> None:  # Snake1d, WNConv1d(k=7, dilated), Snake1d, WNConv1d(k=1)
        keys[f"{prefix}.block.0.alpha"] = None
        conv(f"{prefix}.block.1", 7)
        keys[f"{prefix}.block.2.alpha"] = None
        conv(f"{prefix}.block.3", 1)

    conv("encoder.block.0", 7)
    for i, stride in enumerate(
        arch.encoder_rates, start=1
    ):  # EncoderBlock: 3 residual units, Snake1d, WNConv1d
        block = f"encoder.block.{i}.block"
        for j in range(3):
            residual(f"{block}.{j}")
        keys[f"{block}.3.alpha"] = None
        conv(f"{block}.4", 2 * stride)
    last = len(arch.encoder_rates)
    keys[f"encoder.block.{last + 1}.alpha"] = None
    conv(f"encoder.block.{last + 2}", 3)
    conv("decoder.model.0", 7)
    for i, stride in enumerate(
        arch.decoder_rates, start=1
    ):  # DecoderBlock: Snake1d, WNConvTranspose1d, 3 units
        block = f"decoder.model.{i}.block"
        keys[f"{block}.0.alpha"] = None
        conv(f"{block}.1", 2 * stride)
        for j in range(3):
            residual(f"{block}.{j + 2}")
    last = len(arch.decoder_rates)
    keys[f"decoder.model.{last + 1}.alpha"] = None
    conv(f"decoder.model.{last + 2}", 7)
    for q in range(arch.n_codebooks):
        conv(f"quantizer.quantizers.{q}.in_proj", 1)
        conv(f"quantizer.quantizers.{q}.out_proj", 1)
        keys[f"quantizer.quantizers.{q}.codebook.weight"] = None
    return keys


@pytest.mark.parametrize("arch", [TINY_DAC, ODD_DAC], ids=["tiny", "odd"])
def test_descript_file_has_descripts_names_and_sizes(tmp_path, arch):
    save_descript_pth(random_dac(arch), tmp_path / "weights.pth")
    stored = torch.load(tmp_path / "weights.pth", weights_only=True)
    expected = descript_keys(arch)
    assert set(stored["state_dict"]) == set(expected)
    for key, kernel in expected.items():
        if kernel is not None:
            assert stored["state_dict"][key].shape[-1] == kernel, key
    kwargs = stored["metadata"]["kwargs"]
    assert set(kwargs) == DESCRIPT_KWARGS and kwargs["quantizer_dropout"] == 0.0
    assert (
        DacArchitecture(
            **{
                k: tuple(v) if isinstance(v, list) else v
                for k, v in kwargs.items()
                if k != "quantizer_dropout"
            }
        )
        == arch
    )


def test_every_size_of_a_descript_file_is_read(tmp_path):
    codec = random_dac(ODD_DAC, seed=3)
    save_descript_pth(codec, tmp_path / "odd.pth")
    assert_same_weights(load_dac(tmp_path / "odd.pth"), codec)


def test_a_descript_file_without_latent_dim_gets_the_default(tmp_path):
    """Older descript files leave latent_dim out: it is then encoder_dim * 2**len(encoder_rates)."""
    codec = random_dac(TINY_DAC)
    save_descript_pth(codec, tmp_path / "weights.pth")
    checkpoint = torch.load(tmp_path / "weights.pth", weights_only=True)
    del checkpoint["metadata"]["kwargs"]["latent_dim"]
    torch.save(checkpoint, tmp_path / "weights.pth")
    assert_same_weights(load_dac(tmp_path / "weights.pth"), codec)


@pytest.mark.parametrize(
    "content",
    [{"metadata": {"kwargs": {}}}, {"state_dict": {}}, [1, 2]],
    ids=["no state_dict", "no metadata", "not a dict"],
)
def test_a_pth_that_is_not_descripts_is_refused(tmp_path, content):
    torch.save(content, tmp_path / "other.pth")
    with pytest.raises(ValueError, match=r"other\.pth: not a descript DAC file \(expected the keys"):
        load_dac(tmp_path / "other.pth")


def test_a_pth_is_never_unpickled_beyond_tensors(tmp_path):
    """A .pth is a pickle: loading one with arbitrary objects in it would run their code."""
    torch.save(
        {"state_dict": {}, "metadata": {"kwargs": {}}, "when": datetime.date(2020, 1, 1)}, tmp_path / "x.pth"
    )
    with pytest.raises(pickle.UnpicklingError):
        load_dac(tmp_path / "x.pth")


def test_random_dac_is_seeded():
    def weights(codec):
        return torch.cat([value.flatten() for value in codec.state_dict().values()])

    assert torch.equal(weights(random_dac(TINY_DAC)), weights(random_dac(TINY_DAC, seed=0)))
    assert torch.equal(weights(random_dac(TINY_DAC, seed=5)), weights(random_dac(TINY_DAC, seed=5)))
    assert not torch.equal(weights(random_dac(TINY_DAC, seed=5)), weights(random_dac(TINY_DAC, seed=6)))


def test_random_dac_draws_from_the_documented_distributions():
    """Codebooks N(0, 1), Snake alphas in [0.5, 1.5], convolutions N(0, gain^2 / fan_in) with gain
    1/sqrt(n_codebooks) on the codebooks' out_proj, 0.3 on the residual units' and last convolutions,
    1 elsewhere; fan_in = inputs x taps, over the stride for a transposed convolution; small biases."""
    arch = DacArchitecture(encoder_dim=8, latent_dim=128, decoder_dim=128)
    codec = random_dac(arch)
    for name, module in codec.named_modules():
        if isinstance(module, torch.nn.Embedding):
            assert abs(module.weight.std().item() - 1) < 0.05, name
        elif hasattr(module, "alpha"):
            alpha = module.alpha
            assert alpha.min() >= 0.5 and alpha.max() <= 1.5, name
        elif isinstance(module, torch.nn.Conv1d | torch.nn.ConvTranspose1d) and module.weight.numel() >= 1000:
            fan_in = module.in_channels * module.kernel_size[0]
            if isinstance(module, torch.nn.ConvTranspose1d):
                fan_in /= module.stride[0]
            gain = 1 / 3 if name.endswith("out_proj") else 0.3 if name.endswith("conv2") else 1.0
            assert module.weight.std().item() == pytest.approx(gain / fan_in**0.5, rel=0.1), name
            assert module.bias.abs().max() < 0.1, name
    alphas = torch.cat([m.alpha.flatten() for m in codec.modules() if hasattr(m, "alpha")])
    assert alphas.min() < 0.6 and alphas.max() > 1.4  # spread over the whole range


@pytest.mark.parametrize("dropped", [10, 12])
def test_a_long_list_of_missing_keys_shows_ten(tiny_codec, tmp_path, dropped):
    save_hf_folder(tiny_codec, tmp_path, "folded")
    state = load_file(tmp_path / "model.safetensors")
    gone = sorted(state)[:dropped]
    save_file({key: value for key, value in state.items() if key not in gone}, tmp_path / "model.safetensors")
    more = " and 2 more" if dropped == 12 else ""
    with pytest.raises(ValueError, match=f"missing: {', '.join(gone[:10])}{more}$"):
        load_dac(tmp_path)


def test_a_descript_file_that_does_not_fit_is_named(tmp_path):
    save_descript_pth(random_dac(TINY_DAC), tmp_path / "weights.pth")
    checkpoint = torch.load(tmp_path / "weights.pth", weights_only=True)
    checkpoint["metadata"]["kwargs"]["codebook_dim"] = 4
    torch.save(checkpoint, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match=r"^\S*weights\.pth: DAC weights do not match .*wrong shape"):
        load_dac(tmp_path / "weights.pth")


def test_a_descript_file_saved_from_gpu_tensors_loads_on_the_cpu(tiny_codec, tmp_path):
    """The release file may have been written from CUDA tensors; torch.save records their device, and
    this is such a file (the device tag rewritten), loaded where CUDA may be absent."""
    save_descript_pth(tiny_codec, tmp_path / "cpu.pth")
    with (
        zipfile.ZipFile(tmp_path / "cpu.pth") as source,
        zipfile.ZipFile(tmp_path / "gpu.pth", "w") as target,
    ):
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/data.pkl"):
                assert b"X\x03\x00\x00\x00cpu" in data
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            target.writestr(info, data)
    assert_same_weights(load_dac(tmp_path / "gpu.pth"), tiny_codec)


def test_stored_weight_norm_differs_from_the_weight_by_a_seeded_factor(tiny_codec, tmp_path):
    """`v` is the weight times 0.5 to 2 per output slice (so g != ||v||), the same in every file written."""
    for folder in ("a", "b"):
        save_hf_folder(tiny_codec, tmp_path / folder, "weight_g")
    first, second = (
        load_file(tmp_path / "a" / "model.safetensors"),
        load_file(tmp_path / "b" / "model.safetensors"),
    )
    assert first.keys() == second.keys() and all(torch.equal(first[key], second[key]) for key in first)
    weights = tiny_codec.state_dict()
    factors = torch.cat(
        [
            (first[key] / weights[key.removesuffix("_v")]).flatten(1).median(dim=1).values
            for key in first
            if key.endswith(".weight_v")
        ]
    )
    assert 0.5 <= factors.min() < 0.6 and 1.9 < factors.max() <= 2.0


def test_transformers_reads_the_folder_it_is_given(tiny_codec, tmp_path):
    """transformers' own loader (AutoModel, by config.json's model_type) gets the same weights."""
    save_hf_folder(tiny_codec, tmp_path, "folded")
    model = AutoModel.from_pretrained(tmp_path)
    assert isinstance(model, DacModel) and model.config.architectures == ["DacModel"]
    want = tiny_codec.state_dict()
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=0, atol=0, msg=key)


def test_save_hf_folder_refuses_what_transformers_cannot_hold(tiny_codec, tmp_path):
    with pytest.raises(
        ValueError, match=r"^weight_norm must be one of \('parametrizations', 'weight_g', 'folded'\)"
    ):
        save_hf_folder(tiny_codec, tmp_path, "spectral")
    with pytest.raises(
        ValueError, match=r"^transformers' DacModel requires latent_dim = encoder_dim \* 2\*\*2"
    ):
        save_hf_folder(random_dac(ODD_DAC), tmp_path, "folded")


# ODD_DAC with the latent size transformers' DacModel derives (encoder_dim * 2**len(encoder_rates)), and
# decoder rates that are not the encoder's reversed (the default when a config leaves them out)
HF_ODD_DAC = replace(ODD_DAC, latent_dim=8, decoder_rates=(2, 3))


def test_every_size_of_a_transformers_folder_is_read(tmp_path):
    codec = random_dac(HF_ODD_DAC, seed=4)
    save_hf_folder(codec, tmp_path / "nested" / "odd", "folded")  # parent folders are made
    assert_same_weights(load_dac(tmp_path / "nested" / "odd"), codec)
    model = AutoModel.from_pretrained(tmp_path / "nested" / "odd")
    assert (model.config.hop_length, model.config.upsampling_ratios) == (6, [2, 3])


@pytest.mark.parametrize("dropped", ["hidden_size", "upsampling_ratios"])
def test_a_transformers_config_without_optional_sizes_gets_the_defaults(tmp_path, dropped):
    """hidden_size defaults to encoder_dim * 2**len(rates), upsampling_ratios to the reversed rates."""
    codec = random_dac(replace(HF_ODD_DAC, decoder_rates=HF_ODD_DAC.encoder_rates[::-1]))
    save_hf_folder(codec, tmp_path, "folded")
    config = json.loads((tmp_path / "config.json").read_text())
    del config[dropped]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert_same_weights(load_dac(tmp_path), codec)


def test_a_transformers_config_with_its_own_hidden_size_is_read(tmp_path):
    codec = random_dac(ODD_DAC)
    save_hf_folder(random_dac(replace(ODD_DAC, latent_dim=8)), tmp_path, "folded")  # then hidden_size = 12
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(config | {"hidden_size": ODD_DAC.latent_dim}))
    save_file(
        {key: value.contiguous() for key, value in codec.state_dict().items()}, tmp_path / "model.safetensors"
    )
    assert_same_weights(load_dac(tmp_path), codec)


def test_every_problem_of_a_folder_is_named_with_the_folder(tiny_codec, tmp_path):
    save_hf_folder(tiny_codec, tmp_path, "folded")
    state = load_file(tmp_path / "model.safetensors")
    drop_key(state)
    add_key(state)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(ValueError) as error:
        load_dac(tmp_path)
    message = str(error.value)
    assert message.startswith(f"{tmp_path}: DAC weights do not match")
    assert message.endswith("missing: decoder.conv2.bias; unexpected: decoder.extra.weight")


def test_a_file_that_is_neither_layout_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(
        ValueError, match=r"weights\.bin: expected descript's \.pth file or a transformers DacModel folder$"
    ):
        load_dac(tmp_path / "weights.bin")
