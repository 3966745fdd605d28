"""The benchmark's model folders: made by `python -m export --random-init` once, then reused.

The export runs as a child process so that its wall time and peak RSS are its own; they are kept
next to the manifest, so a reused folder still reports what its export cost.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from bench.process import run_child
from dia_ort.manifest import FORMAT_VERSION, MANIFEST_NAME, Manifest
from export import GRAPH_REVISION
from export.quantize import RECIPES  # no torch: onnx only

RECORD = "bench_export.json"
QUANTIZED = tuple(RECIPES)  # the variants `python -m export --quantize` writes


@dataclass(frozen=True)
class ExportRun:
    """What making a model folder cost, as `python -m export` ran it."""

    command: str
    seconds: float | None  # None: a folder this benchmark did not export
    peak_rss: int | None  # bytes
    reused: bool


def export_command(size: str, folder: Path, seed: int, variants: tuple[str, ...]) -> list[str]:
    """The arguments of `python` that export `size` with random weights and `variants` into `folder`.

    float32 is always written (the quantized variants are made from it).
    """
    dtypes = ["float32", *(v for v in variants if v not in QUANTIZED and v != "float32")]
    quantize = [v for v in variants if v in QUANTIZED]
    argv = ["-m", "export", "--random-init", size, "--seed", str(seed), "--out", str(folder)]
    return argv + ["--dtype", *dtypes] + (["--quantize", *quantize] if quantize else [])


def _current_format(folder: Path) -> bool:
    """Whether the folder's manifest is of the format this runtime reads and its graphs of the revision
    the export writes now (else it is exported anew)."""
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    revision = manifest.get("tools", {}).get("graph_revision")
    return manifest.get("format_version") == FORMAT_VERSION and revision == GRAPH_REVISION


def ensure_export(
    size: str, folder: Path, seed: int, variants: tuple[str, ...], re_export: bool
) -> tuple[Manifest, ExportRun]:
    """The folder's manifest, exporting first unless a finished export of the current format is there."""
    record = folder / RECORD
    if (folder / MANIFEST_NAME).is_file() and not re_export and _current_format(folder):
        if record.is_file():
            run = ExportRun(**{**json.loads(record.read_text()), "reused": True})
        else:
            run = ExportRun(command="(an existing folder)", seconds=None, peak_rss=None, reused=True)
        return Manifest.load(folder), run
    (folder / MANIFEST_NAME).unlink(missing_ok=True)  # a failed re-export must not look finished
    argv = export_command(size, folder, seed, variants)
    child = run_child(argv, f"export of the {size} model", json_out=False)
    run = ExportRun(
        command="python " + " ".join(argv), seconds=child.seconds, peak_rss=child.peak_rss, reused=False
    )
    record.write_text(json.dumps(asdict(run), indent=2) + "\n")
    return Manifest.load(folder), run
