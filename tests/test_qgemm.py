"""The int8 variant on ONNX Runtime's integer GEMM (export/qgemm.py): exact integer sums, rows that do not
depend on their batch, outlier channels kept in float, and generation that equals itself batched."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import export_tiny
from onnx import TensorProto, helper, numpy_helper

from dia_ort import Dia, integer_gemm
from dia_ort.manifest import Manifest
from dia_ort.scheduler import Scheduler
from export import qgemm
from export.__main__ import parse_args
from export.architecture import TINY
from export.checkpoint import random_state
from export.dia_graphs import step_inputs, step_samples
from export.dia_model import DecoderStepGraph, DiaModel
from export.onnx_export import verify_graph
from export.pipeline import QUANTIZED_TOLERANCE
from export.quant_accuracy import quantization_accuracy
from export.quantize import RECIPES, Recipe, matmul_weights, quantize_graph

OUTLIERS = 3  # channels of TINY's 32 with gains of 20-50


@pytest.fixture(scope="module")
def int8_folder(tmp_path_factory, tiny_state, tiny_codec):
    return export_tiny(tmp_path_factory.mktemp("qgemm"), TINY, tiny_state, tiny_codec, ("int8",))


@pytest.fixture(scope="module")
def outlier_state():
    return random_state(TINY, seed=1, outlier_channels=OUTLIERS)


def one_matmul(weight: np.ndarray) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="matmul")],
        "one_matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", weight.shape[0]])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["rows", weight.shape[1]])],
        [numpy_helper.from_array(weight, "w")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


def quantized_by_the_rules(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """One pass of the module docstring's arithmetic in numpy, the integer sums in int64."""
    scale = np.maximum(np.abs(x).max(axis=-1, keepdims=True), np.finfo(np.float32).tiny)
    q = np.clip(np.rint((x / scale) / np.float32(1 / 127)), -128, 127).astype(np.int64)
    w, column = qgemm.quantize_columns(weight)
    sums = q @ (w.astype(np.int64) - 128)
    return sums.astype(np.float32) * scale * (column / 127)


