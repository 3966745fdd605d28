"""The manifest `dia_ort.json` of an exported model folder: what is in it and how to check it.

The export stage writes it with `Manifest.to_dict`; the runtime reads it with `Manifest.load`, which
refuses a folder whose format, files, sizes or hashes do not match, saying what to re-export.
Graph inputs and outputs are named by the conventions below and paired by name.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dia_ort.config import ModelConfig
from dia_ort.dia2_config import Dia2Config
from dia_ort.verified import has_sha256, sha256_of

MANIFEST_NAME = "dia_ort.json"
# 2: the decoder step takes `positions` [B, S], one row of positions per batch row (continuous batching)
FORMAT_VERSION = 2
FLOAT_DTYPES = ("float32", "float16", "bfloat16")  # exported with `python -m export --dtype`
QUANTIZED_DTYPES = ("int8", "int4", "int4-plain")  # ... and with `--quantize`, from the float32 graphs
DIA_GRAPHS = ("encoder", "decoder_step")
CODEC_GRAPHS = ("dac_decoder", "dac_encoder")
DIA2_GRAPHS = ("backbone_step", "depformer_stage")
MIMI_GRAPHS = ("mimi_decoder", "mimi_encoder")
# family -> (each variant's graphs, the codec's graphs, how its model config is read)
FAMILIES = {
    "dia": (DIA_GRAPHS, CODEC_GRAPHS, ModelConfig.from_dict),
    "dia2": (DIA2_GRAPHS, MIMI_GRAPHS, Dia2Config.from_tree),
}
REEXPORT_HINT = "re-export the model with `python -m export --out DIR` (see README)"


def cross_names(layers: int) -> list[str]:
    """Encoder outputs / step inputs: cross_key_0, cross_value_0, cross_key_1, ..."""
    return [f"cross_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


def cache_names(prefix: str, layers: int) -> list[str]:
    """Self-attention cache names: past_key_0, past_value_0, ... (prefix "past" or "present")."""
    return [f"{prefix}_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]


@dataclass(frozen=True)
class FileEntry:
    """One file of the folder with its size and sha256."""

    path: str
    size: int
    sha256: str

    @classmethod
    def of(cls, folder: Path, path: str) -> FileEntry:
        full = folder / path
        return cls(path=path, size=full.stat().st_size, sha256=sha256_of(full))

    def check(self, folder: Path) -> None:
        full = folder / self.path
        if not full.is_file():
            raise FileNotFoundError(f"{full} is listed in {MANIFEST_NAME} but missing; {REEXPORT_HINT}")
        size = full.stat().st_size
        if size != self.size:
            raise ValueError(
                f"{full} has {size} bytes but the manifest says {self.size} (truncated or replaced); {REEXPORT_HINT}"
            )
        if not has_sha256(full, self.sha256):
            raise ValueError(
                f"{full} does not match its sha256 in {MANIFEST_NAME} (altered); {REEXPORT_HINT}"
            )


@dataclass(frozen=True)
class GraphEntry:
    """An ONNX graph: its file, external weight files, its input and output names in order, and the
    tensors the runtime binds to inputs of the same names (`bound`, a safetensors file: Dia2's
    per-stage depformer kernels, `dia_ort.dia2.stage_weights`), and a QGEMM graph's signed twin
    (`signed`: the same graph on int8 weights read from the same data files, `dia_ort.integer_gemm`)."""

    file: FileEntry
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    data_files: tuple[FileEntry, ...] = ()
    bound: FileEntry | None = None
    signed: FileEntry | None = None

    def files(self) -> tuple[FileEntry, ...]:
        extra = [entry for entry in (self.bound, self.signed) if entry]
        return (self.file, *self.data_files, *extra)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GraphEntry:
        return cls(
            file=FileEntry(**data["file"]),
            inputs=tuple(data["inputs"]),
            outputs=tuple(data["outputs"]),
            data_files=tuple(FileEntry(**f) for f in data.get("data_files", ())),
            bound=FileEntry(**data["bound"]) if data.get("bound") else None,
            signed=FileEntry(**data["signed"]) if data.get("signed") else None,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "file": vars(self.file),
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "data_files": [vars(f) for f in self.data_files],
        } | {name: vars(entry) for name, entry in (("bound", self.bound), ("signed", self.signed)) if entry}


@dataclass(frozen=True)
class CodecConfig:
    """The codec's shape (DAC for Dia, Mimi for Dia2): one frame of codes per `hop_length` samples at
    `sample_rate`."""

    sample_rate: int = 44100
    hop_length: int = 512
    n_codebooks: int = 9
    codebook_size: int = 1024
    decoder_delay: int = 0  # samples the streamed DAC decoder's output lags its codes (Mimi: 0)

    @property
    def frame_rate(self) -> float:
        """Frames (decoder steps) in one second of audio: 86.13 for the 44.1 kHz DAC."""
        return self.sample_rate / self.hop_length


@dataclass(frozen=True)
class Manifest:
    """Everything the runtime needs to know about an exported folder."""

    model: ModelConfig | Dia2Config  # by family
    variants: dict[str, dict[str, GraphEntry]]  # dtype -> {"encoder": ..., "decoder_step": ...} (FAMILIES)
    codec: dict[str, GraphEntry]  # {"dac_decoder": ..., "dac_encoder": ...}, float32
    codec_config: CodecConfig = CodecConfig()
    source: dict[str, Any] = field(default_factory=dict)  # model id, revision, weight file hashes
    tools: dict[str, Any] = field(default_factory=dict)  # versions and opset used
    format_version: int = FORMAT_VERSION
    family: str = "dia"  # "dia" (Dia 1.6B) or "dia2"; a manifest without one is Dia's
    assets: dict[str, FileEntry] = field(
        default_factory=dict
    )  # other files the runtime reads (Dia2's tokenizer)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "family": self.family,
            "model": self.model.to_dict(),
            "variants": {
                dtype: {name: g.to_dict() for name, g in graphs.items()}
                for dtype, graphs in self.variants.items()
            },
            "codec": {name: g.to_dict() for name, g in self.codec.items()},
            "codec_config": vars(self.codec_config),
            "assets": {name: vars(entry) for name, entry in self.assets.items()},
            "source": self.source,
            "tools": self.tools,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], folder: str | Path = "DIR") -> Manifest:
        if not isinstance(data, dict):
            raise ValueError(f"{MANIFEST_NAME} in {folder} is not a JSON object; {REEXPORT_HINT}")
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            newer = isinstance(version, int) and version > FORMAT_VERSION
            raise ValueError(
                f"{MANIFEST_NAME} in {folder} has format version {version}, this dia_ort reads version "
                f"{FORMAT_VERSION}; "
                + (
                    "upgrade dia-ort to read it"
                    if newer
                    else f"re-export it with `{reexport_command(data, folder)}`"
                )
            )
        family = data.get("family", "dia")
        if family not in FAMILIES:
            raise ValueError(
                f"{MANIFEST_NAME} in {folder} holds a model of family {family!r}, which this dia_ort does not "
                f"know (it runs {sorted(FAMILIES)}); upgrade dia-ort to read it"
            )
        if family == "dia" and "decoder_delay" not in data.get("codec_config", {}):
            raise ValueError(
                f"{MANIFEST_NAME} in {folder} holds a DAC decoder from before the streamed one (graph "
                f"revision 5); re-export it with `{reexport_command(data, folder)}`"
            )
        graph_names, codec_names, read_config = FAMILIES[family]
        try:
            variants = {
                dtype: {name: GraphEntry.from_dict(g) for name, g in graphs.items()}
                for dtype, graphs in data["variants"].items()
            }
            manifest = cls(
                family=family,
                model=read_config(data["model"]),
                variants=variants,
                codec={name: GraphEntry.from_dict(g) for name, g in data["codec"].items()},
                codec_config=CodecConfig(**data.get("codec_config", {})),
                assets={name: FileEntry(**entry) for name, entry in data.get("assets", {}).items()},
                source=data.get("source", {}),
                tools=data.get("tools", {}),
            )
        except (KeyError, TypeError, AttributeError, ValueError) as exc:
            raise ValueError(
                f"{MANIFEST_NAME} in {folder} is incomplete or malformed ({exc!r}); {REEXPORT_HINT}"
            ) from exc
        for dtype, graphs in variants.items():
            missing = set(graph_names) - set(graphs)
            if missing:
                raise ValueError(
                    f"{MANIFEST_NAME}: variant {dtype} lacks graphs {sorted(missing)}; {REEXPORT_HINT}"
                )
        if set(codec_names) - set(manifest.codec):
            raise ValueError(f"{MANIFEST_NAME}: codec graphs missing; {REEXPORT_HINT}")
        return manifest

    @classmethod
    def load(cls, folder: str | Path) -> Manifest:
        path = Path(folder) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {folder} is not an exported dia-ort model folder (or its export did "
                f"not finish); {REEXPORT_HINT}"
            )
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is not valid JSON ({exc}); {REEXPORT_HINT}") from exc
        return cls.from_dict(data, folder)

    def save(self, folder: str | Path) -> Path:
        """Write the manifest whole or not at all: an export killed while writing it leaves none."""
        path = Path(folder) / MANIFEST_NAME
        partial = path.with_name(f".{MANIFEST_NAME}.partial")
        with partial.open("w") as file:
            file.write(json.dumps(self.to_dict(), indent=2) + "\n")
            file.flush()
            os.fsync(file.fileno())
        os.replace(partial, path)
        return path

    def files(self, dtype: str | None = None) -> list[FileEntry]:
        """The files one variant, the codec and the assets need (every variant's when None), each once."""
        variants = self.variants.values() if dtype is None else [self.variants[dtype]]
        graphs = [*(g for graphs in variants for g in graphs.values()), *self.codec.values()]
        entries = [*(entry for graph in graphs for entry in graph.files()), *self.assets.values()]
        return list({entry.path: entry for entry in entries}.values())

    def check_files(self, folder: str | Path, dtype: str) -> None:
        """Check sizes and hashes of the files that one variant and the codec need."""
        for entry in self.files(dtype):
            entry.check(Path(folder))


def reexport_command(data: dict[str, Any], folder: str | Path) -> str:
    """The `python -m export` command that writes a folder like the one `data` describes, anew."""
    source = data.get("source") if isinstance(data.get("source"), dict) else {}
    variants = list(data.get("variants", {})) if isinstance(data.get("variants"), dict) else []
    if "random_init" in source:
        argv = ["--random-init", str(source["random_init"]), "--seed", str(source.get("seed", 0))]
    else:
        argv = ["--model", str(source.get("model", "/path/to/checkpoint"))]
        argv += ["--dac", str(source["dac"])] if source.get("dac") else []
        argv += ["--revision", str(source["revision"])] if source.get("revision") else []
    floats = [v for v in variants if v in FLOAT_DTYPES] or ["float32"]
    quantized = [v for v in variants if v in QUANTIZED_DTYPES]
    argv += ["--out", str(folder), "--dtype", *floats] + (["--quantize", *quantized] if quantized else [])
    return shlex.join(["python", "-m", "export", *argv])
