"""Checkpoint + codec -> an exported model folder: graphs per precision, verified, and the manifest.

The manifest is written last, so a folder whose export failed half-way is refused by the runtime.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from dia_ort.hub import download, is_hub_id, missing_path_message
from dia_ort.integer_gemm import signed_kernel, signed_sums_exact
from dia_ort.manifest import MANIFEST_NAME, CodecConfig, GraphEntry, Manifest
from export import GRAPH_REVISION
from export.architecture import PRESETS, DiaArchitecture
from export.checkpoint import checkpoint_files, load_checkpoint, random_state
from export.dac import DacArchitecture, DacCodec, DacDecodeGraph, DacEncodeGraph
from export.dac_weights import load_dac, random_dac
from export.dia_graphs import calibration_samples, encoder_samples, encoder_spec, step_samples, step_spec
from export.dia_model import DiaModel
from export.model_card import write_model_card
from export.onnx_export import OPSET, GraphSpec, export_graph, feeds, verify_graph
from export.quant_accuracy import quantization_accuracy
from export.quantize import ACCURACY_LEVEL, RECIPES, quantize_graph

log = logging.getLogger(__name__)

DEFAULT_MODEL = "nari-labs/Dia-1.6B-0626"
DEFAULT_DAC = "descript/dac_44khz"
CARD_STEPS = 200  # teacher-forced steps of the agreement the model card gives each quantized variant
# float16 and bfloat16 are for CUDA; the CPU runtime falls back to float32
HALF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16}
SUPPORTED_DTYPES = ("float32", *HALF_DTYPES)
# Relative to the output scale; tiny models stay near 1e-6 in float32. The half graphs are compared
# with the torch module in the same precision, so the figure is the two sides' rounding: bfloat16
# keeps 8 bits of mantissa to float16's 11.
TOLERANCE = {"float32": 2e-3, "float16": 1e-2, "bfloat16": 6e-2}
# Quantized decoder steps: int8 0.011-0.013 and int4 0.11-0.15 on the tiny model and on a random
# 8-layer one with unsaturated attention. Plain random weights saturate Dia's unscaled attention and
# amplify the error with depth: up to 0.13 and 0.57 at 18 layers. Unrelated weights score 1.7.
QUANTIZED_TOLERANCE = {8: 0.25, 4: 0.8}  # by the recipe's bits


@dataclass(frozen=True)
class Sources:
    """The weights to export and where they came from (recorded in the manifest)."""

    arch: DiaArchitecture
    state: dict[str, torch.Tensor]
    codec: DacCodec
    provenance: dict


def random_sources(
    spec: str, seed: int, dac_arch: DacArchitecture | None = None, outlier_channels: int = 0
) -> Sources:
    """`tiny`, `mid`, `full` or a schema-B config file -> random weights, with a random DAC of the real
    shape; `outlier_channels` as `random_state` takes them."""
    arch = PRESETS[spec] if spec in PRESETS else DiaArchitecture.from_file(spec)
    dac_arch = dac_arch or DacArchitecture()
    provenance = {"random_init": spec, "seed": seed}
    return Sources(
        arch=arch,
        state=random_state(arch, seed, outlier_channels),
        codec=random_dac(dac_arch, seed),
        provenance=provenance | ({"outlier_channels": outlier_channels} if outlier_channels else {}),
    )


def local_folder(ident: str, revision: str | None) -> Path:
    """A local path as it is; a Hub id downloaded into the cache."""
    path = Path(ident).expanduser()
    if path.exists():
        return path
    if not is_hub_id(ident):
        raise FileNotFoundError(missing_path_message(ident))
    return download(ident, revision)


def checkpoint_sources(
    model: str, dac: str, revision: str | None = None, folder: Path | None = None
) -> Sources:
    """A Dia checkpoint (folder or Hub id; `folder` where it is already at hand) and a DAC (descript
    .pth, HF folder or Hub id)."""
    folder = folder or local_folder(model, revision)
    log.info("loading Dia checkpoint from %s", folder)
    arch, state = load_checkpoint(folder)
    dac_path = local_folder(dac, None)
    log.info("loading DAC from %s", dac_path)
    return Sources(
        arch=arch,
        state=state,
        codec=load_dac(dac_path),
        provenance={
            "model": model,
            "revision": revision,
            "files": checkpoint_files(folder),
            "dac": dac,
        },
    )


def export_verified(
    spec: GraphSpec,
    samples: list,
    folder: Path,
    tolerance: float,
    make: Callable[[], GraphEntry] | None = None,
    bound: Callable[[tuple[torch.Tensor, ...]], dict[str, np.ndarray]] | None = None,
) -> tuple[GraphEntry, float]:
    """Write the graph for `spec` (by `make`, else by exporting it) and verify it against torch
    (`verify_graph`'s `bound`: the feeds bound in place of a sample's, once `make` has run); its signed
    twin too where this CPU runs it exactly (`dia_ort.integer_gemm`; elsewhere the runtime never opens it)."""
    began = time.perf_counter()
    entry = make() if make else export_graph(spec, folder)
    checks = [(entry.file, bound)]
    if entry.signed and signed_sums_exact():
        checks.append((entry.signed, bound and partial(_signed_feeds, bound)))
    error = max(
        verify_graph(folder / file.path, spec.module, samples, spec.inputs, tolerance, feeds)
        for file, feeds in checks
    )
    log.info(
        "exported %s in %.1f s (max error vs torch %.2g)", entry.file.path, time.perf_counter() - began, error
    )
    return entry, error


def _signed_feeds(
    bound: Callable[[tuple[torch.Tensor, ...]], dict[str, np.ndarray]], sample: tuple[torch.Tensor, ...]
) -> dict[str, np.ndarray]:
    """`bound`'s feeds for a signed twin: its uint8 kernels as the int8 ones the twin takes."""
    return {name: signed_kernel(a) if a.dtype == np.uint8 else a for name, a in bound(sample).items()}


