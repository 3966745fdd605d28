"""Every bad call of the list in docs/generation.md section 13 gets a clear error and leaves nothing broken behind."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from dia_ort import Dia
from dia_ort.manifest import MANIFEST_NAME
from export.architecture import TINY

HOP = 512  # samples of 44.1 kHz audio in one frame
# Output frames the window leaves without a prompt: 239 of 256 rows (row 0, the EOS row, the delay tail)
ROOM = TINY.decoder.max_length - max(TINY.delay_pattern) - 2


@pytest.mark.parametrize(
    ("text", "error", "words"),
    [
        ("", ValueError, "empty"),
        ("   ", ValueError, "empty"),
        (None, TypeError, "str"),
        (b"[S1] bytes", TypeError, "str"),
        ("[S1] hi [S3] who?", ValueError, "[S3]"),
        ("[S1] " + "a" * TINY.encoder.max_length, ValueError, f"at most {TINY.encoder.max_length}"),
    ],
)
def test_bad_text(tiny_dia, text, error, words):
    with pytest.raises(error, match=words.replace("[", r"\[").replace("]", r"\]")):
        tiny_dia.generate(text)


def test_long_text_error_gives_byte_count(tiny_dia):
    text = "[S1] " + "é" * TINY.encoder.max_length  # two bytes a character
    with pytest.raises(ValueError, match=f"{len(text.encode()) - 3} bytes"):
        tiny_dia.generate(text)


@pytest.mark.parametrize(
    ("kwargs", "error", "words"),
    [
        ({"temperature": -0.1}, ValueError, "temperature"),
        ({"temperature": "hot"}, TypeError, "temperature"),
        ({"top_p": 0.0}, ValueError, "top_p"),
        ({"top_p": 1.5}, ValueError, "top_p"),
        ({"top_k": 0}, ValueError, "top_k"),
        ({"top_k": 2.5}, TypeError, "top_k"),
        ({"cfg_scale": -1}, ValueError, "cfg_scale"),
        ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
        ({"sample_rate": 0}, ValueError, "sample_rate"),
        ({"cfg_filter_top_k": 0}, ValueError, "cfg_filter_top_k"),
        ({"seed": -3}, ValueError, "seed"),
        ({"temperature": float("nan")}, ValueError, "NaN"),
        ({"temperature": float("inf")}, ValueError, "temperature must be finite"),
        ({"temperature": 1e-300}, ValueError, "temperature must be 0 .greedy. or from 1e-06"),
        ({"temperature": 1e308}, ValueError, "temperature must be 0"),
        ({"cfg_scale": float("inf")}, ValueError, "cfg_scale must be finite"),
        ({"cfg_scale": 1e300}, ValueError, "cfg_scale must be from 0 to 1e"),
    ],
)
def test_bad_sampling_values(tiny_dia, kwargs, error, words):
    with pytest.raises(error, match=words):
        tiny_dia.generate("[S1] Hello.", **kwargs)


def test_batch_and_prompt_counts_must_match(tiny_dia):
    codes = np.zeros((3, 9), dtype=np.int64)
    with pytest.raises(ValueError, match="one entry per text"):
        tiny_dia.generate_batch(["[S1] a.", "[S2] b."], audio_prompts=[codes])
    with pytest.raises(TypeError, match="list of texts"):
        tiny_dia.generate_batch("[S1] a.")
    with pytest.raises(ValueError, match="empty"):
        tiny_dia.generate_batch([])


@pytest.mark.parametrize(
    ("codes", "error", "words"),
    [
        (np.zeros((5, 8), dtype=np.int64), ValueError, r"shape \[T, 9\]"),
        (np.zeros((9,), dtype=np.int64), ValueError, "shape"),
        (np.zeros((0, 9), dtype=np.int64), ValueError, "empty"),
        (np.full((4, 9), 1024), ValueError, "outside 0..1023"),
        (np.full((4, 9), -1), ValueError, "outside"),
        (np.zeros((4, 9), dtype=np.float32), TypeError, "integers"),
    ],
)
def test_bad_codes(tiny_dia, codes, error, words):
    with pytest.raises(error, match=words):
        tiny_dia.decode_codes(codes)


def test_bad_audio(tiny_dia, tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.wav"):
        tiny_dia.encode_audio(str(tmp_path / "nope.wav"))
    corrupt = tmp_path / "corrupt.wav"
    corrupt.write_bytes(b"not audio at all" * 10)
    with pytest.raises(ValueError, match="corrupt.wav"):
        tiny_dia.encode_audio(str(corrupt))
    with pytest.raises(ValueError, match="empty"):
        tiny_dia.encode_audio(np.zeros(0, dtype=np.float32))
    with pytest.raises(ValueError, match=r"audio must be 1-D \[samples\] or 2-D .*got shape \(2, 3, 4\)"):
        tiny_dia.encode_audio(np.zeros((2, 3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match="empty"):
        tiny_dia.generate("[S1] Hi.", audio_prompt=np.zeros(0, dtype=np.float32))


def test_audio_longer_than_the_room_is_refused_from_its_first_extra_frame(tiny_dia):
    """An audio prompt may fill the room of an empty prompt, ROOM frames of 512 samples, and no more."""
    assert len(tiny_dia.encode_audio(np.full(ROOM * HOP, 0.01, dtype=np.float32))) == ROOM
    with pytest.raises(
        ValueError, match=rf"\({ROOM + 1} frames\); the model's audio window takes at most {ROOM} frames"
    ):
        tiny_dia.encode_audio(np.full(ROOM * HOP + 1, 0.01, dtype=np.float32))


def test_a_prompt_must_leave_room_for_one_frame(tiny_dia):
    prompt = np.zeros((ROOM - 1, TINY.decoder.num_channels), dtype=np.int64)
    (codes,) = tiny_dia.generate_codes(["[S1] Hi."], [prompt], temperature=0, max_new_tokens=10)
    assert len(codes) == 1
    with pytest.raises(ValueError, match=f"audio prompt of {ROOM} frames leaves no room"):
        tiny_dia.generate_codes(["[S1] Hi."], [np.zeros((ROOM, TINY.decoder.num_channels), dtype=np.int64)])


def test_budget_over_the_window_is_clamped_with_a_warning(tiny_dia, caplog):
    """The random model never ends by itself, so the clamped budget is exactly the output's length."""
    (codes,) = tiny_dia.generate_codes(["[S1] Hi."], temperature=0, max_new_tokens=ROOM)
    assert len(codes) == ROOM and "does not fit the audio window" not in caplog.text
    (codes,) = tiny_dia.generate_codes(["[S1] Hi."], temperature=0, max_new_tokens=ROOM + 1)
    assert len(codes) == ROOM
    assert f"max_new_tokens={ROOM + 1} does not fit the audio window" in caplog.text


