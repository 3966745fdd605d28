"""`dia-ort serve` on a Dia2 folder: the real server (uvicorn in a subprocess, on loopback) with the
official `openai` client, httpx and Debian's chromium. Every response equals `Dia2.generate` with the
same seed, alone or batched with others."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import os
import shutil

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf

from bench.server import Server
from dia_ort.audio import StreamResampler, load_audio, pcm16
from dia_ort.dia2 import Dia2, PrefixConfig, Speaker
from dia_ort.serving.ray import REPLICA_HEADER
from export.dia2_pipeline import dia2_random_sources, export_dia2

SCRIPT = "[S1] Hello there, how are you? [S2] Fine, thanks."
TRANSCRIPT = "[S1] This is how I sound."


@pytest.fixture(scope="module")
def dia2_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dia2-served")
    export_dia2(dia2_random_sources("dia2-tiny", seed=7), folder, ("float32",))
    return folder


@pytest.fixture(scope="module")
def model(dia2_folder) -> Dia2:
    return Dia2(dia2_folder, device="cpu")


@pytest.fixture(scope="module")
def voices(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dia2-voices")
    t = np.arange(24000 // 2) / 24000
    sf.write(folder / "narrator.wav", 0.3 * np.sin(2 * np.pi * 220 * t), 24000)
    (folder / "narrator.txt").write_text(TRANSCRIPT)
    return folder


@pytest.fixture(scope="module")
def server(dia2_folder, voices):
    running = Server(dia2_folder, "--voices", str(voices), "--max-batch", "4")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def speech(client: openai.OpenAI, fmt: str = "pcm", voice: str = "alloy", **extra) -> bytes:
    return client.audio.speech.create(
        model="dia2", voice=voice, input=SCRIPT, response_format=fmt, extra_body=extra
    ).content


def at_rate(audio: np.ndarray, rate: int) -> np.ndarray:
    """The model's 24 kHz audio at `rate`, as one streaming resampler gives it."""
    return audio if rate == 24000 else StreamResampler(rate, 24000).resample_chunk(audio, last=True)


def test_every_format_is_the_generated_audio(client, model):
    """pcm is `generate`'s samples; wav and flac those resampled to 44.1 kHz; mp3 and opus decode (with
    FFmpeg) to that length, within the codecs' padding."""
    want = model.generate(SCRIPT, seed=3).waveform
    assert len(want) > 0
    assert speech(client, seed=3) == pcm16(want)
    for fmt, rate in (("wav", 44100), ("flac", 44100), ("mp3", 44100), ("opus", 48000)):
        data = speech(client, fmt, seed=3)
        with av.open(io.BytesIO(data)) as container:
            samples = np.concatenate([f.to_ndarray().reshape(-1) for f in container.decode(audio=0)])
            assert container.streams.audio[0].rate == rate
        expected = at_rate(want, rate if fmt != "opus" else 48000)
        if fmt in ("wav", "flac"):
            np.testing.assert_array_equal(samples, np.frombuffer(pcm16(expected), dtype="<i2"))
        else:
            assert len(expected) <= len(samples) <= len(expected) + 2 * 1152 + 960, fmt


def test_streaming_and_sse_carry_the_same_audio(server, client, model):
    with client.audio.speech.with_streaming_response.create(
        model="dia2", voice="alloy", input=SCRIPT, response_format="pcm", extra_body={"seed": 4}
    ) as response:
        streamed = b"".join(response.iter_bytes(512))
    assert streamed == pcm16(model.generate(SCRIPT, seed=4).waveform)
    body = {"model": "dia2", "voice": "alloy", "input": SCRIPT, "response_format": "pcm"}
    body |= {"stream_format": "sse", "seed": 4}
    events = httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=120).text.split("\n\n")
    payloads = [json.loads(e.removeprefix("data: ")) for e in events if e]
    assert payloads[-1] == {"type": "speech.audio.done"}
    assert b"".join(base64.b64decode(p["audio"]) for p in payloads[:-1]) == streamed


def test_concurrent_requests_share_the_batch_and_each_equals_its_own(server, client, model):
    """Four requests at once share frames (counted, not timed), and each is its solo result."""
    seeds = [11, 12, 13, 14]
    before = server.decoder_steps()
    speech(client, seed=seeds[0], cfg_scale=1.5)
    one = server.decoder_steps() - before
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda seed: speech(client, seed=seed, cfg_scale=1.5), seeds))
    four = server.decoder_steps() - before - one
    assert four < 2.5 * one, (one, four)  # one after another would take about 4x
    for seed, data in zip(seeds, bodies, strict=True):
        assert data == pcm16(model.generate(SCRIPT, seed=seed, cfg_scale=1.5).waveform)
    assert server.health()["batch_occupancy"] == 0


