"""Streaming audio: an item's rows -> its waveform in chunks, as soon as their frames are final.

Frame k of an item is final once decoder row k + 1 + P + max_delay has been produced; its audio is
decoded on the codec's fixed block grid (codec.py), so an item's chunks, joined, are bit-identical to
decoding its finished codes at once, and resampling runs through soxr's streaming resampler, which
gives the same samples as resampling the whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from dia_ort.audio import DAC_SAMPLE_RATE, stream_resampler
from dia_ort.codec import Codec
from dia_ort.item import ItemState

FIRST_CHUNK_FRAMES = 8  # about 93 ms of audio: the first chunk, for a short time to first audio
CHUNK_FRAMES = 8  # later chunks: every decoded block as soon as it is ready (the blocks grow)


@dataclass(frozen=True)
class AudioChunk:
    """Audio of one batch item: float32 mono at the stream's rate; `last` marks the item's end."""

    item: int
    audio: np.ndarray
    last: bool


def check_chunk_frames(first_chunk_frames: int, chunk_frames: int) -> None:
    for name, value in (("first_chunk_frames", first_chunk_frames), ("chunk_frames", chunk_frames)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be a positive number of frames, got {value!r}")


class ItemStream:
    """One item's final codes -> its audio, in chunks of at least `first_chunk_frames`, then `chunk_frames`.

    A chunk is cut where a codec block's audio ends (the block's frames less the decoder's lookahead
    of 9.3 frames), so its size is rounded up to that: with the default grid the first chunk comes
    max_delay + 18 steps after the prefill with 8.7 frames of audio, one of 16 frames after 36 (on
    CUDA, whose blocks are all 64 frames, after 64).
    """

    def __init__(
        self,
        codec: Codec,
        sample_rate: int = DAC_SAMPLE_RATE,
        first_chunk_frames: int = FIRST_CHUNK_FRAMES,
        chunk_frames: int = CHUNK_FRAMES,
    ) -> None:
        check_chunk_frames(first_chunk_frames, chunk_frames)
        self.decoder = codec.stream()
        self.hop = codec.config.hop_length
        self.resampler = stream_resampler(sample_rate)
        self.wanted = first_chunk_frames * self.hop
        self.chunk = chunk_frames * self.hop
        self.pending: list[np.ndarray] = []  # decoded audio at 44.1 kHz not yet returned
        self.pending_samples = 0
        self.ended = False

    def after_row(self, item: ItemState, row: int) -> np.ndarray | None:
        """The audio to hand out once the item produced `row`: a chunk (empty only at the item's end),
        or None. Decodes only when a block is complete or the item has ended."""
        last = item.finished(row)
        frames = item.final_frames(row)
        if not (last or frames >= self.decoder.needs()):
            return None
        audio = self.feed(item.codes(frames), last)
        return audio if audio is not None and (len(audio) or last) else None

    def feed(self, codes: np.ndarray, last: bool = False) -> np.ndarray | None:
        """Every final frame so far `[T, C]`; returns a chunk when enough audio is ready, else None.

        With `last` the item is complete: the rest of its audio comes back (possibly empty).
        """
        if self.ended:
            raise ValueError("this item's stream has ended")
        audio = self.decoder.decode(codes, last)
        if len(audio):
            self.pending.append(audio)
            self.pending_samples += len(audio)
        if not last and self.pending_samples < self.wanted:
            return None
        chunk = np.concatenate(self.pending) if self.pending else np.zeros(0, dtype=np.float32)
        self.pending, self.pending_samples, self.wanted = [], 0, self.chunk
        self.ended = last
        if self.resampler is not None:
            chunk = self.resampler.resample_chunk(chunk, last=last)
        return chunk
