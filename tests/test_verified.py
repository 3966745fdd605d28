"""Loading a model hashes its files once; later loads hash only what changed, and still refuse a change."""

from __future__ import annotations

import os
import shutil
import stat

import pytest

import dia_ort.verified
from dia_ort import Dia


@pytest.fixture
def folder(tiny_folder, tmp_path):
    copy = tmp_path / "model"
    shutil.copytree(tiny_folder, copy)
    return copy


@pytest.fixture
def hashed(monkeypatch):
    """The files hashed so far (by name)."""
    names = []
    original = dia_ort.verified.sha256_of

    def counting(path):
        names.append(path.name)
        return original(path)

    monkeypatch.setattr(dia_ort.verified, "sha256_of", counting)
    return names


def test_a_second_load_hashes_nothing_and_a_changed_file_again(folder, hashed):
    Dia(folder, device="cpu")
    first = sorted(hashed)
    assert "decoder_step.float32.onnx" in first and "dac_decoder.onnx" in first
    hashed.clear()
    Dia(folder, device="cpu")
    assert hashed == []
    graph = folder / "dac_encoder.onnx"
    graph.write_bytes(graph.read_bytes())  # the same bytes, a new modification time
    Dia(folder, device="cpu")
    assert hashed == ["dac_encoder.onnx"]


def test_changed_bytes_are_refused_after_a_remembered_load(folder):
    Dia(folder, device="cpu")
    data = folder / "decoder_step.float32.onnx.data"
    content = bytearray(data.read_bytes())
    content[len(content) // 2] ^= 0xFF  # same size
    data.write_bytes(bytes(content))
    with pytest.raises(ValueError, match=r"decoder_step.float32.onnx.data does not match its sha256"):
        Dia(folder, device="cpu")


def test_a_read_only_folder_loads_and_gets_nothing_written(folder, private_cache):
    before = sorted(os.listdir(folder))
    for path in (folder, *folder.iterdir()):
        path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
    try:
        Dia(folder, device="cpu")
        Dia(folder, device="cpu")
    finally:
        for path in (folder, *folder.iterdir()):
            path.chmod(path.stat().st_mode | stat.S_IWUSR)
    assert sorted(os.listdir(folder)) == before
    assert (private_cache / dia_ort.verified.RECORD_NAME).is_file()


def test_verify_always_hashes_every_load(folder, hashed, monkeypatch):
    Dia(folder, device="cpu")
    monkeypatch.setenv("DIA_ORT_VERIFY", "always")
    hashed.clear()
    Dia(folder, device="cpu")
    assert "decoder_step.float32.onnx.data" in hashed


def test_an_unreadable_record_only_costs_a_hash(folder, hashed, private_cache):
    (private_cache / dia_ort.verified.RECORD_NAME).write_text("{not json")
    Dia(folder, device="cpu")
    assert hashed and Dia(folder, device="cpu")


def test_a_modification_time_put_back_does_not_hide_a_change(folder):
    """`cp -p`, `rsync -t` and `tar x` restore mtimes; the change time still shows the edit."""
    Dia(folder, device="cpu")
    data = folder / "dac_decoder.onnx.data"
    times = data.stat()
    content = bytearray(data.read_bytes())
    content[100] ^= 0xFF
    data.write_bytes(bytes(content))
    os.utime(data, ns=(times.st_atime_ns, times.st_mtime_ns))
    with pytest.raises(ValueError, match="dac_decoder.onnx.data does not match its sha256"):
        Dia(folder, device="cpu")
