"""Quantized CPU variants: how they are built, that they run, and how closely they follow float32."""

from __future__ import annotations

import os
import stat

import numpy as np
import onnx
import pytest
from conftest import export_tiny

from dia_ort import Dia, GenerationOptions
from dia_ort.manifest import QUANTIZED_DTYPES, Manifest
from export.architecture import TINY
from export.dia_graphs import step_samples
from export.dia_model import DecoderStepGraph, DiaModel
from export.onnx_export import verify_graph
from export.pipeline import QUANTIZED_TOLERANCE
from export.quant_accuracy import DEFAULT_TEXT, kl_divergence, quantization_accuracy
from export.quantize import (
    ACCURACY_LEVEL,
    KIND_PATTERNS,
    RECIPES,
    Recipe,
    matmul_weights,
    quantize_graph,
)


@pytest.fixture(scope="module")
def quant_folder(tmp_path_factory, tiny_state, tiny_codec):
    """Only the quantized variants asked for: float32 comes along, since they are made from it."""
    return export_tiny(tmp_path_factory.mktemp("quant"), TINY, tiny_state, tiny_codec, tuple(RECIPES))


def test_manifest_lists_quantized_variants_sharing_the_float32_encoder(quant_folder, tiny_state):
    """Each variant records the error it was verified with (the export refuses one past its tolerance:
    test_export_refuses_a_quantized_step_past_its_tolerance), larger than float32's as rounded weights give."""
    manifest = Manifest.load(quant_folder)
    assert set(manifest.variants) == {"float32", *RECIPES}
    errors = manifest.tools["verification_error"]
    model = DiaModel.from_state(TINY, tiny_state)
    for dtype in RECIPES:
        graphs = manifest.variants[dtype]
        assert graphs["decoder_step"].file.path == f"decoder_step.{dtype}.onnx"
        assert graphs["encoder"] == manifest.variants["float32"]["encoder"]
        assert graphs["decoder_step"].inputs == manifest.variants["float32"]["decoder_step"].inputs
        measured = verify_graph(
            quant_folder / graphs["decoder_step"].file.path,
            DecoderStepGraph(model),
            step_samples(model),
            graphs["decoder_step"].inputs,
            tolerance=np.inf,
        )
        assert errors[f"decoder_step.{dtype}"] == pytest.approx(measured, rel=1e-6)
        assert measured > 100 * errors["decoder_step.float32"]


def test_every_exported_file_gets_its_mode_from_the_umask(quant_folder):
    """ONNX writes external data 0600; a server running as another user must read every file."""
    umask = os.umask(0)
    os.umask(umask)
    manifest = Manifest.load(quant_folder)
    names = [entry.path for entry in manifest.files()] + ["dia_ort.json"]
    assert any(name.endswith(".int8.onnx.data") for name in names)
    assert {name: stat.S_IMODE((quant_folder / name).stat().st_mode) for name in names} == dict.fromkeys(
        names, 0o666 & ~umask
    )


def test_export_refuses_a_quantized_step_past_its_tolerance(tmp_path, tiny_state, tiny_codec, monkeypatch):
    monkeypatch.setitem(QUANTIZED_TOLERANCE, 8, 1e-3)  # int8 measures about 0.01 on the tiny model
    with pytest.raises(RuntimeError, match=r"decoder_step\.int8\.onnx: output logits differs from torch"):
        export_tiny(tmp_path, TINY, tiny_state, tiny_codec, ("int8",))


@pytest.mark.parametrize("dtype", [d for d, recipe in RECIPES.items() if recipe.kernel == "nbits"])
def test_each_weight_gets_its_recipes_bits_and_the_tables_stay_float(quant_folder, dtype):
    """int4: the recipe's kinds at 8 bits, the rest at 4; int4-plain: all but the head at 4."""
    float32 = onnx.load(str(quant_folder / "decoder_step.float32.onnx"), load_external_data=False)
    kinds = matmul_weights(float32.graph)
    dia_kinds = set(KIND_PATTERNS) - {"text_in", "stage_in", "stage_head"}  # those three are Dia2's
    assert sorted({kind for kind, _ in kinds.values()}) == sorted(dia_kinds)
    assert len(kinds) == 6 * TINY.decoder.layers + 1  # qkv, o, cross q, cross o, gate_up, down; head
    model = onnx.load(str(quant_folder / f"decoder_step.{dtype}.onnx"), load_external_data=False)
    graph = model.graph
    weights = {t.name: t for t in graph.initializer}
    nodes = {n.name: n for n in graph.node}
    recipe = RECIPES[dtype]
    for name, (kind, layer) in kinds.items():
        bits = recipe.bits_of(kind, layer, TINY.decoder.layers)
        if bits is None:
            assert nodes[name].op_type == "MatMul"
            assert weights[nodes[name].input[1]].data_type == onnx.TensorProto.FLOAT
            continue
        node = nodes[f"{name}_Q{bits}"]
        assert node.op_type == "MatMulNBits"
        attributes = {a.name: a.i for a in node.attribute}
        assert (attributes["bits"], attributes["accuracy_level"], attributes["block_size"]) == (
            bits,
            ACCURACY_LEVEL,
            recipe.block8 if bits == 8 else recipe.block4,
        )
    tables = [n.input[0] for n in graph.node if n.op_type == "Gather" and n.input[0] in weights]
    assert tables
    assert all(weights[t].data_type == onnx.TensorProto.FLOAT for t in tables)


