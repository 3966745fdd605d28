"""Run one step of the benchmark in a child process: its wall time, its peak RSS, its JSON result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]  # children run here, so `-m bench...` and `-m export` resolve


@dataclass(frozen=True)
class ChildRun:
    """A finished child: its wall time, peak memory, JSON result and standard output."""

    seconds: float
    peak_rss: int  # bytes, the child's own maximum resident set
    result: dict[str, Any]  # what the child wrote to its --out file ({} without json_out)
    stdout: str


def run_child(argv: list[str], description: str, json_out: bool = True) -> ChildRun:
    """Run `python ARGV...` in the repository root (paths in ARGV must be absolute); with `json_out`,
    `--out FILE` is appended and the child's JSON read back. Its stderr passes through.

    `os.wait4` gives the rusage of exactly this child, so peak RSS needs no polling.
    """
    with tempfile.TemporaryDirectory(prefix="dia-bench-") as tmp:
        out, stdout = Path(tmp) / "result.json", Path(tmp) / "stdout.txt"
        command = [sys.executable, *argv, *(["--out", str(out)] if json_out else [])]
        with open(stdout, "w") as sink:
            began = time.perf_counter()
            child = subprocess.Popen(command, cwd=REPO, stdout=sink)
            _, status, usage = os.wait4(child.pid, 0)
            seconds = time.perf_counter() - began
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            raise RuntimeError(f"{description} failed (exit {child.returncode}): {' '.join(command)}")
        return ChildRun(
            seconds=seconds,
            peak_rss=usage.ru_maxrss * 1024,
            result=json.loads(out.read_text()) if json_out else {},
            stdout=stdout.read_text(),
        )


def emit(result: dict[str, Any], out: Path | None) -> None:
    """A child's result: printed, and written to `out` (the `--out` that `run_child` reads back)."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.write_text(text + "\n")
