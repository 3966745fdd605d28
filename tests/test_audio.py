"""Tests for dia_ort.audio: conversion, resampling, loading and atomic saving."""

import os
import stat
import struct
import subprocess
import sys

import numpy as np
import pytest
import soundfile
import soxr

from dia_ort import audio
from dia_ort.audio import (
    DAC_SAMPLE_RATE,
    StreamResampler,
    check_output_path,
    load_audio,
    pcm16,
    resample,
    save_audio,
    stream_resampler,
    streaming_wav_header,
    to_mono_float32,
)


def sine(freq: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def peak_frequency(wave: np.ndarray, rate: int) -> float:
    spectrum = np.abs(np.fft.rfft(wave * np.hanning(len(wave))))
    return float(np.argmax(spectrum) * rate / len(wave))


class FakeTensor:
    """Stands in for a torch tensor that requires grad and lives on a device."""

    def __init__(self, array: np.ndarray, on_host: bool = False, detached: bool = False):
        self.array, self.on_host, self.detached = array, on_host, detached

    def detach(self) -> "FakeTensor":
        return FakeTensor(self.array, self.on_host, detached=True)

    def cpu(self) -> "FakeTensor":
        return FakeTensor(self.array, on_host=True, detached=self.detached)

    def numpy(self) -> np.ndarray:
        if not (self.on_host and self.detached):
            raise RuntimeError("call .detach().cpu() before .numpy()")
        return self.array


# --- to_mono_float32 ---------------------------------------------------------------------------


def test_mono_float32_passes_through():
    wave = sine(440, DAC_SAMPLE_RATE)
    out = to_mono_float32(wave, DAC_SAMPLE_RATE)
    assert out.dtype == np.float32 and out.shape == wave.shape
    np.testing.assert_array_equal(out, wave)
    assert np.shares_memory(out, wave)  # not copied


@pytest.mark.parametrize("layout", ["channels_first", "channels_last"])
def test_stereo_is_averaged(layout):
    left, right = np.full(1000, 0.2, np.float32), np.full(1000, 0.6, np.float32)
    stereo = np.stack([left, right]) if layout == "channels_first" else np.stack([left, right], axis=1)
    out = to_mono_float32(stereo, DAC_SAMPLE_RATE)
    assert out.shape == (1000,)
    np.testing.assert_allclose(out, 0.4, rtol=1e-6)


@pytest.mark.parametrize("ext", ["wav", "flac"])
def test_a_stereo_file_is_averaged(tmp_path, ext):
    path = tmp_path / f"stereo.{ext}"
    soundfile.write(path, np.stack([np.full(4410, 0.25), np.full(4410, -0.75)], axis=1), DAC_SAMPLE_RATE)
    np.testing.assert_allclose(load_audio(path), -0.25, atol=1e-4)


def streamed(container: str, subtype: str, samples: np.ndarray, rate: int) -> bytes:
    """The bytes of a file as a stream writer sends them: its header as first written, never
    rewritten (a FLAC's STREAMINFO then counts 0 samples: "unknown")."""
    from dia_ort.serving.formats import _GrowingFile

    file = _GrowingFile()
    with soundfile.SoundFile(file, "w", rate, 1, subtype, format=container) as sound:
        sound.write(samples)
        sent = file.take()
    return sent + file.take()  # the header rewrite on close lands in bytes already sent


@pytest.mark.parametrize(
    ("container", "subtype", "ext"), [("FLAC", "PCM_16", "flac"), ("WAV", "PCM_16", "wav")]
)
def test_a_file_whose_header_gives_no_length_reads_to_its_end(tmp_path, container, subtype, ext):
    wave = 0.5 * sine(440, DAC_SAMPLE_RATE, seconds=1.5)
    path = tmp_path / f"stream.{ext}"
    if container == "WAV":  # the server's and `speak -o -`'s header: sizes 0xFFFFFFFF
        path.write_bytes(audio.streaming_wav_header(DAC_SAMPLE_RATE) + audio.pcm16(wave))
    else:
        path.write_bytes(streamed(container, subtype, wave, DAC_SAMPLE_RATE))
        with pytest.raises(ValueError, match="array is too big"):  # what soundfile.read makes of it
            soundfile.read(path)
    whole = tmp_path / f"whole.{ext}"
    soundfile.write(whole, wave, DAC_SAMPLE_RATE, subtype=subtype)
    np.testing.assert_array_equal(load_audio(path), load_audio(whole))
    assert len(load_audio(path)) == len(wave)


def test_a_cut_stream_names_the_file(tmp_path):
    path = tmp_path / "cut.flac"
    data = streamed("FLAC", "PCM_16", 0.5 * sine(440, DAC_SAMPLE_RATE, seconds=1.0), DAC_SAMPLE_RATE)
    path.write_bytes(data[: len(data) // 3])
    with pytest.raises(ValueError, match=f"cannot read audio file {path}"):
        load_audio(path)


def test_float64_list_and_float16_become_float32():
    assert to_mono_float32([0.0, 0.5, -0.5], 16000).dtype == np.float32
    assert to_mono_float32(np.ones(10, np.float16), 16000).dtype == np.float32


@pytest.mark.parametrize(
    ("dtype", "full_scale", "expected"),
    [(np.int16, 32767, 32767 / 32768), (np.int32, -(2**31), -1.0), (np.uint8, 0, -1.0)],
)
def test_integer_pcm_is_scaled(dtype, full_scale, expected):
    out = to_mono_float32(np.array([full_scale, full_scale], dtype=dtype), DAC_SAMPLE_RATE)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, expected)


def test_tensor_like_is_detached_moved_and_converted():
    wave = sine(440, DAC_SAMPLE_RATE, seconds=0.1)
    np.testing.assert_array_equal(to_mono_float32(FakeTensor(wave), DAC_SAMPLE_RATE), wave)


@pytest.mark.parametrize(
    ("bad", "error", "words"),
    [
        (np.zeros(0, np.float32), ValueError, "empty"),
        (np.zeros((2, 0), np.float32), ValueError, "empty"),
        (np.array([0.0, np.nan, 0.1], np.float32), ValueError, "non-finite"),
        (np.array([0.0, np.inf], np.float64), ValueError, "non-finite"),
        (np.float32(0.5), ValueError, "shape"),
        (np.zeros((2, 3, 100), np.float32), ValueError, "shape"),
        (np.zeros((100, 200), np.float32), ValueError, "channel"),
        (np.array(["a", "b"]), TypeError, "dtype"),
        (np.array([True, False]), TypeError, "dtype"),
        (np.zeros(4, np.int64), TypeError, "dtype"),
        (np.zeros(4, np.complex64), TypeError, "dtype"),
        ([[0.1, 0.2], [0.3]], TypeError, "array of numbers, got list"),
    ],
)
def test_bad_audio_is_refused(bad, error, words):
    with pytest.raises(error, match=words):
        to_mono_float32(bad, DAC_SAMPLE_RATE)


@pytest.mark.parametrize(("rate", "error"), [(0, ValueError), (-44100, ValueError), (44100.0, TypeError)])
def test_bad_sample_rate_is_refused(rate, error):
    with pytest.raises(error, match="^sample_rate must be"):
        to_mono_float32(np.zeros(10, np.float32), rate)


def test_any_positive_rate_and_up_to_eight_channels_are_taken():
    np.testing.assert_array_equal(to_mono_float32(np.zeros(10, np.float32), 1), np.zeros(10))
    eight = np.stack([np.full(100, c / 10, np.float32) for c in range(8)])
    np.testing.assert_allclose(to_mono_float32(eight, DAC_SAMPLE_RATE), np.full(100, 0.35), rtol=1e-6)


# --- resample ------------------------------------------------------------------------------------


@pytest.mark.parametrize("from_rate", [22050, 48000])
def test_resample_keeps_duration_and_pitch(from_rate):
    out = resample(sine(1000, from_rate), from_rate, DAC_SAMPLE_RATE)
    assert out.dtype == np.float32
    assert abs(len(out) - DAC_SAMPLE_RATE) <= 1
    assert peak_frequency(out, DAC_SAMPLE_RATE) == pytest.approx(1000, abs=2)


def test_resample_same_rate_is_identity():
    wave = sine(440, 16000)
    assert resample(wave, 16000, 16000) is wave


def test_resample_refuses_bad_rates():
    with pytest.raises(ValueError, match="^to_rate must be positive"):
        resample(np.zeros(10, np.float32), 16000, 0)
    with pytest.raises(TypeError, match="^from_rate must be an integer"):
        resample(np.zeros(10, np.float32), 16000.0, 8000)


def square(rate: int, seconds: float = 0.5) -> np.ndarray:
    """A full-scale square wave: resampling it rings past full scale at every edge."""
    return np.sign(sine(441, rate, seconds)).astype(np.float32)


def test_resampled_audio_is_clipped_to_full_scale():
    wave = square(22050)
    raw = soxr.resample(wave, 22050, DAC_SAMPLE_RATE, quality="VHQ")
    assert raw.max() > 1.01 and raw.min() < -1.01  # the ringing this guards against
    np.testing.assert_array_equal(resample(wave, 22050, DAC_SAMPLE_RATE), np.clip(raw, -1, 1))


def test_stream_resampler_gives_the_samples_of_the_whole():
    wave = square(DAC_SAMPLE_RATE)
    stream = stream_resampler(24000)
    pieces = [stream.resample_chunk(chunk) for chunk in np.array_split(wave, 7)]
    pieces.append(stream.resample_chunk(np.zeros(0, np.float32), last=True))
    streamed = np.concatenate(pieces)
    assert streamed.dtype == np.float32
    np.testing.assert_array_equal(streamed, resample(wave, DAC_SAMPLE_RATE, 24000))


def test_stream_resampler_is_none_at_the_codec_rate():
    assert stream_resampler(DAC_SAMPLE_RATE) is None
    assert isinstance(stream_resampler(24000), StreamResampler)
    with pytest.raises(ValueError, match="to_rate must be positive"):
        stream_resampler(0)


# --- load_audio ----------------------------------------------------------------------------------


def test_load_array_defaults_to_44100_and_tuple_gives_rate():
    wave = sine(1000, 22050)
    assert len(load_audio(wave)) == len(wave)
    from_tuple = load_audio((wave, 22050))
    assert abs(len(from_tuple) - 2 * len(wave)) <= 1
    np.testing.assert_array_equal(load_audio(wave, sample_rate=22050), from_tuple)
    assert peak_frequency(from_tuple, DAC_SAMPLE_RATE) == pytest.approx(1000, abs=2)


def test_load_tensor_like_with_rate():
    out = load_audio((FakeTensor(sine(1000, 48000)), 48000))
    assert abs(len(out) - DAC_SAMPLE_RATE) <= 1


def test_load_refuses_bad_tuple():
    with pytest.raises(ValueError, match=r"\(array, sample_rate\)"):
        load_audio((np.zeros(10), 16000, "extra"))


def test_load_resamples_a_stereo_file(tmp_path):
    path = tmp_path / "stereo.wav"
    wave = sine(1000, 48000)
    soundfile.write(path, np.stack([wave, wave], axis=1), 48000, subtype="FLOAT")
    out = load_audio(path)
    assert abs(len(out) - DAC_SAMPLE_RATE) <= 1
    assert peak_frequency(out, DAC_SAMPLE_RATE) == pytest.approx(1000, abs=2)


def test_load_missing_file(tmp_path):
    path = tmp_path / "nope.wav"
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        load_audio(path)


def test_load_corrupt_file(tmp_path):
    path = tmp_path / "corrupt.wav"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="corrupt.wav.*not recognised") as error:
        load_audio(str(path))
    assert (
        str(error.value).count("corrupt.wav") == 1
    )  # libsndfile's reason, not its message naming the file again


@pytest.mark.parametrize("action", ["load", "save"])
def test_a_soundfile_error_without_a_reason_gives_its_own_text(tmp_path, monkeypatch, action):
    """Only libsndfile's errors carry `error_string`; any other RuntimeError is reported as it is."""

    def fail(*args, **kwargs):
        raise RuntimeError("device went away")

    path = tmp_path / "a.wav"
    soundfile.write(path, np.zeros(10, np.float32), DAC_SAMPLE_RATE)
    if action == "load":  # the reads of an open file
        monkeypatch.setattr(audio.sf.SoundFile, "read", fail)
    else:
        monkeypatch.setattr(audio.sf, "write", fail)
    with pytest.raises(ValueError, match=r"a\.wav.*: device went away$"):
        load_audio(path) if action == "load" else save_audio(path, np.zeros(10, np.float32))


def test_load_empty_file(tmp_path):
    path = tmp_path / "empty.wav"
    soundfile.write(path, np.zeros(0, np.float32), DAC_SAMPLE_RATE)
    with pytest.raises(ValueError, match="empty.wav.*empty"):
        load_audio(path)


# --- save_audio ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("ext", "tolerance"), [("wav", 1e-4), ("flac", 1e-4), ("ogg", 0.02), ("mp3", 0.02)])
def test_save_load_round_trip(tmp_path, ext, tolerance):
    wave = sine(440, DAC_SAMPLE_RATE)
    path = tmp_path / f"out.{ext}"
    save_audio(path, wave)
    assert soundfile.info(path).channels == 1
    back = load_audio(path)
    # Lossy codecs may pad or trim a frame; compare the common middle.
    assert abs(len(back) - len(wave)) < 2048
    middle = slice(4096, 40000)
    rms_error = np.sqrt(np.mean((back[middle] - wave[middle]) ** 2))
    assert rms_error < tolerance
    assert peak_frequency(back, DAC_SAMPLE_RATE) == pytest.approx(440, abs=2)


def test_save_other_rate_and_stereo_as_mono(tmp_path):
    path = tmp_path / "out.wav"
    wave = sine(440, 22050)
    save_audio(path, np.stack([wave, wave]), sample_rate=22050)
    info = soundfile.info(path)
    assert (info.samplerate, info.channels, info.frames) == (22050, 1, len(wave))


def test_save_clips_lossy_formats_and_says_how_many_samples(tmp_path, caplog):
    """libsndfile clips PCM itself, but Vorbis would encode samples past full scale as they are."""
    loud = 1.5 * sine(440, DAC_SAMPLE_RATE, seconds=0.2, amplitude=1.0)
    loud[:2] = [1.0, -1.0]  # full scale exactly is not clipping
    save_audio(tmp_path / "clipped.ogg", np.clip(loud, -1, 1))
    with caplog.at_level("WARNING", logger="dia_ort.audio"):
        save_audio(tmp_path / "loud.ogg", loud)
    count = np.count_nonzero(np.abs(loud) > 1)
    assert caplog.messages == [
        f"clipping {count} samples outside [-1, 1] while saving {tmp_path / 'loud.ogg'}"
    ]
    loud_back, _ = soundfile.read(tmp_path / "loud.ogg", dtype="float32")
    clipped_back, _ = soundfile.read(tmp_path / "clipped.ogg", dtype="float32")
    np.testing.assert_array_equal(loud_back, clipped_back)


def test_save_logs_what_it_wrote(tmp_path, caplog):
    with caplog.at_level("DEBUG", logger="dia_ort.audio"):
        save_audio(tmp_path / "out.wav", np.zeros(300, np.float32), sample_rate=16000)
    assert caplog.messages == [f"saved 300 samples at 16000 Hz to {tmp_path / 'out.wav'}"]


def test_save_clips_pcm_instead_of_wrapping(tmp_path):
    path = tmp_path / "loud.wav"
    save_audio(path, np.array([1.5, -2.0, 0.5], np.float32))
    back, _ = soundfile.read(path, dtype="float32")
    np.testing.assert_allclose(back, [32767 / 32768, -1.0, 0.5], atol=1e-4)


def test_save_replaces_existing_file(tmp_path):
    path = tmp_path / "out.flac"
    save_audio(path, np.zeros(100, np.float32))
    save_audio(path, np.full(200, 0.25, np.float32))
    assert soundfile.info(path).frames == 200
    assert os.listdir(tmp_path) == ["out.flac"]


def test_saved_file_mode_follows_umask(tmp_path):
    umask = os.umask(0o022)
    try:
        save_audio(tmp_path / "out.wav", np.zeros(10, np.float32))
    finally:
        os.umask(umask)
    assert stat.S_IMODE(os.stat(tmp_path / "out.wav").st_mode) == 0o644


def test_save_unknown_extension_lists_supported(tmp_path):
    with pytest.raises(ValueError, match=r"\.xyz.*; use one of \.wav, \.flac, .*\.mp3"):
        save_audio(tmp_path / "out.xyz", np.zeros(10, np.float32))
    assert os.listdir(tmp_path) == []


def test_save_into_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        save_audio(tmp_path / "missing" / "out.wav", np.zeros(10, np.float32))
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (np.array([0.1, np.nan]), "1 non-finite values"),
        (np.zeros(0), "empty"),
        (np.zeros((2, 2, 2)), "1-D .samples. or 2-D"),
    ],
)
def test_save_invalid_audio_leaves_nothing(tmp_path, bad, words):
    path = tmp_path / "out.wav"
    with pytest.raises(ValueError, match=words):
        save_audio(path, bad)
    assert os.listdir(tmp_path) == []