def codec_specs(codec: DacCodec) -> list[tuple[GraphSpec, list]]:
    """The codec's graphs with their verification samples: the streamed decoder (`DacDecodeGraph`),
    then the encoder."""
    hop = codec.arch.hop_length
    g = torch.Generator().manual_seed(0)
    waves = [0.3 * torch.randn(b, t * hop, generator=g) for b, t in ((1, 2), (2, 5))]
    decoder = DacDecodeGraph(codec)
    contexts = [f"context_{i}" for i in range(len(decoder.contexts))]
    # a first block, one later in the item (its contexts random), and a last block of padding
    blocks = [
        decode_sample(decoder, 1, 3, 0, g),
        decode_sample(decoder, 2, 7, 40, g),
        decode_sample(decoder, 2, 4, 9, g, 0),
    ]
    decode = GraphSpec(
        name="dac_decoder",
        module=decoder,
        example=blocks[0],
        inputs=("codes", "first_frame", "end_frame", *(f"past_{name}" for name in contexts)),
        outputs=("waveform", *(f"present_{name}" for name in contexts)),
        dynamic_axes={
            "codes": {0: "batch", 2: "frames"},
            "first_frame": {0: "batch"},
            "end_frame": {0: "batch"},
            "waveform": {0: "batch", 1: "samples"},
            **{f"{kind}_{name}": {0: "batch"} for name in contexts for kind in ("past", "present")},
        },
    )
    encode = GraphSpec(
        name="dac_encoder",
        module=DacEncodeGraph(codec),
        example=(waves[0],),
        inputs=("waveform",),
        outputs=("codes",),
        dynamic_axes={"waveform": {0: "batch", 1: "samples"}, "codes": {0: "batch", 2: "frames"}},
    )
    return [(decode, blocks), (encode, [(w,) for w in waves])]


def decode_sample(
    decoder: DacDecodeGraph, batch: int, frames: int, first: int, g: torch.Generator, real: int | None = None
) -> tuple[torch.Tensor, ...]:
    """Feeds of `dac_decoder` for a block of `frames` random codes from frame `first` on (`real` of them
    the item's), with random contexts unless it is the item's first block."""
    arch = decoder.codec.arch
    codes = torch.randint(0, arch.codebook_size, (batch, arch.n_codebooks, frames), generator=g)
    contexts = [0.3 * torch.randn(batch, c, k, generator=g) * (first > 0) for c, k in decoder.contexts]
    where = (torch.full((batch,), first), torch.full((batch,), first + (frames if real is None else real)))
    return (codes, *where, *contexts)


