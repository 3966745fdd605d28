"""The DAC codec graphs: audio codes `[T, C]` <-> 44.1 kHz mono waveform.

Decoding streams: the decoder graph takes one block of an item's codes and the left context each of
its convolutions kept from the block before, and returns the audio up to `decoder_delay` samples
before the block's end (the convolutions see that far ahead). A last block of padding codes brings
out the rest. No frame is decoded twice, whether the codes come all at once or a few at a time while
they are generated. ONNX Runtime's convolutions round differently for blocks of different lengths
(their GEMM strides depend on the width), so only the same blocks give the same bits: decoding every
item on one grid (`DecodeGrid`) is what makes a stream of audio bit-identical to decoding the whole.

Encoding runs in windows: each chunk carries the frames around it that its outputs can see (the
receptive field) and keeps only its own part of the result, which bounds memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dia_ort.engine import Device, open_sessions
from dia_ort.manifest import Manifest

# The encoder's receptive field in frames on each side (3733 samples, 7.3 frames).
ENCODE_CONTEXT_FRAMES = 8
# Encoding runs in chunks of about 6 s of audio, so that clips that short take one call; its memory
# stays bounded (a 35 s decode in one run peaks at 3.7 GB of process memory).
ENCODE_CHUNK_FRAMES = 512


def chunk_windows(total: int, chunk: int, context: int) -> Iterator[tuple[int, int, int, int]]:
    """Cover frames 0..total-1 in chunks of `chunk`: yield `(lo, hi, start, end)` per chunk.

    `lo:hi` is the window to run (the chunk `start:end` plus up to `context` frames each side);
    `start - lo : end - lo` is the chunk's own part of that window's output.
    """
    for start in range(0, total, chunk):
        end = min(start + chunk, total)
        yield max(0, start - context), min(total, end + context), start, end


@dataclass(frozen=True)
class DecodeGrid:
    """The blocks an item's frames are decoded in: `first` frames, then doubling up to `steady`.

    With the defaults the blocks end at frames 18, 36, 72, 144, 288, 544, 800, ...: the first block
    brings out 8.7 frames of audio (its 18 frames less the decoder's lookahead, 4757 samples or 9.3
    frames); later blocks are larger (fewer codec calls), and no call sees more than `steady` frames.

    A `padded` grid runs every call at one width (`first == steady`): the item's last block and the
    padding blocks after it are filled out with codes past its end. ONNX Runtime's CUDA convolutions
    pay for every change of shape between calls (cuDNN sets each one up anew): on an H200, 431 frames
    took 0.39 s on the doubling grid and 0.04 s in blocks of 64.
    """

    first: int = 18
    steady: int = 256
    padded: bool = False

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.steady:
            raise ValueError(f"a decode grid needs 1 <= first <= steady, got {self.first} and {self.steady}")
        if self.padded and self.first != self.steady:
            raise ValueError(
                f"a padded decode grid has one width, got first {self.first}, steady {self.steady}"
            )

    def blocks(self) -> Iterator[tuple[int, int]]:
        """`(start, end)` of every block, without end."""
        start = 0
        while True:
            size = min(max(self.first, start), self.steady)
            yield start, start + size
            start += size


DEFAULT_GRID = DecodeGrid()
CUDA_GRID = DecodeGrid(first=64, steady=64, padded=True)  # a first chunk after max_delay + 64 steps


class Codec:
    """Runs the exported DAC decoder and encoder (float32) on one device, in chunks of bounded size."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        device: Device,
        encode_chunk_frames: int = ENCODE_CHUNK_FRAMES,
        grid: DecodeGrid | None = None,
    ) -> None:
        """`grid`: the blocks items are decoded in; by default DEFAULT_GRID, on CUDA CUDA_GRID."""
        self.config = manifest.codec_config
        paths = [folder / manifest.codec[name].file.path for name in ("dac_decoder", "dac_encoder")]
        self.decoder, self.encoder = open_sessions(paths, device)
        self.encode_chunk_frames = encode_chunk_frames
        self.grid = grid or (CUDA_GRID if device.kind == "cuda" else DEFAULT_GRID)
        self.context_inputs = [
            (i.name, i.shape[1:]) for i in self.decoder.get_inputs() if i.name.startswith("past_")
        ]
        self.outputs = [o.name for o in self.decoder.get_outputs()]
        # Hand the CPU arena's unused memory back after each chunk, which it would otherwise keep for good.
        self.run_options = ort.RunOptions()
        self.run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def check_codes(self, codes: object) -> np.ndarray:
        """Validate `[T, C]` integer codes in 0..codebook_size-1; return them as int64."""
        if hasattr(codes, "numpy"):
            codes = codes.detach().cpu().numpy() if hasattr(codes, "detach") else codes.numpy()
        codes = np.asarray(codes)
        n = self.config.n_codebooks
        if codes.ndim != 2 or codes.shape[1] != n:
            raise ValueError(f"codes must have shape [T, {n}], got {list(codes.shape)}")
        if not np.issubdtype(codes.dtype, np.integer):
            raise TypeError(f"codes must be integers, got dtype {codes.dtype}")
        if len(codes) == 0:
            raise ValueError("codes are empty (0 frames)")
        bad = (codes < 0) | (codes >= self.config.codebook_size)
        if bad.any():
            raise ValueError(
                f"{int(bad.sum())} codes are outside 0..{self.config.codebook_size - 1} "
                f"(first at frame {int(np.argwhere(bad)[0][0])})"
            )
        return codes.astype(np.int64)

    def decode(self, codes: np.ndarray) -> np.ndarray:
        """`[T, C]` codes -> float32 waveform `[T * hop]` at the codec's sample rate."""
        return self.stream().decode(self.check_codes(codes), last=True)

    def stream(self) -> DecodeStream:
        """A decoder for one item whose codes arrive a few frames at a time."""
        return DecodeStream(self)

    def first_contexts(self) -> list[np.ndarray]:
        """The decoder's contexts before an item's first block: zeros."""
        return [np.zeros([1, *shape], dtype=np.float32) for _, shape in self.context_inputs]

    def block_feeds(
        self, codes: np.ndarray, first_frame: int, end_frame: int, contexts: list[np.ndarray]
    ) -> dict[str, np.ndarray]:
        """The decoder's inputs for one block `[T, C]` from `first_frame` on, after `contexts`, with the
        item ending at `end_frame` (codes from there on are padding)."""
        return {
            "codes": np.ascontiguousarray(codes.T[None], dtype=np.int64),
            "first_frame": np.array([first_frame], dtype=np.int64),
            "end_frame": np.array([end_frame], dtype=np.int64),
            **{name: context for (name, _), context in zip(self.context_inputs, contexts, strict=True)},
        }

    def decode_block(
        self, codes: np.ndarray, first_frame: int, end_frame: int, contexts: list[np.ndarray]
    ) -> tuple[np.ndarray, list[np.ndarray]]:
        """Run the decoder on one block (`block_feeds`): waveform `[T * hop]` from sample
        `first_frame * hop - decoder_delay` on, and the contexts for the next block."""
        feeds = self.block_feeds(codes, first_frame, end_frame, contexts)
        wave, *contexts = self.decoder.run(self.outputs, feeds, self.run_options)
        return wave[0], contexts

    def encode(self, waveform: np.ndarray) -> np.ndarray:
        """Mono float32 waveform at the codec's rate -> `[ceil(N / hop), C]` codes (right-padded)."""
        hop = self.config.hop_length
        frames = -(-len(waveform) // hop)
        padded = np.zeros(frames * hop, dtype=np.float32)
        padded[: len(waveform)] = waveform
        codes = np.empty((frames, self.config.n_codebooks), dtype=np.int64)
        for lo, hi, start, end in chunk_windows(frames, self.encode_chunk_frames, ENCODE_CONTEXT_FRAMES):
            (part,) = self.encoder.run(
                None, {"waveform": padded[None, lo * hop : hi * hop]}, self.run_options
            )
            codes[start:end] = part[0, :, start - lo : end - lo].T
        return codes


class DecodeStream:
    """One item's waveform, decoded block by block on the codec's grid as its frames become final.

    `decode(codes, last)` takes every final frame so far and returns the audio that became final: a
    block is decoded once all its frames are, and its audio lags them by the decoder's delay, which
    the item's end brings out.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.blocks = codec.grid.blocks()
        self.block = next(self.blocks)
        self.contexts = codec.first_contexts()
        self.fed = 0  # frames run through the decoder, padding included
        self.position = -codec.config.decoder_delay  # the sample the decoder's next output starts at
        self.ended = False

    def needs(self) -> int:
        """How many final frames the next block waits for (before the item's end)."""
        return self.block[1]

    def decode(self, codes: np.ndarray, last: bool = False) -> np.ndarray:
        """New audio for the blocks that `[T, C]` final codes (all of them when `last`) complete."""
        if self.ended:
            raise ValueError("this item's audio was decoded to its end")
        total, decoded = len(codes), self.block[0]
        if total < decoded:
            raise ValueError(f"{decoded} frames were decoded already; got codes of {total} frames")
        grid, hop = self.codec.grid, self.codec.config.hop_length
        pieces = []
        while self.block[0] < total and (self.block[1] <= total or last):
            start, end = self.block
            width = end - start if grid.padded else min(end, total) - start
            pieces.append(self._run(codes[start:end], width, min(end, total)))
            self.block = next(self.blocks)
        if last:
            width = grid.steady if grid.padded else -(-self.codec.config.decoder_delay // hop)
            while total and self.position < total * hop:  # the audio the decoder's lookahead held back
                pieces.append(self._run(codes[:0], width, total))
            self.ended = True
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)

    def _run(self, codes: np.ndarray, width: int, end_frame: int) -> np.ndarray:
        """Decode `codes` filled out to `width` frames with padding, the item ending at `end_frame`;
        return the audio that lies inside the item."""
        if width > len(codes):
            codes = np.concatenate([codes, np.zeros((width - len(codes), codes.shape[1]), dtype=codes.dtype)])
        wave, self.contexts = self.codec.decode_block(codes, self.fed, end_frame, self.contexts)
        self.fed += width
        start = self.position
        self.position += len(wave)
        end = min(self.position, end_frame * self.codec.config.hop_length)
        return wave[max(0, -start) : max(0, end - start)]
