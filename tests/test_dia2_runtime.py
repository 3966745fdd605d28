"""`dia_ort.Dia2`: the reference's script parser, state machine, sampler and generation loop.

Exactness: generation equals nari-labs/dia2's token for token on random checkpoints of two shapes,
greedy and sampled (the same draws substituted on both sides). Where a checkout of the reference is given ($DIA2_REFERENCE) both run here; everywhere, the
tokens equal the reference's as recorded in tests/data/dia2_reference.json by `record_reference`.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from reference import dia2_reference

from dia_ort.audio import StreamResampler
from dia_ort.dia2 import Dia2, GenerationConfig, PrefixConfig, SamplingConfig, Speaker, Word
from dia_ort.dia2 import batch as dia2_batch
from dia_ort.dia2.model import MimiDecoder
from dia_ort.dia2.prefix import spread_words
from dia_ort.dia2.sampling import guide, lerp, mask_ids, sample
from dia_ort.dia2.script import parse_script
from dia_ort.dia2.stage_weights import StageWeights
from dia_ort.dia2.state_machine import Entry, StateMachine, TokenIds
from dia_ort.dia2_config import Dia2Config
from dia_ort.integer_gemm import signed_sums_exact
from dia_ort.manifest import Manifest
from dia_ort.scheduler import Scheduler
from export.dia2_checkpoint import PRESETS, random_state, write_checkpoint
from export.dia2_graphs import stage_inputs, stage_spec
from export.dia2_model import Dia2Model
from export.dia2_pipeline import Dia2Sources, dia2_random_sources, export_dia2
from export.dia2_tokenizer import write_tokenizer
from export.mimi_weights import save_mimi
from export.onnx_export import verify_graph
from export.pipeline import QUANTIZED_TOLERANCE

GOLDEN = Path(__file__).parent / "data" / "dia2_reference.json"
IDS = TokenIds(new_word=4, pad=3, bos=1, zero=7, spk1=5, spk2=6)
GREEDY = GenerationConfig(text=SamplingConfig(0.0, 50), audio=SamplingConfig(0.0, 50))
SAMPLED = GenerationConfig(text=SamplingConfig(0.9, 3), audio=SamplingConfig(0.8, 5))
# a case: its settings, and for a prefix of both speakers' clips whether the output keeps their audio
CASES = {
    "greedy": (GREEDY, None),
    "sampled": (SAMPLED, None),
    "prefix": (GREEDY, False),
    "prefix-kept": (SAMPLED, True),
}
CLIP_WORDS = {  # what "Whisper" hears in each speaker's clip
    1: [Word("hello", 0.1, 0.3), Word("there,", 0.35, 0.7)],
    2: [Word("how", 0.05, 0.2), Word("are", 0.25, 0.55)],
}


def write_clips(root: Path) -> dict[int, Path]:
    """Both speakers' clips: 24 kHz 16-bit WAVs of smoothed noise, 0.9 and 0.7 s."""
    import soundfile as sf

    rng, clips = np.random.default_rng(0), {}
    for speaker, seconds in ((1, 0.9), (2, 0.7)):
        noise = rng.standard_normal(int(24000 * seconds))
        clips[speaker] = root / f"speaker{speaker}.wav"
        sf.write(clips[speaker], 0.3 * np.convolve(noise, np.ones(8) / 8, "same"), 24000, subtype="PCM_16")
    return clips


