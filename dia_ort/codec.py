"""The DAC codec graphs: audio codes `[T, C]` <-> 44.1 kHz mono waveform.

Both graphs are convolutional, so long audio runs in pieces: each piece carries the frames around it
that its outputs can see (the receptive field) and keeps only its own part of the result, which
bounds memory and the size of every intermediate tensor.

Decoding cuts an item's frames into blocks on one fixed grid (`DecodeGrid`), whether the codes come
all at once or a few at a time while they are generated. ONNX Runtime's convolutions round
differently for windows of different lengths (their GEMM strides depend on the width), so only the
same windows give the same bits: decoding every item on one grid is what makes a stream of audio
bit-identical to decoding the whole item.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dia_ort.engine import Device, open_sessions
from dia_ort.manifest import Manifest

# Receptive fields of the 44.1 kHz DAC in frames on each side (the span of nonzero input gradients).
# Decoder: conv1 (k7) sees 3 frames, each upsampling block's transposed conv about one of its input
# samples and its residual units (k7, dilations 1, 3, 9) 39 of their own samples, which with rates
# 8, 8, 4, 2 adds up to 9.9 frames. Encoder: 3733 samples, 7.3 frames.
DECODE_CONTEXT_FRAMES = 10
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

    With the defaults the blocks end at frames 8, 16, 32, 64, 128, 256, 512, 768, ...: a stream's
    first block is ready soon after its frames are generated (time to first audio), later ones are
    larger (fewer codec calls). Each block is decoded with DECODE_CONTEXT_FRAMES of context on each
    side, so a 10 s item costs about 18 % more decoder work than one window would, and no call sees
    more than `steady` + 20 frames.
    """

    first: int = 8
    steady: int = 256

    def __post_init__(self) -> None:
        if not 1 <= self.first <= self.steady:
            raise ValueError(f"a decode grid needs 1 <= first <= steady, got {self.first} and {self.steady}")

    def blocks(self) -> Iterator[tuple[int, int]]:
        """`(start, end)` of every block, without end."""
        start = 0
        while True:
            size = min(max(self.first, start), self.steady)
            yield start, start + size
            start += size


DEFAULT_GRID = DecodeGrid()


class Codec:
    """Runs the exported DAC decoder and encoder (float32) on one device, in chunks of bounded size."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        device: Device,
        encode_chunk_frames: int = ENCODE_CHUNK_FRAMES,
        grid: DecodeGrid = DEFAULT_GRID,
    ) -> None:
        self.config = manifest.codec_config
        paths = [folder / manifest.codec[name].file.path for name in ("dac_decoder", "dac_encoder")]
        self.decoder, self.encoder = open_sessions(paths, device)
        self.encode_chunk_frames = encode_chunk_frames
        self.grid = grid
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

    def decode_window(self, codes: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Run the decoder on frames `lo:hi` of `[T, C]` codes: waveform `[(hi - lo) * hop]`."""
        window = np.ascontiguousarray(codes[lo:hi].T[None], dtype=np.int64)
        (wave,) = self.decoder.run(None, {"codes": window}, self.run_options)
        return wave[0]

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

    `decode(codes, last)` takes every final frame so far and returns the audio of the blocks that
    became decodable: a block needs DECODE_CONTEXT_FRAMES final frames after it, or the item's end.
    """

    def __init__(self, codec: Codec) -> None:
        self.codec = codec
        self.blocks = codec.grid.blocks()
        self.block = next(self.blocks)
        self.decoded = 0  # frames whose audio was returned

    def needs(self) -> int:
        """How many final frames the next block waits for (before the item's end)."""
        return self.block[1] + DECODE_CONTEXT_FRAMES

    def decode(self, codes: np.ndarray, last: bool = False) -> np.ndarray:
        """New audio for the blocks that `[T, C]` final codes (all of them when `last`) complete."""
        hop, total = self.codec.config.hop_length, len(codes)
        if total < self.decoded:
            raise ValueError(f"{self.decoded} frames were decoded already; got codes of {total} frames")
        pieces = []
        while self.decoded < total:
            start, end = self.block
            if self.needs() > total and not last:
                break
            end = min(end, total)
            lo, hi = max(0, start - DECODE_CONTEXT_FRAMES), min(total, end + DECODE_CONTEXT_FRAMES)
            pieces.append(self.codec.decode_window(codes, lo, hi)[(start - lo) * hop : (end - lo) * hop])
            self.decoded = end
            self.block = next(self.blocks)
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
