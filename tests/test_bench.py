"""`python -m bench` end to end on a tiny model with float32 and int8 variants, with small counts."""

from __future__ import annotations

import itertools
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import export_tiny
from onnx import numpy_helper

from bench import dac_quantized, kernels, longform
from bench.__main__ import PROMPT_SECONDS, parse_args
from bench.accuracy import measure, sweep, with_recipes
from bench.measure import TEXT, random_codes, step_ms
from bench.overhead import step_overhead
from bench.profile import profile_step
from bench.report import number
from bench.roofline import step_floor_bytes, step_weight_bytes, text_kv_bytes
from dia_ort.codec import DEFAULT_GRID, Codec
from dia_ort.engine import Device
from dia_ort.item import PREFILL_CHUNK
from dia_ort.manifest import Manifest
from dia_ort.text import encode_text
from export.architecture import TINY
from export.quantize import RECIPES

REPO = Path(__file__).resolve().parents[1]


def _table(markdown: str, header_start: str) -> list[list[str]]:
    """The body rows (cells) of the first table whose header line starts with `header_start`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def _positive(cells: list[str]) -> bool:
    return all(float(cell) > 0 for cell in cells if cell != "–")  # a dash: not measured for this engine


@pytest.fixture(scope="module")
def float32_int8_folder(tmp_path_factory, tiny_state, tiny_codec) -> Path:
    return export_tiny(tmp_path_factory.mktemp("bench"), TINY, tiny_state, tiny_codec, ("float32", "int8"))


def test_tiny_benchmark(float32_int8_folder, tmp_path):
    results = tmp_path / "RESULTS.md"
    argv = [sys.executable, "-m", "bench", "--sizes", "tiny", "--model-folder", str(float32_int8_folder)]
    argv += ["--seed", "1"]  # the fixture's weights
    argv += [
        "--steps",
        "2",
        "--batch-steps",
        "4",
        "--stream-frames",
        "40",
        "--skip-dac",
        "--results",
        str(results),
        "--dia2",
        "dia2-tiny",
        "--models",
        str(tmp_path),
    ]
    run = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=420)
    assert run.returncode == 0, run.stderr
    markdown = results.read_text()
    assert "python -m bench --sizes tiny" in markdown and "memory read bandwidth" in markdown

    engines = _table(markdown, "| engine | threads |")
    names = ["dia-ort float32", "dia-ort int8", "transformers float32 sdpa (torch eager)"]
    assert [row[0] for row in engines] == names
    assert all(_positive(row[1:]) for row in engines), engines
    assert engines[0][2] != "–" and engines[0][-2] != "–"  # the runtime's load time and load peak

    batches = _table(markdown, "| engine | batch |")
    assert [row[1] for row in batches] == ["1", "4", "16"] * 2
    assert all(_positive(row[1:]) for row in batches), batches

    streams = _table(markdown, "| engine | frames | first chunk frames |")
    assert [row[0] for row in streams] == names[:2]
    first_steps = max(TINY.delay_pattern) + DEFAULT_GRID.first  # max_delay + the first decode block
    assert all(row[1:4] == ["40", "8", str(first_steps)] and _positive(row[4:]) for row in streams), streams
    assert all(row[7] == number(PROMPT_SECONDS["tiny"]) for row in streams), streams  # with a voice prompt

    error = float(re.search(r"differ by at most (\S+) of their scale", markdown).group(1))
    assert error < 1e-3, "the reference did not run the exported weights"

    accuracy = _table(markdown, "| variant | steps |")
    assert [row[0] for row in accuracy] == ["int8"] and 0 < float(accuracy[0][2]) <= 1
    assert "Not measured: ['int4', 'int4-plain']" in markdown
    text = len(encode_text(TEXT, TINY.encoder.max_length))
    per_text_byte = 2 * TINY.decoder.layers * 2 * TINY.decoder.cross_heads * TINY.decoder.cross_head_dim * 4
    kv = re.search(r"cross-attention K/V a step reads, in every variant: (.*)\.", markdown).group(1)
    assert kv.startswith(f"{number(text * per_text_byte / 1e6)} MB for {text} text bytes"), kv

    dia2 = _table(markdown, "| variant | backbone ms |")
    assert [row[0] for row in dia2] == ["float32", "int8"] and all(_positive(row[1:]) for row in dia2), dia2
    assert "## Dia2 dia2-tiny: backbone 2 layers" in markdown
    # the section says when it was measured: later runs without --dia2 keep it as it is
    assert re.search(r"## Dia2 dia2-tiny[^\n]*\n\n\d{4}-\d\d-\d\d \d\d:\d\d UTC\. Random weights", markdown)
    agreement = re.search(r"int8 picks float32's argmax on (\S+) % of its draws, text (\S+) %", markdown)
    assert 0 < float(agreement.group(1)) <= 100 and 0 < float(agreement.group(2)) <= 100


def test_floor_counts_weights_text_keys_and_cache(float32_int8_folder):
    """Both CFG rows read the text's cross K/V and the cache up to the position, besides the weights."""
    graph = float32_int8_folder / "decoder_step.float32.onnx"
    weights = step_weight_bytes(graph)
    d = TINY.decoder
    per_row = 9 * d.hidden * 4  # one embedding row per channel's token
    text_kv = 30 * d.layers * 2 * d.cross_heads * d.cross_head_dim * 4  # 30 text bytes of cross K/V
    per_row += text_kv + 21 * d.layers * 2 * d.kv_heads * d.head_dim * 4  # and cache slots 0..20
    assert step_floor_bytes(graph, weights, text_bytes=30, position=20) == weights + 2 * per_row
    assert text_kv_bytes(graph, 30) == 2 * text_kv


