"""Long-form dialogue: a script of any length generated part by part, with the voices kept.

The script is split into parts (script.py). Each part after the first is prompted with the previous
part: its generated codes (no codec round trip) as the audio prompt, its text as the transcript at
the start of the new text, as in Dia's voice cloning, so the speakers keep their voices. The parts'
audio is joined with a short equal-power crossfade, so the joins do not click.

Each part is a request of the decoding loop, run by whoever drives it (`RunPart`): `Dia` runs it as a
fixed batch of one, the server submits it to its scheduler, so the parts of a script share the batch
with the server's other requests.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import numpy as np

from dia_ort.audio import DAC_SAMPLE_RATE, stream_resampler
from dia_ort.config import ModelConfig
from dia_ort.generation import Step
from dia_ort.item import ItemState
from dia_ort.options import GenerationOptions
from dia_ort.progress import report_speed
from dia_ort.script import LONG_FORM_SECONDS, ScriptPart, estimated_seconds, model_bytes, split_script
from dia_ort.streaming import AudioChunk

log = logging.getLogger(__name__)

CROSSFADE_SECONDS = 0.04
# A part may come out this much longer than its estimate; the prompt must leave that much room.
ESTIMATE_MARGIN = 1.3


@dataclass(frozen=True)
class Spoken:
    """Audio already generated, usable as the next part's prompt: codes `[T, C]` and their transcript."""

    codes: np.ndarray
    transcript: str


class Crossfade:
    """Joins consecutive parts' audio with an equal-power crossfade of up to `samples` samples.

    The last `samples` of a part are held back until the next part's first samples arrive; the two
    overlap, weighted by cos and sin of a quarter period, so the joined signal moves continuously from
    one part to the next and its power stays level.
    """

    def __init__(self, samples: int) -> None:
        self.samples = samples
        self.held = np.zeros(0, dtype=np.float32)  # the current part's end, kept for the next join
        self.tail: np.ndarray | None = None  # the previous part's end, waiting for the next part
        self.head = np.zeros(0, dtype=np.float32)  # the current part's start, collected for the join

    def push(self, audio: np.ndarray) -> np.ndarray:
        """Audio of the current part -> the joined audio that is now final."""
        joined = np.zeros(0, dtype=np.float32)
        if self.tail is not None:
            self.head = np.concatenate([self.head, audio])
            if len(self.head) < len(self.tail):
                return joined
            joined, audio = self._mix(self.tail, self.head[: len(self.tail)]), self.head[len(self.tail) :]
            self.tail, self.head = None, np.zeros(0, dtype=np.float32)
        held = np.concatenate([self.held, audio])
        cut = max(0, len(held) - self.samples)
        self.held = held[cut:]
        return np.concatenate([joined, held[:cut]])

    def next_part(self) -> np.ndarray:
        """The current part has ended and another one follows; returns what became final.

        A part shorter than the fade has been mixed into the previous one's end whole; that mix is
        then the end the next part fades in from.
        """
        ending = np.concatenate([self._settle(), self.held])
        cut = max(0, len(ending) - self.samples)
        self.tail = ending[cut:] if len(ending) else None
        self.held = np.zeros(0, dtype=np.float32)
        return ending[:cut]

    def finish(self) -> np.ndarray:
        """The last part has ended: the rest of the audio."""
        out = np.concatenate([self._settle(), self.held])
        self.held = np.zeros(0, dtype=np.float32)
        return out

    def _settle(self) -> np.ndarray:
        """A join whose new part ended before it was as long as the fade: fade over what there is."""
        if self.tail is None:
            return np.zeros(0, dtype=np.float32)
        n = len(self.head)
        out = np.concatenate(
            [self.tail[: len(self.tail) - n], self._mix(self.tail[len(self.tail) - n :], self.head)]
        )
        self.tail, self.head = None, np.zeros(0, dtype=np.float32)
        return out

    @staticmethod
    def _mix(ending: np.ndarray, starting: np.ndarray) -> np.ndarray:
        angle = (np.arange(len(ending), dtype=np.float64) + 0.5) / max(len(ending), 1) * (np.pi / 2)
        return (ending * np.cos(angle) + starting * np.sin(angle)).astype(np.float32)


def part_seed(seed: int | None, part: int) -> int | None:
    """The first part uses `seed` itself (so a one-part script equals a plain call); later ones derive."""
    if seed is None or part == 0:
        return seed
    return int(np.random.SeedSequence([seed, part]).generate_state(1, np.uint64)[0] >> 1)


# Runs one part: (text, prompt codes, options) -> the part's item (its codes and end, once the events
# are spent) and its events: `Step`s and `AudioChunk`s at the codec's rate.
RunPart = Callable[[str, np.ndarray | None, GenerationOptions], tuple[ItemState, Iterator[Step | AudioChunk]]]