class QuantileDraw:
    """A draw both implementations can make: the i-th call takes the quantile frac(i x golden ratio) of
    the probabilities it is given (in their order), summed in float64."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, probs: np.ndarray) -> int:
        self.calls += 1
        cdf = np.cumsum(probs.astype(np.float64))
        quantile = (self.calls * 0.6180339887498949) % 1.0
        return int(min(np.searchsorted(cdf, quantile * cdf[-1], side="right"), len(probs) - 1))


SCRIPT = '[S1] Hello there, how are you today? [S2] I am fine. <break time="0.5s"/> [S1] Good!'


def odd_tree() -> dict:
    """Another shape: no second stream, a low-rank text table, GELU gates, a depformer without RoPE or
    text embedding whose stages share one weight group."""
    tree = copy.deepcopy(PRESETS["dia2-tiny"])
    tree["data"]["second_stream_ahead"] = 0
    tree["model"]["decoder"] |= {"low_rank_dim": 16, "n_layer": 3}
    tree["model"]["linear"]["mlp_activations"] = ["gelu", "linear"]
    tree["model"]["depformer"] |= {"apply_rope": False, "text_embedding": False, "n_layer": 1}
    tree["runtime"]["weights_schedule"] = [0, 0, 0]
    return tree


SHAPES = {"tiny": lambda: dia2_random_sources("dia2-tiny", seed=7)}


def _odd_sources() -> Dia2Sources:
    config = Dia2Config.from_tree(odd_tree())
    tiny = dia2_random_sources("dia2-tiny", seed=8)
    return replace(tiny, config=config, state=random_state(config, seed=8), provenance={"random_init": "odd"})


SHAPES["odd"] = _odd_sources


@pytest.fixture(scope="module", params=sorted(SHAPES))
def dia2_case(request, tmp_path_factory) -> tuple[str, Path, Dia2Sources]:
    """An exported folder and, beside it, the same weights as a published checkpoint and Mimi folder."""
    root = tmp_path_factory.mktemp(f"dia2-{request.param}")
    sources = SHAPES[request.param]()
    export_dia2(sources, root / "exported", ("float32", "int8"))
    checkpoint = write_checkpoint(root / "checkpoint", sources.config, sources.state)
    write_tokenizer(checkpoint, sources.config)
    save_mimi(sources.codec, root / "mimi")
    write_clips(root)
    return request.param, root, sources


# -- the script and the state machine ------------------------------------------------------------


def test_the_script_becomes_one_entry_per_word():
    words = {"hello": [10], "there": [11], ",": [12]}

    def encode(text: str) -> list[int]:
        tags = {"[S1]": [IDS.spk1], "[S2]": [IDS.spk2]}
        return [i for part in text.split() for i in tags.get(part, words.get(part, [99]))]

    entries = parse_script('[S1] hello  there <break time="0.4s"/>[S2] hello', encode, IDS, 12.5)
    assert [(e.tokens, e.text, e.padding) for e in entries] == [
        ([IDS.spk1, 10], "hello", 2),
        ([11], "there", 1),
        ([], "", 5),  # round(0.4 x 12.5)
        ([IDS.spk2, 10], "hello", 2),
    ]
    # the reference gives the first word [S1]'s token, before [S2]'s when the script opens with [S2]
    assert parse_script("[S2] there", encode, IDS, 12.5)[0].tokens == [IDS.spk1, IDS.spk2, 11]
    assert parse_script("it\u2019s: x", encode, IDS, 12.5)[1].text == "x"


def test_the_machine_feeds_a_word_after_the_model_starts_it():
    machine = StateMachine(IDS, second_stream_ahead=0, max_padding=2, initial_padding=1)
    state = machine.new_state([Entry([20, 21], "ab", padding=1), Entry([22], "c", padding=0)])
    frames = [machine.process(t, state, action) for t, action in enumerate([1, 1, 0, 0, 0, 0, 0, 0, 0, 1])]
    mains = [main for main, _ in frames]
    # frame 0: an initial pad is forced; frame 1: "ab" starts, then its tokens go out one a frame, each
    # spending the pad budget of 2; with none left, frame 4 is forced to start "c"; frame 7, with no word
    # left, is the end
    assert mains[:6] == [IDS.pad, IDS.new_word, 20, 21, IDS.new_word, 22]
    assert state.transcript == [("ab", 1), ("c", 4)] and state.end_step == 7
    assert all(main == second for main, second in frames)  # no second stream: it repeats the first


def test_the_second_stream_runs_ahead_by_words():
    machine = StateMachine(IDS, second_stream_ahead=1)
    state = machine.new_state([Entry([20], "a", 0), Entry([21, 22], "b", 0), Entry([23], "c", 0)])
    main, second = machine.process(0, state, 1)
    assert (main, second) == (20, IDS.new_word)  # the word's first token comes with the new word
    assert machine.process(1, state, 0) == (IDS.pad, 21)  # the next word's tokens on the second stream


def test_a_script_in_pieces_gives_the_entries_of_the_whole():
    """Cut anywhere (mid-word, mid-tag, mid-space), the reader gives the whole script's entries."""
    from dia_ort.dia2.script import ScriptReader

    def encode(text: str) -> list[int]:
        return [len(word) for word in text.split()]

    whole = parse_script(SCRIPT, encode, IDS, 12.5)
    for size in (1, 2, 3, 7, 11):
        reader = ScriptReader(encode, IDS, 12.5)
        entries = [e for i in range(0, len(SCRIPT), size) for e in reader.feed(SCRIPT[i : i + size])]
        assert entries + reader.close() == whole, size


# -- the sampler ---------------------------------------------------------------------------------


def test_guidance_keeps_the_conditional_logits_on_the_guided_top_k():
    cond = np.array([1.0, 5.0, 2.0, 0.0], np.float32)
    uncond = np.array([3.0, 5.0, 0.0, 0.0], np.float32)
    guided = lerp(uncond, cond, 2.0)  # 2 cond - uncond: [-1, 5, 4, 0]
    np.testing.assert_array_equal(guided, [-1, 5, 4, 0])
    out = guide(np.stack([cond, uncond]), 2.0, 2)
    np.testing.assert_array_equal(out, [-np.inf, 5, 2, -np.inf])
    np.testing.assert_array_equal(guide(np.stack([cond, uncond]), 1.0, 2), cond)  # scale 1: no guidance
    assert mask_ids(cond, (3, 9))[3] == np.finfo(np.float32).min


def test_sampling_is_argmax_at_temperature_zero_and_draws_among_the_top_k():
    logits = np.array([0.0, 3.0, 2.0, 1.0], np.float32)
    assert sample(logits, SamplingConfig(0.0, 2), lambda p: pytest.fail("no draw at temperature 0")) == 1
    seen = []
    assert sample(logits, SamplingConfig(1.0, 2), lambda p: seen.append(p) or 1) == 2
    np.testing.assert_allclose(seen[0], np.exp([3, 2]) / np.exp([3, 2]).sum(), rtol=1e-6)


# -- generation against the reference ------------------------------------------------------------


def _ours(root: Path, case: str):
    config, include = CASES[case]
    prefix = None
    if include is not None:
        speakers = [Speaker(root / f"speaker{i}.wav", CLIP_WORDS[i]) for i in (1, 2)]
        prefix = PrefixConfig(*speakers, include_audio=include)
    return Dia2(root / "exported", device="cpu").generate(
        SCRIPT, config=config, draw=QuantileDraw(), prefix=prefix
    )


