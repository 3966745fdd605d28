"""Named voices for the server: `NAME.wav|flac|mp3` with `NAME.txt` (its transcript) in a folder, and
voices uploaded by clients (`POST /v1/audio/voices`, the page's voice cloning).

Each voice is read once, at startup or when uploaded: for Dia it is encoded and kept as DAC codes,
for Dia2 kept as a prefix (the clip at 24 kHz and its words), which each request encodes with Mimi. A request names a voice; the name is only
ever a key into this table, never part of a path. OpenAI's built-in voice names mean "no prompt"
unless the folder has a voice of that name.
"""

from __future__ import annotations

import base64
import binascii
import logging
import re
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dia_ort.audio import DAC_SAMPLE_RATE, load_audio

if TYPE_CHECKING:
    from dia_ort.dia2 import Dia2, PrefixConfig
    from dia_ort.model import Dia

log = logging.getLogger(__name__)

AUDIO_SUFFIXES = (".wav", ".flac", ".mp3")
OPENAI_VOICES = (
    "alloy", "ash", "ballad", "cedar", "coral", "echo", "fable", "marin", "nova", "onyx", "sage", "shimmer", "verse"
)  # fmt: skip
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
MAX_UPLOAD_SECONDS = 20.0  # a voice prompt this long leaves the model room for 15 s of speech
MAX_UPLOADED_VOICES = 64  # uploaded voices kept (the oldest goes); each is about 21 KB of codes a second
_UPLOADS = threading.Lock()  # held while an upload changes the table


@dataclass(frozen=True)
class Voice:
    """A voice prompt: Dia's DAC codes `[T, C]` and the transcript that goes before the request's text,
    or Dia2's prefix (the clip and its words)."""

    name: str
    codes: np.ndarray | None  # None: no prompt (an OpenAI name the folder does not define), or Dia2's
    transcript: str = ""
    uploaded: bool = False  # sent by a client, not read from the voices folder
    prefix: PrefixConfig | None = None  # Dia2's prompt
    seconds: float = 0.0  # of audio

    @property
    def prompt(self) -> np.ndarray | PrefixConfig | None:
        """What a request of this voice is prompted with: Dia's codes, Dia2's prefix or nothing."""
        return self.prefix if self.prefix is not None else self.codes


def read_voice(model: Dia | Dia2, name: str, audio: object, transcript: str, uploaded: bool = False) -> Voice:
    """A voice of `model`'s family from a clip (a path, or samples with their rate as `(array, rate)`).
    A Dia2 voice may take at most half the model's window, so that it leaves the other half to speak."""
    from dia_ort.dia2 import Dia2, PrefixConfig, Speaker

    if isinstance(model, Dia2):
        wave = load_audio(audio, to_rate=model.sample_rate)
        seconds, most = len(wave) / model.sample_rate, model.config.max_context_steps / 2 / model.frame_rate
        if seconds > most:
            raise ValueError(f"the clip is {seconds:.1f} s; a Dia2 voice takes at most {most:.1f} s")
        return Voice(name, None, transcript, uploaded, PrefixConfig(Speaker(wave, transcript)), seconds)
    codes = model.encode_audio(audio)
    return Voice(name, codes, transcript, uploaded, seconds=len(codes) / model.engine.frame_rate)


def load_voices(dia: Dia | Dia2, folder: str | Path | None, strict: bool = False) -> dict[str, Voice]:
    """Every voice of `folder` plus OpenAI's names; a voice that cannot be read is skipped with a
    warning that names the file and why (or refused with `strict`)."""
    voices = {name: Voice(name, None) for name in OPENAI_VOICES}
    if folder is None:
        return voices
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"voices folder {folder} does not exist")
    for audio in sorted(p for p in folder.iterdir() if p.suffix.lower() in AUDIO_SUFFIXES):
        try:
            voices[audio.stem] = _load_voice(dia, folder, audio)
        except (ValueError, OSError) as exc:
            if strict:
                raise ValueError(f"voice {audio.name}: {exc}") from exc
            log.warning("skipping voice %s: %s", audio.name, exc)
    return voices


def _load_voice(dia: Dia | Dia2, folder: Path, audio: Path) -> Voice:
    if not _NAME.fullmatch(audio.stem):
        raise ValueError("a voice name has letters, digits, '_', '.' and '-' only, at most 64")
    transcript_file = audio.with_suffix(".txt")
    for path in (audio, transcript_file):
        if path.exists() and path.resolve().parent != folder.resolve():
            raise ValueError(f"{path.name} links to a file outside the voices folder")
    if not transcript_file.is_file():
        raise FileNotFoundError(f"its transcript {transcript_file.name} is missing")
    transcript = transcript_file.read_text(encoding="utf-8").strip()
    if not transcript:
        raise ValueError(f"its transcript {transcript_file.name} is empty")
    voice = read_voice(dia, audio.stem, str(audio), transcript)
    log.info("voice %s: %.1f s of audio", audio.stem, voice.seconds)
    return voice


def upload_voice(dia: Dia | Dia2, voices: dict[str, Voice], name: str, transcript: str, audio: str) -> Voice:
    """Encode a clip sent as base64 (any format libsndfile reads, at most MAX_UPLOAD_SECONDS) as the
    voice `name`, beside the startup voices (whose names it may not take); ValueError says what is
    wrong. Runs the codec: call it off the event loop."""
    if not _NAME.fullmatch(name) or name in OPENAI_VOICES:
        raise ValueError(
            f"a voice name has letters, digits, '_', '.' and '-' only, at most 64, and is not one of OpenAI's; got {name!r}"
        )
    if name in voices and not voices[name].uploaded:
        raise ValueError(f"voice {name!r} is one of the server's own; choose another name")
    transcript = transcript.strip()
    if not transcript:
        raise ValueError(
            "the voice's transcript is empty: give the words the clip speaks, with [S1]/[S2] tags"
        )
    try:
        data = base64.b64decode(audio, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ValueError(f"audio is not base64: {exc}") from exc
    from dia_ort.dia2 import Dia2

    rate = dia.sample_rate if isinstance(dia, Dia2) else DAC_SAMPLE_RATE  # the codec's
    with tempfile.NamedTemporaryFile(prefix="voice-", suffix=".audio") as file:
        file.write(data)
        file.flush()
        try:
            wave = load_audio(file.name, max_seconds=MAX_UPLOAD_SECONDS, to_rate=rate)
        except ValueError as exc:  # say what is wrong with the clip, not where the server put it
            raise ValueError(str(exc).replace(f"audio file {file.name}", "the clip")) from exc
    voice = read_voice(dia, name, (wave, rate), transcript, uploaded=True)
    with _UPLOADS:  # uploads run on worker threads
        uploaded = [n for n, v in voices.items() if v.uploaded and n != name]
        for oldest in uploaded[: max(0, len(uploaded) - MAX_UPLOADED_VOICES + 1)]:
            del voices[oldest]
        voices.pop(name, None)
        voices[name] = voice
    log.info("voice %s uploaded: %.1f s of audio", name, voice.seconds)
    return voice
