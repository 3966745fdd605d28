"""Models from the Hugging Face Hub, against a local stand-in for its file API (tests/fake_hub.py):
an exported folder's repo gives only what the chosen variant needs; offline, the cache serves."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import export_tiny
from fake_hub import COMMIT, FakeHub

from dia_ort import Dia
from dia_ort.manifest import MANIFEST_NAME, Manifest
from export.architecture import TINY

REPO = "nari-test/dia-tiny-onnx"
RESOLVE = (
    "import sys; from dia_ort.hub import resolve_model_folder; "
    "print(resolve_model_folder(sys.argv[1], revision=sys.argv[2] or None, cache_dir=sys.argv[3], variant=sys.argv[4]))"
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_state, tiny_codec) -> Path:
    return export_tiny(tmp_path_factory.mktemp("hub"), TINY, tiny_state, tiny_codec, ("float32", "int8"))


@pytest.fixture
def hub(exported):
    server = FakeHub(REPO, exported, tags=("v1",))
    yield server
    server.close()


def resolve(hub: FakeHub, cache: Path, variant: str, revision: str = "", **env: str) -> Path:
    """`resolve_model_folder` in a fresh process that talks to `hub` (huggingface_hub reads its
    endpoint and offline switch when it is imported)."""
    environment = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_TELEMETRY": "1", **env}
    run = subprocess.run(
        [sys.executable, "-c", RESOLVE, REPO, revision, str(cache), variant],
        capture_output=True, text=True, timeout=120, env=environment,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    return Path(run.stdout.strip().splitlines()[-1])


def test_a_variant_fetches_only_the_manifest_the_codec_and_its_own_graphs(hub, exported, tmp_path):
    folder = resolve(hub, tmp_path, "int8")
    manifest = Manifest.load(exported)
    wanted = {MANIFEST_NAME, *(entry.path for entry in manifest.files("int8"))}
    assert set(hub.fetched()) == wanted and len(hub.fetched()) == len(wanted)  # each file once
    assert not any(".float32.onnx" in name and "decoder_step" in name for name in hub.fetched())
    fetched = sum((exported / name).stat().st_size for name in wanted)
    whole = sum(p.stat().st_size for p in exported.iterdir() if p.is_file())
    print(f"int8: {fetched} of the folder's {whole} bytes")
    assert fetched < whole
    here = Dia(folder, compute_dtype="int8", device="cpu").generate_codes(
        "[S1] Hi.", temperature=0, max_new_tokens=6
    )
    there = Dia(exported, compute_dtype="int8", device="cpu").generate_codes(
        "[S1] Hi.", temperature=0, max_new_tokens=6
    )
    np.testing.assert_array_equal(here[0], there[0])


def test_the_folder_carries_a_model_card_for_the_hub(exported):
    card = (exported / "README.md").read_text()
    metadata = card.split("---")[1].splitlines()
    for line in ("library_name: onnxruntime", "pipeline_tag: text-to-speech", "license: apache-2.0"):
        assert line in metadata
    manifest = Manifest.load(exported)
    for dtype in ("float32", "int8"):
        size = sum((exported / entry.path).stat().st_size for entry in manifest.files(dtype))
        assert f"| `{dtype}` | {size / 1e9:.2f} GB |" in card
    int8 = re.search(r"\| `int8` \|[^|]*\|[^|]*\| ([0-9.]+) \| ([0-9.]+) \(([0-9.]+)x real time\) \|", card)
    agreement, steps, realtime = map(float, int8.groups())
    assert 0.5 < agreement <= 1 and steps > 0 and realtime == pytest.approx(steps / (44100 / 512), abs=0.01)
    assert "on the exporting CPU" in card and "Speeds: one greedy request" in card
    assert "hf upload ORG/NAME DIR" in card


def test_offline_the_cache_serves_without_a_request(hub, tmp_path):
    online = resolve(hub, tmp_path, "int8")
    before = len(hub.requests)
    assert resolve(hub, tmp_path, "int8", HF_HUB_OFFLINE="1") == online
    assert len(hub.requests) == before


def test_a_revision_pins_what_is_fetched(hub, tmp_path):
    folder = resolve(hub, tmp_path, "int8", revision="v1")
    assert folder.name == COMMIT
    asked = {
        path.split("/")[6] if path.startswith("/api/") else path.split("/")[4] for _, path in hub.requests
    }
    assert asked <= {"v1", COMMIT} and "v1" in asked
    with pytest.raises(AssertionError, match=f"the Hub repository '{REPO}' has no revision 'no-such-tag'"):
        resolve(hub, tmp_path / "other", "int8", revision="no-such-tag")
