"""Splitting a long dialogue script into parts that one generation can take.

A part fits the text window and a target audio length estimated from its characters. The script is
cut at speaker turns first; a turn too long for one part is cut at sentence ends, a sentence too long
at commas, semicolons and colons, a clause too long between words. Consecutive pieces are then packed
into parts as long as they fit. A speaker tag or a non-verbal such as `(clears throat)` is never cut,
and every part starts with the speaker tag of its first turn.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dia_ort.text import SPEAKER_TAGS, encode_text

# Dia speaks about 14-16 characters a second; a slower estimate keeps parts short enough that the
# previous part (the next one's voice prompt) and the next part fit the audio window together.
CHARS_PER_SECOND = 13.0
# Target speech per part: the previous part (the next one's prompt) and the next part must fit the
# model's 35.5 s audio window together, with room for a part that comes out longer than estimated
# (10 s parts leave a previous part 22 s, or a voice prompt of 12 s before the first part).
LONG_FORM_SECONDS = 10.0
MIN_PART_SECONDS = 1.0

_TAG = re.compile(r"\[S[12]\]")
# A word: a run of non-space characters in which a parenthesised group, spaces and all, counts as one
# character (an unclosed parenthesis is an ordinary character). CJK sentence and clause marks end a
# word even without a space after them.
_WORD = re.compile(r"(?:\([^()]*\)|[^\s(。！？，、；]|\((?![^()]*\)))+[。！？，、；]?|[。！？，、；]")
_SENTENCE_END = re.compile(r"[.!?…。！？][\"'”’)\]]*$")
_CLAUSE_END = re.compile(r"[,;:，、；—–][\"'”’)\]]*$")


@dataclass(frozen=True)
class ScriptPart:
    """One generation's share of a script: `text` starts with `speaker` (when the script has tags).

    `continues` is True when the part goes on with the previous part's turn (the turn was cut).
    """

    text: str
    speaker: str | None
    continues: bool

    @property
    def body(self) -> str:
        """The text without its leading speaker tag (how a cut turn goes on after its prompt)."""
        return self.text[len(self.speaker) :].lstrip() if self.speaker else self.text


@dataclass(frozen=True)
class _Piece:
    speaker: str | None
    words: tuple[str, ...]
    first_of_turn: bool


def estimated_seconds(text: str) -> float:
    """Seconds of speech `text` makes, from its characters (speaker tags not counted)."""
    return len(_TAG.sub("", text).strip()) / CHARS_PER_SECOND


def split_script(
    text: str, max_bytes: int, target_seconds: float, lead_seconds: float = 0.0
) -> list[ScriptPart]:
    """Cut `text` into parts of at most `max_bytes` model bytes and about `target_seconds` of speech.

    The first part may hold `lead_seconds` more (the transcript of an audio prompt at its start).
    A word longer than a part (text without spaces) is cut between characters. Raises ValueError for
    an empty script, an unknown speaker tag, or a non-verbal too long for a part.
    """
    encode_text(text, len(text.encode("utf-8")) + 1)  # the same checks as a plain request: empty, tags
    if not MIN_PART_SECONDS <= target_seconds < float("inf"):
        raise ValueError(f"long_form_seconds must be a number >= {MIN_PART_SECONDS}, got {target_seconds}")
    pieces: list[_Piece] = []
    for speaker, words in _turns(text):
        for k, group in enumerate(_cut(words, _Budget(speaker, max_bytes, target_seconds), 0)):
            pieces.append(_Piece(speaker, group, first_of_turn=k == 0))
    return _pack(pieces, max_bytes, target_seconds, lead_seconds)


def _turns(text: str) -> list[tuple[str | None, list[str]]]:
    """(speaker tag or None, words) per turn, in order; text before the first tag has no speaker."""
    turns = []
    bounds = [(m.start(), m.group()) for m in _TAG.finditer(text)]
    starts = [0, *(start for start, _ in bounds)]
    speakers = [None, *(tag for _, tag in bounds)]
    for k, (start, speaker) in enumerate(zip(starts, speakers, strict=True)):
        end = starts[k + 1] if k + 1 < len(starts) else len(text)
        body = text[start + (len(speaker) if speaker else 0) : end]
        words = _WORD.findall(body)
        if words:  # a tag with nothing after it says nothing
            turns.append((speaker, words))
    return turns


def _render(speaker: str | None, words: tuple[str, ...] | list[str]) -> str:
    body = " ".join(words)
    return f"{speaker} {body}".strip() if speaker else body


def model_bytes(text: str) -> int:
    """How many bytes the model reads for `text` (a speaker tag is one)."""
    return len(text.encode("utf-8")) - sum(text.count(tag) * (len(tag) - 1) for tag in SPEAKER_TAGS)


@dataclass(frozen=True)
class _Budget:
    """Whether words, rendered as a part of `speaker`'s turn, fit a part."""

    speaker: str | None
    max_bytes: int
    seconds: float

    def __call__(self, words: tuple[str, ...] | list[str]) -> bool:
        text = _render(self.speaker, words)
        return model_bytes(text) <= self.max_bytes and estimated_seconds(text) <= self.seconds

    def window_fits(self, words: tuple[str, ...] | list[str]) -> bool:
        """The hard limit: the text window (the seconds are a target, which one word may exceed)."""
        return model_bytes(_render(self.speaker, words)) <= self.max_bytes


_BOUNDARIES = (_SENTENCE_END, _CLAUSE_END)


def _cut(words: list[str], fits: _Budget, level: int) -> list[tuple[str, ...]]:
    """`words` as groups that fit, cut at sentence ends, then clause ends, then between words."""
    if fits(words):
        return [tuple(words)]
    if level == len(_BOUNDARIES):  # between words: as many as fit in each group
        groups: list[list[str]] = []
        for word in words:
            if groups and fits([*groups[-1], word]):
                groups[-1].append(word)
            elif fits.window_fits([word]):
                groups.append([word])
            else:
                groups += [[piece] for piece in _cut_word(word, fits)]
        return [tuple(g) for g in groups]
    groups = [[]]
    for word in words:
        groups[-1].append(word)
        if _BOUNDARIES[level].search(word):
            groups.append([])
    return [piece for group in groups if group for piece in _cut(group, fits, level + 1)]


def _cut_word(word: str, fits: _Budget) -> list[str]:
    """A word too long for a part (text with no spaces, such as CJK) cut between its characters."""
    if "(" in word:
        raise ValueError(
            f"the non-verbal in {word[:40]!r} alone is too long for one part of a long-form script"
        )
    pieces = [""]
    for char in word:
        if pieces[-1] and not fits.window_fits([pieces[-1] + char]):
            pieces.append("")
        pieces[-1] += char
    return pieces


def _pack(
    pieces: list[_Piece], max_bytes: int, target_seconds: float, lead_seconds: float
) -> list[ScriptPart]:
    """Join consecutive pieces into parts while the joined text fits."""
    parts: list[ScriptPart] = []
    text = ""
    speaker: str | None = None
    continues = False
    for piece in pieces:
        rendered = _render(piece.speaker if piece.first_of_turn else None, piece.words)
        joined = f"{text} {rendered}".strip()
        seconds = target_seconds + (lead_seconds if not parts else 0)
        if text and model_bytes(joined) <= max_bytes and estimated_seconds(joined) <= seconds:
            text = joined
            continue
        if text:
            parts.append(ScriptPart(text, speaker, continues))
        speaker, continues = piece.speaker, not piece.first_of_turn
        text = _render(piece.speaker, piece.words)
    parts.append(ScriptPart(text, speaker, continues))
    return parts
