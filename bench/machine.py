"""The machine a run came from: CPU, cores, memory, load, library versions and memory read bandwidth.

Decoding reads every decoder weight once per step, so the bandwidth sets a floor on the step time.
"""

from __future__ import annotations

import os
import platform
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import numpy as np
import onnxruntime

PACKAGES = ("onnxruntime", "numpy", "torch", "transformers", "onnx")
BANDWIDTH_BYTES = 1 << 30  # a float32 array far larger than any cache
BANDWIDTH_REPEATS = 10


@dataclass(frozen=True)
class Machine:
    """What a reader needs to compare a report with another machine's."""

    cpu: str
    logical_cores: int
    physical_cores: int
    ram_bytes: int
    load_average: float  # 1-minute load when the run started: other work skews every number
    date: str
    python: str
    versions: dict[str, str]
    bandwidth: float  # bytes/s read by `threads` threads (best of a few runs)
    threads: int
    gpu: str | None  # the GPU's name when the run measures CUDA


def _cpuinfo() -> list[dict[str, str]]:
    """/proc/cpuinfo as one dict per logical CPU."""
    blocks = Path("/proc/cpuinfo").read_text().strip().split("\n\n")
    return [
        dict(map(str.strip, line.split(":", 1)) for line in b.splitlines() if ":" in line) for b in blocks
    ]


def physical_cores() -> int:
    """Distinct (socket, core) pairs; what torch and ONNX Runtime size their thread pools by."""
    cpus = _cpuinfo()
    if all("core id" in c for c in cpus):
        return len({(c.get("physical id"), c["core id"]) for c in cpus})
    return len(cpus)


def read_bandwidth(threads: int) -> float:
    """Bytes/s of a numpy max over `BANDWIDTH_BYTES` of float32, split over `threads` threads.

    numpy releases the GIL inside the reduction, so the threads read in parallel, as the ONNX
    Runtime kernels of a decoder step do. The max, not the sum: numpy's pairwise sum is bound by its
    additions (it read 17.9 GB/s with 2 threads where the max read 31.8 GB/s, and a float32 decoder
    step read faster than the sum), which made every floor too high.
    """
    data = np.ones(BANDWIDTH_BYTES // 4, dtype=np.float32)
    parts = np.array_split(data, threads)
    best = float("inf")
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(BANDWIDTH_REPEATS):
            began = time.perf_counter()
            list(pool.map(np.max, parts))
            best = min(best, time.perf_counter() - began)
    return data.nbytes / best


def _version(package: str) -> str:
    if package == "onnxruntime":  # the build imported: onnxruntime-gpu installs the same module
        return f"{onnxruntime.__version__} ({', '.join(onnxruntime.get_available_providers())})"
    try:
        return version(package)
    except PackageNotFoundError:
        return "not installed"


def gpu_name() -> str:
    """The first GPU's name and memory, as nvidia-smi reports them."""
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        return subprocess.run(query, capture_output=True, text=True, check=True).stdout.splitlines()[0]
    except (OSError, subprocess.CalledProcessError, IndexError) as exc:
        return f"unknown ({exc})"


def describe(threads: int, device: str = "cpu") -> Machine:
    """This machine, now; measures the bandwidth with `threads` threads (a few seconds)."""
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return Machine(
        cpu=_cpuinfo()[0].get("model name", platform.processor() or "unknown"),
        logical_cores=os.cpu_count() or 1,
        physical_cores=physical_cores(),
        ram_bytes=int(meminfo["MemTotal"].split()[0]) * 1024,
        load_average=os.getloadavg()[0],
        date=datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        python=platform.python_version(),
        versions={p: _version(p) for p in PACKAGES},
        bandwidth=read_bandwidth(threads),
        threads=threads,
        gpu=gpu_name() if device == "cuda" else None,
    )