def _reference_result(root: Path, case: str):
    """nari-labs/dia2's own `generate` on the checkpoint folder (CPU, float32), from $DIA2_REFERENCE."""
    dia2, voice_clone, codec = dia2_reference("dia2", "dia2.runtime.voice_clone", "dia2.audio.codec")
    MimiCodec = codec.MimiCodec
    config, include = CASES[case]

    def transcribe(path, device):  # noqa: ARG001
        speaker = 1 if Path(path).name == "speaker1.wav" else 2
        return [voice_clone.WhisperWord(w.text, w.start, w.end) for w in CLIP_WORDS[speaker]]

    voice_clone.transcribe_words = transcribe

    def decode(self, codes):  # transformers 5 returns a 1-tuple where the reference unpacks two values
        with torch.inference_mode():
            return torch.clamp(self.model.decode(codes.to(self.device), return_dict=False)[0], -1.0, 1.0)

    MimiCodec.decode = decode
    draw, multinomial = QuantileDraw(), torch.multinomial
    reference_config = dia2.GenerationConfig(
        text=dia2.SamplingConfig(config.text.temperature, config.text.top_k),
        audio=dia2.SamplingConfig(config.audio.temperature, config.audio.top_k),
        cfg_scale=config.cfg_scale,
        cfg_filter_k=config.cfg_filter_k,
        initial_padding=config.initial_padding,
    )
    model = dia2.Dia2.from_local(
        root / "checkpoint" / "config.json",
        root / "checkpoint" / "model.safetensors",
        tokenizer_id=str(root / "checkpoint"),
        mimi_id=str(root / "mimi"),
        device="cpu",
        dtype="float32",
    )
    torch.multinomial = lambda probs, num_samples: torch.tensor([[draw(probs.reshape(-1).double().numpy())]])
    try:
        if include is None:
            result = model.generate(SCRIPT, config=reference_config)
        else:
            clips = {f"prefix_speaker_{i}": str(root / f"speaker{i}.wav") for i in (1, 2)}
            result = model.generate(SCRIPT, config=reference_config, include_prefix=include, **clips)
    finally:
        torch.multinomial = multinomial
    return result.audio_tokens[0].numpy(), result.waveform.numpy(), result.timestamps


@pytest.mark.parametrize("case", sorted(CASES))
def test_generation_equals_the_recorded_reference(dia2_case, case):
    """Greedy, and sampled with the same draws substituted on both sides; with and without a prefix."""
    name, root, _ = dia2_case
    golden = json.loads(GOLDEN.read_text())[name][case]
    ours = _ours(root, case)
    np.testing.assert_array_equal(ours.audio_tokens, np.array(golden["audio_tokens"]))
    assert [(w, round(s, 6)) for w, s in ours.timestamps] == [(w, s) for w, s in golden["timestamps"]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_generation_equals_the_reference_run_here(dia2_case, case):
    name, root, _ = dia2_case
    tokens, waveform, timestamps = _reference_result(root, case)
    ours = _ours(root, case)
    np.testing.assert_array_equal(ours.audio_tokens, tokens)
    assert [w for w, _ in ours.timestamps] == [w for w, _ in timestamps]
    assert [s for _, s in ours.timestamps] == pytest.approx([s for _, s in timestamps])
    np.testing.assert_allclose(ours.waveform, waveform, rtol=0, atol=1e-4)
    assert ours.sample_rate == 24000


def record_reference(roots: dict[str, Path]) -> None:
    """Write tests/data/dia2_reference.json from the reference's runs (by hand, with $DIA2_REFERENCE)."""
    record: dict[str, dict] = {}
    for name, root in roots.items():
        for case in CASES:
            tokens, _, timestamps = _reference_result(root, case)
            stamps = [[word, round(second, 6)] for word, second in timestamps]
            record.setdefault(name, {})[case] = {"audio_tokens": tokens.tolist(), "timestamps": stamps}
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(record) + "\n")


# -- streaming -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_a_stream_is_generate_chunk_by_chunk(dia2_case, dtype):
    model = Dia2(dia2_case[1] / "exported", compute_dtype=dtype)
    plain = model.generate(SCRIPT, seed=5)
    stream = model.stream(SCRIPT, seed=5, chunk_frames=3)
    chunks = list(stream)
    hop = model.manifest.codec_config.hop_length
    sizes = [len(c) for c in chunks]
    assert sizes[0] == hop and sizes[1:-1] == [3 * hop] * (len(chunks) - 2) and 0 < sizes[-1] <= 3 * hop
    assert np.array_equal(np.concatenate(chunks), stream.result.waveform)
    np.testing.assert_array_equal(stream.result.audio_tokens, plain.audio_tokens)
    assert stream.result.timestamps == plain.timestamps
    # generate joins chunks of CHUNK_FRAMES: bit for bit the same samples as a stream of that size
    assert np.array_equal(plain.waveform, np.concatenate(list(model.stream(SCRIPT, seed=5))))
    np.testing.assert_allclose(np.concatenate(chunks), plain.waveform, rtol=0, atol=1e-5)


def test_text_in_pieces_speaks_as_the_whole_script(dia2_case):
    """An iterator of pieces, cut mid-word and mid-tag, gives the whole script's codes and samples."""
    model = Dia2(dia2_case[1] / "exported")
    whole = model.generate(SCRIPT, seed=6)
    pieces = model.generate((SCRIPT[i : i + 5] for i in range(0, len(SCRIPT), 5)), seed=6)
    np.testing.assert_array_equal(pieces.audio_tokens, whole.audio_tokens)
    assert np.array_equal(pieces.waveform, whole.waveform) and pieces.timestamps == whole.timestamps