@pytest.mark.parametrize("requests", [1, 3])
def test_step_profile_sums_its_operator_types(float32_int8_folder, requests):
    result = profile_step(float32_int8_folder, "int8", threads=1, steps=2, position=4, requests=requests)
    assert result["requests"] == requests
    assert result["nodes"] == sum(op["nodes"] for op in result["ops"]) > 0
    assert abs(sum(op["share"] for op in result["ops"]) - 1) < 1e-6
    assert "MatMulInteger" in {op["op"] for op in result["ops"]}  # the int8 weights (QGEMM)


def test_a_step_time_is_one_prefill_then_one_row_per_position():
    """`step_ms` fills the cache up to the position with one prefill, then times one-row steps there."""
    fed = []

    class Recording:
        def step(self, tokens, start):
            fed.append((tokens.shape[1], start))
            np.testing.assert_array_equal(tokens, rows[:, start : start + tokens.shape[1]])

    rows = random_codes(2, 30, TINY.decoder.num_channels)
    assert step_ms(Recording(), rows, position=20, steps=5) >= 0
    assert fed == [(20, 0)] + [(1, row) for row in range(20, 25)]


def test_step_overhead_runs_the_runtimes_rows(float32_int8_folder):
    manifest = Manifest.load(float32_int8_folder)
    assert step_overhead(float32_int8_folder, manifest, "int8", threads=1, steps=3) > 0


def test_recipes_are_measured_from_the_float32_step_without_touching_the_folder(
    float32_int8_folder, tmp_path
):
    before = sorted(p.name for p in float32_int8_folder.iterdir())
    recipes = {"int4-plain": RECIPES["int4-plain"], "int4": RECIPES["int4"]}
    folder = with_recipes(float32_int8_folder, recipes, tmp_path)
    rows = measure(folder, ["int4-plain", "int4"], steps=20, recipes=recipes)
    assert sorted(p.name for p in float32_int8_folder.iterdir()) == before
    plain, mixed = rows
    assert plain["steps"] == mixed["steps"] == 20
    assert plain["recipe"] == asdict(RECIPES["int4-plain"])
    float32_bytes = step_weight_bytes(float32_int8_folder / "decoder_step.float32.onnx")
    # the tiny model's bytes are mostly its head: float32 in plain int4, 8 bits in the mixed recipe
    assert mixed["step_bytes"] < plain["step_bytes"] < float32_bytes
    assert 0 < plain["agreement"] <= 1 and 0 < mixed["agreement"] <= 1


def test_the_sweep_puts_each_kind_and_each_layer_at_8_bits_in_turn():
    recipes = sweep(layers=2)
    assert recipes["int4-plain"] == RECIPES["int4-plain"]
    assert recipes["int4 + down int8"].bits_of("down", 1, 2) == 8
    assert recipes["int4 + down int8"].bits_of("qkv", 1, 2) == 4
    assert recipes["int4 + head int8"].bits_of("head", None, 2) == 8
    layer = recipes["int4 + layer 1 int8"]
    assert [layer.bits_of("gate_up", n, 2) for n in (0, 1)] == [4, 8]
    assert len(recipes) == 1 + 6 + 1 + 2  # plain, six kinds, the head, two layers


