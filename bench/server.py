"""`dia-ort serve` as a user runs it: a subprocess on a loopback port (for benchmarks and tests).

Its log goes to a temporary file, not a pipe: under load the access log would fill a pipe nobody
reads, and the server would block writing to it.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.measure import memory_bytes
from bench.process import REPO


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`dia-ort serve --model FOLDER FLAGS...` on a free loopback port, up once /health answers."""

    def __init__(self, folder: Path, *flags: str, timeout: float = 120) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "dia_ort", "serve", "--model", str(folder), "--port", str(self.port)]
        env = {k: v for k, v in os.environ.items() if k != "DIA_ORT_API_KEY"}
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 (closed by stop)
        self.process = subprocess.Popen(
            [*argv, *flags], cwd=REPO, stdout=subprocess.DEVNULL, stderr=self.log, env=env
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited: {self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not come up in {timeout:.0f} s: {self.output()}")

    def output(self) -> str:
        """What the server has logged so far."""
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
        self.log.close()

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def decoder_steps(self) -> float:
        """The decoder steps (Dia2: frames) the server has run, from its Prometheus metrics."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=5).text
        families = text_string_to_metric_families(text)
        return next(s.value for f in families if f.name == "dia_ort_decoder_steps" for s in f.samples)

    def resident_bytes(self) -> int:
        """The server process's resident memory."""
        return memory_bytes("VmRSS", self.process.pid)