def test_save_rate_the_format_cannot_hold_leaves_nothing(tmp_path):
    with pytest.raises(ValueError, match="out.mp3.*96000.*only supports sample rates") as error:
        save_audio(tmp_path / "out.mp3", np.zeros(1000, np.float32), sample_rate=96000)
    assert ".tmp" not in str(error.value)  # libsndfile's reason, not its message naming the temporary file
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("unwritable", ["directory", "file"])
def test_an_unwritable_path_is_refused(tmp_path, monkeypatch, unwritable):
    """Checked with os.access, which tests run as root cannot make refuse, so it is replaced here."""
    path = tmp_path / "out.wav"
    path.touch()
    refused = tmp_path if unwritable == "directory" else path
    monkeypatch.setattr(audio.os, "access", lambda p, mode: os.fspath(p) != os.fspath(refused))
    with pytest.raises(PermissionError, match="out.wav: it is not writable"):
        check_output_path(path)


def test_a_temporary_file_that_cannot_be_created_raises_its_own_error(tmp_path, monkeypatch):
    def refuse(*args):
        raise PermissionError("read-only file system")

    monkeypatch.setattr(audio.os, "open", refuse)
    with pytest.raises(PermissionError, match="read-only file system"):
        save_audio(tmp_path / "out.wav", np.zeros(10, np.float32))


