"""DAC codec speed: the exported graphs through the runtime's `Codec` (ONNX Runtime) against
transformers' `DacModel` (torch eager, float32) with the same weights on the same device, in one run.

    python -m bench.dac_speed [--seconds 5] [--repeats 3] [--seed 0] [--folder DIR] [--device cuda]

Without `--folder`, a `--random-init tiny` model (whose DAC has the real shape) is exported to a
temporary folder first. A folder given must hold the DAC of `random_dac(seed=--seed)`, as
`python -m export --random-init {tiny,full} --seed N` writes it; the reported errors show if not.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
from transformers import DacModel

from bench.measure import fastest
from dia_ort.codec import Codec
from dia_ort.engine import Device
from dia_ort.manifest import Manifest
from export.dac import DacCodec
from export.dac_weights import save_hf_folder
from export.pipeline import export_model, random_sources


def dac_model(codec: DacCodec) -> DacModel:
    """transformers' `DacModel` holding `codec`'s weights, loaded the way a user would load it."""
    with tempfile.TemporaryDirectory() as folder:
        save_hf_folder(codec, folder, "folded")
        return DacModel.from_pretrained(folder).eval()


def measure_dac(
    folder: str | Path, codec: DacCodec, seconds: float = 5.0, repeats: int = 3, device: str = "cpu"
) -> dict:
    """Realtime factors (audio seconds / wall seconds) of decoding and encoding `seconds` of audio.

    `folder` is an exported model folder whose DAC graphs hold `codec`'s weights; `DacModel` runs
    with those weights too. Returns `{ort,torch}_{decode,encode}_rtf`, the speedups of ONNX Runtime
    over torch, and how far the two agree (decode: max|ort - torch| / max|torch|; encode: the
    fraction of equal codes).
    """
    folder = Path(folder)
    runtime = Codec(folder, Manifest.load(folder), Device.parse(device))
    reference = dac_model(codec).to(device)
    arch = codec.arch
    frames = max(1, round(seconds * arch.sample_rate / arch.hop_length))
    rng = np.random.default_rng(0)
    codes = rng.integers(0, arch.codebook_size, size=(frames, arch.n_codebooks))
    wave = (0.3 * rng.standard_normal(frames * arch.hop_length)).astype(np.float32)
    codes_t = torch.from_numpy(codes.T[None].copy()).to(device)
    wave_t = torch.from_numpy(wave)[None, None].to(device)
    runs = {  # each returns numpy on the host, which waits for a GPU to finish
        "ort_decode": lambda: runtime.decode(codes),
        "torch_decode": lambda: reference.decode(audio_codes=codes_t).audio_values[0].cpu().numpy(),
        "ort_encode": lambda: runtime.encode(wave),
        "torch_encode": lambda: reference.encode(wave_t).audio_codes[0].cpu().numpy().T,
    }
    with torch.inference_mode():
        times, out = fastest(runs, repeats)
    audio_seconds = frames * arch.hop_length / arch.sample_rate
    return {
        "audio_seconds": audio_seconds,
        **{f"{name}_rtf": audio_seconds / elapsed for name, elapsed in times.items()},
        "decode_speedup": times["torch_decode"] / times["ort_decode"],
        "encode_speedup": times["torch_encode"] / times["ort_encode"],
        "decode_max_rel_error": float(
            np.abs(out["ort_decode"] - out["torch_decode"]).max() / np.abs(out["torch_decode"]).max()
        ),
        "encode_codes_equal": float(np.mean(out["ort_encode"] == out["torch_encode"])),
        "repeats": repeats,
        "device": device,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="audio length to decode and encode")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds (the fastest counts)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random DAC")
    parser.add_argument("--folder", type=Path, help="an exported folder with that DAC (default: export one)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where both codecs run")
    args = parser.parse_args(argv)
    sources = random_sources("tiny", args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.folder
        if folder is None:
            folder = Path(tmp)
            export_model(sources, folder)
        result = measure_dac(folder, sources.codec, args.seconds, args.repeats, args.device)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
