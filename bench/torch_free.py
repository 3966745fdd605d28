"""`python -m bench.torch_free MODULE ARGS...`: run MODULE where importing torch fails.

The runtime needs no torch; measuring it in such a process proves that, and keeps torch's thread
pools and memory out of its timings and peak RSS.
"""

from __future__ import annotations

import importlib.abc
import runpy
import sys

BLOCKED = ("torch", "transformers", "export")


class _BlockTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        if name.split(".")[0] in BLOCKED:
            raise ImportError(f"{name} is blocked: this process measures the torch-free runtime")


def main() -> None:
    if len(sys.argv) < 2:
        raise SystemExit("usage: python -m bench.torch_free MODULE [ARGS...]")
    sys.meta_path.insert(0, _BlockTorch())
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
