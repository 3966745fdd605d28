"""The runtime's `encode_audio` and `decode_codes` (ONNX Runtime) against transformers' DacModel, and
chunked runs against whole-length ones."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import export_tiny
from test_dac import hf_dac

from dia_ort.codec import ENCODE_CONTEXT_FRAMES, Codec, DecodeGrid, chunk_windows
from dia_ort.engine import Device
from dia_ort.manifest import Manifest
from export.architecture import TINY
from export.dac import DAC_44KHZ, TINY_DAC
from export.dac_weights import random_dac

REPO = Path(__file__).resolve().parents[1]
WHOLE = 10**6  # a chunk longer than any input: one run


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
    tiny_dia.encoded_clips.clear()  # the generation encodes the waveform itself
    by_wave = tiny_dia.generate_codes(["[S1] Hi."], [wave], **kwargs)[0]
    by_codes = tiny_dia.generate_codes(["[S1] Hi."], [codes], **kwargs)[0]
    np.testing.assert_array_equal(by_wave, by_codes)


def test_a_clip_seen_again_skips_the_encoder(tiny_dia, monkeypatch, tmp_path):
    import soundfile as sf

    runs = []
    encode = tiny_dia.codec.encode
    monkeypatch.setattr(tiny_dia.codec, "encode", lambda wave: runs.append(len(wave)) or encode(wave))
    tiny_dia.encoded_clips.clear()
    wave = (0.2 * np.random.default_rng(3).standard_normal(9 * 512)).astype(np.float32)
    first = tiny_dia.encode_audio(wave)
    first[:] = 0  # the caller's copy: the kept codes stay as they were
    again = tiny_dia.encode_audio(wave.copy())
    path = tmp_path / "voice.wav"
    sf.write(path, wave, 44100, subtype="FLOAT")
    from_file = tiny_dia.encode_audio(str(path))  # the same samples, read from a file
    assert len(runs) == 1
    np.testing.assert_array_equal(again, encode(wave))
    np.testing.assert_array_equal(from_file, again)

    other = wave.copy()
    other[100] += 0.01  # one sample differs: another clip
    np.testing.assert_array_equal(tiny_dia.encode_audio(other), encode(other))
    assert len(runs) == 2
    tiny_dia.encoded_clips.clear()
    tiny_dia.encode_audio(wave)
    assert len(runs) == 3


def test_a_clip_too_long_is_refused_before_it_is_kept(tiny_dia):
    tiny_dia.encoded_clips.clear()
    frames = tiny_dia.config.audio_room + 1
    with pytest.raises(ValueError, match="audio window"):
        tiny_dia.encode_audio(np.zeros(frames * 512, dtype=np.float32))
    assert len(tiny_dia.encoded_clips) == 0


def open_codec(folder, chunk_frames: int) -> Codec:
    """A codec that encodes in chunks of `chunk_frames` and decodes in blocks of that size."""
    grid = DecodeGrid(first=chunk_frames, steady=chunk_frames)
    return Codec(folder, Manifest.load(folder), Device("cpu"), encode_chunk_frames=chunk_frames, grid=grid)


def relative_error(have: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(have - want).max() / np.abs(want).max())


@pytest.mark.parametrize(("total", "chunk"), [(1, 4), (4, 4), (5, 4), (30, 7), (64, 16), (100, 512)])
def test_chunk_windows_cover_every_frame_once(total, chunk):
    context = ENCODE_CONTEXT_FRAMES
    windows = list(chunk_windows(total, chunk, context))
    assert [f for _, _, start, end in windows for f in range(start, end)] == list(range(total))
    for lo, hi, start, end in windows:
        assert lo == max(0, start - context) and hi == min(total, end + context)
    assert len(windows) == -(-total // chunk)  # audio shorter than a chunk takes one run


def test_decode_grid_doubles_to_its_steady_block():
    blocks = DecodeGrid(first=8, steady=256).blocks()
    ends = [next(blocks)[1] for _ in range(9)]
    assert ends == [8, 16, 32, 64, 128, 256, 512, 768, 1024]
    blocks = DecodeGrid().blocks()
    assert [next(blocks)[1] for _ in range(7)] == [18, 36, 72, 144, 288, 544, 800]
    blocks = DecodeGrid(first=5, steady=12).blocks()
    assert [next(blocks) for _ in range(4)] == [(0, 5), (5, 10), (10, 20), (20, 32)]
    for first, steady in ((0, 8), (9, 8)):
        with pytest.raises(ValueError, match="first <= steady"):
            DecodeGrid(first, steady)
    with pytest.raises(ValueError, match="one width"):
        DecodeGrid(8, 16, padded=True)


@pytest.mark.parametrize("frames", [1, 8, 9, 40])
def test_a_padded_grid_runs_every_block_at_one_width(tiny_folder, frames, monkeypatch):
    """Blocks of 4 frames, the last filled out past the item's end, then padding blocks of 4 until the
    decoder's lookahead (9.3 frames) is out: one shape for CUDA, the same audio as unpadded blocks."""
    codes = np.random.default_rng(frames).integers(0, 1024, size=(frames, 9))
    manifest = Manifest.load(tiny_folder)
    codec = Codec(tiny_folder, manifest, Device("cpu"), grid=DecodeGrid(4, 4, padded=True))
    widths = []
    decode_block = codec.decode_block
    monkeypatch.setattr(
        codec, "decode_block", lambda codes, *rest: widths.append(len(codes)) or decode_block(codes, *rest)
    )
    want = codec.decode(codes)
    delay = manifest.codec_config.decoder_delay
    assert set(widths) == {4} and len(widths) == -(-(frames * 512 + delay) // (4 * 512))  # no block more
    np.testing.assert_allclose(want, open_codec(tiny_folder, 4).decode(codes), atol=1e-5)
    stream = codec.stream()
    pieces = [stream.decode(codes[:n]) for n in range(3, frames, 3)]
    pieces.append(stream.decode(codes, last=True))
    np.testing.assert_array_equal(np.concatenate(pieces), want)


@pytest.mark.parametrize("frames", [1, 9, 17, 18, 36, 37, 80])
def test_decode_stream_is_bit_identical_to_decode(tiny_dia, frames):
    """Codes fed a few frames at a time decode to exactly the bits of the whole item."""
    codes = np.random.default_rng(frames).integers(0, 1024, size=(frames, 9))
    want = tiny_dia.codec.decode(codes)
    for feed in (1, 3, 17):
        stream = tiny_dia.codec.stream()
        pieces = [stream.decode(codes[:n]) for n in range(feed, frames, feed)]
        pieces.append(stream.decode(codes, last=True))
        np.testing.assert_array_equal(np.concatenate(pieces), want)


def test_decode_stream_decodes_a_block_once_its_frames_are_final(tiny_dia):
    """The first block (18 frames) brings out its audio less the decoder's lookahead, the item's end
    the rest; nothing is decoded twice."""
    codes = np.random.default_rng(0).integers(0, 1024, size=(40, 9))
    delay = tiny_dia.codec.config.decoder_delay
    assert delay == 4757
    stream = tiny_dia.codec.stream()
    assert stream.needs() == 18 and len(stream.decode(codes[:17])) == 0
    first = stream.decode(codes[:18])
    assert len(first) == 18 * 512 - delay >= 8 * 512  # the first chunk a stream hands out
    assert stream.needs() == 36 and len(stream.decode(codes[:35])) == 0
    rest = stream.decode(codes, last=True)
    assert len(first) + len(rest) == 40 * 512
    with pytest.raises(ValueError, match="decoded to its end"):
        stream.decode(codes, last=True)
    stream = tiny_dia.codec.stream()
    stream.decode(codes[:18])
    with pytest.raises(ValueError, match="decoded already"):
        stream.decode(codes[:3])


@pytest.mark.parametrize("frames", [1, 9, 16, 17, 40, 53])
def test_chunked_decode_equals_one_run(tiny_folder, frames):
    codes = np.random.default_rng(frames).integers(0, 1024, size=(frames, 9))
    want = open_codec(tiny_folder, WHOLE).decode(codes)
    for chunk in (1, 8, 16):
        assert relative_error(open_codec(tiny_folder, chunk).decode(codes), want) < 1e-4


@pytest.mark.parametrize("frames", [1, 16, 17, 45])
def test_chunked_encode_equals_one_run(tiny_folder, frames):
    wave = (0.3 * np.random.default_rng(frames).standard_normal(frames * 512 - 77)).astype(np.float32)
    want = open_codec(tiny_folder, WHOLE).encode(wave)
    for chunk in (1, 16):
        np.testing.assert_array_equal(open_codec(tiny_folder, chunk).encode(wave), want)


@pytest.fixture(scope="module")
def full_size_folder(tmp_path_factory, tiny_state):
    """A tiny Dia with a random DAC of the real shape (what `--random-init tiny` exports)."""
    return export_tiny(tmp_path_factory.mktemp("full_dac"), TINY, tiny_state, random_dac(DAC_44KHZ, seed=2))


def test_chunked_full_size_codec_equals_one_run(full_size_folder):
    rng = np.random.default_rng(4)
    codes = rng.integers(0, 1024, size=(29, 9))
    whole, chunked = open_codec(full_size_folder, WHOLE), open_codec(full_size_folder, 6)
    wave = whole.decode(codes)
    assert relative_error(chunked.decode(codes), wave) < 1e-4
    np.testing.assert_array_equal(chunked.encode(wave), whole.encode(wave))


def test_dac_speed_bench_measures_the_exported_codec(full_size_folder):
    argv = [sys.executable, "-m", "bench.dac_speed", "--folder", str(full_size_folder), "--seed", "2"]
    argv += ["--seconds", "0.05", "--repeats", "1"]
    result = json.loads(subprocess.run(argv, cwd=REPO, check=True, capture_output=True, text=True).stdout)
    assert result["decode_max_rel_error"] < 1e-4 and result["encode_codes_equal"] == 1.0
    assert all(result[f"{engine}_{op}_rtf"] > 0 for engine in ("ort", "torch") for op in ("decode", "encode"))
