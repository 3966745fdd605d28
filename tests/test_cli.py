"""`dia-ort speak` and `python -m export`, driven through argv and stdin."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import soundfile as sf

from dia_ort.cli import main


def test_speak_from_argument(tiny_folder, tmp_path, capsys):
    out = tmp_path / "a.flac"
    code = main(
        [
            "speak",
            "[S1] Hello there.",
            "--model",
            str(tiny_folder),
            "-o",
            str(out),
            "--seed",
            "1",
            "--max-new-tokens",
            "6",
            "--quiet",
        ]
    )
    assert code == 0
    audio, rate = sf.read(out)
    assert rate == 44100 and len(audio) == 6 * 512
    assert "wrote" in capsys.readouterr().out


def test_speak_from_stdin_and_file(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("[S1] From stdin."))
    assert (
        main(
            [
                "speak",
                "--model",
                str(tiny_folder),
                "-o",
                str(tmp_path / "b.wav"),
                "--max-new-tokens",
                "4",
                "--quiet",
                "--temperature",
                "0",
            ]
        )
        == 0
    )
    text = tmp_path / "t.txt"
    text.write_text("[S2] From a file.")
    assert (
        main(
            [
                "speak",
                "--file",
                str(text),
                "--model",
                str(tiny_folder),
                "-o",
                str(tmp_path / "c.ogg"),
                "--max-new-tokens",
                "4",
                "--quiet",
                "--sample-rate",
                "24000",
            ]
        )
        == 0
    )
    assert sf.info(tmp_path / "c.ogg").samplerate == 24000


def test_speak_with_a_voice(tiny_folder, tmp_path):
    voice = tmp_path / "voice.wav"
    sf.write(voice, 0.1 * np.sin(np.arange(44100 // 4) / 7), 44100)
    assert (
        main(
            [
                "speak",
                "[S1] And now me.",
                "--voice",
                str(voice),
                "--voice-text",
                "[S1] Me first.",
                "--model",
                str(tiny_folder),
                "-o",
                str(tmp_path / "v.wav"),
                "--max-new-tokens",
                "4",
                "--quiet",
            ]
        )
        == 0
    )


def test_speak_errors_are_clear_and_leave_no_file(tiny_folder, tmp_path, capsys):
    out = tmp_path / "x.wav"
    assert (
        main(["speak", "[S1] Hi.", "--model", str(tiny_folder), "-o", str(out), "--top-p", "2", "--quiet"])
        == 2
    )
    assert "top_p" in capsys.readouterr().err
    assert main(["speak", "[S1] Hi.", "--voice", "v.wav", "--model", str(tiny_folder), "-o", str(out)]) == 2
    assert "--voice-text" in capsys.readouterr().err
    assert main(["speak", "[S1] Hi.", "--model", str(tmp_path / "none"), "-o", str(out)]) == 2
    assert not out.exists()


def test_export_command_random_tiny(tmp_path):
    """`python -m export --random-init tiny` end to end (real-shape random DAC), then one short speak."""
    out = tmp_path / "model"
    result = subprocess.run(
        [sys.executable, "-m", "export", "--random-init", "tiny", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr
    assert (out / "dia_ort.json").is_file()
    assert (
        main(
            [
                "speak",
                "[S1] Hi.",
                "--model",
                str(out),
                "-o",
                str(tmp_path / "s.wav"),
                "--max-new-tokens",
                "3",
                "--quiet",
            ]
        )
        == 0
    )


def test_export_command_errors(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "export", "--model", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "export",
            "--random-init",
            "tiny",
            "--dtype",
            "float64",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "float64" in result.stderr


def test_hub_ids_offline_say_how_to_export_locally(tmp_path):
    """With no network a Hub id fails at once with the local-folder command (never a hang)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "DIA_ORT_CACHE": str(tmp_path / "cache")}
    result = subprocess.run(
        [sys.executable, "-m", "export", "--model", "nari-labs/Dia-1.6B-0626", "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 2
    assert "could not download" in result.stderr and "python -m export --model /path/to/" in result.stderr
    code = "from dia_ort import Dia\ntry:\n    Dia.from_pretrained('nari-labs/Dia-1.6B')\nexcept ConnectionError as e:\n    print(e)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert "could not download 'nari-labs/Dia-1.6B'" in result.stdout