def _quantized_variant(
    float32_step: GraphSpec, samples: list, float32: dict[str, GraphEntry], folder: Path, dtype: str
) -> tuple[dict[str, GraphEntry], float]:
    """The float32 variant with its decoder step quantized, verified against the float32 step's module
    (reused: each step module holds a copy of the fused Q/K/V and output kernels). A QGEMM recipe
    measures the step's activations on `calibration_samples` first.

    The encoder runs once per request, and every step reads the cross-attention K/V it writes: on
    QGEMM it cost the mid model 0.8 points of agreement even with every activation quantized twice
    (2026-12-03), with MatMulNBits 0.7 (int8) and 9 (int4). So every variant shares the float32
    encoder.
    """
    recipe = RECIPES[dtype]
    spec = replace(float32_step, name=f"decoder_step.{dtype}")
    calibration = []
    if recipe.kernel == "qgemm":
        calibration = [feeds(spec.inputs, sample) for sample in calibration_samples(float32_step.module)]
    source = folder / float32["decoder_step"].file.path
    make = partial(quantize_graph, source, folder, spec.name, recipe, calibration)
    step, error = export_verified(spec, samples, folder, QUANTIZED_TOLERANCE[recipe.bits], make)
    return {"encoder": float32["encoder"], "decoder_step": step}, error


def tools_record(errors: dict[str, float], quantization: dict) -> dict:
    """The manifest's `tools`: versions, opset, graph revision, each graph's error against torch."""
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "opset": OPSET,
        "graph_revision": GRAPH_REVISION,
        "python": platform.python_version(),
        "verification_error": errors,
        "quantization": quantization,
    }


def export_model(
    sources: Sources,
    out: str | Path,
    dtypes: tuple[str, ...] = ("float32",),
) -> Manifest:
    """Write every graph for `dtypes` and the codec into `out`, verify each, then the manifest.

    The quantized variants (`export.quantize.RECIPES`) are made from the float32 graphs, which are exported
    (and listed) too when not asked for.
    """
    supported = [*SUPPORTED_DTYPES, *RECIPES]
    unsupported = [d for d in dtypes if d not in supported]
    if unsupported:
        raise ValueError(f"precision {unsupported} cannot be exported yet; supported: {supported}")
    quantized = [d for d in dtypes if d in RECIPES]
    dtypes = tuple(d for d in dtypes if d not in RECIPES)
    if quantized and "float32" not in dtypes:
        dtypes = ("float32", *dtypes)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # a folder re-exported half-way must not look finished
    errors: dict[str, float] = {}
    variants: dict[str, dict[str, GraphEntry]] = {}
    for dtype in sorted(dtypes, key=lambda d: d != "float32"):  # float32 first: quantizing reads it
        dia = DiaModel.from_state(sources.arch, sources.state)  # float32 views of the weights
        if dtype in HALF_DTYPES:
            dia = dia.to(HALF_DTYPES[dtype])  # a copy; the float32 weights stay in `sources`
        graphs = {}
        step = (step_spec(dia, f"decoder_step.{dtype}"), step_samples(dia))
        for spec, samples in ((encoder_spec(dia, f"encoder.{dtype}"), encoder_samples(dia)), step):
            graphs[spec.name.split(".")[0]], errors[spec.name] = export_verified(
                spec, samples, out, TOLERANCE[dtype]
            )
        variants[dtype] = graphs
        if dtype == "float32":
            for name in quantized:
                variants[name], errors[f"decoder_step.{name}"] = _quantized_variant(*step, graphs, out, name)
    codec = {}
    codec_graphs = codec_specs(sources.codec)
    for spec, samples in codec_graphs:
        codec[spec.name], errors[spec.name] = export_verified(spec, samples, out, TOLERANCE["float32"])
    arch = sources.codec.arch
    manifest = Manifest(
        model=sources.arch.model_config(),
        variants=variants,
        codec=codec,
        codec_config=CodecConfig(
            sample_rate=arch.sample_rate,
            hop_length=arch.hop_length,
            n_codebooks=arch.n_codebooks,
            codebook_size=arch.codebook_size,
            decoder_delay=next(s.module for s, _ in codec_graphs if s.name == "dac_decoder").delay,
        ),
        source=sources.provenance,
        tools=tools_record(
            errors, {d: {**asdict(RECIPES[d]), "accuracy_level": ACCURACY_LEVEL} for d in quantized}
        ),
    )
    manifest.save(out)
    agreement = {d: quantization_accuracy(out, d, steps=CARD_STEPS) for d in quantized}
    card = write_model_card(manifest, out, agreement)
    modes_from_umask(out, [*(entry.path for entry in manifest.files()), MANIFEST_NAME, card.name])
    return manifest


def modes_from_umask(folder: Path, names: list[str]) -> None:
    """Give the exported files the mode a new file gets here: ONNX writes external data files 0600,
    which a server running as another user could not read."""
    umask = os.umask(0)
    os.umask(umask)
    for name in names:
        (folder / name).chmod(0o666 & ~umask)
