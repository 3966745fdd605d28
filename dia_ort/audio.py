"""Audio input and output for the runtime: validation, mono conversion, resampling, files.

Never imports torch: tensors are accepted through their ``.numpy()`` method.
"""

from __future__ import annotations

import logging
import os
import struct
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger(__name__)

DAC_SAMPLE_RATE = 44100

# The most channels a 2-D waveform may have; the channel axis is the smaller dimension.
MAX_CHANNELS = 8

# Extension -> libsndfile format for save_audio: the formats that keep the rate and length exactly on a
# round trip (libsndfile's HTK, WVE and SDS writers do not), limited to what this libsndfile can write.
_ROUND_TRIP_FORMATS = {
    "wav": "WAV",
    "flac": "FLAC",
    "ogg": "OGG",
    "mp3": "MP3",
    "aiff": "AIFF",
    "aif": "AIFF",
    "au": "AU",
    "caf": "CAF",
    "w64": "W64",
    "rf64": "RF64",
}
_WRITE_FORMATS = {ext: fmt for ext, fmt in _ROUND_TRIP_FORMATS.items() if fmt in sf.available_formats()}


def _check_rate(rate: Any, name: str = "sample_rate") -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise TypeError(f"{name} must be an integer number of Hz, got {rate!r}")
    if rate <= 0:
        raise ValueError(f"{name} must be positive, got {rate}")
    return int(rate)


def _as_numpy(audio: Any) -> np.ndarray:
    """Turn an array-like (a torch tensor included, via ``.numpy()``) into a numpy array."""
    if not isinstance(audio, np.ndarray) and hasattr(audio, "numpy"):
        for method in ("detach", "cpu"):
            if hasattr(audio, method):
                audio = getattr(audio, method)()
        audio = audio.numpy()
    try:
        return np.asarray(audio)
    except (TypeError, ValueError) as err:
        raise TypeError(f"audio must be an array of numbers, got {type(audio).__name__}: {err}") from err


def _to_float(audio: np.ndarray) -> np.ndarray:
    """Floats as they are; integer PCM scaled to [-1, 1] by its full scale."""
    if audio.dtype.kind == "f":
        return audio.astype(np.float32, copy=False)
    if audio.dtype in (np.int8, np.int16, np.int32):
        return (audio / float(2 ** (8 * audio.dtype.itemsize - 1))).astype(np.float32)
    if audio.dtype == np.uint8:  # 8-bit PCM is offset binary, silence at 128
        return (audio.astype(np.float32) - 128.0) / 128.0
    raise TypeError(f"audio must hold float samples or int8/int16/int32/uint8 PCM, got dtype {audio.dtype}")


def to_mono_float32(audio: Any, sample_rate: int) -> np.ndarray:
    """Validate a waveform and return it as mono float32 ``[N]``.

    ``audio`` is ``[N]``, channels-first ``[C, N]`` or channels-last ``[N, C]`` with C <= 8 (the smaller
    dimension is taken as the channels, which are averaged); a numpy array, anything ``np.asarray``
    takes, or an object with ``.numpy()`` such as a torch tensor. Integer PCM is scaled to [-1, 1].
    ``sample_rate`` is validated alongside so callers check a waveform and its rate in one place. The
    result is not copied when the input already is mono float32.
    """
    _check_rate(sample_rate)
    array = _as_numpy(audio)
    if array.ndim not in (1, 2):
        raise ValueError(
            f"audio must be 1-D [samples] or 2-D [channels, samples] / [samples, channels], "
            f"got shape {array.shape}"
        )
    if array.size == 0:
        raise ValueError(f"audio is empty (shape {array.shape})")
    samples = _to_float(array)
    if samples.ndim == 2:
        channel_axis = int(np.argmin(samples.shape))
        if samples.shape[channel_axis] > MAX_CHANNELS:
            raise ValueError(
                f"cannot tell the channel axis of audio with shape {samples.shape}: "
                f"one dimension must be the channels (at most {MAX_CHANNELS})"
            )
        samples = samples.mean(axis=channel_axis, dtype=np.float32)
    bad = np.count_nonzero(~np.isfinite(samples))
    if bad:
        raise ValueError(f"audio contains {bad} non-finite values (NaN or inf)")
    return np.ascontiguousarray(samples)


