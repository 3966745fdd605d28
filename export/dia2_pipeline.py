"""A Dia2 checkpoint + Mimi -> an exported model folder of family "dia2": graphs verified, then the manifest.

The graphs: the backbone step and the depformer stage (export/dia2_graphs.py), and Mimi's streaming
decoder and clip encoder (export/mimi.py). Float32, and int8 (`--quantize int8`): both decoder graphs
on ONNX Runtime's integer GEMM (export/qgemm.py) by Dia's int8 recipe, Mimi float32.
"""

from __future__ import annotations

import logging
import shutil
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np
import torch

from dia_ort.dia2_config import Dia2Config
from dia_ort.manifest import MANIFEST_NAME, CodecConfig, FileEntry, GraphEntry, Manifest
from export.dia2_checkpoint import load_checkpoint, preset_config, random_state
from export.dia2_graphs import (
    STAGE_INPUTS,
    save_stage_weights,
    stage_inputs,
    stage_samples,
    stage_spec,
    step_inputs,
    step_samples,
    step_spec,
)
from export.dia2_model import BackboneStepGraph, Dia2Model
from export.dia2_tokenizer import write_tokenizer
from export.mimi import MIMI, TINY_MIMI, MimiCodec, MimiDecodeGraph, MimiEncodeGraph, stream_names
from export.mimi_weights import DEFAULT_MIMI, load_mimi, random_mimi
from export.onnx_export import GraphSpec, feeds
from export.pipeline import (
    QUANTIZED_TOLERANCE,
    TOLERANCE,
    checkpoint_files,
    export_verified,
    local_folder,
    modes_from_umask,
    tools_record,
)
from export.quantize import RECIPES, quantize_graph

log = logging.getLogger(__name__)

RANDOM_MIMI = {"dia2-tiny": TINY_MIMI}  # presets' codecs; the others get Mimi's real shape


TOKENIZER_FILES = (  # a published repo's tokenizer; the runtime reads the first two
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
)


@dataclass(frozen=True)
class Dia2Sources:
    """The weights and tokenizer to export and where they came from (recorded in the manifest)."""

    config: Dia2Config
    state: dict[str, torch.Tensor]
    codec: MimiCodec
    provenance: dict
    tokenizer: Path | None  # a folder holding tokenizer.json; None: the test tokenizer of the config


def copy_tokenizer(source: Path, out: Path) -> list[str]:
    """The tokenizer's files copied from `source` into `out`; their names."""
    if not (source / "tokenizer.json").is_file():
        raise FileNotFoundError(f"no tokenizer.json in {source}: dia_ort.Dia2 reads the tokenizer from it")
    names = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    for name in names:
        if (source / name).resolve() != (out / name).resolve():
            shutil.copyfile(source / name, out / name)
    return names


def dia2_random_sources(preset: str, seed: int) -> Dia2Sources:
    """A preset of `export.dia2_checkpoint.PRESETS` -> random weights, with a random Mimi of its codes."""
    config = preset_config(preset)
    arch = replace(
        RANDOM_MIMI.get(preset, MIMI), num_quantizers=config.codebooks, codebook_size=config.audio_vocab_limit
    )
    provenance = {"random_init": preset, "seed": seed}
    return Dia2Sources(config, random_state(config, seed), random_mimi(arch, seed), provenance, None)


def dia2_checkpoint_sources(folder: Path, model: str, revision: str | None, mimi: str | None) -> Dia2Sources:
    """A Dia2 checkpoint folder (`model` names it: a Hub id or the folder) and Mimi (a Hub id or folder;
    by default the one the checkpoint names, else kyutai/mimi)."""
    config, state = load_checkpoint(folder)
    mimi = mimi or config.mimi or DEFAULT_MIMI
    log.info("loading Mimi from %s", mimi)
    provenance = {"model": model, "revision": revision, "files": checkpoint_files(folder), "mimi": mimi}
    tokenizer = local_folder(config.tokenizer, None) if config.tokenizer else folder
    return Dia2Sources(config, state, load_mimi(local_folder(mimi, None)), provenance, tokenizer)


