"""Which model family a checkpoint is (Dia 1.6B or Dia2), and exporting it by its family."""

from __future__ import annotations

from pathlib import Path

from dia_ort.dia2_config import is_dia2_checkpoint
from dia_ort.manifest import Manifest
from export.dia2_pipeline import dia2_checkpoint_sources, export_dia2
from export.pipeline import DEFAULT_DAC, checkpoint_sources, export_model, local_folder


def export_checkpoint_folder(
    model: str, revision: str | None, mimi: str | None, dac: str, out: str | Path, dtypes: tuple[str, ...]
) -> Manifest:
    """Export the checkpoint `model` (a folder or Hub id) by its family: Dia2 with Mimi, else Dia with DAC."""
    folder = local_folder(model, revision)
    if is_dia2_checkpoint(folder):
        return export_dia2(dia2_checkpoint_sources(folder, model, revision, mimi), out, dtypes)
    return export_model(checkpoint_sources(model, dac, revision, folder), out, dtypes)


def export_checkpoint(checkpoint: str, out: str | Path, dtypes: tuple[str, ...]) -> Manifest:
    """Export a Dia or Dia2 checkpoint (folder or Hub id) with its default codec: the `dia_ort.exporters`
    entry point, through which the runtime exports a checkpoint on first use."""
    return export_checkpoint_folder(checkpoint, None, None, DEFAULT_DAC, out, dtypes)