def test_unavailable_device(tiny_folder):
    import onnxruntime

    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():  # a GPU machine: it loads
        assert Dia.from_pretrained(tiny_folder, compute_dtype="float32", device="cuda").device.kind == "cuda"
    else:
        with pytest.raises(ValueError, match="CUDA"):
            Dia.from_pretrained(tiny_folder, compute_dtype="float32", device="cuda")
    with pytest.raises(ValueError, match="device must be"):
        Dia.from_pretrained(tiny_folder, compute_dtype="float32", device="tpu")


def test_unknown_or_missing_dtype(tiny_folder, caplog):
    with pytest.raises(ValueError, match="compute_dtype"):
        Dia.from_pretrained(tiny_folder, compute_dtype="float8", device="cpu")
    with pytest.raises(ValueError, match="--quantize int8"):
        Dia.from_pretrained(tiny_folder, compute_dtype="int8", device="cpu")
    model = Dia.from_pretrained(tiny_folder, compute_dtype="float16", device="cpu")
    assert model.compute_dtype == "float32"
    assert "float16" in caplog.text and "float32" in caplog.text


def test_missing_folder_and_not_a_model(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Dia.from_pretrained(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(FileNotFoundError, match="neither"):
        Dia.from_pretrained(tmp_path, device="cpu")


@pytest.fixture
def folder_copy(tiny_folder, tmp_path):
    return shutil.copytree(tiny_folder, tmp_path / "copy")


def test_truncated_file_is_refused(folder_copy):
    graph = next(folder_copy.glob("decoder_step.float32.onnx.data"))
    graph.write_bytes(graph.read_bytes()[:-100])
    with pytest.raises(ValueError, match="truncated"):
        Dia.from_pretrained(folder_copy, compute_dtype="float32", device="cpu")


def test_altered_file_is_refused(folder_copy):
    graph = next(folder_copy.glob("encoder.float32.onnx.data"))
    data = bytearray(graph.read_bytes())
    data[10] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        Dia.from_pretrained(folder_copy, compute_dtype="float32", device="cpu")


def test_missing_file_is_refused(folder_copy):
    (folder_copy / "dac_decoder.onnx").unlink()
    with pytest.raises(FileNotFoundError, match="dac_decoder.onnx"):
        Dia.from_pretrained(folder_copy, compute_dtype="float32", device="cpu")


def test_a_dac_decoder_that_does_not_stream_is_refused(folder_copy):
    """A folder of graph revision 4 or older holds the windowed decoder: no codec_config.decoder_delay."""
    path = folder_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    del data["codec_config"]["decoder_delay"]
    path.write_text(json.dumps(data))
    command = f"python -m export --random-init test --seed 0 --out {folder_copy}"
    with pytest.raises(
        ValueError, match=f"before the streamed one .*re-export it with `{re.escape(command)}"
    ):
        Dia.from_pretrained(folder_copy, device="cpu")


def test_manifest_of_another_format_is_refused(folder_copy):
    path = folder_copy / MANIFEST_NAME
    data = json.loads(path.read_text())
    data["format_version"] = 99
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="format version 99, this dia_ort reads version 2; upgrade dia-ort"):
        Dia.from_pretrained(folder_copy, device="cpu")
    data["format_version"] = 1  # one position per step: before continuous batching
    data["variants"]["int8"] = data["variants"]["float32"]
    data["source"] = {"model": "nari-labs/Dia-1.6B", "revision": None, "dac": "descript/dac_44khz"}
    path.write_text(json.dumps(data))
    command = (
        f"python -m export --model nari-labs/Dia-1.6B --dac descript/dac_44khz --out {folder_copy} "
        "--dtype float32 --quantize int8"
    )
    with pytest.raises(ValueError, match=f"format version 1, .*re-export it with `{re.escape(command)}`"):
        Dia.from_pretrained(folder_copy, device="cpu")
    data["source"] = {"random_init": "tiny", "seed": 3}
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=re.escape("`python -m export --random-init tiny --seed 3 --out")):
        Dia.from_pretrained(folder_copy, device="cpu")
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        Dia.from_pretrained(folder_copy, device="cpu")