def mimi_specs(codec: MimiCodec, codebooks: int) -> list[tuple[GraphSpec, list]]:
    decode, encode = MimiDecodeGraph(codec), MimiEncodeGraph(codec, codebooks)
    size, hop = codec.arch.codebook_size, codec.arch.hop_length
    g = torch.Generator().manual_seed(0)
    past, present = stream_names(codec, "past"), stream_names(codec, "present")

    def decode_sample(batch: int, frames: int, offset: int) -> tuple[torch.Tensor, ...]:
        states = [s + 0.1 * torch.randn(s.shape, generator=g) for s in decode.initial_state(batch)]
        codes = torch.randint(0, size, (batch, codebooks, frames), generator=g)
        return (codes, torch.tensor([offset]), *states)

    axes = {"codes": {0: "batch", 2: "frames"}, "waveform": {0: "batch", 1: "samples"}}
    decoder = GraphSpec(
        name="mimi_decoder",
        module=decode,
        example=decode_sample(1, 2, 0),
        inputs=("codes", "offset", *past),
        outputs=("waveform", *present),
        dynamic_axes=axes | {n: {0: "batch"} for n in (*past, *present)},
    )
    encoder = GraphSpec(
        name="mimi_encoder",
        module=encode,
        example=(0.3 * torch.randn(1, 2 * hop, generator=g),),
        inputs=("waveform",),
        outputs=("codes",),
        dynamic_axes={"waveform": {0: "batch", 1: "samples"}, "codes": {0: "batch", 2: "frames"}},
    )
    decode_samples = [decode_sample(1, 1, 0), decode_sample(2, 5, 8), decode_sample(1, 3, 300)]
    encode_samples = [
        (0.3 * torch.randn(b, n, generator=g),) for b, n in ((1, hop), (2, 2 * hop + 7), (1, 333))
    ]
    return [(decoder, decode_samples), (encoder, encode_samples)]


DIA2_DTYPES = ("float32", "int8")


def _calibration(model: Dia2Model) -> tuple[list[tuple[torch.Tensor, ...]], list[tuple[torch.Tensor, ...]]]:
    """Inputs on which the int8 graphs measure their MatMuls' activations: a prefill of 32 frames, and
    every depformer stage on the hidden states it gives (export/qgemm.py keeps outlier channels float)."""
    rows = min(32, model.config.max_context_steps - 2)  # batch row b starts at b % 3
    prefill = step_inputs(model, rows=rows, start=0, cache_slots=rows + 2, seed=21, batch=4)
    with torch.no_grad():
        hidden = BackboneStepGraph(model)(*prefill)[0]
    stages = []
    for stage in range(model.config.depth):
        sample = list(stage_inputs(model, stage, seed=stage, batch=hidden.shape[0]))
        sample[STAGE_INPUTS.index("hidden")] = hidden
        stages.append(tuple(sample))
    return [prefill], stages


