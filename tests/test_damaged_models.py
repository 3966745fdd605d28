"""Damaged model folders: each is refused at load, naming the file and what to do, and left untouched.

Also exports killed part-way (SIGKILL, in a subprocess): they leave a folder that loads whole or is
refused, never a half-written one that loads.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import export_tiny

from dia_ort import Dia
from dia_ort.manifest import MANIFEST_NAME
from export.architecture import TINY
from export.checkpoint import random_state

GRAPH_FILES = (
    "encoder.float32.onnx",
    "encoder.float32.onnx.data",
    "decoder_step.float32.onnx",
    "decoder_step.float32.onnx.data",
    "dac_decoder.onnx",
    "dac_decoder.onnx.data",
    "dac_encoder.onnx",
    "dac_encoder.onnx.data",
)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    """Each file of `folder` with its size and modification time: what a load must not change."""
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.fixture
def damaged(tiny_folder, tmp_path):
    return shutil.copytree(tiny_folder, tmp_path / "model")


def refused(folder: Path, error: type[Exception], *words: str) -> str:
    """Load `folder`; it must raise `error` saying `words`, and leave the folder as it was."""
    before = snapshot(folder)
    with pytest.raises(error) as caught:
        Dia(folder, device="cpu")
    message = str(caught.value)
    for word in words:
        assert word in message, (word, message)
    assert snapshot(folder) == before
    return message


def test_the_graph_files_are_all_listed(tiny_folder):
    assert sorted(GRAPH_FILES) == sorted(p.name for p in tiny_folder.iterdir() if ".onnx" in p.name)


@pytest.mark.parametrize("name", GRAPH_FILES)
def test_a_missing_graph_file(damaged, name):
    (damaged / name).unlink()
    refused(damaged, FileNotFoundError, name, "missing", "re-export")


@pytest.mark.parametrize("name", GRAPH_FILES)
def test_a_truncated_graph_file(damaged, name):
    path = damaged / name
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    refused(damaged, ValueError, name, "truncated", "re-export")


@pytest.mark.parametrize("name", GRAPH_FILES)
def test_a_graph_file_with_bytes_changed(damaged, name):
    path = damaged / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    refused(damaged, ValueError, name, "sha256", "re-export")


@pytest.fixture(scope="module")
def other_export(tmp_path_factory, tiny_codec) -> Path:
    """A model of the same shapes with other weights."""
    return export_tiny(tmp_path_factory.mktemp("other"), TINY, random_state(TINY, seed=9), tiny_codec)


@pytest.mark.parametrize("name", ["encoder.float32.onnx.data", "decoder_step.float32.onnx.data"])
def test_a_graph_from_another_export(damaged, other_export, name):
    """The same graph of another model (same shapes, same size) does not pass for this one's."""
    assert (other_export / name).stat().st_size == (damaged / name).stat().st_size
    shutil.copyfile(other_export / name, damaged / name)
    refused(damaged, ValueError, name, "sha256", "re-export")


def edit_manifest(folder: Path, edit) -> None:
    path = folder / MANIFEST_NAME
    data = json.loads(path.read_text())
    path.write_text(json.dumps(edit(data)))


def without(data: dict, *keys: str) -> dict:
    inner = data
    for key in keys[:-1]:
        inner = inner[key]
    del inner[keys[-1]]
    return data


@pytest.mark.parametrize(
    ("edit", "words"),
    [
        (lambda d: without(d, "variants"), ["incomplete", "'variants'"]),
        (lambda d: without(d, "model", "eos_id"), ["incomplete", "eos_id"]),
        (lambda d: without(d, "variants", "float32", "decoder_step"), ["decoder_step"]),
        (lambda d: without(d, "codec", "dac_encoder"), ["codec graphs missing"]),
        (lambda d: without(d, "variants", "float32", "encoder", "file", "sha256"), ["incomplete", "sha256"]),
        (lambda d: {**d, "variants": []}, ["incomplete"]),
        (lambda d: {**d, "model": {**d["model"], "decoder_layers": "two"}}, ["decoder_layers", "'two'"]),
        (lambda d: {**d, "model": {**d["model"], "audio_length": -1}}, ["audio_length", "-1"]),
        (lambda d: [d], ["not a JSON object"]),
    ],
)
def test_a_manifest_with_a_missing_or_wrong_field(damaged, edit, words):
    edit_manifest(damaged, edit)
    refused(damaged, ValueError, MANIFEST_NAME, *words, "re-export")


def test_a_manifest_with_a_wrong_hash(damaged):
    def wrong_hash(data):
        data["variants"]["float32"]["decoder_step"]["file"]["sha256"] = "0" * 64
        return data

    edit_manifest(damaged, wrong_hash)
    refused(damaged, ValueError, "decoder_step.float32.onnx", "sha256")


def test_a_manifest_of_a_newer_format(damaged):
    edit_manifest(damaged, lambda d: {**d, "format_version": 3})
    refused(damaged, ValueError, "format version 3", "upgrade dia-ort")


def test_a_manifest_that_is_not_text(damaged):
    (damaged / MANIFEST_NAME).write_bytes(b"\xff\xfe\x00garbage")
    refused(damaged, ValueError, MANIFEST_NAME, "re-export")


# -- exports killed part-way --------------------------------------------------------------------------


def export_command(out: Path) -> list[str]:
    return [sys.executable, "-m", "export", "--random-init", "tiny", "--seed", "5", "--out", str(out)]


def kill_when(out: Path, ready, timeout: float = 240) -> bool:
    """Run the export into `out` and SIGKILL it once `ready(out)`; False when it finished first."""
    process = subprocess.Popen(export_command(out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    try:
        while process.poll() is None and time.monotonic() < deadline:
            if out.is_dir() and ready(out):
                process.send_signal(signal.SIGKILL)
                process.wait(timeout=30)
                return True
            time.sleep(0.005)
        assert process.poll() is not None, "the export did not finish in time"
        return False
    finally:
        if process.poll() is None:
            process.kill()


def loads_whole_or_is_refused(folder: Path) -> None:
    try:
        dia = Dia(folder, device="cpu")
    except (FileNotFoundError, ValueError) as error:
        assert "re-export" in str(error) or "not an exported dia-ort model folder" in str(error), error
    else:  # the kill came after the manifest was written whole: the folder is complete
        codes = dia.generate_codes(["[S1] Whole."], temperature=0, max_new_tokens=4)[0]
        assert codes.shape == (4, 9)


KILL_POINTS = {
    "first graph written": lambda out: any(out.glob("*.onnx")),
    "step weights being written": lambda out: (out / "decoder_step.float32.onnx.data").exists(),
    "codec being written": lambda out: any(out.glob("dac_*.onnx*")),
    "manifest being written": lambda out: any(p.name.endswith(".partial") for p in out.iterdir()),
}


@pytest.mark.parametrize("point", list(KILL_POINTS))
def test_an_export_killed_part_way_never_leaves_a_folder_that_loads_half(tmp_path, point):
    out = tmp_path / "killed"
    kill_when(out, KILL_POINTS[point])
    loads_whole_or_is_refused(out)


def test_a_re_export_killed_part_way_over_a_valid_folder(tiny_folder, tmp_path):
    """The folder held a valid export: killed part-way through a new one, it is refused, not mixed."""
    out = shutil.copytree(tiny_folder, tmp_path / "model")
    os.utime(out / MANIFEST_NAME)
    if kill_when(out, lambda folder: not (folder / MANIFEST_NAME).exists()):
        refused(out, FileNotFoundError, "not an exported dia-ort model folder", "re-export")
    else:
        loads_whole_or_is_refused(out)