def test_write_failure_midway_leaves_nothing_and_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "out.wav"
    save_audio(path, np.zeros(100, np.float32))
    original = path.read_bytes()

    def failing_write(file, *args, **kwargs):
        with open(file, "wb") as handle:
            handle.write(b"RIFF partial")
        raise OSError("disk full")

    monkeypatch.setattr(audio.sf, "write", failing_write)
    with pytest.raises(OSError, match="disk full"):
        save_audio(path, np.ones(1000, np.float32) * 0.1)
    assert os.listdir(tmp_path) == ["out.wav"]
    assert path.read_bytes() == original


# --- no torch ------------------------------------------------------------------------------------


def test_import_without_torch():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, dia_ort.audio as a\n"
        "assert a.to_mono_float32(np.zeros(4, np.int16), 44100).dtype == np.float32\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_pcm16_holds_the_samples_a_wav_file_holds(tmp_path):
    """What `-o -` streams equals what `save_audio` writes to a .wav, sample for sample."""
    audio = (np.random.default_rng(0).standard_normal(50000) * 0.6).astype(np.float32)
    audio[:6] = [1.0, -1.0, 1.5, -1.5, 0.5 / 32768, -0.5 / 32768]
    save_audio(tmp_path / "a.wav", audio, 44100)
    written, _ = soundfile.read(tmp_path / "a.wav", dtype="int16")
    np.testing.assert_array_equal(np.frombuffer(pcm16(audio), dtype="<i2"), written)


