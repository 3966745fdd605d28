"""Tiny random models, built and exported once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from dia_ort import Dia
from export.architecture import TINY, DiaArchitecture
from export.checkpoint import random_state
from export.dac import TINY_DAC
from export.dac_weights import random_dac
from export.pipeline import Sources, export_model


def export_tiny(
    folder: Path, arch: DiaArchitecture, state: dict[str, torch.Tensor], codec, dtypes=("float32",)
) -> Path:
    export_model(Sources(arch, state, codec, {"random_init": "test"}), folder, dtypes)
    return folder


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """The user's cache ($DIA_ORT_CACHE: verified-file records, exports) is a folder of the test session,
    for this process and the servers and commands it starts."""
    folder = tmp_path_factory.mktemp("dia-ort-cache")
    previous = os.environ.get("DIA_ORT_CACHE")
    os.environ["DIA_ORT_CACHE"] = str(folder)
    yield folder
    if previous is None:
        del os.environ["DIA_ORT_CACHE"]
    else:
        os.environ["DIA_ORT_CACHE"] = previous


@pytest.fixture(scope="session")
def tiny_codec():
    return random_dac(TINY_DAC, seed=0)


@pytest.fixture(scope="session")
def tiny_state() -> dict[str, torch.Tensor]:
    return random_state(TINY, seed=1)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny_state, tiny_codec) -> Path:
    return export_tiny(tmp_path_factory.mktemp("tiny"), TINY, tiny_state, tiny_codec)


@pytest.fixture(scope="session")
def tiny_dia(tiny_folder) -> Dia:
    return Dia.from_pretrained(tiny_folder, compute_dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def v01_arch() -> DiaArchitecture:
    return TINY.with_flavour("v0.1")


@pytest.fixture(scope="session")
def v01_folder(tmp_path_factory, v01_arch, tiny_state, tiny_codec) -> Path:
    return export_tiny(tmp_path_factory.mktemp("tiny_v01"), v01_arch, tiny_state, tiny_codec)


@pytest.fixture(scope="session")
def v01_dia(v01_folder) -> Dia:
    return Dia.from_pretrained(v01_folder, compute_dtype="float32", device="cpu")


@pytest.fixture
def ends_at_once(monkeypatch):
    """Make channel 0 sample EOS at once for the `ItemState`s put in the returned set (all when empty),
    in every decoding loop: each places its sampled rows through `ItemState.place`."""
    from dia_ort.item import ItemState

    original = ItemState.place
    items: set[ItemState] = set()

    def place(item, row, sampled):
        if not items or item in items:
            sampled = np.concatenate([[item.config.eos_id], sampled[1:]])
        return original(item, row, sampled)

    monkeypatch.setattr(ItemState, "place", place)
    return items