def test_recipes_name_kinds_and_layers():
    recipe = Recipe(bits=4, int8=("qkv", "down@0,-1"))
    assert [recipe.bits_of("qkv", layer, 6) for layer in (0, 5)] == [8, 8]
    assert [recipe.bits_of("down", layer, 6) for layer in (0, 1, 5)] == [8, 4, 8]
    assert recipe.bits_of("o", 0, 6) == 4
    with pytest.raises(ValueError, match="outside the model's 6"):
        Recipe(bits=4, int8=("down@6",)).bits_of("down", 0, 6)
    bad_recipes = (
        dict(bits=3),
        dict(bits=4, int8=("attention",)),
        dict(bits=4, int8=("down@x",)),
        dict(bits=4, block4=48),
    )
    for bad in bad_recipes:
        with pytest.raises(ValueError, match="bits must be 8 or 4|recipe entry|block size must be"):
            Recipe(**bad)
    assert recipe.bits_of("head", None, 6) is None  # float32 unless a recipe says otherwise
    assert RECIPES["int4"].bits_of("head", None, 6) == 8


def test_only_8_and_4_bits(quant_folder, tmp_path):
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_graph(quant_folder / "decoder_step.float32.onnx", tmp_path, "step", Recipe(bits=3))


def test_quantized_variant_generates(quant_folder):
    dia = Dia.from_pretrained(quant_folder, compute_dtype="int8", device="cpu")
    assert dia.compute_dtype == "int8"
    (codes,) = dia.generate_codes("[S1] Hello there.", temperature=0, max_new_tokens=12)
    assert codes.shape == (12, TINY.decoder.num_channels)


def test_kl_divergence_ignores_ids_masked_in_both():
    p = np.array([[0.0, 1.0, -np.inf], [2.0, 2.0, 2.0]], dtype=np.float32)
    q = np.array([[1.0, 0.0, -np.inf], [2.0, 2.0, 2.0]], dtype=np.float32)
    p_probs = np.exp(p[0, :2]) / np.exp(p[0, :2]).sum()
    q_probs = np.exp(q[0, :2]) / np.exp(q[0, :2]).sum()
    want = (p_probs * np.log(p_probs / q_probs)).sum()
    np.testing.assert_allclose(kl_divergence(p, q), [want, 0.0], rtol=1e-6)


def test_float32_against_itself_agrees_fully(quant_folder):
    accuracy = quantization_accuracy(quant_folder, "float32", steps=50)
    assert accuracy.steps == 50
    assert accuracy.agreement == 1.0
    assert accuracy.channel_agreement == (1.0,) * TINY.decoder.num_channels
    assert accuracy.kl == 0.0


def test_int8_follows_float32_closer_than_int4(quant_folder):
    int8, int4 = (quantization_accuracy(quant_folder, dtype) for dtype in ("int8", "int4"))
    stream = Dia(quant_folder, compute_dtype="float32", device="cpu").start(
        [DEFAULT_TEXT], None, GenerationOptions(temperature=0, max_new_tokens=200)
    )
    expected = min(200, sum(1 for _ in stream))  # the float32 stream ends on EOS or at its budget
    assert int8.steps == int4.steps == expected > 100
    assert int8.agreement > 0.9 and 0.5 < int4.agreement < int8.agreement
    assert 0 < int8.kl < int4.kl < 0.05


def test_the_runtime_knows_every_recipe():
    """`--quantize` writes what `compute_dtype` can ask for, and nothing else."""
    assert tuple(RECIPES) == QUANTIZED_DTYPES