@pytest.mark.parametrize("rate", [24000, 2**31 - 1])
def test_streaming_wav_header_fields(rate):
    """RIFF's fields are unsigned little-endian: sizes unknown, 16-bit mono PCM, byte rate, block align."""
    header = streaming_wav_header(rate)
    assert (header[:4], header[8:16], header[36:40]) == (b"RIFF", b"WAVEfmt ", b"data")
    riff_size, fmt_size, pcm, channels, got_rate, byte_rate, align, bits, data_size = struct.unpack(
        "<4xI8xIHHIIHH4xI", header
    )
    assert (fmt_size, pcm, channels, got_rate, byte_rate, align, bits) == (16, 1, 1, rate, 2 * rate, 2, 16)
    assert riff_size == data_size == 0xFFFFFFFF and len(header) == 44


def test_streaming_wav_header_is_read_by_libsndfile(tmp_path):
    audio = (0.3 * np.sin(np.arange(8000) / 5)).astype(np.float32)
    path = tmp_path / "stream.wav"
    path.write_bytes(streaming_wav_header(24000) + pcm16(audio))
    read, rate = soundfile.read(path, dtype="int16")
    assert rate == 24000
    np.testing.assert_array_equal(read, np.frombuffer(pcm16(audio), dtype="<i2"))
