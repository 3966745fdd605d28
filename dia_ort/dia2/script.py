"""A Dia2 script -> the state machine's entries, one per word (docs/dia2.md section 6).

A port of nari-labs/dia2's `runtime/script_parser.py` (8687268), quirks included: the whole script is
one line to it, so its first word always carries [S1]'s token (inserted before [S2]'s when the
script opens with [S2]), and `<break time="Xs"/>` becomes an entry of X x 12.5 pad frames.

`ScriptReader` takes the script in pieces (as a language model writes it): a word is read once the
whitespace after it has arrived, outside any `<...>` tag, so the entries are those of the whole text.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from dia_ort.dia2.state_machine import Entry, TokenIds

BREAK_OR_SPACE = re.compile(r"(?:<break\s+time=\"([0-9]+(?:.[0-9]*)?)s\"\s*/?>)|(?:\s+)")
SPEAKER_TAGS = ("[S1]", "[S2]")
PADDING_BETWEEN_WORDS = 1


class ScriptReader:
    """`encode` is the tokenizer without special tokens; `ids` gives the speaker tags' ids."""

    def __init__(self, encode: Callable[[str], list[int]], ids: TokenIds, frame_rate: float) -> None:
        self.encode, self.ids, self.frame_rate = encode, ids, frame_rate
        self.unread = ""
        self.first_word = True
        self.pending: int | None = None  # the id of the speaker tag before the next word

    def feed(self, piece: str) -> list[Entry]:
        """The entries of the words `piece` completes."""
        self.unread += piece.replace("\u2019", "'").replace(":", " ")
        cut, inside = 0, False
        for index, char in enumerate(self.unread):
            if char in "<>":
                inside = char == "<"
            elif char.isspace() and not inside:
                cut = index + 1
        text, self.unread = self.unread[:cut], self.unread[cut:]
        return self._entries(text)

    def close(self) -> list[Entry]:
        """The entries of what is left: the script has ended."""
        text, self.unread = self.unread, ""
        return self._entries(text)

    def _entries(self, text: str) -> list[Entry]:
        entries: list[Entry] = []
        while text:
            match = BREAK_OR_SPACE.search(text)
            segment, text = (text, "") if match is None else (text[: match.start()], text[match.end() :])
            for word in segment.split():
                if word in SPEAKER_TAGS:  # with the tags out of the vocabulary both ids are new_word's
                    self.pending = self.ids.spk1 if word == "[S1]" else self.ids.spk2
                    continue
                entries.append(self._word(word))
            if match and match.group(1):
                padding = round(float(match.group(1)) * self.frame_rate)
                if padding > 0:
                    entries.append(Entry([], "", padding))
        return entries

    def _word(self, word: str) -> Entry:
        if self.pending is None:
            tokens = self.encode(word)
        else:  # the tag is written before the word: [S1] for spk1's id, [S2] for any other
            tokens = self.encode(f"{'[S1]' if self.pending == self.ids.spk1 else '[S2]'} {word}")
        if self.first_word:
            if not tokens or tokens[0] != self.ids.spk1:
                tokens.insert(0, self.ids.spk1)
            self.first_word = False
        self.pending = None
        return Entry(tokens, word, max(0, PADDING_BETWEEN_WORDS + len(tokens) - 1))


def parse_script(
    text: str, encode: Callable[[str], list[int]], ids: TokenIds, frame_rate: float
) -> list[Entry]:
    """A whole script's entries."""
    reader = ScriptReader(encode, ids, frame_rate)
    return reader.feed(text) + reader.close()
