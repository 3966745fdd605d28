"""What int8 would cost the DAC decoder: ONNX Runtime's own quantization tools applied to a folder's
float32 `dac_decoder`, each result timed against it and its audio compared with it, in one run.

    python -m bench.dac_quantized FOLDER [--seconds 3] [--repeats 2] [--threads N]

Two ways ONNX Runtime quantizes a convolution:
- dynamic (`quantize_dynamic`): `ConvInteger` on activations quantized per tensor at run time, int8
  weights per output channel;
- static (`quantize_static`, QDQ): `QLinearConv` with activation scales calibrated on random codes,
  the Snake activations in float32 between them.
Issue 20 asks a quantized codec to keep its audio within 35 dB SNR of the float32 codec's, and to be
faster; this measures both before one is shipped. Prints JSON: per path the decode seconds, the
speedup over float32 and the SNR in dB.
"""

from __future__ import annotations

import argparse
import copy
import json
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np
from onnxruntime.quantization import (
    CalibrationDataReader,
    QuantFormat,
    QuantType,
    quantize_dynamic,
    quantize_static,
)

from bench.machine import physical_cores
from bench.measure import fastest
from dia_ort.codec import Codec
from dia_ort.engine import Device, open_session
from dia_ort.manifest import Manifest

CALIBRATION = (4, 60)  # random code sequences of this many frames calibrate the static scales
QUANTIZED_OPS = ["Conv", "ConvTranspose"]


class RandomCodes(CalibrationDataReader):
    """Uniformly random codes `[frames, C]` as an item's first block, the calibration input of the static
    path."""

    def __init__(self, codec: Codec, count: int, frames: int) -> None:
        rng = np.random.default_rng(1)
        config = codec.config
        self.feeds: Iterator[dict[str, np.ndarray]] = iter(
            codec.block_feeds(
                rng.integers(0, config.codebook_size, size=(frames, config.n_codebooks)),
                0,
                frames,
                codec.first_contexts(),
            )
            for _ in range(count)
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self.feeds, None)


def quantized_decoders(codec: Codec, graph: Path, out: Path) -> dict[str, Path]:
    """`codec`'s decoder `graph` quantized both ways into `out`: {"dynamic": path, "static": path}."""
    paths = {"dynamic": out / "dac_decoder.dynamic.onnx", "static": out / "dac_decoder.static.onnx"}
    common = dict(op_types_to_quantize=QUANTIZED_OPS, per_channel=True, use_external_data_format=True)
    quantize_dynamic(graph, paths["dynamic"], weight_type=QuantType.QInt8, **common)
    quantize_static(
        graph,
        paths["static"],
        RandomCodes(codec, *CALIBRATION),
        quant_format=QuantFormat.QDQ,
        weight_type=QuantType.QInt8,
        activation_type=QuantType.QUInt8,
        **common,
    )
    return paths


def snr_db(reference: np.ndarray, other: np.ndarray) -> float:
    """Signal-to-noise ratio of `other` against `reference`, in dB (inf when equal)."""
    reference = reference.astype(np.float64)
    noise = float(np.sum((reference - other) ** 2))
    return float("inf") if noise == 0 else 10 * np.log10(float(np.sum(reference**2)) / noise)


def measure(folder: Path, seconds: float, repeats: int, threads: int) -> dict:
    """Each quantized decoder's speed and SNR against the folder's float32 decoder, on random codes.

    Each decodes through the runtime's `Codec` (its block grid, contexts and padding block), and the
    three take turns in each timed round (`bench.measure.fastest`).
    """
    manifest = Manifest.load(folder)
    config = manifest.codec_config
    graph = folder / manifest.codec["dac_decoder"].file.path
    frames = max(1, round(seconds * config.frame_rate))
    codes = np.random.default_rng(0).integers(0, config.codebook_size, size=(frames, config.n_codebooks))
    device = Device.parse("cpu", threads)
    codecs = {"float32": Codec(folder, manifest, device)}
    with tempfile.TemporaryDirectory(prefix="dac-int8-") as tmp:
        quantized = quantized_decoders(codecs["float32"], graph, Path(tmp))
        for name, path in quantized.items():
            codecs[name] = copy.copy(codecs["float32"])  # the same codec with this decoder
            codecs[name].decoder = open_session(path, device)
    runs = {name: partial(codec.decode, codes) for name, codec in codecs.items()}
    times, outputs = fastest(runs, repeats)
    reference = outputs["float32"]
    result = {
        "frames": frames,
        "audio_seconds": reference.shape[-1] / config.sample_rate,
        "float32_s": times["float32"],
    }
    for name in quantized:
        result[name] = {
            "seconds": times[name],
            "speedup": times["float32"] / times[name],
            "snr_db": snr_db(reference, outputs[name]),
        }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dac_quantized", description=__doc__.splitlines()[0]
    )
    parser.add_argument("folder", type=Path, help="an exported model folder")
    parser.add_argument("--seconds", type=float, default=3.0, help="audio decoded per timed run")
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (the fastest counts)")
    parser.add_argument("--threads", type=int, default=physical_cores())
    args = parser.parse_args(argv)
    print(json.dumps(measure(args.folder, args.seconds, args.repeats, args.threads), indent=2))


if __name__ == "__main__":
    main()
