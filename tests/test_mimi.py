"""Mimi (Dia2's codec): the export's modules and graphs against transformers' `MimiModel`.

The decoder graph streams: its state goes out and comes back in, and chunks of any size give the
waveform of one call on every frame. The encoder's codes equal the reference's for any clip length.
"""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from safetensors.torch import save_file
from transformers import MimiConfig, MimiModel

from export.dia2_pipeline import mimi_specs
from export.mimi import TINY_MIMI, TRANSFORMERS_RENAMES, MimiArchitecture, MimiCodec, MimiDecodeGraph
from export.mimi_weights import load_mimi, random_mimi
from export.onnx_export import export_graph

CODEBOOKS = TINY_MIMI.num_quantizers
HOP = TINY_MIMI.hop_length


@pytest.fixture(scope="module")
def reference() -> MimiModel:
    """transformers' Mimi of the tiny shape, with random codebooks and layer scales (its own init
    leaves the codebooks zero)."""
    torch.manual_seed(0)
    model = MimiModel(MimiConfig(**TINY_MIMI.to_config())).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("embed_sum"):
                buffer.copy_(torch.randn(buffer.shape, generator=g))
            elif name.endswith("cluster_usage"):
                buffer.copy_(torch.rand(buffer.shape, generator=g) + 0.5)
        for name, parameter in model.named_parameters():
            if name.endswith("scale"):
                parameter.copy_(0.5 * torch.rand(parameter.shape, generator=g))
    return model


@pytest.fixture(scope="module")
def codec(reference) -> MimiCodec:
    return MimiCodec.from_state(TINY_MIMI, reference.state_dict())  # transformers' names


@pytest.fixture(scope="module")
def sessions(codec, tmp_path_factory) -> dict[str, tuple]:
    folder = tmp_path_factory.mktemp("mimi")
    result = {}
    for spec, _ in mimi_specs(codec, CODEBOOKS):
        path = folder / export_graph(spec, folder).file.path
        result[spec.name] = (spec, ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]))
    return result


def _codes(frames: int, seed: int, batch: int = 2) -> torch.Tensor:
    return torch.randint(
        0, TINY_MIMI.codebook_size, (batch, CODEBOOKS, frames), generator=torch.Generator().manual_seed(seed)
    )


def _decode(sessions, codec, codes: np.ndarray, chunks: list[int]) -> np.ndarray:
    spec, session = sessions["mimi_decoder"]
    state = [s.numpy() for s in MimiDecodeGraph(codec).initial_state(codes.shape[0])]
    pieces, done = [], 0
    for size in chunks:
        offset = np.array([done * TINY_MIMI.latent_stride])
        out = session.run(
            None, dict(zip(spec.inputs, [codes[..., done : done + size], offset, *state], strict=True))
        )
        pieces.append(out[0])
        state, done = out[1:], done + size
    return np.concatenate(pieces, axis=-1)


def test_the_decoder_graph_decodes_what_mimimodel_decodes(reference, codec, sessions):
    """13 frames: 26 transformer frames against a window of 6, so the window is exercised."""
    codes = _codes(13, seed=2)
    with torch.no_grad():
        want = reference.decode(codes).audio_values[:, 0].numpy()
    got = _decode(sessions, codec, codes.numpy(), [13])
    assert got.shape == (2, 13 * HOP)
    assert np.abs(got - want).max() <= 1e-5 * max(1.0, np.abs(want).max())


@pytest.mark.parametrize("chunks", [[1] * 9, [2, 3, 4], [5, 1, 3]])
def test_a_stream_of_chunks_is_one_call(codec, sessions, chunks):
    codes = _codes(9, seed=3).numpy()
    whole = _decode(sessions, codec, codes, [9])
    streamed = _decode(sessions, codec, codes, chunks)
    np.testing.assert_allclose(streamed, whole, rtol=0, atol=1e-5 * np.abs(whole).max())


@pytest.mark.parametrize("samples", [HOP, 3 * HOP, 3 * HOP + 7, 5000, 333])
def test_the_encoder_graph_gives_mimimodels_codes(reference, sessions, samples):
    """Any clip length: the last frame is padded as the reference pads it (zeros in the SEANet's strided
    convolutions, the edge repeated in the downsampling one)."""
    waveform = 0.3 * torch.randn(2, samples, generator=torch.Generator().manual_seed(samples))
    with torch.no_grad():
        want = reference.encode(waveform[:, None]).audio_codes.numpy()
    spec, session = sessions["mimi_encoder"]
    got = session.run(None, {"waveform": waveform.numpy()})[0]
    assert got.shape == (2, CODEBOOKS, -(-samples // HOP))
    np.testing.assert_array_equal(got, want)


def test_a_published_folder_loads_by_the_flat_names(reference, codec, tmp_path):
    state = {}
    for name, tensor in reference.state_dict().items():
        for published, renamed in TRANSFORMERS_RENAMES:
            if name.startswith(published):
                name = renamed + name[len(published) :]
        state[name] = tensor.contiguous()
    (tmp_path / "config.json").write_text(json.dumps(reference.config.to_dict()))
    save_file(state, str(tmp_path / "model.safetensors"))
    loaded = load_mimi(tmp_path)
    assert loaded.arch == TINY_MIMI
    for (name, a), b in zip(loaded.state_dict().items(), codec.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_bad_mimi_folders_and_configs_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_mimi(tmp_path)
    with pytest.raises(ValueError, match="causal"):
        MimiArchitecture.from_config({"use_causal_conv": False})
    with pytest.raises(ValueError, match="key/value heads"):
        MimiArchitecture.from_config({"num_attention_heads": 8, "num_key_value_heads": 4})
    with pytest.raises(RuntimeError, match="Missing key"):
        MimiCodec.from_state(TINY_MIMI, {})


def test_random_mimi_decodes_to_audio_of_a_sane_size(sessions):
    codec = random_mimi(TINY_MIMI, seed=4)
    with torch.no_grad():
        waveform = MimiDecodeGraph(codec)(
            _codes(4, seed=5), torch.zeros(1, dtype=torch.long), *MimiDecodeGraph(codec).initial_state(2)
        )[0]
    assert torch.isfinite(waveform).all() and 1e-3 < waveform.abs().max() < 1e3