def test_integer_sums_are_exact_at_the_extremes():
    """Rows and weights at full scale: the uint8 x int8 kernel of AVX2 without VNNI saturates on such
    pairs, the uint8 x uint8 one does not, and MLAS' result equals int64 arithmetic."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((256, 48)).astype(np.float32)
    weight[:, 0] = np.abs(weight[:, 0]) + 1  # a column of large positive weights
    x = rng.standard_normal((7, 256)).astype(np.float32)
    x[0] = np.abs(x[0]).max()  # a row at its own maximum everywhere: every q is 255
    model = qgemm.rewrite(one_matmul(weight), ["matmul"], {"x": np.ones(256, np.float32)})
    np.testing.assert_allclose(run(model, x), quantized_by_the_rules(x, weight), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(run(model, x), x @ weight, rtol=0.03, atol=0.03 * np.abs(x @ weight).max())


def test_a_row_computes_the_same_alone_and_in_any_batch():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((64, 96)).astype(np.float32)
    x = rng.standard_normal((33, 64)).astype(np.float32) * rng.uniform(0.1, 10, (33, 1)).astype(np.float32)
    for two_pass in ((), ("matmul",)):
        model = qgemm.rewrite(one_matmul(weight), ["matmul"], {"x": np.ones(64, np.float32)}, two_pass)
        batch = run(model, x)
        for rows in (slice(0, 1), slice(5, 7), slice(1, 33)):
            np.testing.assert_array_equal(run(model, x[rows]), batch[rows])


def test_two_passes_resolve_heavy_tails_far_better_than_one():
    """A gate-times-up activation: one scale per row leaves most values a few levels."""
    rng = np.random.default_rng(2)
    gate, up = rng.standard_normal((2, 16, 512)).astype(np.float32)
    x = gate * up * (rng.standard_normal((16, 512)) ** 2).astype(np.float32)
    weight = (rng.standard_normal((512, 64)) / np.sqrt(512)).astype(np.float32)
    want = x @ weight
    errors = {}
    for two_pass in ((), ("matmul",)):
        model = qgemm.rewrite(one_matmul(weight), ["matmul"], {"x": np.abs(x).max(axis=0)}, two_pass)
        errors[bool(two_pass)] = np.abs(run(model, x) - want).max() / np.abs(want).max()
    assert errors[True] < errors[False] / 2
    assert errors[True] < 0.01  # the weights' own rounding remains


def test_outlier_channels_are_found_and_kept_in_float():
    rng = np.random.default_rng(3)
    maxima = rng.uniform(0.5, 2, 64).astype(np.float32)
    maxima[[7, 40]] = [60.0, 25.0]
    np.testing.assert_array_equal(qgemm.outlier_channels(maxima), [7, 40])
    assert len(qgemm.outlier_channels(rng.uniform(0.5, 2, 64))) == 0
    crowded = np.ones(64, np.float32)
    crowded[:20] = np.arange(100, 120)
    np.testing.assert_array_equal(qgemm.outlier_channels(crowded), np.arange(12, 20))  # the largest 8 of 64

    weight = rng.standard_normal((64, 32)).astype(np.float32)
    x = rng.standard_normal((5, 64)).astype(np.float32)
    x[:, [7, 40]] *= [60.0, 25.0]
    model = qgemm.rewrite(one_matmul(weight), ["matmul"], {"x": np.abs(x).max(axis=0)})
    ops = [node.op_type for node in model.graph.node]
    assert ops.count("MatMul") == 1 and ops.count("Gather") == 1  # the two channels' float MatMul
    inliers = x.copy()
    inliers[:, [7, 40]] = 0
    want = quantized_by_the_rules(inliers, np.where(np.isin(np.arange(64), [7, 40])[:, None], 0, weight))
    np.testing.assert_allclose(run(model, x), want + x[:, [7, 40]] @ weight[[7, 40]], rtol=1e-5, atol=1e-4)


def test_a_bound_weight_computes_what_its_row_computes_as_a_constant():
    """A MatMul whose weight is a graph input (Dia2's per-stage kernels): its stacked kernels are
    quantized per row as a constant weight is, outliers included, and each row bound gives exactly
    the constant graph's result."""
    rng = np.random.default_rng(5)
    stacked = rng.standard_normal((3, 64, 24)).astype(np.float32)
    x = rng.standard_normal((4, 64)).astype(np.float32)
    x[:, 9] *= 40.0
    maxima = {"x": np.abs(x).max(axis=0)}
    graph = one_matmul(stacked[0]).graph
    del graph.initializer[:]
    graph.input.append(helper.make_tensor_value_info("w", TensorProto.FLOAT, [64, 24]))
    bound = {"w": stacked}
    model = qgemm.rewrite(
        helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), ["matmul"], maxima, (), bound
    )
    assert sorted(bound) == ["w", "w.outliers", "w.scale"] and bound["w"].dtype == np.uint8
    assert [i.name for i in model.graph.input] == ["x", "w", "w.scale", "w.outliers"]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for row in range(3):
        got = session.run(None, {"x": x} | {name: values[row] for name, values in bound.items()})[0]
        np.testing.assert_array_equal(
            got, run(qgemm.rewrite(one_matmul(stacked[row]), ["matmul"], maxima), x)
        )


def test_every_step_matmul_but_the_head_runs_on_qgemm(int8_folder):
    float32 = onnx.load(str(int8_folder / "decoder_step.float32.onnx"), load_external_data=False)
    kinds = matmul_weights(float32.graph)
    model = onnx.load(str(int8_folder / "decoder_step.int8.onnx"), load_external_data=False)
    nodes = {n.name: n for n in model.graph.node}
    weights = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    assert not any(n.op_type == "MatMulNBits" for n in model.graph.node)
    for name, (kind, _) in kinds.items():
        if kind == "head":
            assert nodes[name].op_type == "MatMul"
            continue
        integer = nodes[f"{name}.qgemm.sums"]
        assert integer.op_type == "MatMulInteger"
        assert weights[integer.input[1]].data_type == TensorProto.UINT8
        assert len(integer.input) == 4  # both zero points
        assert (producers[integer.input[0]].op_type == "Concat") == (kind == "down")  # two passes


