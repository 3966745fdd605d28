"""A Dia2 script -> the state machine's entries, one per word (docs/dia2.md section 6).

A port of nari-labs/dia2's `runtime/script_parser.py` (8687268), quirks included: the whole script is
one line to it, so its first word always carries [S1]'s token (inserted before [S2]'s when the
script opens with [S2]), and `<break time="Xs"/>` becomes an entry of X x 12.5 pad frames.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from dia_ort.dia2.state_machine import Entry, TokenIds

BREAK_OR_SPACE = re.compile(r"(?:<break\s+time=\"([0-9]+(?:.[0-9]*)?)s\"\s*/?>)|(?:\s+)")
SPEAKER_TAGS = ("[S1]", "[S2]")
PADDING_BETWEEN_WORDS = 1


def parse_script(
    text: str, encode: Callable[[str], list[int]], ids: TokenIds, frame_rate: float
) -> list[Entry]:
    """`encode` is the tokenizer without special tokens; `ids` gives the speaker tags' ids."""
    entries: list[Entry] = []
    first_word, pending = True, None  # pending: the id of the tag before this word
    tag_of = {ids.spk1: "[S1]"}  # an id -> the tag written before the word; any other id writes [S2]
    remaining = text.replace("\u2019", "'").replace(":", " ")
    while remaining:
        match = BREAK_OR_SPACE.search(remaining)
        segment, remaining = (
            (remaining, "") if match is None else (remaining[: match.start()], remaining[match.end() :])
        )
        for word in segment.split():
            if word in SPEAKER_TAGS:  # where the tags are not in the vocabulary both ids are new_word's: [S1]
                pending = ids.spk1 if word == "[S1]" else ids.spk2
                continue
            tokens = encode(f"{tag_of.get(pending, '[S2]')} {word}" if pending is not None else word)
            if first_word:
                if not tokens or tokens[0] != ids.spk1:
                    tokens.insert(0, ids.spk1)
                first_word = False
            entries.append(Entry(tokens, word, max(0, PADDING_BETWEEN_WORDS + len(tokens) - 1)))
            pending = None
        if match and match.group(1):
            padding = round(float(match.group(1)) * frame_rate)
            if padding > 0:
                entries.append(Entry([], "", padding))
    return entries