def test_a_voice_is_a_prefix_from_the_folder_or_uploaded(server, client, model, voices, tmp_path):
    """The folder's voice speaks as `generate` with its clip and transcript as speaker 1's prefix; an
    uploaded clip as the same clip read the way the server reads uploads."""
    wave = load_audio(str(voices / "narrator.wav"), to_rate=24000)
    prefix = PrefixConfig(Speaker(wave, TRANSCRIPT))
    assert speech(client, voice="narrator", seed=5) == pcm16(
        model.generate(SCRIPT, seed=5, prefix=prefix).waveform
    )

    buffer = io.BytesIO()
    t = np.arange(16000) / 16000
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 180 * t)).astype(np.float32), 16000, format="FLAC")
    body = {
        "name": "mine",
        "transcript": "[S1] My own words.",
        "audio": base64.b64encode(buffer.getvalue()).decode(),
    }
    added = httpx.post(f"{server.url}/v1/audio/voices", json=body, timeout=60)
    assert added.status_code == 201 and added.json()["seconds"] == 1.0
    (tmp_path / "clip.flac").write_bytes(buffer.getvalue())
    uploaded = load_audio(str(tmp_path / "clip.flac"), to_rate=24000)
    prefix = PrefixConfig(Speaker(uploaded, "[S1] My own words."))
    assert speech(client, voice="mine", seed=6) == pcm16(
        model.generate(SCRIPT, seed=6, prefix=prefix).waveform
    )
    listed = httpx.get(f"{server.url}/v1/audio/voices", timeout=10).json()["voices"]
    assert {"name": "mine", "prompt": True, "transcript": "[S1] My own words."} in listed

    buffer = io.BytesIO()  # over half of the tiny model's 7.7 s window
    sf.write(buffer, np.zeros(16000 * 5, np.float32), 16000, format="WAV")
    body |= {"name": "long", "audio": base64.b64encode(buffer.getvalue()).decode()}
    refused = httpx.post(f"{server.url}/v1/audio/voices", json=body, timeout=60)
    assert (
        refused.status_code == 400
        and "a Dia2 voice takes at most 3.8 s" in refused.json()["error"]["message"]
    )


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"temperature": 0.5}, "not options of Dia2"),
        ({"top_p": 0.9, "max_new_tokens": 20}, "['max_new_tokens', 'top_p']: not options of Dia2"),
        ({"long_form": True}, "long_form is Dia's"),
        ({"cfg_scale": -1.0}, "cfg_scale"),
        ({"input": "[S1]"}, "script is empty"),
    ],
)
def test_what_dia2_does_not_take_gets_a_400_naming_it(server, body, message):
    request = {"model": "dia2", "voice": "alloy", "input": SCRIPT, "response_format": "pcm"} | body
    response = httpx.post(f"{server.url}/v1/audio/speech", json=request, timeout=30)
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_health_and_models_name_the_family(server):
    health = server.health()
    assert health["family"] == "dia2" and health["ready"] and health["compute_dtype"] == "float32"
    models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["dia2"]


def test_the_page_plays_dia2_with_its_own_options(server):
    """Chromium: the page hides Dia's temperature and top_p, starts cfg_scale at Dia2's 2.0, and plays."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"],
        )
        try:
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_function(
                "document.getElementById('server').textContent.includes('dia2')", timeout=30_000
            )
            assert not page.is_visible("#temperature") and not page.is_visible("#top_p")
            assert page.input_value("#cfg_scale") == "2.0"
            page.fill("#script", SCRIPT)
            page.fill("#seed", "1")
            page.click("#play")
            page.wait_for_function(
                "Number(document.getElementById('played').textContent) > 0", timeout=60_000
            )
            page.wait_for_selector("#download:not([hidden])", timeout=60_000)
            assert page.inner_text("#error") == ""
        finally:
            browser.close()


def test_ray_serves_a_dia2_folder(dia2_folder):
    """`dia-ort serve --ray` on a Dia2 folder, through Ray's proxy: streamed answers equal the library's
    (as a replica runs it: the cores shared out among the replicas)."""
    running = Server(
        dia2_folder, "--ray", "--replicas", "1", "--max-batch", "2", "--max-queue", "4", timeout=300
    )
    try:
        replica = Dia2(dia2_folder, device="cpu", threads=os.cpu_count() or 1)
        body = {"model": "dia2", "voice": "alloy", "input": SCRIPT, "response_format": "pcm", "seed": 8}
        with httpx.stream("POST", f"{running.url}/v1/audio/speech", json=body, timeout=120) as response:
            assert response.status_code == 200 and response.headers[REPLICA_HEADER]
            chunks = list(response.iter_bytes())
        assert len(chunks) > 1 and b"".join(chunks) == pcm16(replica.generate(SCRIPT, seed=8).waveform)
        assert httpx.get(f"{running.url}/health", timeout=10).json()["family"] == "dia2"
    finally:
        running.stop()


def test_serve_reads_the_family_of_a_hub_repo(dia2_folder, model, monkeypatch):
    """`dia-ort serve --model ORG/NAME` of a repo holding an exported Dia2 folder (tests/fake_hub.py on
    loopback): the family comes from the repo's manifest, and the answers are the library's."""
    from fake_hub import FakeHub

    hub = FakeHub("nari-labs/Dia2-served", dia2_folder)
    monkeypatch.setenv("HF_ENDPOINT", hub.url)
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    try:
        running = Server("nari-labs/Dia2-served", timeout=120)
        try:
            assert running.health()["family"] == "dia2"
            body = {"model": "dia2", "voice": "alloy", "input": SCRIPT, "response_format": "pcm", "seed": 9}
            answer = httpx.post(f"{running.url}/v1/audio/speech", json=body, timeout=120)
            assert answer.content == pcm16(model.generate(SCRIPT, seed=9).waveform)
        finally:
            running.stop()
    finally:
        hub.close()