def test_audio_comes_before_the_text_has_all_arrived(dia2_case):
    """Streaming both ways: the first chunk is out while most of a long script is still to come."""
    model = Dia2(dia2_case[1] / "exported")
    words = ("[S1] hello there how are you today " * 6).split(" ")
    read = []

    def pieces():
        for word in words:
            read.append(word)
            yield word + " "

    stream = model.stream(pieces(), seed=1)
    next(stream)
    at_first_audio = len(read)
    assert at_first_audio < len(words) / 4
    assert list(stream) and len(read) > at_first_audio  # the rest was read while audio came out


# -- int8 ----------------------------------------------------------------------------------------


def test_the_int8_stage_on_the_kernels_the_runtime_binds_follows_torch(dia2_case):
    """The int8 depformer stage runs every kernel it is bound on QGEMM (the output heads too: a frame
    reads one per stage), and with the kernels the runtime loads for each stage (StageWeights) it
    computes what the float32 torch stage computes, within the export's int8 tolerance."""
    _, root, sources = dia2_case
    folder = root / "exported"
    entry = Manifest.load(folder).variants["int8"]["depformer_stage"]
    graph = onnx.load(str(folder / entry.file.path), load_external_data=False)
    bound = {i.name for i in graph.graph.input}
    matmuls = [n for n in graph.graph.node if n.op_type in ("MatMul", "MatMulInteger")]
    weighted = [n.op_type for n in matmuls if n.input[1] in bound]
    assert weighted == ["MatMulInteger"] * (2 + 2 * sources.config.depformer.layers)
    model = Dia2Model.from_state(sources.config, sources.state)
    spec = stage_spec(model, "stage")
    kernels = StageWeights(folder / entry.bound.path, sources.config.depth, {})

    def kernels_of(sample: tuple[torch.Tensor, ...]) -> dict[str, np.ndarray]:
        return {name: value.numpy() for name, value in kernels[int(sample[0][0])].items()}

    samples = [stage_inputs(model, stage, seed=stage) for stage in range(sources.config.depth)]
    tolerance = QUANTIZED_TOLERANCE[8]
    assert (
        verify_graph(folder / entry.file.path, spec.module, samples, spec.inputs, tolerance, kernels_of) > 0
    )


def test_the_signed_stage_on_its_flipped_kernels_equals_the_int8_stage(dia2_case):
    """The depformer stage's signed twin takes its bound kernels as int8 inputs; on the kernels
    StageWeights flips for it, it gives the int8 stage's outputs bit for bit where this CPU sums uint8 x
    int8 exactly."""
    _, root, sources = dia2_case
    folder = root / "exported"
    entry = Manifest.load(folder).variants["int8"]["depformer_stage"]
    twin = ort.InferenceSession(str(folder / entry.signed.path), providers=["CPUExecutionProvider"])
    types = {i.name: i.type for i in twin.get_inputs()}
    signed = StageWeights(folder / entry.bound.path, sources.config.depth, types)
    plain = StageWeights(folder / entry.bound.path, sources.config.depth, {})
    flipped = [name for name, array in signed.arrays.items() if array.dtype == np.int8]
    assert flipped and all(types[name] == "tensor(int8)" for name in flipped)
    for name in flipped:
        np.testing.assert_array_equal(signed.arrays[name].astype(np.int16) + 128, plain.arrays[name])
    if not signed_sums_exact():
        pytest.skip("this CPU's uint8 x int8 GEMM is not exact (no VNNI or AMX): the twin is never opened")
    session = ort.InferenceSession(str(folder / entry.file.path), providers=["CPUExecutionProvider"])
    model = Dia2Model.from_state(sources.config, sources.state)
    names = stage_spec(model, "stage").inputs
    for stage in range(sources.config.depth):
        sample = dict(zip(names, (t.numpy() for t in stage_inputs(model, stage, seed=stage)), strict=True))
        want = session.run(None, sample | {k: v.numpy() for k, v in plain[stage].items()})
        got = twin.run(None, sample | {k: v.numpy() for k, v in signed[stage].items()})
        for a, b in zip(want, got, strict=True):
            np.testing.assert_array_equal(a, b)


def test_the_accuracy_benchmark_forces_the_picks_it_compares(dia2_case):
    """bench.dia2_accuracy's teacher forcing: a run forced to its own picks agrees on every draw, and
    int8 forced to float32's makes the same draws (frame by frame: the text action, codebook 0, each
    stage)."""
    from bench.dia2_accuracy import UNFILTERED, Picks

    folder = dia2_case[1] / "exported"
    first = Picks()
    model = Dia2(folder)
    model.generate(SCRIPT, UNFILTERED, draw=first)
    again = Picks(first.picks)
    model.generate(SCRIPT, UNFILTERED, draw=again)
    assert len(again.agreed) == len(first.picks) and all(again.agreed)
    assert len(first.picks) % (2 + model.config.depth) == 0
    int8 = Picks(first.picks)
    Dia2(folder, compute_dtype="int8").generate(SCRIPT, UNFILTERED, draw=int8)
    assert len(int8.agreed) == len(first.picks)


