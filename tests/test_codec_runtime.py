"""The runtime's `encode_audio` and `decode_codes` (ONNX Runtime) against transformers' DacModel."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_dac import hf_dac

from export.dac import TINY_DAC


@pytest.fixture(scope="module")
def reference(tiny_codec):
    model = hf_dac(TINY_DAC)
    model.load_state_dict(tiny_codec.state_dict(), strict=True)
    return model


def test_decode_codes_matches_dac_model(tiny_dia, reference):
    codes = np.random.default_rng(0).integers(0, 1024, size=(23, 9))
    with torch.no_grad():
        want = reference.decode(audio_codes=torch.as_tensor(codes.T[None])).audio_values[0].numpy()
    have = tiny_dia.decode_codes(codes)
    assert have.dtype == np.float32 and have.shape == (23 * 512,)
    np.testing.assert_allclose(have, want, atol=1e-4)


def test_encode_audio_matches_dac_model(tiny_dia, reference):
    wave = (0.3 * np.random.default_rng(1).standard_normal(17 * 512 - 100)).astype(np.float32)
    padded = np.concatenate([wave, np.zeros(100, dtype=np.float32)])  # right-padded to a whole frame
    with torch.no_grad():
        want = reference.encode(torch.as_tensor(padded)[None, None]).audio_codes[0].numpy().T
    have = tiny_dia.encode_audio(wave)
    assert have.shape == (17, 9)
    np.testing.assert_array_equal(have, want)


def test_encode_audio_resamples_and_mixes_down(tiny_dia, tmp_path):
    import soundfile as sf

    rng = np.random.default_rng(2)
    stereo = (0.2 * rng.standard_normal((22050, 2))).astype(np.float32)
    path = tmp_path / "voice.flac"
    sf.write(path, stereo, 22050)
    from_file = tiny_dia.encode_audio(str(path))
    from_array = tiny_dia.encode_audio((stereo, 22050))
    assert from_file.shape == from_array.shape == (87, 9)  # 1 s at 44.1 kHz = 86.13 frames -> 87


def test_waveform_prompt_equals_its_codes(tiny_dia):
    wave = (0.2 * np.sin(np.arange(6 * 512) / 9)).astype(np.float32)
    codes = tiny_dia.encode_audio(wave)
    kwargs = dict(temperature=0, max_new_tokens=12)
    by_wave = tiny_dia.generate_codes(["[S1] Hi."], [wave], **kwargs)[0]
    by_codes = tiny_dia.generate_codes(["[S1] Hi."], [codes], **kwargs)[0]
    np.testing.assert_array_equal(by_wave, by_codes)
