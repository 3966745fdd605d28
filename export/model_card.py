"""The model card an exported folder carries (`README.md`): the Hub's metadata and what each variant is,
so that the folder can be uploaded to the Hub as it is.

Each variant lists its files' size (what a download of it fetches, with the codec), how far its graphs
were verified from the torch modules, and its top-1 agreement with float32 over teacher-forced steps
(`export.quant_accuracy`), and its steady decoding speed on the machine that exported it, named
(speed depends on the machine: the card says how to measure it on another).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

from dia_ort import Dia
from dia_ort.manifest import Manifest
from dia_ort.progress import steady_step_seconds
from export.quant_accuracy import Accuracy

CARD_NAME = "README.md"
LICENSE = "apache-2.0"  # Dia's weights and code; the DAC codec's are MIT


SPEED_TEXT = "[S1] Dia runs on ONNX Runtime. [S2] On the CPU too."
SPEED_FRAMES = 40  # greedy frames of the speed run


def step_speed(folder: Path, dtype: str) -> float:
    """Decoder steps a second of one request of `dtype` on this machine's CPU (steady state)."""
    dia = Dia(folder, compute_dtype=dtype, device="cpu")
    return 1 / steady_step_seconds(
        dia.generate_codes, [SPEED_TEXT], temperature=0, max_new_tokens=SPEED_FRAMES
    )


def cpu_name() -> str:
    """This machine's CPU model and core count, to name where the speeds were measured."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            model = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} logical CPUs"


def model_card(
    manifest: Manifest, folder: Path, agreement: dict[str, Accuracy], speed: dict[str, float]
) -> str:
    """The card's text: YAML metadata for the Hub, then the variants and how to use the folder."""
    base = manifest.source.get("model")
    metadata = ["library_name: onnxruntime", "pipeline_tag: text-to-speech", f"license: {LICENSE}"]
    metadata += [f"base_model: {base}"] if base else []
    metadata += ["tags:", "- dia", "- text-to-dialogue", "- onnx", "- dia-ort"]
    errors = manifest.tools.get("verification_error", {})
    rows = []
    for dtype, graphs in manifest.variants.items():
        size = sum((folder / entry.path).stat().st_size for entry in manifest.files(dtype))
        error = max(errors.get(entry.file.path.removesuffix(".onnx"), 0.0) for entry in graphs.values())
        accuracy = agreement.get(dtype)
        agrees = (
            "reference" if dtype == "float32" else "–" if accuracy is None else f"{accuracy.agreement:.3f}"
        )
        rate = speed[dtype] / manifest.codec_config.frame_rate if dtype in speed else None
        speeds = "–" if rate is None else f"{speed[dtype]:.1f} ({rate:.2f}x real time)"
        rows.append(f"| `{dtype}` | {size / 1e9:.2f} GB | {error:.3g} | {agrees} | {speeds} |")
    random = ", ".join(f"{key} {value}" for key, value in manifest.source.items())
    source = f"[{base}](https://huggingface.co/{base})" if base else f"Random weights ({random}), for tests"
    steps = next(iter(agreement.values())).steps if agreement else 0
    return "\n".join(
        [
            "---",
            *metadata,
            "---",
            "",
            f"# {base or 'Dia'} for ONNX Runtime",
            "",
            f"{source}, exported by [dia-ort](https://github.com/nari-labs/dia) to ONNX graphs that run on "
            "ONNX Runtime without torch (CPU or CUDA): the text encoder, the decoder step with its KV "
            "cache, and the DAC codec. `dia_ort.json` lists every file with its size and hash.",
            "",
            "| variant | download (with the codec) | largest verified difference from torch | "
            f"top-1 agreement with float32 ({steps} steps) | steps a second on the exporting CPU |",
            "|---|---|---|---|---|",
            *rows,
            "",
            "```python",
            "from dia_ort import Dia",
            "",
            f'model = Dia.from_pretrained("ORG/NAME", compute_dtype="{_recommended(manifest)}")  # fetches that variant only',
            'audio = model.generate("[S1] Dia on ONNX Runtime. [S2] No torch needed.")',
            'model.save_audio("dialogue.wav", audio)',
            "```",
            "",
            f"Speeds: one greedy request of {SPEED_FRAMES} frames, ONNX Runtime on {cpu_name()}, one thread "
            f"per physical core; {manifest.codec_config.frame_rate:.2f} steps make a second of audio. "
            "Speed depends on the machine: "
            "`python -m bench --model-folder DIR` measures it on another.",
            "Upload this folder as it is: `hf upload ORG/NAME DIR`.",
            "",
        ]
    )


def write_model_card(manifest: Manifest, folder: Path, agreement: dict[str, Accuracy]) -> Path:
    """Measure each CPU variant's speed here and write the card into the exported folder."""
    speed = {d: step_speed(folder, d) for d in manifest.variants if d not in ("float16", "bfloat16")}
    path = folder / CARD_NAME
    path.write_text(model_card(manifest, folder, agreement, speed), encoding="utf-8")
    return path


def _recommended(manifest: Manifest) -> str:
    return "int8" if "int8" in manifest.variants else "float32"