def test_a_variant_or_kernels_file_missing_is_named(dia2_case, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(dia2_case[1] / "exported", folder)
    with pytest.raises(ValueError, match=r"has \['float32', 'int8'\].*--quantize int8"):
        Dia2(folder, compute_dtype="int4")
    manifest = json.loads((folder / "dia_ort.json").read_text())
    del manifest["variants"]["float32"]["depformer_stage"]["bound"]
    (folder / "dia_ort.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="older dia-ort.*re-export"):
        Dia2(folder)
    Dia2(folder, compute_dtype="int8")  # the other variant is whole


def test_a_kernels_file_without_a_row_for_each_stage_is_refused(dia2_case, tmp_path):
    """StageWeights reads what the export wrote, and refuses a file without its rows' metadata, or
    whose rows do not cover every stage, naming the file."""
    from safetensors.numpy import save_file

    folder, depth = dia2_case[1] / "exported", dia2_case[2].config.depth
    entry = Manifest.load(folder).variants["float32"]["depformer_stage"]
    kernels = StageWeights(folder / entry.bound.path, depth, {})
    assert sorted(kernels[0]) == sorted(kernels.arrays)
    path = tmp_path / "kernels.safetensors"
    save_file({"logits_head": np.zeros((depth, 2, 3), np.float32)}, str(path))
    with pytest.raises(ValueError, match="kernels.safetensors holds no depformer stage kernels"):
        StageWeights(path, depth, {})
    for rows in ([0] * (depth - 1), [depth] * depth):
        save_file(
            {"logits_head": np.zeros((depth, 2, 3), np.float32)},
            str(path),
            {"stage_rows": json.dumps({"logits_head": rows})},
        )
        with pytest.raises(ValueError, match=f"no row for each of the {depth} stages"):
            StageWeights(path, depth, {})


# -- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("script", "error", "message"),
    [
        ("", ValueError, "script is empty"),
        ("  ", ValueError, "script is empty"),
        (5, TypeError, "string"),
        (["[S1] hi", 3], TypeError, "lines must be strings"),
        (lambda: iter(["[S1] hi", b"x"]), TypeError, "pieces must be strings"),
        (lambda: iter([" ", ""]), ValueError, "script is empty"),
    ],
)
def test_bad_scripts_are_refused(dia2_case, script, error, message):
    with pytest.raises(error, match=message):
        Dia2(dia2_case[1] / "exported").generate(script() if callable(script) else script)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"temp_text": -1.0}, ValueError, "text.temperature"),
        ({"topk_audio": 2.5}, ValueError, "audio.top_k"),
        ({"cfg_scale": float("nan")}, ValueError, "cfg_scale"),
        ({"initial_padding": -1}, ValueError, "initial_padding"),
        ({"top_p": 0.9}, TypeError, "unknown options"),
    ],
)
def test_bad_options_are_refused(dia2_case, options, error, message):
    with pytest.raises(error, match=message):
        Dia2(dia2_case[1] / "exported").generate("[S1] hi", **options)


