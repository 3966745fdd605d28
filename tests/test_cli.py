"""`dia-ort speak` and `python -m export`, driven through argv and stdin."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

from dia_ort import Dia
from dia_ort.audio import pcm16
from dia_ort.cli import main


@pytest.mark.parametrize("ext", ["wav", "flac", "ogg", "mp3"])
def test_speak_writes_files_every_reader_opens_and_that_prompt_a_voice(tiny_folder, tiny_dia, tmp_path, ext):
    """libsndfile reads each file `speak -o` writes at its length, and it goes back in as a voice."""
    out = tmp_path / f"a.{ext}"
    argv = ["speak", "[S1] Hello there.", "--model", str(tiny_folder), "-o", str(out)]
    assert main([*argv, "--seed", "1", "--max-new-tokens", "6", "--quiet"]) == 0
    audio, rate = sf.read(out)
    assert rate == 44100
    assert (
        len(audio) == 6 * 512
        if ext in ("wav", "flac", "ogg")
        else 6 * 512 <= len(audio) <= 6 * 512 + 2 * 1152
    )
    prompt = tiny_dia.encode_audio(str(out))
    assert prompt.shape[1] == 9 and 6 <= len(prompt) <= 6 + 5


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


def test_speak_from_stdin_and_file(tiny_folder, tiny_dia, tmp_path, monkeypatch):
    """The text read from stdin and the guidance flags reach the model: the file is the library's audio."""
    monkeypatch.setattr(sys, "stdin", io.StringIO("[S1] From stdin."))
    argv = ["speak", "--model", str(tiny_folder), "-o", str(tmp_path / "b.wav"), "--quiet"]
    argv += ["--max-new-tokens", "6", "--temperature", "0", "--cfg-scale", "1.5", "--cfg-filter-top-k", "7"]
    assert main(argv) == 0
    audio, _ = sf.read(tmp_path / "b.wav", dtype="int16")
    want = tiny_dia.generate(
        "[S1] From stdin.", max_new_tokens=6, temperature=0, cfg_scale=1.5, cfg_filter_top_k=7
    )
    np.testing.assert_array_equal(audio, np.frombuffer(pcm16(want), dtype="<i2"))
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