def test_the_signed_twin_reads_the_same_weights_as_int8(int8_folder):
    entry = Manifest.load(int8_folder).variants["int8"]["decoder_step"]
    assert entry.signed is not None and entry.signed.path == "decoder_step.int8.signed.onnx"
    plain = onnx.load(str(int8_folder / entry.file.path), load_external_data=False)
    twin = onnx.load(str(int8_folder / entry.signed.path), load_external_data=False)
    external = {t.name: list(t.external_data) for t in plain.graph.initializer if t.external_data}
    assert {t.name: list(t.external_data) for t in twin.graph.initializer if t.external_data} == external
    assert entry.signed.size < 1.2 * entry.file.size  # the graph and a few nodes: no weights of its own
    producers = {o: n for n in twin.graph.node for o in n.output}
    integer = [n for n in twin.graph.node if n.op_type == "MatMulInteger"]
    assert integer and all(producers[n.input[1]].op_type == "Cast" for n in integer)
    assert all(n.input[3] == "qgemm.signed_zero_point" for n in integer)


def test_the_signed_twin_equals_int8_bit_for_bit(int8_folder, tiny_state):
    """Where this CPU sums uint8 x int8 exactly (VNNI, AMX), the twin gives int8's every output exactly;
    the export verified it against torch too."""
    if not integer_gemm.signed_sums_exact():
        pytest.skip("this CPU's uint8 x int8 GEMM is not exact (no VNNI or AMX): the twin is never opened")
    entry = Manifest.load(int8_folder).variants["int8"]["decoder_step"]
    model = DiaModel.from_state(TINY, tiny_state)
    inputs = step_inputs(model, rows=3, start=4, cache_slots=12, text_length=9, seed=5, batch=4)
    feeds = dict(zip(entry.inputs, (t.numpy() for t in inputs), strict=True))
    plain, twin = (
        ort.InferenceSession(str(int8_folder / path), providers=["CPUExecutionProvider"]).run(None, feeds)
        for path in (entry.file.path, entry.signed.path)
    )
    for a, b in zip(plain, twin, strict=True):
        np.testing.assert_array_equal(a, b)


def test_the_runtime_opens_the_twin_only_where_its_sums_are_exact(int8_folder, tmp_path, monkeypatch):
    entry = Manifest.load(int8_folder).variants["int8"]["decoder_step"]
    exact = integer_gemm.signed_sums_exact()
    assert integer_gemm.graph_file(entry, on_cpu=True) == (entry.signed.path if exact else entry.file.path)
    assert integer_gemm.graph_file(entry, on_cpu=False) == entry.file.path
    dia = Dia.from_pretrained(int8_folder, compute_dtype="int8", device="cpu")
    assert dia.engine.step_path.name == (entry.signed.path if exact else entry.file.path)
    monkeypatch.setenv(integer_gemm.OVERRIDE, "unsigned")
    assert integer_gemm.graph_file(entry, on_cpu=True) == entry.file.path
    monkeypatch.delenv(integer_gemm.OVERRIDE)
    # a CPU whose sums come out wrong: the probe's weights changed stand in for saturated pairs
    probe = qgemm.probe_model()
    weight = next(t for t in probe.graph.initializer if t.name == "weight")
    weight.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(weight) // 2, "weight"))
    (tmp_path / "probe.onnx").write_bytes(probe.SerializeToString())
    monkeypatch.setattr(integer_gemm, "PROBE", tmp_path / "probe.onnx")
    integer_gemm.signed_sums_exact.cache_clear()
    try:
        assert not integer_gemm.signed_sums_exact()
        assert integer_gemm.graph_file(entry, on_cpu=True) == entry.file.path
    finally:
        integer_gemm.signed_sums_exact.cache_clear()


def test_the_shipped_probe_is_probe_model():
    assert integer_gemm.PROBE.read_bytes() == qgemm.probe_model().SerializeToString()


def test_int8_batches_rows_at_different_positions_bit_for_bit(int8_folder, tiny_state):
    """The graph itself: each row of a batch of rows at different positions gets the logits and cache
    it gets alone, exactly."""
    model = DiaModel.from_state(TINY, tiny_state)
    manifest = Manifest.load(int8_folder)
    names = manifest.variants["int8"]["decoder_step"].inputs
    inputs = [
        t.numpy() for t in step_inputs(model, rows=3, start=4, cache_slots=12, text_length=9, seed=5, batch=4)
    ]
    session = ort.InferenceSession(
        str(int8_folder / "decoder_step.int8.onnx"), providers=["CPUExecutionProvider"]
    )
    together = session.run(None, dict(zip(names, inputs, strict=True)))
    for row in range(4):
        alone = session.run(
            None, {name: value[row : row + 1] for name, value in zip(names, inputs, strict=True)}
        )
        for a, b in zip(together, alone, strict=True):
            np.testing.assert_array_equal(a[row : row + 1], b)