def test_a_dia2_folder_runs_without_torch(dia2_case, tmp_path):
    """In a process where importing torch fails, a sampled generation runs and equals this process's."""
    folder = dia2_case[1] / "exported"
    code = (
        "import sys, json; sys.modules['torch'] = None\n"
        "from dia_ort.dia2 import Dia2\n"
        f"r = Dia2({str(folder)!r}).generate({SCRIPT!r}, seed=3)\n"
        "print(json.dumps(r.audio_tokens.tolist()))\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    here = Dia2(folder).generate(SCRIPT, seed=3)
    assert json.loads(run.stdout) == here.audio_tokens.tolist()


# -- the command line ----------------------------------------------------------------------------


def test_speak_runs_a_dia2_folder(dia2_case, tmp_path, capsysbinary):
    """`dia-ort speak` reads the family from the folder: Dia2's audio at 24 kHz (or --sample-rate, the
    same samples to a file and to stdout), the same samples as `generate`; Dia's own options are refused
    by name."""
    import soundfile as sf

    from dia_ort.audio import pcm16
    from dia_ort.cli import main

    folder = dia2_case[1] / "exported"
    speak = ["speak", SCRIPT, "--model", str(folder), "--quiet", "--seed", "4", "--cfg-scale", "3"]
    want = Dia2(folder).generate(SCRIPT, seed=4, cfg_scale=3.0)
    out = tmp_path / "out.wav"
    assert main([*speak, "-o", str(out)]) == 0
    audio, rate = sf.read(out, dtype="int16")
    assert rate == 24000 and np.array_equal(audio.tobytes(), pcm16(want.waveform))
    capsysbinary.readouterr()
    assert main([*speak, "-o", "-", "--format", "pcm"]) == 0
    assert capsysbinary.readouterr().out == pcm16(want.waveform)
    assert main([*speak, "-o", str(tmp_path / "b.wav"), "--sample-rate", "16000"]) == 0
    resampled, rate = sf.read(tmp_path / "b.wav", dtype="int16")
    assert rate == 16000
    capsysbinary.readouterr()
    assert main([*speak, "-o", "-", "--format", "pcm", "--sample-rate", "16000"]) == 0
    assert capsysbinary.readouterr().out == resampled.tobytes()  # the resampler's tail included
    assert main([*speak, "-o", str(tmp_path / "c.wav"), "--temperature", "0.5"]) == 2
    assert "--temperature: not options of Dia2" in capsysbinary.readouterr().err.decode()
    assert not (tmp_path / "c.wav").exists()


def test_speak_clones_both_voices_of_a_dia2_prefix(dia2_case, tmp_path, capsysbinary):
    """--voice/--voice-text and --voice-2/--voice-2-text are Dia2's prefix speakers: the same samples as
    `generate(prefix=...)`; a transcript or second clip without its first is refused by name."""
    from dia_ort.audio import pcm16
    from dia_ort.cli import main

    root = dia2_case[1]
    clips = {n: str(root / f"speaker{n}.wav") for n in (1, 2)}
    speak = ["speak", "[S1] Good to hear.", "--model", str(root / "exported"), "--quiet", "--seed", "2"]
    voices = ["--voice", clips[1], "--voice-text", "hello there,", "--voice-2", clips[2]]
    voices += ["--voice-2-text", "how are"]
    prefix = PrefixConfig(Speaker(clips[1], "hello there,"), Speaker(clips[2], "how are"))
    want = Dia2(root / "exported").generate("[S1] Good to hear.", seed=2, prefix=prefix)
    capsysbinary.readouterr()
    assert main([*speak, *voices, "-o", "-", "--format", "pcm"]) == 0
    assert capsysbinary.readouterr().out == pcm16(want.waveform)
    for flags, message in (
        (voices[4:], "--voice-2 needs --voice"),
        (["--voice-text", "hi"], "--voice-text needs --voice"),
    ):
        assert main([*speak, *flags, "-o", str(tmp_path / "x.wav")]) == 2
        assert message in capsysbinary.readouterr().err.decode()
    assert not (tmp_path / "x.wav").exists()


# -- prefixes ------------------------------------------------------------------------------------


def test_prefix_speakers_need_their_words(dia2_case, monkeypatch):
    """Without words and without Whisper, the error names both ways; a transcript without times is
    spread over the clip; a clip must hold audio."""
    root = dia2_case[1]
    model = Dia2(root / "exported")
    monkeypatch.setitem(sys.modules, "whisper_timestamped", None)
    with pytest.raises(ValueError, match="pip install whisper-timestamped.*words="):
        model.generate("[S1] hi", prefix=PrefixConfig(Speaker(root / "speaker1.wav")))
    result = model.generate(
        "[S1] hi", prefix=PrefixConfig(Speaker(root / "speaker1.wav", "hello there")), seed=1
    )
    assert result.audio_tokens.shape[0] == model.config.codebooks
    with pytest.raises(ValueError, match="audio is empty"):
        model.generate("[S1] hi", prefix=PrefixConfig(Speaker(np.zeros(0, np.float32), "hello")))
    with pytest.raises(TypeError, match="PrefixConfig"):
        model.generate("[S1] hi", prefix=str(root / "speaker1.wav"))


def test_the_speed_benchmark_runs_torch_free(dia2_case, tmp_path):
    """`python -m bench.torch_free bench.dia2_speed FOLDER` on the tiny folder, both variants: every
    figure there, the floor counting each stage's weights in the variant's precision."""
    from bench.dia2_speed import stage_weight_bytes

    folder, figures = dia2_case[1] / "exported", {}
    for dtype in ("float32", "int8"):
        out = tmp_path / f"{dtype}.json"
        command = [
            sys.executable,
            "-m",
            "bench.torch_free",
            "bench.dia2_speed",
            str(folder),
            "--repeats",
            "2",
        ]
        subprocess.run(
            [*command, "--dtype", dtype, "--out", str(out)], check=True, capture_output=True, timeout=300
        )
        figures[dtype] = json.loads(out.read_text())
        for key in (
            "backbone_ms",
            "stage_ms",
            "decode_ms_per_frame",
            "frame_ms",
            "floor_ms",
            "first_audio_s",
        ):
            assert figures[dtype][key] > 0, key
        model = Dia2(folder, compute_dtype=dtype)
        stages = sum(stage_weight_bytes(model, s) for s in range(model.config.depth))
        assert figures[dtype]["floor_bytes"] > stages > 0
        assert figures[dtype]["frame_ms"] == pytest.approx(
            figures[dtype]["backbone_ms"]
            + model.config.depth * figures[dtype]["stage_ms"]
            + figures[dtype]["decode_ms_per_frame"]
        )
    assert figures["int8"]["floor_bytes"] < figures["float32"]["floor_bytes"]


def test_a_codebook_without_delay_needs_a_prefix(dia2_case, tmp_path):
    """With delay 0 the first frame has no audio to read (the reference fails there): refused without a
    prefix, spoken with one."""
    tree = copy.deepcopy(PRESETS["dia2-tiny"])
    tree["data"]["delay_pattern"] = [0, 1, 2, 2]
    config = Dia2Config.from_tree(tree)
    sources = replace(dia2_random_sources("dia2-tiny", seed=9), config=config)
    export_dia2(sources, tmp_path / "exported")
    model = Dia2(tmp_path / "exported")
    with pytest.raises(ValueError, match="codebook without delay.*give this model a prefix"):
        model.generate("[S1] hi")
    prefix = PrefixConfig(Speaker(dia2_case[1] / "speaker1.wav", CLIP_WORDS[1]))
    assert model.generate("[S1] hi there", prefix=prefix, seed=2).audio_tokens.shape[0] == config.codebooks


# -- from the Hub --------------------------------------------------------------------------------

FROM_HUB = (
    "import json, sys; from dia_ort.dia2 import Dia2\n"
    "model = Dia2.from_pretrained(sys.argv[1], cache_dir=sys.argv[2], compute_dtype=sys.argv[3])\n"
    "print(json.dumps(model.generate('[S1] hello there', seed=1).audio_tokens.tolist()))\n"
)


def _from_hub(folder: Path, repo: str, cache: Path, dtype: str = "float32") -> list:
    """`Dia2.from_pretrained(repo, compute_dtype=dtype)` in a fresh process whose Hub
    (tests/fake_hub.py) serves `folder`."""
    from fake_hub import FakeHub

    hub = FakeHub(repo, folder)
    try:
        environment = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1"}
        run = subprocess.run(
            [sys.executable, "-c", FROM_HUB, repo, str(cache), dtype],
            capture_output=True,
            text=True,
            timeout=300,
            env=environment,
        )
    finally:
        hub.close()
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_a_hub_repo_of_an_exported_folder_or_of_a_checkpoint_speaks(dia2_case, tmp_path):
    """An exported Dia2 folder on the Hub is fetched and run; a published checkpoint there (its config
    naming its Mimi) is exported on first use, and again with int8 added when int8 is asked for; each
    speaks as the folder does here."""
    root = dia2_case[1]
    want = Dia2(root / "exported").generate("[S1] hello there", seed=1).audio_tokens.tolist()
    int8 = Dia2(root / "exported", compute_dtype="int8")
    want_int8 = int8.generate("[S1] hello there", seed=1).audio_tokens.tolist()
    assert _from_hub(root / "exported", "nari-test/dia2-onnx", tmp_path / "cache") == want
    assert _from_hub(root / "exported", "nari-test/dia2-onnx", tmp_path / "cache", "int8") == want_int8
    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(root / "checkpoint", checkpoint)
    tree = json.loads((checkpoint / "config.json").read_text())
    (checkpoint / "config.json").write_text(json.dumps(tree | {"assets": {"mimi": str(root / "mimi")}}))
    assert _from_hub(checkpoint, "nari-test/dia2-checkpoint", tmp_path / "cache") == want
    assert _from_hub(checkpoint, "nari-test/dia2-checkpoint", tmp_path / "cache", "int8") == want_int8


# -- continuous batching -------------------------------------------------------------------------


def test_requests_batched_on_the_scheduler_equal_their_solo_generations(dia2_case):
    """Three requests on a batch of two, one with both speakers' prefix: the first runs alone for a few
    frames, the second joins it, the third takes the rows the first one frees. Each gets the codes,
    timestamps and samples it gets alone, resampled alike where it asks for another rate."""
    root = dia2_case[1]
    model = Dia2(root / "exported")
    prefix = PrefixConfig(*(Speaker(root / f"speaker{i}.wav", CLIP_WORDS[i]) for i in (1, 2)))
    asks = [  # script, prefix, options, sample rate
        (SCRIPT, None, {"seed": 1}, 24000),
        ("[S2] Just a few words. [S1] Yes.", prefix, {"seed": 2, "cfg_scale": 1.5}, 24000),
        (
            '[S1] The last one <break time="0.2s"/> waits for rows.',
            None,
            {"seed": 3, "cfg_filter_k": 7},
            16000,
        ),
    ]
    alone = [model.generate(script, prefix=prefix, **options) for script, prefix, options, _ in asks]
    scheduler = Scheduler(model, max_batch=2)
    submit = [lambda a=a: scheduler.submit(a[0], a[1], sample_rate=a[3], **a[2]) for a in asks]
    requests = [submit[0]()]
    for _ in range(3):
        scheduler.step()
    assert scheduler.occupancy == 1 and not requests[0].done
    requests += [submit[1](), submit[2]()]
    scheduler.step()
    assert scheduler.occupancy == 2 and scheduler.queue_depth == 1
    while scheduler.step():
        pass
    for request, solo in zip(requests, alone, strict=True):
        assert request.done and request.result is not None
        np.testing.assert_array_equal(request.result.audio_tokens, solo.audio_tokens)
        assert request.result.timestamps == solo.timestamps
        assert np.array_equal(request.result.waveform, solo.waveform)
    assert np.array_equal(np.concatenate(list(requests[0])), alone[0].waveform)
    assert np.array_equal(np.concatenate(list(requests[1])), alone[1].waveform)
    whole = StreamResampler(16000, 24000).resample_chunk(alone[2].waveform, last=True)
    assert np.array_equal(np.concatenate(list(requests[2])), whole)
    assert scheduler.decoding.batch.rows.rows == 0


def test_the_scheduler_refuses_a_bad_dia2_request_and_runs_on(dia2_case):
    """Bad requests are refused at submission and queue nothing; a request cancelled while it runs
    leaves the batch, the last request's rows moving into its own, and the others go on as alone."""
    model = Dia2(dia2_case[1] / "exported")
    scheduler = Scheduler(model, max_batch=3)
    for script, options, error, message in (
        ("   ", {}, ValueError, "script is empty"),
        ("[S1]", {}, ValueError, "script is empty"),
        (["[S1] lines"], {}, TypeError, "a request's script is a string"),
        (SCRIPT, {"temperature": 0.5}, TypeError, "unknown options"),
        (SCRIPT, {"cfg_scale": -1}, ValueError, "cfg_scale"),
    ):
        with pytest.raises(error, match=message):
            scheduler.submit(script, **options)
    assert scheduler.queue_depth == 0
    leaving = scheduler.submit(SCRIPT, seed=5)
    requests = [scheduler.submit(SCRIPT, seed=4), scheduler.submit("[S2] Another one, a bit longer.", seed=6)]
    scheduler.step()
    leaving.cancel()
    while scheduler.step():
        pass
    assert not leaving.done and scheduler.occupancy == 0 and scheduler.decoding.batch.rows.rows == 0
    list(leaving)  # its chunks end
    for request, (script, seed) in zip(
        requests, ((SCRIPT, 4), ("[S2] Another one, a bit longer.", 6)), strict=True
    ):
        solo = model.generate(script, seed=seed)
        np.testing.assert_array_equal(request.result.audio_tokens, solo.audio_tokens)
        assert np.array_equal(np.concatenate(list(request)), solo.waveform)


def test_a_joining_prefix_is_fed_in_chunks_between_the_others_frames(dia2_case, monkeypatch):
    """A voice's frames go in a chunk a step while the running request advances a frame each step; both
    equal their solo generations (chunked alike)."""
    monkeypatch.setattr(dia2_batch, "PREFILL_FRAMES", 4)
    root = dia2_case[1]
    model = Dia2(root / "exported")
    prefix = PrefixConfig(*(Speaker(root / f"speaker{i}.wav", CLIP_WORDS[i]) for i in (1, 2)))
    later = "[S2] Just a few words. [S1] Yes."
    alone = [model.generate(SCRIPT, seed=1), model.generate(later, seed=2, prefix=prefix)]
    scheduler = Scheduler(model, max_batch=2)
    running = scheduler.submit(SCRIPT, seed=1)
    scheduler.step()
    joining = scheduler.submit(later, prefix, seed=2)
    frames, t = joining.audio.loop.prefill.shape[1], running.audio.loop.t
    chunks = -(-frames // 4)
    assert chunks >= 3
    for step in range(1, chunks + 1):
        scheduler.step()  # the first: a frame of the running request, then the joining one's first chunk
        assert running.audio.loop.t == t + step and (joining.audio.loop in scheduler.decoding.batch.held) == (
            step < chunks
        )
    while scheduler.step():
        pass
    for request, solo in zip((running, joining), alone, strict=True):
        np.testing.assert_array_equal(request.result.audio_tokens, solo.audio_tokens)
        assert np.array_equal(np.concatenate(list(request)), solo.waveform)


def test_a_voice_whose_later_chunk_fails_leaves_alone(dia2_case, monkeypatch):
    """The second chunk of a joining voice fails: that request ends with the error, the running one
    goes on as alone; a stream whose prefix fails so raises it, at every later `next` too."""
    monkeypatch.setattr(dia2_batch, "PREFILL_FRAMES", 4)
    root = dia2_case[1]
    model = Dia2(root / "exported")
    prefix = PrefixConfig(*(Speaker(root / f"speaker{i}.wav", CLIP_WORDS[i]) for i in (1, 2)))
    feed = dia2_batch.FrameBatch._feed_chunk

    def failing(self, loop):
        if self.held[loop] > 0:
            raise RuntimeError("the chunk broke")
        feed(self, loop)

    solo = model.generate(SCRIPT, seed=1)
    monkeypatch.setattr(dia2_batch.FrameBatch, "_feed_chunk", failing)
    scheduler = Scheduler(model, max_batch=2)
    running = scheduler.submit(SCRIPT, seed=1)
    scheduler.step()
    joining = scheduler.submit("[S2] Just a few words.", prefix, seed=2)
    while scheduler.step():
        pass
    with pytest.raises(RuntimeError, match="the chunk broke"):
        list(joining)
    np.testing.assert_array_equal(running.result.audio_tokens, solo.audio_tokens)
    assert scheduler.decoding.batch.rows.rows == 0 and scheduler.decoding.steps == scheduler.steps
    stream = model.stream("[S2] Just a few words.", prefix=prefix, seed=2)
    for _ in range(2):
        with pytest.raises(RuntimeError, match="the chunk broke"):
            next(stream)


def test_a_request_whose_audio_fails_leaves_alone(dia2_case, monkeypatch):
    """One request's Mimi decode raises: it ends with that error, the other goes on as alone."""
    model = Dia2(dia2_case[1] / "exported")
    scheduler = Scheduler(model, max_batch=2)
    failing, going = scheduler.submit(SCRIPT, seed=7), scheduler.submit(SCRIPT, seed=8)
    decode = MimiDecoder.decode

    def broken(self, codes):
        if self is failing.audio.decoder:
            raise RuntimeError("the codec broke")
        return decode(self, codes)

    monkeypatch.setattr(MimiDecoder, "decode", broken)
    while scheduler.step():
        pass
    with pytest.raises(RuntimeError, match="the codec broke"):
        list(failing)
    assert going.done and scheduler.decoding.batch.rows.rows == 0
    assert np.array_equal(np.concatenate(list(going)), model.generate(SCRIPT, seed=8).waveform)


def test_speaker_tags_in_a_prefix_transcript_are_not_words():
    """The prefix puts its speaker's tag before the first word itself; a tag in the transcript would
    be spoken as a word of its own and take a share of the clip's time."""
    assert spread_words("[S1] hello there [S2]", 1.0) == spread_words("hello there", 1.0)
    with pytest.raises(ValueError, match="transcript is empty"):
        spread_words("[S1]", 1.0)
