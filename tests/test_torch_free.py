"""The runtime works in a process where importing torch fails."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCK_TORCH = """
import importlib.abc, sys

class NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "transformers", "export"):
            raise ImportError(f"{name} is blocked in this test")

sys.meta_path.insert(0, NoTorch())
"""


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    script = BLOCK_TORCH + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)


def test_generate_and_save_without_torch(tiny_folder, tmp_path):
    out = tmp_path / "speech.wav"
    result = run_without_torch(
        f"""
        import numpy as np
        import dia_ort
        model = dia_ort.Dia.from_pretrained({str(tiny_folder)!r}, compute_dtype="float32", device="cpu")
        audio = model.generate("[S1] Hello. [S2] Hi.", max_new_tokens=8, seed=0, sample_rate=22050)
        codes = model.encode_audio(np.sin(np.arange(4096) / 10).astype(np.float32))
        model.save_audio({str(out)!r}, audio, 22050)
        assert "torch" not in sys.modules, "torch was imported"
        print(audio.shape, codes.shape)
        """
    )
    assert result.returncode == 0, result.stderr
    assert out.is_file() and out.stat().st_size > 44
    assert "(2048,)" in result.stdout  # 8 frames * 512 samples at 44.1 kHz, resampled to 22.05 kHz
    assert "(8, 9)" in result.stdout


def test_blocking_really_blocks():
    result = run_without_torch("import torch")
    assert result.returncode != 0 and "blocked" in result.stderr
