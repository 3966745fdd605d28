"""The DAC codec graphs: audio codes `[T, C]` <-> 44.1 kHz mono waveform.

Both graphs are convolutional, so long audio runs in chunks: each chunk carries the frames around it
that its outputs can see (the receptive field) and keeps only its own part of the result. The
stitched output then equals one whole-length run up to float rounding, while memory and the size of
every intermediate tensor stay bounded by the chunk.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort

from dia_ort.engine import Device, open_session
from dia_ort.manifest import Manifest

# Receptive fields of the 44.1 kHz DAC in frames on each side (the span of nonzero input gradients).
# Decoder: conv1 (k7) sees 3 frames, each upsampling block's transposed conv about one of its input
# samples and its residual units (k7, dilations 1, 3, 9) 39 of their own samples, which with rates
# 8, 8, 4, 2 adds up to 9.9 frames. Encoder: 3733 samples, 7.3 frames.
DECODE_CONTEXT_FRAMES = 10
ENCODE_CONTEXT_FRAMES = 8
# About 6 s of audio, so that clips that short take one call. Longer audio costs 2 x 10 / 512 (4 %)
# more compute, and its memory stays bounded: a 35 s decode peaks at 1.0 GB of process memory in
# chunks, at 3.7 GB in one run. Chunks of 256 to 1024 frames ran equally fast on the CPU.
CHUNK_FRAMES = 512


def chunk_windows(total: int, chunk: int, context: int) -> Iterator[tuple[int, int, int, int]]:
    """Cover frames 0..total-1 in chunks of `chunk`: yield `(lo, hi, start, end)` per chunk.

    `lo:hi` is the window to run (the chunk `start:end` plus up to `context` frames each side);
    `start - lo : end - lo` is the chunk's own part of that window's output.
    """
    for start in range(0, total, chunk):
        end = min(start + chunk, total)
        yield max(0, start - context), min(total, end + context), start, end


class Codec:
    """Runs the exported DAC decoder and encoder (float32) on one device, in chunks of bounded size."""

    def __init__(
        self,
        folder: Path,
        manifest: Manifest,
        device: Device,
        chunk_frames: int = CHUNK_FRAMES,
    ) -> None:
        self.config = manifest.codec_config
        self.decoder = open_session(folder / manifest.codec["dac_decoder"].file.path, device)
        self.encoder = open_session(folder / manifest.codec["dac_encoder"].file.path, device)
        self.chunk_frames = chunk_frames
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
        codes = self.check_codes(codes)
        hop = self.config.hop_length
        wave = np.empty(len(codes) * hop, dtype=np.float32)
        for lo, hi, start, end in chunk_windows(len(codes), self.chunk_frames, DECODE_CONTEXT_FRAMES):
            (part,) = self.decoder.run(
                None, {"codes": np.ascontiguousarray(codes[lo:hi].T[None])}, self.run_options
            )
            wave[start * hop : end * hop] = part[0, (start - lo) * hop : (end - lo) * hop]
        return wave

    def encode(self, waveform: np.ndarray) -> np.ndarray:
        """Mono float32 waveform at the codec's rate -> `[ceil(N / hop), C]` codes (right-padded)."""
        hop = self.config.hop_length
        frames = -(-len(waveform) // hop)
        padded = np.zeros(frames * hop, dtype=np.float32)
        padded[: len(waveform)] = waveform
        codes = np.empty((frames, self.config.n_codebooks), dtype=np.int64)
        for lo, hi, start, end in chunk_windows(frames, self.chunk_frames, ENCODE_CONTEXT_FRAMES):
            (part,) = self.encoder.run(
                None, {"waveform": padded[None, lo * hop : hi * hop]}, self.run_options
            )
            codes[start:end] = part[0, :, start - lo : end - lo].T
        return codes