def _int8_variant(
    model: Dia2Model,
    specs: tuple[GraphSpec, GraphSpec],
    float32: dict[str, GraphEntry],
    float32_kernels: tuple[dict[str, np.ndarray], dict[str, list[int]]],
    out: Path,
) -> tuple[dict[str, GraphEntry], dict[str, float]]:
    """Both decoder graphs on QGEMM, each verified against its torch module; the stage's kernels are
    quantized as the runtime binds them (`float32_kernels`: the float32 ones stacked, and the row each
    stage reads; one row per weight group, a head per stage); the backbone's heads stay float32 (the
    recipe's `head`)."""
    recipe, tolerance = RECIPES["int8"], QUANTIZED_TOLERANCE[8]
    step, stage = specs
    step_calibration, stage_calibration = _calibration(model)
    graphs, errors = {}, {}
    name = "backbone_step.int8"
    calibration = [feeds(step.inputs, sample) for sample in step_calibration]
    make = partial(quantize_graph, out / float32["backbone_step"].file.path, out, name, recipe, calibration)
    graphs["backbone_step"], errors[name] = export_verified(
        replace(step, name=name), step_samples(model), out, tolerance, make
    )
    name = "depformer_stage.int8"
    kernels, rows = dict(float32_kernels[0]), float32_kernels[1]  # quantize_graph rewrites the copy
    calibration = [feeds(stage.inputs, sample) for sample in stage_calibration]
    make = partial(
        quantize_graph, out / float32["depformer_stage"].file.path, out, name, recipe, calibration, kernels
    )

    def bound(sample: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
        at = int(sample[STAGE_INPUTS.index("stage")][0])  # a kernel's scales and outlier rows go with it
        return {tensor: values[rows[tensor.split(".")[0]][at]] for tensor, values in kernels.items()}

    entry, errors[name] = export_verified(
        replace(stage, name=name), stage_samples(model), out, tolerance, make, bound
    )
    graphs["depformer_stage"] = replace(entry, bound=save_stage_weights(kernels, rows, out, name))
    return graphs, errors


def export_dia2(sources: Dia2Sources, out: str | Path, dtypes: tuple[str, ...] = ("float32",)) -> Manifest:
    """Write and verify Dia2's graphs and Mimi's into `out`, then the manifest (family "dia2"). int8 is
    made from the float32 graphs, which are written too."""
    if not set(dtypes) <= set(DIA2_DTYPES):
        raise ValueError(f"Dia2 exports {list(DIA2_DTYPES)} so far; asked for {list(dtypes)}")
    config, codec = sources.config, sources.codec
    if (codec.arch.codebook_size, codec.arch.num_quantizers) < (config.audio_vocab_limit, config.codebooks):
        raise ValueError(
            f"Mimi has {codec.arch.num_quantizers} codebooks of {codec.arch.codebook_size} codes; this Dia2 needs "
            f"{config.codebooks} of {config.audio_vocab_limit}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST_NAME).unlink(missing_ok=True)  # a folder re-exported half-way must not look finished
    model = Dia2Model.from_state(config, sources.state)
    errors: dict[str, float] = {}
    graphs: dict[str, GraphEntry] = {}
    step, stage = step_spec(model, "backbone_step.float32"), stage_spec(model, "depformer_stage.float32")
    for spec, samples in ((step, step_samples(model)), (stage, stage_samples(model))):
        graphs[spec.name.split(".")[0]], errors[spec.name] = export_verified(
            spec, samples, out, TOLERANCE["float32"]
        )
    stacked = stage.module.stacked_weights()
    kernels = {name: kernel.numpy() for name, (kernel, _) in stacked.items()}
    rows = {name: stage_rows for name, (_, stage_rows) in stacked.items()}
    graphs["depformer_stage"] = replace(
        graphs["depformer_stage"], bound=save_stage_weights(kernels, rows, out, stage.name)
    )
    variants = {"float32": graphs}
    if "int8" in dtypes:
        variants["int8"], int8_errors = _int8_variant(model, (step, stage), graphs, (kernels, rows), out)
        errors |= int8_errors
    mimi = {}
    for spec, samples in mimi_specs(codec, config.codebooks):
        mimi[spec.name], errors[spec.name] = export_verified(spec, samples, out, TOLERANCE["float32"])
    if sources.tokenizer is None:
        names = write_tokenizer(out, config)
    else:
        names = copy_tokenizer(sources.tokenizer, out)
    assets = {name: FileEntry.of(out, name) for name in names}
    arch = codec.arch
    manifest = Manifest(
        family="dia2",
        assets=assets,
        model=config,
        variants=variants,
        codec=mimi,
        codec_config=CodecConfig(arch.sampling_rate, arch.hop_length, config.codebooks, arch.codebook_size),
        source=sources.provenance,
        tools=tools_record(errors, {"int8": asdict(RECIPES["int8"])} if "int8" in dtypes else {}),
    )
    manifest.save(out)
    modes_from_umask(out, [*(entry.path for entry in manifest.files()), MANIFEST_NAME])
    return manifest