def _full_scale(audio: np.ndarray) -> np.ndarray:
    """Clip to [-1, 1]: resampling rings past full scale near peaks (by 4% seen), and audio handed
    out must stay in range, where a file writer would clip it anyway."""
    return np.clip(audio, -1.0, 1.0, out=audio).astype(np.float32, copy=False)


def resample(audio: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """Resample a mono float32 waveform with soxr (very high quality), clipped to [-1, 1]; identity
    when the rates match."""
    from_rate = _check_rate(from_rate, "from_rate")
    to_rate = _check_rate(to_rate, "to_rate")
    if from_rate == to_rate:
        return audio
    return _full_scale(soxr.resample(audio, from_rate, to_rate, quality="VHQ"))


class StreamResampler:
    """`resample` from a codec's rate (DAC's by default) for audio that comes in pieces: the same
    samples as resampling the whole, clipped alike."""

    def __init__(self, to_rate: int, from_rate: int = DAC_SAMPLE_RATE) -> None:
        self.stream = soxr.ResampleStream(from_rate, to_rate, 1, dtype="float32", quality="VHQ")

    def resample_chunk(self, audio: np.ndarray, last: bool = False) -> np.ndarray:
        return _full_scale(self.stream.resample_chunk(audio, last=last))


def stream_resampler(to_rate: int) -> StreamResampler | None:
    """A `StreamResampler` to `to_rate`; None when it is the codec's rate."""
    to_rate = _check_rate(to_rate, "to_rate")
    return None if to_rate == DAC_SAMPLE_RATE else StreamResampler(to_rate)


class _SequentialFile(sf.SoundFile):
    """A file read front to back without asking libsndfile where it is.

    A header written before the audio's length was known says so: a streamed FLAC's STREAMINFO
    counts 0 samples, which libsndfile reports as 2**63 - 1 frames and cannot seek in, and a streamed
    WAV's sizes are 0xFFFFFFFF. soundfile asks for the position around every read of a seekable file;
    read as if it were not seekable, every such file reads to its end.
    """

    def seekable(self) -> bool:
        return False


READ_BLOCK_FRAMES = 1 << 16


def _read_to_end(source: str | os.PathLike, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """All frames `[N, channels]` float32 of an audio file, read in blocks to its end, and its rate;
    past `max_seconds` a ValueError, before more is decoded (a small file can hold hours of silence)."""
    with _SequentialFile(source) as file:
        blocks, frames = [], 0
        while len(block := file.read(READ_BLOCK_FRAMES, dtype="float32", always_2d=True)):
            blocks.append(block)
            frames += len(block)
            if max_seconds is not None and frames > max_seconds * file.samplerate:
                raise ValueError(f"audio file {os.fspath(source)} lasts more than {max_seconds:g} s")
        data = np.concatenate(blocks) if blocks else np.zeros((0, file.channels), dtype=np.float32)
        return data, file.samplerate


def _read_file(source: str | os.PathLike, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """Read an audio file as mono float32 and its rate, with errors that name the file."""
    if not os.path.exists(source):
        raise FileNotFoundError(f"audio file not found: {os.fspath(source)}")
    try:
        data, rate = _read_to_end(source, max_seconds)
    except RuntimeError as err:  # soundfile's LibsndfileError
        reason = getattr(err, "error_string", err)
        raise ValueError(f"cannot read audio file {os.fspath(source)}: {reason}") from err
    try:
        return to_mono_float32(data.mean(axis=1), rate), rate
    except ValueError as err:
        raise ValueError(f"audio file {os.fspath(source)}: {err}") from err


def load_audio(
    source: Any,
    sample_rate: int | None = None,
    max_seconds: float | None = None,
    to_rate: int = DAC_SAMPLE_RATE,
) -> np.ndarray:
    """Load a waveform as mono float32 at `to_rate`: 44.1 kHz by default, the rate the DAC codec works at.

    ``source`` is a path (any format libsndfile reads: wav, flac, ogg, mp3, ...; its own rate is used and
    ``sample_rate`` is ignored), a tuple ``(array, rate)``, or a waveform accepted by
    ``to_mono_float32`` at ``sample_rate`` (default 44100). A file longer than ``max_seconds`` is
    refused while it is read.
    """
    if isinstance(source, (str, os.PathLike)):
        audio, rate = _read_file(source, max_seconds)
    else:
        if isinstance(source, tuple):
            if len(source) != 2:
                raise ValueError(f"an audio tuple must be (array, sample_rate), got {len(source)} items")
            source, sample_rate = source
        rate = DAC_SAMPLE_RATE if sample_rate is None else sample_rate
        audio = to_mono_float32(source, rate)
    return resample(audio, rate, to_rate)


def check_output_path(path: str | os.PathLike) -> None:
    """Refuse an output path that `save_audio` would refuse, before any audio is generated."""
    path = Path(path)
    _write_format(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(f"cannot save audio to {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
        raise PermissionError(f"cannot save audio to {path}: it is not writable")


def pcm16(audio: np.ndarray) -> bytes:
    """Float samples -> 16-bit signed little-endian PCM bytes, converted as libsndfile converts the
    files `save_audio` writes (rounded to 32 bits, clipped, the low 16 bits dropped), so that a stream
    and a file hold the same samples."""
    wide = np.clip(np.rint(np.asarray(audio, dtype=np.float64) * 2.0**31), -(2.0**31), 2.0**31 - 1)
    return (wide.astype(np.int64) >> 16).astype("<i2").tobytes()


def streaming_wav_header(sample_rate: int) -> bytes:
    """A 16-bit mono WAV header whose sizes say "unknown" (0xFFFFFFFF), for audio written as it comes.

    A pipe cannot be rewound to fill in the sizes at the end; players such as ffplay read to the end
    of the stream instead, as they do for ffmpeg's own piped WAV.
    """
    rate = _check_rate(sample_rate)
    unknown = 0xFFFFFFFF
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate * 2, 2, 16)  # PCM, mono, byte rate, block align, bits
    return (
        b"RIFF"
        + struct.pack("<I", unknown)
        + b"WAVEfmt "
        + struct.pack("<I", len(fmt))
        + fmt
        + b"data"
        + struct.pack("<I", unknown)
    )


def _write_format(path: Path) -> str:
    ext = path.suffix.lower().lstrip(".")
    if ext not in _WRITE_FORMATS:
        supported = ", ".join(f".{e}" for e in _WRITE_FORMATS)
        raise ValueError(
            f"cannot save audio to {path}: unknown extension {path.suffix!r}; use one of {supported}"
        )
    return _WRITE_FORMATS[ext]


def save_audio(path: str | os.PathLike, audio: Any, sample_rate: int = DAC_SAMPLE_RATE) -> None:
    """Write a waveform to ``path`` in the format its extension names, as mono.

    The model is mono, so 2-D audio is averaged to one channel. Samples are clipped to [-1, 1]; each
    format uses libsndfile's default encoding (16-bit PCM for wav/flac, Vorbis for ogg). The file appears whole or not at all: audio is validated first, then
    written to a temporary file in the same directory that replaces ``path`` only once complete.
    """
    path = Path(path)
    check_output_path(path)
    fmt = _write_format(path)
    samples = to_mono_float32(audio, sample_rate)
    # Every format above is written as integer PCM or a lossy codec, which wrap or distort past full scale.
    clipped = np.count_nonzero(np.abs(samples) > 1.0)
    if clipped:
        logger.warning("clipping %d samples outside [-1, 1] while saving %s", clipped, path)
        samples = np.clip(samples, -1.0, 1.0)

    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    try:
        # O_EXCL: never clobber another file; mode 0o666 lets the umask decide, as for a plain open().
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        try:
            sf.write(tmp, samples, sample_rate, format=fmt)
        except RuntimeError as err:  # soundfile's LibsndfileError, e.g. a rate the format cannot hold
            reason = getattr(err, "error_string", err)
            raise ValueError(f"cannot save audio to {path} as {fmt} at {sample_rate} Hz: {reason}") from err
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    logger.debug("saved %d samples at %d Hz to %s", samples.size, sample_rate, path)
