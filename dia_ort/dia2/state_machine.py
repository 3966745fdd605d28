"""The text stream's state machine: which text token each frame carries (docs/dia2.md section 6).

The model does not read the script as a whole: each frame it says whether the next word starts (the
action "new word") or not ("pad"), and this machine answers with the frame's main and second text
tokens, feeding a word's tokens one per frame once the model has started it. Budgets force pads after
a word and a new word when the model waits too long. A port of nari-labs/dia2's
`runtime/state_machine.py` (8687268), quirks included.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(frozen=True)
class TokenIds:
    """The text ids the machine deals in (from the config and the tokenizer)."""

    new_word: int
    pad: int
    bos: int
    zero: int
    spk1: int
    spk2: int


@dataclass
class Entry:
    """One word of the script: its tokens, its text, and the pads that follow it."""

    tokens: list[int]
    text: str
    padding: int = 0


@dataclass
class State:
    """One generation's progress through its entries."""

    entries: deque[Entry]
    padding_budget: int
    forced_padding: int
    pending_tokens: deque[int] = field(default_factory=deque)
    lookahead_tokens: deque[int] = field(default_factory=deque)
    end_step: int | None = None  # the frame at which the model asked for a word past the last
    transcript: list[tuple[str, int]] = field(default_factory=list)  # (word, frame it started)

    def peek_tokens(self, count: int) -> list[int]:
        """The tokens of the count-th entry ahead that has tokens (the second stream's lookahead)."""
        for entry in self.entries:
            if entry.tokens:
                count -= 1
                if count == 0:
                    return entry.tokens
        return []


@dataclass(frozen=True)
class StateMachine:
    ids: TokenIds
    second_stream_ahead: int = 0
    max_padding: int = 6
    initial_padding: int = 0

    def new_state(self, entries: list[Entry]) -> State:
        return State(deque(entries), padding_budget=self.initial_padding, forced_padding=self.initial_padding)

    def process(self, step: int, state: State, action: int, forced: bool = False) -> tuple[int, int]:
        """The action sampled (or, in a prefix, forced) at frame `step` -> the main and second text
        tokens of the next frame (second is -1 where the reference gives none: its caller feeds pad)."""
        token = self._sanitize(action)
        token = self._constrain(state, token, forced)
        token = self._start_word(step, state, token)
        return self._multiplex(state, self._emit(state, token))

    def _sanitize(self, action: int) -> int:
        ids = self.ids
        token = {1: ids.new_word, 0: ids.pad}.get(action, action)
        return token if token in (ids.new_word, ids.pad) else ids.pad

    def _constrain(self, state: State, token: int, forced: bool) -> int:
        ids = self.ids
        if state.pending_tokens:
            return ids.pad
        if forced:
            return token
        if state.forced_padding > 0:
            return ids.pad
        if state.padding_budget <= 0 and token != ids.new_word:
            return ids.new_word
        return token

    def _start_word(self, step: int, state: State, token: int) -> int:
        ids = self.ids
        if token != ids.new_word:
            return token
        if state.entries:
            entry = state.entries.popleft()
            if entry.tokens:
                state.transcript.append((entry.text, step))
                state.pending_tokens.extend(entry.tokens)
                if self.second_stream_ahead:
                    state.lookahead_tokens.extend(state.peek_tokens(self.second_stream_ahead))
                state.padding_budget = self.max_padding
            else:
                token = ids.pad
            state.forced_padding = entry.padding
            return token
        token = ids.new_word if self.second_stream_ahead and state.end_step is None else ids.pad
        if state.end_step is None:
            state.end_step = step
        return token

    def _emit(self, state: State, token: int) -> int:
        ids = self.ids
        if token == ids.pad:
            if state.padding_budget > 0:
                state.padding_budget -= 1
            if state.forced_padding > 0:
                state.forced_padding -= 1
            return state.pending_tokens.popleft() if state.pending_tokens else ids.pad
        if token in (ids.new_word, ids.zero):
            return token
        raise RuntimeError(f"the state machine cannot emit token {token}")

    def _multiplex(self, state: State, output: int) -> tuple[int, int]:
        ids = self.ids
        if not self.second_stream_ahead:
            return output, output
        if output == ids.new_word:
            return (state.pending_tokens.popleft() if state.pending_tokens else ids.pad), ids.new_word
        return output, (state.lookahead_tokens.popleft() if state.lookahead_tokens else ids.pad)
