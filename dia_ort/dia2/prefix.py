"""Voice prefixes: a speaker's clip and its words, fed to the model before the script (docs/dia2.md section 6).

A port of nari-labs/dia2's `runtime/voice_clone.py` (8687268): each word of a clip becomes an entry
placed at the frame its speech starts, the clip's codes come from Mimi's encoder, and the prefix is fed
frame by frame with the state machine forced to the words' frames. The reference finds the words with
Whisper (`whisper_timestamped`); here they may be given (`Word`s with their times, as Whisper gives
them), or a transcript without times (its words spread evenly over the clip: an approximation), or
found by Whisper where `whisper_timestamped` is installed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from dia_ort.dia2.script import SPEAKER_TAGS
from dia_ort.dia2.state_machine import Entry, TokenIds

SPEAKER_ONE_OFFSET = 3  # the reference's "legacy BOS/PAD offset" of the first speaker's word frames


@dataclass(frozen=True)
class Word:
    """One word of a clip and when it is spoken, in seconds."""

    text: str
    start: float
    end: float


@dataclass(frozen=True)
class Speaker:
    """A clip of one speaker (a file path, or 24 kHz mono samples) and what is said in it: `Word`s with
    times, or a transcript (None: Whisper finds the words, where `whisper_timestamped` is installed)."""

    audio: str | os.PathLike | np.ndarray
    words: Sequence[Word] | str | None = None


@dataclass(frozen=True)
class PrefixConfig:
    """The reference's prefix: speaker 1's clip, optionally speaker 2's after it, and whether the output
    keeps the prefix's audio."""

    speaker_1: Speaker
    speaker_2: Speaker | None = None
    include_audio: bool = False


@dataclass(frozen=True)
class PrefixPlan:
    entries: list[Entry]
    new_word_steps: set[int]  # the frames at which the machine is forced to start a word
    codes: np.ndarray  # [K, T] the clips' codes, one after the other


def words_to_entries(
    words: Sequence[Word], encode: Callable[[str], list[int]], tag: str | None, frame_rate: float
) -> tuple[list[Entry], list[int]]:
    """Each word at the frame its speech starts (after the previous word's tokens), padded to the next
    word's start; the first word written after the speaker's tag. -> entries, and the frame before
    each word's start."""
    entries, steps, position = [], [], 0
    for index, word in enumerate(words):
        tokens = encode(f"{tag} {word.text}" if tag and index == 0 else word.text)
        start = max(position + 1, round(word.start * frame_rate))
        end = start + len(tokens)
        steps.append(start - 1)
        following = words[index + 1].start if index < len(words) - 1 else words[-1].end
        next_start = max(end + 1, round(following * frame_rate))
        entries.append(Entry(tokens, word.text, max(0, next_start - start - 1)))
        position = end
    return entries, steps


def spread_words(transcript: str, seconds: float) -> list[Word]:
    """A transcript without times: its words spread evenly over the clip (an approximation of what
    Whisper would find). Speaker tags are not words: the prefix puts its speaker's tag first itself."""
    texts = [word for word in transcript.split() if word not in SPEAKER_TAGS]
    if not texts:
        raise ValueError("the prefix transcript is empty")
    share = seconds / len(texts)
    return [Word(text, i * share, (i + 1) * share) for i, text in enumerate(texts)]


def whisper_words(path: str | os.PathLike) -> list[Word]:
    """The reference's transcription: whisper_timestamped with openai/whisper-large-v3."""
    try:
        import whisper_timestamped as wts
    except ImportError:
        raise ValueError(
            "a prefix speaker without words needs Whisper (pip install whisper-timestamped); or give the "
            "clip's words: Speaker(audio, words='what is said') or Speaker(audio, words=[Word(text, start, end)])"
        ) from None
    result = wts.transcribe(wts.load_model("openai/whisper-large-v3", device="cpu"), str(path))
    words = []
    for segment in result.get("segments", []):
        for word in segment.get("words", []):
            text = (word.get("text") or word.get("word") or "").strip()
            if text:
                words.append(Word(text, float(word.get("start", 0.0)), float(word.get("end", 0.0))))
    return words


def build_plan(
    prefix: PrefixConfig,
    ids: TokenIds,
    encode_text: Callable[[str], list[int]],
    tags: dict[int, str],
    load: Callable[[str | os.PathLike | np.ndarray], np.ndarray],
    encode_audio: Callable[[np.ndarray], np.ndarray],
    frame_rate: float,
    sample_rate: int,
) -> PrefixPlan:
    """The entries, forced frames and codes of both speakers' clips (`tags`: a speaker id -> its tag)."""
    entries: list[Entry] = []
    steps: list[int] = []
    codes = []
    for speaker, token in ((prefix.speaker_1, ids.spk1), (prefix.speaker_2, ids.spk2)):
        if speaker is None:
            continue
        samples = load(speaker.audio)
        words = speaker.words
        if words is None:
            if isinstance(speaker.audio, np.ndarray):
                raise ValueError("Whisper reads a file: give a clip's samples with its words")
            words = whisper_words(speaker.audio)
        elif isinstance(words, str):
            words = spread_words(words, len(samples) / sample_rate)
        speaker_entries, speaker_steps = words_to_entries(
            list(words), encode_text, tags.get(token), frame_rate
        )
        offset = SPEAKER_ONE_OFFSET if not codes else sum(c.shape[-1] for c in codes)
        entries += speaker_entries
        steps += [step + offset for step in speaker_steps]
        codes.append(encode_audio(samples))
    return PrefixPlan(entries, set(steps), np.concatenate(codes, axis=-1))