def test_int8_requests_joining_mid_way_get_their_solo_tokens(int8_folder):
    dia = Dia.from_pretrained(int8_folder, compute_dtype="int8", device="cpu")
    texts = ["[S1] Hello there. [S2] Hi.", "[S1] A second, longer request joins later on."]
    prompt = np.random.default_rng(4).integers(0, 1024, size=(6, TINY.decoder.num_channels))
    scheduler = Scheduler(dia, max_batch=2)
    first = scheduler.submit(texts[0], temperature=0, max_new_tokens=25)
    for _ in range(6):
        scheduler.step()
    second = scheduler.submit(texts[1], prompt, seed=3, max_new_tokens=20)
    while scheduler.step():
        pass
    np.testing.assert_array_equal(
        first.codes(), dia.generate_codes(texts[0], temperature=0, max_new_tokens=25)[0]
    )
    want = dia.generate_codes(texts[1], [prompt], seed=3, max_new_tokens=20)[0]
    np.testing.assert_array_equal(second.codes(), want)


def test_outlier_channels_pass_the_exports_tolerance_where_weight_only_int8_does_not(
    tmp_path, outlier_state, tiny_codec, monkeypatch
):
    """Norm gains of 20-50 on a few channels: MatMulNBits' int8 (per-block activation scales) misses
    the tolerance; QGEMM with the outliers in float passes it and follows float32 closely, where the
    same QGEMM with the outliers quantized strays more than ten times as far."""
    folder = export_tiny(tmp_path / "kept", TINY, outlier_state, tiny_codec, ("int8",))
    model = onnx.load(str(folder / "decoder_step.int8.onnx"), load_external_data=False)
    assert sum(node.op_type == "Gather" and node.name.endswith("outlier_x") for node in model.graph.node) > 0
    error = Manifest.load(folder).tools["verification_error"]["decoder_step.int8"]
    assert error <= QUANTIZED_TOLERANCE[8]
    accuracy = quantization_accuracy(folder, "int8")
    assert accuracy.agreement >= 0.95

    dia = DiaModel.from_state(TINY, outlier_state)
    weight_only = quantize_graph(
        folder / "decoder_step.float32.onnx", tmp_path, "weight_only", Recipe(bits=8, block8=128)
    )
    with pytest.raises(RuntimeError, match="differs from torch"):
        verify_graph(
            tmp_path / weight_only.file.path,
            DecoderStepGraph(dia),
            step_samples(dia),
            weight_only.inputs,
            QUANTIZED_TOLERANCE[8],
        )

    monkeypatch.setattr(qgemm, "OUTLIER_RATIO", np.inf)
    monkeypatch.setitem(QUANTIZED_TOLERANCE, 8, 1.0)
    quantized = export_tiny(tmp_path / "quantized", TINY, outlier_state, tiny_codec, ("int8",))
    assert Manifest.load(quantized).tools["verification_error"]["decoder_step.int8"] > 10 * error
    assert quantization_accuracy(quantized, "int8").agreement < accuracy.agreement


def test_recipes_name_their_kernel():
    for bad in (dict(bits=8, kernel="gemm"), dict(bits=4, kernel="qgemm"), dict(bits=8, two_pass=("down",))):
        with pytest.raises(ValueError, match="kernel|two_pass"):
            Recipe(**bad)
    with pytest.raises(ValueError, match="recipe entry"):
        Recipe(bits=8, kernel="qgemm", two_pass=("mlp",))


def test_qgemm_needs_calibration(int8_folder, tmp_path):
    with pytest.raises(ValueError, match="calibration"):
        quantize_graph(int8_folder / "decoder_step.float32.onnx", tmp_path, "step", RECIPES["int8"])


def test_outlier_channels_need_random_weights(capsys):
    for argv in (
        ["--outlier-channels", "3", "--out", "x"],
        ["--random-init", "tiny", "--outlier-channels", "-1", "--out", "x"],
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
        assert "--outlier-channels takes a count" in capsys.readouterr().err