def test_torch_checkpoint_without_export_extra_names_the_command(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text(json.dumps(TINY.to_hf_dict()))
    monkeypatch.setitem(__import__("sys").modules, "export.families", None)  # the entry point's module
    with pytest.raises(ValueError, match="python -m export --model .* --dtype float32 --quantize int8$"):
        Dia.from_pretrained(tmp_path, compute_dtype="int8", device="cpu", cache_dir=tmp_path / "cache")


def test_model_still_works_after_bad_calls(tiny_dia):
    for bad, words in (("", "empty"), ("[S9] x", r"\[S9\]")):
        with pytest.raises(ValueError, match=words):
            tiny_dia.generate(bad)
    codes = tiny_dia.generate_codes(["[S1] Still fine."], temperature=0, max_new_tokens=5)[0]
    assert codes.shape == (5, 9)


def test_save_audio_leaves_no_partial_file(tiny_dia, tmp_path):
    target = tmp_path / "out.wav"
    with pytest.raises(ValueError, match=r"audio contains 1 non-finite values \(NaN or inf\)"):
        tiny_dia.save_audio(target, np.array([np.nan, 0.0], dtype=np.float32))
    with pytest.raises(ValueError, match="extension|format"):
        tiny_dia.save_audio(tmp_path / "out.xyz", np.zeros(100, dtype=np.float32))
    assert list(tmp_path.iterdir()) == []


def test_export_failing_half_way_leaves_a_refused_folder(folder_copy, tiny_state, tiny_codec, monkeypatch):
    """Re-exporting over a folder and failing before the end must not leave the old manifest behind."""
    import export.pipeline as pipeline

    def broken_codec(codec):
        raise RuntimeError("codec export failed")

    monkeypatch.setattr(pipeline, "codec_specs", broken_codec)
    with pytest.raises(RuntimeError, match="codec export failed"):
        pipeline.export_model(pipeline.Sources(TINY, tiny_state, tiny_codec, {}), folder_copy)
    with pytest.raises(FileNotFoundError, match="not an exported dia-ort model folder"):
        Dia(folder_copy, device="cpu")