def test_kernel_copies_each_read_their_own_weights():
    """Every copy of the MatMul holds other bytes (identical pages can be merged and read faster than
    memory), and each output is its own copy's product."""
    model, nbytes = kernels.copies(kernels.one_matmul(32, 16), total_bytes=3 * 32 * 16 * 4)
    weights = [numpy_helper.to_array(w) for w in model.graph.initializer]
    assert len(weights) == 3 and nbytes == 3 * 32 * 16 * 4
    assert all(not np.array_equal(a, b) for a, b in itertools.combinations(weights, 2))
    x = np.random.default_rng(0).standard_normal((2, 32), dtype=np.float32)
    outputs = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    for y, w in zip(outputs, weights, strict=True):
        np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-6)


def test_kernel_table_has_every_format_thread_and_row_count(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "RUNS", 1)
    monkeypatch.setattr(
        kernels, "FORMATS", (kernels.WeightFormat(), kernels.WeightFormat(4, 32, zero_points=True))
    )
    results = tmp_path / "RESULTS.md"
    argv = ["--shape", "64", "32", "--gigabytes", "0.0001", "--threads", "1", "--rows", "1", "2"]
    assert kernels.main([*argv, "--results", str(results)]) == 0
    rows = _table(results.read_text(), "| format | threads |")
    assert [row[:3] for row in rows] == [
        [name, "1", count]
        for name in ("float32 MatMul", "4-bit, block 32, zero points, level 4")
        for count in "12"
    ]
    assert all(_positive(row[3:]) for row in rows), rows


def test_snr_is_signal_over_noise_power_in_decibels():
    signal = np.sin(np.linspace(0, 100, 10_000)).astype(np.float32)
    assert dac_quantized.snr_db(signal, signal) == float("inf")
    assert dac_quantized.snr_db(signal, 1.01 * signal) == pytest.approx(40.0)


def test_quantized_codec_paths_run_integer_convolutions_and_are_compared_with_float32(tiny_folder, tmp_path):
    manifest = Manifest.load(tiny_folder)
    graph = tiny_folder / manifest.codec["dac_decoder"].file.path
    codec = Codec(tiny_folder, manifest, Device("cpu"))
    paths = dac_quantized.quantized_decoders(codec, graph, tmp_path)
    ops = {
        name: {node.op_type for node in onnx.load(path, load_external_data=False).graph.node}
        for name, path in paths.items()
    }
    assert "ConvInteger" in ops["dynamic"] and "Conv" not in ops["dynamic"]
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops["static"]
    result = dac_quantized.measure(tiny_folder, seconds=0.1, repeats=1, threads=1)
    assert result["frames"] == 9 and result["float32_s"] > 0
    for name in paths:
        assert result[name]["speedup"] > 0 and np.isfinite(result[name]["snr_db"])


def test_longform_times_a_chained_parts_prefill_apart_from_its_decoding(tiny_folder):
    frames = PREFILL_CHUNK + 6  # the previous part: a prefill of two chunks
    result = longform.measure(tiny_folder, "float32", frames, threads=1, repeats=1)
    assert result["prompt_frames"] == frames and result["prefill_chunks"] == 2
    assert 1 <= result["decode_steps"] <= frames + max(TINY.delay_pattern)
    assert result["decode_s"] > 0
    assert result["prefill_share"] == pytest.approx(result["prefill_s"] / result["decode_s"])


def test_dia2_shapes_are_measured_beside_dia_on_the_cpu_only(capsys):
    """bench/dia2_speed.py runs Dia2 on the CPU, so a CUDA run must not put CPU figures in its report."""
    assert parse_args([]).dia2 == ["dia2-bench"]
    assert parse_args(["--device", "cuda"]).dia2 == []
    assert parse_args(["--device", "cuda", "--dia2"]).dia2 == []
    with pytest.raises(SystemExit):
        parse_args(["--device", "cuda", "--dia2", "dia2-bench"])
    assert "--dia2 measures Dia2 on the CPU" in capsys.readouterr().err