class LongFormStream:
    """A script generated part by part: iterate it for float32 audio at `options.sample_rate`.

    `prompt` is the caller's checked audio prompt (codes), if any. The request is checked and split
    when the object is made, before any audio is asked for.
    """

    def __init__(
        self,
        run_part: RunPart,
        config: ModelConfig,
        frame_rate: float,
        text: str,
        prompt: np.ndarray | None,
        options: GenerationOptions,
        seconds: float = LONG_FORM_SECONDS,
        callback: Callable[[int, int], None] | None = None,
    ) -> None:
        self.run_part, self.config, self.callback = run_part, config, callback
        self.options = options.validate()
        self.room = config.audio_room  # prompt + output frames of one generation
        self.frame_rate = frame_rate
        self.prompt = prompt
        prompt_frames = 0 if self.prompt is None else len(self.prompt)
        if _fits_one_generation(text, config.text_length, self.room - prompt_frames, self.frame_rate):
            self.parts = [ScriptPart(text, None, continues=False)]  # as a plain request would take it
        else:
            lead = prompt_frames / self.frame_rate
            self.parts = split_script(text, config.text_length // 2, seconds, lead_seconds=lead)
        log.info("long-form script: %d parts", len(self.parts))

    def __iter__(self) -> Iterator[np.ndarray]:
        fade = Crossfade(round(CROSSFADE_SECONDS * DAC_SAMPLE_RATE))
        resampler = stream_resampler(self.options.sample_rate)

        def out(audio: np.ndarray, last: bool = False) -> Iterator[np.ndarray]:
            if resampler is not None:
                audio = resampler.resample_chunk(audio, last=last)
            if len(audio):
                yield audio

        previous = None if self.prompt is None else Spoken(self.prompt, "")
        steps_done = 0
        began = time.perf_counter()
        for k, part in enumerate(self.parts):
            if k:
                previous = _fitting_prompt(
                    previous, part, self.config.text_length, self.room, self.frame_rate
                )
            item, events = self._start(k, part, previous)
            later = len(self.parts) - k - 1  # parts still to come, each at most `room` steps
            last_index = 0
            for event in events:
                if isinstance(event, AudioChunk):
                    yield from out(fade.push(event.audio))
                    continue
                last_index = event.index
                if self.callback is not None:
                    self.callback(steps_done + event.index, steps_done + event.total + later * self.room)
            steps_done += last_index
            previous = self._spoken(k, part, item, previous)
            if later:
                yield from out(fade.next_part())
        yield from out(fade.finish(), last=True)
        if self.options.verbose:
            report_speed(steps_done, time.perf_counter() - began, self.frame_rate)

    def _start(
        self, k: int, part: ScriptPart, previous: Spoken | None
    ) -> tuple[ItemState, Iterator[Step | AudioChunk]]:
        """Part k's run: prompted with `previous`, with seed and frame budget of its own, its audio
        at the codec's rate (the joined audio is resampled once, at the end).

        `max_new_tokens` bounds each part; it is clamped to the room the prompt leaves here, so that
        the default 2048 does not warn on every part (`frame_budget` reports a prompt with no room).
        """
        text = part.text if previous is None or k == 0 else _after(previous.transcript, part)
        codes = None if previous is None else previous.codes
        budget = self.room - (0 if codes is None else len(codes))
        options = replace(
            self.options,
            seed=part_seed(self.options.seed, k),
            max_new_tokens=max(1, min(self.options.max_new_tokens, budget)),
            sample_rate=DAC_SAMPLE_RATE,
        )
        return self.run_part(text, codes, options)

    def _spoken(self, k: int, part: ScriptPart, item: ItemState, previous: Spoken | None) -> Spoken | None:
        """What prompts part k + 1: part k's codes and text (the first part's with the caller's prompt,
        whose transcript starts its text); the older prompt when part k has no audio."""
        codes = item.codes()
        if item.eos_row == item.last_row:
            log.warning("part %d of the script reached its frame budget; its speech may be cut short", k + 1)
        if len(codes) == 0:
            log.warning("part %d of the script ended at once, with no audio: %r", k + 1, part.text[:60])
            return previous
        if k == 0 and self.prompt is not None:
            codes = np.concatenate([self.prompt, codes])
        return Spoken(codes, part.text)


def _fits_one_generation(text: str, text_length: int, room: int, frame_rate: float) -> bool:
    """Whether a whole script fits one generation: the text window, and the audio room (`room` frames,
    `frame_rate` a second) with margin."""
    fits_text = model_bytes(text) <= text_length
    return fits_text and estimated_seconds(text) * frame_rate * ESTIMATE_MARGIN <= room


def _after(transcript: str, part: ScriptPart) -> str:
    """The text of a prompted part: the prompt's transcript, then the part (a cut turn goes on untagged)."""
    return f"{transcript} {part.body if part.continues else part.text}"


def _fitting_prompt(
    previous: Spoken | None, part: ScriptPart, text_length: int, room: int, frame_rate: float
) -> Spoken | None:
    """`previous` when it and the part fit one generation (text window and audio room), else None."""
    if previous is None:
        return None
    text_bytes = model_bytes(_after(previous.transcript, part))
    needed = estimated_seconds(part.text) * frame_rate * ESTIMATE_MARGIN
    if text_bytes <= text_length and len(previous.codes) + needed <= room:
        return previous
    log.warning(
        "the previous part (%d frames, %d text bytes) does not fit as the prompt of the next; "
        "generating it without a prompt, so its voices may differ",
        len(previous.codes),
        model_bytes(previous.transcript),
    )
    return None
