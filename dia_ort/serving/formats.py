"""Audio response formats, encoded while the audio is generated.

wav is a 16-bit WAV whose header says "length unknown" and pcm raw 16-bit little-endian samples
(both are the bytes `dia-ort speak -o -` writes); mp3 comes from LAME (`lameenc`), which emits
frames as it goes; opus goes through libsndfile's encoder into an in-memory file whose new bytes are
sent as they appear (Ogg pages carry their own positions, so readers find the length).

flac is sent whole, when the audio has ended: libsndfile writes the total sample count into FLAC's
STREAMINFO header only when it closes the file, and a FLAC whose header says "unknown" (0 samples)
is one libsndfile, and so `soundfile.read`, cannot open (it reports 2**63 - 1 frames). To stream
audio, use wav, pcm, mp3 or opus.
"""

from __future__ import annotations

import functools
import importlib.util
import io
from dataclasses import dataclass

import numpy as np
import soundfile as sf

from dia_ort.audio import pcm16, streaming_wav_header


@dataclass(frozen=True)
class Format:
    """A response format: its sample rate, MIME type, libsndfile container (None: written here), and
    whether its bytes go out as they are encoded or all at the end."""

    sample_rate: int
    media_type: str
    container: str | None = None
    subtype: str | None = None
    streams: bool = True


FORMATS = {
    "wav": Format(44100, "audio/wav"),
    "pcm": Format(24000, "audio/pcm"),  # OpenAI's pcm: 24 kHz, 16-bit signed little-endian, mono
    "flac": Format(44100, "audio/flac", "FLAC", "PCM_16", streams=False),
    "mp3": Format(44100, "audio/mpeg"),
    "opus": Format(48000, "audio/ogg", "OGG", "OPUS"),  # Opus runs at 48 kHz
}
UNSUPPORTED = {"aac": "libsndfile has no AAC encoder"}


@functools.cache
def available_formats() -> list[str]:
    """The formats this installation can encode (libsndfile's build, and LAME for mp3)."""
    return [name for name, f in FORMATS.items() if _can_encode(name, f)]


def _can_encode(name: str, f: Format) -> bool:
    if name == "mp3":
        return importlib.util.find_spec("lameenc") is not None
    if f.container is None:
        return True
    return f.container in sf.available_formats() and f.subtype in sf.available_subtypes(f.container)


class _GrowingFile(io.RawIOBase):
    """A seekable in-memory file for libsndfile; `take()` returns the bytes written past the last take."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.position = 0
        self.sent = 0

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:
        end = self.position + len(b)
        if end > len(self.data):
            self.data.extend(b"\0" * (end - len(self.data)))
        self.data[self.position : end] = b
        self.position = end
        return len(b)

    def readinto(self, b: bytearray) -> int:
        chunk = self.data[self.position : self.position + len(b)]
        b[: len(chunk)] = chunk
        self.position += len(chunk)
        return len(chunk)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: len(self.data)}[whence]
        self.position = base + offset
        return self.position

    def tell(self) -> int:
        return self.position

    def take(self) -> bytes:
        """The bytes written past the last take (rewrites of bytes taken before are not sent again)."""
        new = bytes(self.data[self.sent :])
        self.sent = len(self.data)
        return new


class AudioEncoder:
    """Float32 chunks at the format's rate -> the bytes to send next; `finish()` -> the last bytes."""

    def __init__(self, name: str) -> None:
        if name not in available_formats():
            why = UNSUPPORTED.get(name, "unknown format")
            raise ValueError(
                f"response_format {name!r} is not available ({why}); use one of {available_formats()}"
            )
        self.format = FORMATS[name]
        self.header = streaming_wav_header(self.format.sample_rate) if name == "wav" else b""
        self.file = self.sound = self.mp3 = None
        if name == "mp3":
            import lameenc  # the serve extra

            self.mp3 = lameenc.Encoder()
            self.mp3.set_in_sample_rate(self.format.sample_rate)
            self.mp3.set_channels(1)
            self.mp3.set_bit_rate(128)
            self.mp3.set_quality(2)
        if self.format.container is not None:
            self.file = _GrowingFile()
            self.sound = sf.SoundFile(
                self.file,
                mode="w",
                samplerate=self.format.sample_rate,
                channels=1,
                format=self.format.container,
                subtype=self.format.subtype,
            )

    def encode(self, audio: np.ndarray) -> bytes:
        head, self.header = self.header, b""
        if self.mp3 is not None:
            return bytes(self.mp3.encode(pcm16(audio)))
        if self.sound is None:
            return head + pcm16(audio)
        self.sound.write(np.frombuffer(pcm16(audio), dtype="<i2"))  # the samples wav and pcm carry
        return head + self.file.take() if self.format.streams else b""

    def finish(self) -> bytes:
        head, self.header = self.header, b""
        if self.mp3 is not None:
            return bytes(self.mp3.flush())
        if self.sound is None:
            return head
        self.sound.close()
        return head + self.file.take()
