"""The DAC codec graphs: audio codes `[T, C]` <-> 44.1 kHz mono waveform."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dia_ort.engine import Device, open_session
from dia_ort.manifest import Manifest


class Codec:
    """Runs the exported DAC decoder and encoder (float32) on one device."""

    def __init__(self, folder: Path, manifest: Manifest, device: Device) -> None:
        self.config = manifest.codec_config
        self.decoder = open_session(folder / manifest.codec["dac_decoder"].file.path, device)
        self.encoder = open_session(folder / manifest.codec["dac_encoder"].file.path, device)

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
        (wave,) = self.decoder.run(None, {"codes": codes.T[None].copy()})
        return wave[0].astype(np.float32)

    def encode(self, waveform: np.ndarray) -> np.ndarray:
        """Mono float32 waveform at the codec's rate -> `[ceil(N / hop), C]` codes (right-padded)."""
        hop = self.config.hop_length
        padded = np.zeros(-(-len(waveform) // hop) * hop, dtype=np.float32)
        padded[: len(waveform)] = waveform
        (codes,) = self.encoder.run(None, {"waveform": padded[None]})
        return codes[0].T.astype(np.int64)