def test_speak_with_a_voice(tiny_folder, tiny_dia, tmp_path):
    """--voice is the audio prompt and --voice-text goes before the text, as the library takes them."""
    voice = tmp_path / "voice.wav"
    sf.write(voice, 0.1 * np.sin(np.arange(44100 // 4) / 7), 44100)
    argv = ["speak", "[S1] And now me.", "--voice", str(voice), "--voice-text", "[S1] Me first."]
    argv += ["--model", str(tiny_folder), "-o", str(tmp_path / "v.wav"), "--max-new-tokens", "6"]
    assert main([*argv, "--temperature", "0", "--quiet"]) == 0
    audio, _ = sf.read(tmp_path / "v.wav", dtype="int16")
    want = tiny_dia.generate(
        "[S1] Me first. [S1] And now me.", audio_prompt=str(voice), max_new_tokens=6, temperature=0
    )
    np.testing.assert_array_equal(audio, np.frombuffer(pcm16(want), dtype="<i2"))


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
    assert (
        "could not be downloaded" in result.stderr and "python -m export --model /path/to/" in result.stderr
    )
    code = "from dia_ort import Dia\ntry:\n    Dia.from_pretrained('nari-labs/Dia-1.6B')\nexcept ConnectionError as e:\n    print(e)"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env
    )
    assert "'nari-labs/Dia-1.6B' is no local folder, and it could not be downloaded" in result.stdout


def test_a_mistyped_local_folder_is_reported_missing_not_looked_up(tmp_path, monkeypatch, capsys):
    """`--model models/nope` beside a `models/` folder is a missing folder, never a Hub lookup."""
    (tmp_path / "models" / "dia").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("dia_ort.hub.download", lambda *a, **k: pytest.fail("looked up on the Hub"))
    assert main(["speak", "[S1] Hi.", "--model", "models/nope", "-o", "a.wav"]) == 2
    err = capsys.readouterr().err
    assert "models/nope does not exist (the folder models holds: dia)" in err
    assert "not looked up on the Hugging Face Hub" in err
    with pytest.raises(FileNotFoundError, match="nope/a/b does not exist and is not a Hugging Face Hub id"):
        Dia.from_pretrained("nope/a/b", device="cpu")


SCRIPT = (
    "[S1] Welcome back to the show. Today we talk about trains. [S2] Trains! (laughs) My favourite topic. "
    "[S1] I know. So, where do we start? [S2] At the beginning, with steam, coal, and a lot of noise. "
) * 3


def read_wav_stream(data: bytes) -> tuple[int, np.ndarray]:
    """A WAV with a streaming header: its rate and 16-bit samples."""
    assert data[:4] == b"RIFF" and data[8:16] == b"WAVEfmt " and data[36:40] == b"data"
    assert data[4:8] == data[40:44] == b"\xff\xff\xff\xff"  # sizes unknown while streaming
    rate = int.from_bytes(data[24:28], "little")
    return rate, np.frombuffer(data[44:], dtype="<i2")


def test_speak_to_stdout_streams_while_generating(tiny_folder, tiny_dia, tmp_path):
    """`-o -` writes the header at once and audio while the script is generated, equal to a plain call."""
    script = tmp_path / "script.txt"
    script.write_text(SCRIPT)
    argv = [sys.executable, "-m", "dia_ort", "speak", "--file", str(script), "--model", str(tiny_folder)]
    argv += ["-o", "-", "--temperature", "0", "--max-new-tokens", "40", "--long-form-seconds", "1.5"]
    child = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    data, arrivals = b"", []
    try:
        while chunk := child.stdout.read1(65536):
            data += chunk
            arrivals.append((time.monotonic(), len(data)))
            assert arrivals[-1][0] - arrivals[0][0] < 300
    finally:
        _, err = child.communicate(timeout=300)
    assert child.returncode == 0, err.decode()
    header_at = next(t for t, n in arrivals if n >= 44)
    first_audio_at = next(t for t, n in arrivals if n > 44)
    done_at = arrivals[-1][0]
    # streaming: the first audio comes soon after the header; written at the end it would come last
    assert first_audio_at - header_at < 0.5 * (done_at - header_at)
    rate, samples = read_wav_stream(data)
    want = tiny_dia.generate(
        SCRIPT.strip(), long_form=True, long_form_seconds=1.5, temperature=0, max_new_tokens=40
    )
    assert rate == 44100
    np.testing.assert_array_equal(samples, np.frombuffer(pcm16(want), dtype="<i2"))
    assert b"wrote stdout" in err


def test_speak_raw_pcm_to_stdout(tiny_folder, tiny_dia, capsysbinary):
    code = main(
        ["speak", "[S1] Hi there.", "--model", str(tiny_folder), "-o", "-", "--format", "pcm"]
        + ["--seed", "2", "--max-new-tokens", "9", "--sample-rate", "24000", "--quiet"]
    )
    assert code == 0
    out = capsysbinary.readouterr().out
    want = tiny_dia.generate("[S1] Hi there.", seed=2, max_new_tokens=9, sample_rate=24000)
    assert out == pcm16(want)


def test_speak_long_form_file_and_flag(tiny_folder, tiny_dia, tmp_path):
    script = tmp_path / "script.txt"
    script.write_text(SCRIPT)
    common = ["--model", str(tiny_folder), "--temperature", "0", "--max-new-tokens", "20", "--quiet"]
    assert (
        main(
            [
                "speak",
                "--file",
                str(script),
                "-o",
                str(tmp_path / "f.wav"),
                "--long-form-seconds",
                "2",
                *common,
            ]
        )
        == 0
    )
    audio, _ = sf.read(tmp_path / "f.wav", dtype="int16")
    want = tiny_dia.generate(
        SCRIPT.strip(), long_form=True, long_form_seconds=2, temperature=0, max_new_tokens=20
    )
    np.testing.assert_array_equal(audio, np.frombuffer(pcm16(want), dtype="<i2"))
    # a script over the window: refused without --long-form, spoken with it
    assert main(["speak", SCRIPT, "-o", str(tmp_path / "a.wav"), *common]) == 2
    assert main(["speak", SCRIPT, "--long-form", "-o", str(tmp_path / "a.wav"), *common]) == 0
    assert (
        main(["speak", "--file", str(script), "--no-long-form", "-o", str(tmp_path / "b.wav"), *common]) == 2
    )
    assert not (tmp_path / "b.wav").exists()


def test_speak_checks_the_output_path_before_loading_anything(tmp_path, capsys):
    missing_model = str(tmp_path / "no-model")
    assert main(["speak", "[S1] Hi.", "--model", missing_model, "-o", str(tmp_path / "out.xyz")]) == 2
    assert "unknown extension '.xyz'" in capsys.readouterr().err
    assert main(["speak", "[S1] Hi.", "--model", missing_model, "-o", str(tmp_path / "no" / "a.wav")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert (
        main(
            ["speak", "[S1] Hi.", "--model", missing_model, "-o", str(tmp_path / "a.wav"), "--format", "pcm"]
        )
        == 2
    )
    assert "--format pcm is for -o -" in capsys.readouterr().err
    with pytest.MonkeyPatch.context() as patch:  # a folder this user cannot write (root can write all)
        patch.setattr("dia_ort.audio.os.access", lambda path, mode: False)
        assert main(["speak", "[S1] Hi.", "--model", missing_model, "-o", str(tmp_path / "a.wav")]) == 2
    assert "a.wav: it is not writable" in capsys.readouterr().err
