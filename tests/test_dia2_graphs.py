"""Dia2's config, checkpoints and decoder graphs (backbone step, depformer stage) against torch.

The torch modules of `export/dia2_model.py` are checked against nari-labs/dia2's own modules by
`test_modules_equal_the_reference`, where a checkout of the reference is at hand ($DIA2_REFERENCE).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from reference import dia2_reference

from dia_ort.dia2_config import Dia2Config, is_dia2_checkpoint
from export.dia2_checkpoint import (
    PRESETS,
    load_checkpoint,
    preset_config,
    random_state,
    write_checkpoint,
)
from export.dia2_graphs import stage_samples, stage_spec, step_inputs, step_samples, step_spec
from export.dia2_model import BackboneStepGraph, DepformerStageGraph, Dia2Model, stage_kernels
from export.onnx_export import export_graph, feeds, verify_graph


def tree(**changes) -> dict:
    """The tiny tree with `section.key=value` changes (a value of None deletes the key)."""
    result = copy.deepcopy(PRESETS["dia2-tiny"])
    for path, value in changes.items():
        *parents, key = path.split("__")
        node = result
        for parent in parents:
            node = node[parent]
        if value is None:
            del node[key]
        else:
            node[key] = value
    return result


@pytest.fixture(scope="module")
def dia2_model() -> Dia2Model:
    config = preset_config("dia2-tiny")
    return Dia2Model.from_state(config, random_state(config, seed=3))


@pytest.fixture(scope="module")
def dia2_graphs(dia2_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("dia2-graphs")
    step, stage = step_spec(dia2_model, "dia2_step"), stage_spec(dia2_model, "dia2_stage")
    return {
        "step": (step, folder / export_graph(step, folder).file.path),
        "stage": (stage, folder / export_graph(stage, folder).file.path),
    }


def test_config_reads_the_tree_with_the_reference_defaults():
    config = Dia2Config.from_tree(
        tree(
            data__text_zero_token_id=None,
            data__second_stream_ahead=None,
            runtime={},
            model__depformer={**PRESETS["dia2-tiny"]["model"]["depformer"]},
        )
    )
    assert (config.audio_pad_id, config.audio_bos_id, config.text_zero_id) == (33, 32, 7)
    assert config.weights_schedule == (0, 1, 2) and config.max_context_steps == 1500
    assert config.second_stream_ahead == 0 and config.depformer_rope and config.depformer_text_embedding
    assert (config.codebooks, config.depth, config.audio_vocab_limit) == (4, 3, 32)
    assert config.decoder.activations == ("silu", "linear")


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"runtime": None}, "missing its `runtime` section"),
        ({"model": None}, "needs `data` and `model`"),
        ({"data__channels": None}, "missing 'channels'"),
        ({"data__delay_pattern": [0, 1]}, "must give 4 delays"),
        ({"runtime__weights_schedule": [0, 1]}, "for each of the 3 depformer stages"),
        ({"model__depformer__kv_heads": 1}, "needs them equal"),
        ({"model__decoder__kv_heads": 4}, "not a multiple of 4 KV heads"),
        ({"model__decoder__gqa_head_dim": 7}, "even head_dim"),
        ({"model__decoder__n_layer": 0}, "n_layer must be a whole number >= 1"),
        ({"model__linear__mlp_activations": ["tanh", "linear"]}, "mlp_activations must be two of"),
        ({"data__channels": 2, "data__delay_pattern": []}, "needs 2 text streams and audio"),
    ],
)
def test_config_refuses_what_the_model_cannot_be(changes, message):
    with pytest.raises(ValueError, match=message):
        Dia2Config.from_tree(tree(**changes))


def test_checkpoint_round_trips_in_the_published_layout(tmp_path):
    config = preset_config("dia2-tiny")
    state = random_state(config, seed=5)
    folder = write_checkpoint(tmp_path / "ckpt", config, state)
    assert is_dia2_checkpoint(folder) and not is_dia2_checkpoint(tmp_path)
    loaded_config, loaded = load_checkpoint(folder)
    assert loaded_config == config and loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], state[k]) for k in state)
    # dia2_assets.json may name other files
    (folder / "model.safetensors").rename(folder / "weights.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        load_checkpoint(folder)
    (folder / "dia2_assets.json").write_text(json.dumps({"weights": "weights.safetensors"}))
    assert load_checkpoint(folder)[1].keys() == state.keys()


def test_a_state_with_a_missing_or_extra_tensor_is_refused():
    config = preset_config("dia2-tiny")
    state = random_state(config, seed=5)
    del state["depformer.norm.weight"]
    with pytest.raises(RuntimeError, match="depformer.norm.weight"):
        Dia2Model.from_state(config, state)
    state = random_state(config, seed=5) | {"transformer.extra": torch.zeros(1)}
    with pytest.raises(RuntimeError, match="transformer.extra"):
        Dia2Model.from_state(config, state)


@pytest.mark.parametrize("graph", ["step", "stage"])
def test_graphs_compute_what_the_torch_modules_compute(dia2_model, dia2_graphs, graph):
    spec, path = dia2_graphs[graph]
    samples = step_samples(dia2_model) if graph == "step" else stage_samples(dia2_model)
    assert verify_graph(path, spec.module, samples, spec.inputs, tolerance=1e-4) < 1e-4


def test_backbone_prefill_equals_its_single_steps(dia2_model, dia2_graphs):
    """S frames in one call give the caches and last outputs of S calls of one frame each."""
    spec, path = dia2_graphs["step"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    tokens, _, _, *past = step_inputs(dia2_model, rows=5, start=0, cache_slots=8, seed=9)
    positions = torch.arange(5).expand(2, 5)
    whole = session.run(None, feeds(spec.inputs, (tokens, positions, positions, *past)))
    caches = [p.numpy() for p in past]
    for row in range(5):
        names = spec.inputs
        at = positions[:, row : row + 1].numpy()
        inputs = {"tokens": tokens[:, row : row + 1].numpy(), "positions": at, "slots": at}
        single = session.run(None, inputs | dict(zip(names[3:], caches, strict=True)))
        caches = single[3:]
    for a, b in zip(whole, single, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-5)


def test_a_backbone_row_does_not_depend_on_its_batch(dia2_model, dia2_graphs):
    spec, path = dia2_graphs["step"]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    sample = feeds(spec.inputs, step_inputs(dia2_model, rows=2, start=3, cache_slots=8, seed=4, batch=3))
    batched = session.run(None, sample)
    alone = session.run(None, {name: value[1:2] for name, value in sample.items()})
    for a, b in zip(batched, alone, strict=True):
        np.testing.assert_array_equal(a[1:2], b)


def test_modules_equal_the_reference(tmp_path):
    """The published names load into the reference with a strict check, and a frame computes the same:
    the backbone frame by frame against its cache, then every depformer stage of the last frame."""
    config_module, model_module, precision = dia2_reference(
        "dia2.config", "dia2.core.model", "dia2.core.precision"
    )
    load_config, ReferenceModel = config_module.load_config, model_module.Dia2Model
    precision = precision.Precision(torch.float32, torch.float32)
    config = preset_config("dia2-tiny")
    state = random_state(config, seed=11)
    folder = write_checkpoint(tmp_path, config, state)
    reference = ReferenceModel(load_config(folder / "config.json"), precision)
    reference.load_state_dict(state, strict=True)
    reference.eval()
    ours = Dia2Model.from_state(config, dict(state))
    step, stage = BackboneStepGraph(ours), DepformerStageGraph(ours)
    tokens, _, _, *past = step_inputs(ours, rows=6, start=0, cache_slots=10, seed=2)
    past = [torch.zeros_like(p) for p in past]
    decode = reference.init_state(2, torch.device("cpu"), 10)
    with torch.no_grad():
        for t in range(6):
            position = torch.full((2, 1), t)
            want = reference.step_text(tokens[:, t, :, None], position, decode)
            hidden, action, cb0, *past = step(tokens[:, t : t + 1], position, position, *past)
            for a, b in zip(want, (hidden, action, cb0), strict=True):
                torch.testing.assert_close(a[:, 0], b, rtol=0, atol=1e-5)
        p = config.depformer
        caches = [torch.zeros(2, p.heads, config.depth, p.head_dim) for _ in range(2 * p.layers)]
        text = tokens[:, -1, :2]
        previous = tokens[:, -1, 2]
        for s in range(config.depth):
            main, second = (text[:, 0], text[:, 1]) if s == 0 else (None, None)
            want = reference.step_audio_stage(s, previous, hidden[:, None], decode, main, second)
            kernels = stage_kernels(ours, s).values()
            logits, *caches = stage(torch.tensor([s]), previous, hidden, text, *kernels, *caches)
            torch.testing.assert_close(want[:, 0, 0], logits, rtol=0, atol=1e-5)
            previous = logits.argmax(-1)


def test_export_writes_a_dia2_folder_from_random_weights_or_a_checkpoint(tmp_path):
    """`--random-init dia2-tiny` and the same weights as a published checkpoint and Mimi folder give the
    same graphs, in a folder whose manifest names the family; dia_ort.Dia refuses it by name."""
    from dia_ort import Dia
    from dia_ort.manifest import Manifest
    from export.__main__ import main
    from export.dia2_pipeline import dia2_random_sources
    from export.dia2_tokenizer import write_tokenizer
    from export.mimi_weights import save_mimi

    assert main(["--random-init", "dia2-tiny", "--seed", "2", "--out", str(tmp_path / "random")]) == 0
    sources = dia2_random_sources("dia2-tiny", seed=2)
    checkpoint = write_checkpoint(tmp_path / "checkpoint", sources.config, sources.state)
    mimi = save_mimi(sources.codec, tmp_path / "mimi")
    argv = ["--model", str(checkpoint), "--mimi", str(mimi), "--out", str(tmp_path / "published")]
    assert main(argv) == 2  # no tokenizer.json: refused
    assert not (tmp_path / "published" / "dia_ort.json").exists()
    write_tokenizer(checkpoint, sources.config)
    assert main(argv) == 0
    random, published = Manifest.load(tmp_path / "random"), Manifest.load(tmp_path / "published")
    assert random.family == published.family == "dia2"
    assert published.model == sources.config and published.source["mimi"] == str(mimi)
    assert random.files() == published.files()  # the same bytes, file by file
    with pytest.raises(
        ValueError, match="holds a dia2 model, which dia_ort.Dia cannot run: open it with dia_ort.Dia2"
    ):
        Dia.from_pretrained(tmp_path / "published")
    for precision in (["--quantize", "int4"], ["--dtype", "float16"]):  # Dia2 has float32 and int8
        assert main(["--random-init", "dia2-tiny", *precision, "--out", str(tmp_path / "q")]) == 2
    assert not (tmp_path / "q" / "dia_ort.json").exists()
