"""The real server (uvicorn in a subprocess, on loopback) with the official `openai` client and httpx."""

from __future__ import annotations

import base64
import concurrent.futures
import io
import json
import shutil
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import av
import httpx
import numpy as np
import openai
import pytest
import soundfile as sf
from conftest import export_tiny
from prometheus_client.parser import text_string_to_metric_families

from bench.server import Server
from dia_ort import Dia
from dia_ort.audio import pcm16
from dia_ort.serving.limits import MAX_BODY_BYTES
from dia_ort.serving.voices import load_voices
from export.architecture import TINY
from export.checkpoint import random_state

TEXT = "[S1] Hello there. [S2] Hi, how are you?"
GREEDY = {"temperature": 0, "max_new_tokens": 40}
KEY = "sk-test-dia-ort"
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"  # screenshots (not committed)


@pytest.fixture(scope="module")
def voices(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("voices")
    sf.write(folder / "narrator.wav", 0.2 * np.sin(np.arange(44100 // 4) / 6), 44100)
    (folder / "narrator.txt").write_text("[S1] This is how I sound.")
    (folder / "broken.wav").write_bytes(b"not audio")
    (folder / "broken.txt").write_text("[S1] Never read.")
    return folder


# The tiny model with 16 decoder layers: its step then outweighs the work each request adds (sampling,
# the codec), as the real model's does, so a request lasts long enough to watch it stream.
SERVED = replace(TINY, decoder=replace(TINY.decoder, layers=16))


@pytest.fixture(scope="module")
def served_folder(tmp_path_factory, tiny_codec) -> Path:
    return export_tiny(tmp_path_factory.mktemp("served"), SERVED, random_state(SERVED, seed=4), tiny_codec)


@pytest.fixture(scope="module")
def served_dia(served_folder) -> Dia:
    return Dia(served_folder, device="cpu")


@pytest.fixture(scope="module")
def server(served_folder, voices):
    running = Server(served_folder, "--voices", str(voices), "--max-batch", "4")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def decode(data: bytes) -> tuple[np.ndarray, int]:
    """Any container FFmpeg reads (not libsndfile: an independent decoder) -> mono samples, rate."""
    with av.open(io.BytesIO(data)) as container:
        frames = [frame.to_ndarray().reshape(-1) for frame in container.decode(audio=0)]
        return np.concatenate(frames), container.streams.audio[0].rate


def test_every_format_decodes_to_the_generated_length(client, served_dia, tmp_path):
    """Each body opens with FFmpeg (PyAV) and with libsndfile (`soundfile.read`), at the generated
    length, and goes back in as a voice prompt; pcm, which has no header, is the plain result's bytes."""
    frames = GREEDY["max_new_tokens"]  # the random model never ends by itself
    for fmt, rate in (("wav", 44100), ("flac", 44100), ("mp3", 44100), ("opus", 48000), ("pcm", 24000)):
        data = client.audio.speech.create(
            model="dia", voice="alloy", input=TEXT, response_format=fmt, extra_body={"seed": 3, **GREEDY}
        ).content
        want = served_dia.generate(TEXT, seed=3, sample_rate=rate, **GREEDY)
        if fmt == "pcm":
            assert data == pcm16(want)  # the plain result, sample for sample
            continue
        samples, got_rate = decode(data)
        path = tmp_path / f"speech.{'ogg' if fmt == 'opus' else fmt}"
        path.write_bytes(data)
        read, read_rate = sf.read(path, dtype="int16")  # libsndfile, what `soundfile` users have
        assert got_rate == read_rate == rate
        for decoded in (samples, read):
            if fmt == "mp3":  # MP3 pads to whole frames of 1152 samples, plus the encoder's delay
                assert len(want) <= len(decoded) <= len(want) + 2 * 1152, fmt
            else:
                assert len(decoded) == len(want), fmt
        if fmt in ("wav", "flac"):  # lossless: the 16-bit samples of the plain result
            assert samples.dtype == np.int16  # FFmpeg hands 16-bit PCM out as it is
            np.testing.assert_array_equal(samples, np.frombuffer(pcm16(want), dtype="<i2"))
            np.testing.assert_array_equal(read, samples)
        prompt = served_dia.encode_audio(str(path))
        extra = 2 * 1152 // 512 + 1 if fmt == "mp3" else 1
        assert frames <= len(prompt) <= frames + extra, fmt


def clip_bytes(seconds: float, rate: int = 16000, fmt: str = "WAV") -> bytes:
    """A clip as a client sends it: a file's bytes (a hum, louder at its start)."""
    t = np.arange(int(seconds * rate)) / rate
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * 180 * t) * np.exp(-t)).astype(np.float32), rate, format=fmt)
    return buffer.getvalue()


def upload(server, **body) -> httpx.Response:
    url = f"{server.url}/v1/audio/voices"
    return httpx.post(url, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)


def test_a_voice_uploaded_as_a_clip_speaks_as_that_clip_prompts(server, client, served_dia, tmp_path):
    """The stored voice is the clip's codes and transcript: a request with it equals `generate` with
    the clip as audio prompt and the transcript before the text."""
    data = clip_bytes(1.5, fmt="FLAC")
    answer = upload(
        server, name="guest", transcript="[S1] This is my voice.", audio=base64.b64encode(data).decode()
    )
    assert answer.status_code == 201, answer.text
    assert answer.json() == {
        "name": "guest",
        "transcript": "[S1] This is my voice.",
        "seconds": round(130 / (44100 / 512), 2),
    }
    assert any(
        v["name"] == "guest" and v["prompt"]
        for v in httpx.get(f"{server.url}/v1/audio/voices").json()["voices"]
    )
    spoken = client.audio.speech.create(
        model="dia", voice="guest", input=TEXT, response_format="pcm", extra_body={"seed": 5, **GREEDY}
    ).content
    (tmp_path / "clip.flac").write_bytes(data)
    want = served_dia.generate(
        f"[S1] This is my voice. {TEXT}",
        audio_prompt=str(tmp_path / "clip.flac"),
        seed=5,
        sample_rate=24000,
        **GREEDY,
    )
    assert spoken == pcm16(want)


def test_a_bad_clip_gets_a_400_in_openais_shape(server):
    good = base64.b64encode(clip_bytes(1.0)).decode()
    for body, words in (
        ({"name": "x", "transcript": "[S1] Hi.", "audio": "not base64!"}, "not base64"),
        (
            {"name": "x", "transcript": "[S1] Hi.", "audio": base64.b64encode(b"no audio here").decode()},
            "cannot read the clip",
        ),
        (
            {
                "name": "x",
                "transcript": "[S1] Hi.",
                "audio": base64.b64encode(clip_bytes(21, rate=8000)).decode(),
            },
            "the clip lasts more than 20 s",
        ),
        ({"name": "alloy", "transcript": "[S1] Hi.", "audio": good}, "OpenAI"),
        ({"name": "narrator", "transcript": "[S1] Hi.", "audio": good}, "one of the server's own"),
        ({"name": "../x", "transcript": "[S1] Hi.", "audio": good}, "a voice name has letters"),
        ({"name": "x", "transcript": "  ", "audio": good}, "transcript is empty"),
        ({"name": "x", "transcript": "[S1] Hi."}, "audio"),
    ):
        answer = upload(server, **body)
        assert answer.status_code == 400, (body["name"], answer.text)
        error = answer.json()["error"]
        assert words in error["message"] and error["type"] == "invalid_request_error", error
        assert "/tmp" not in error["message"]  # where the server put the clip is its own business
    assert "x" not in {v["name"] for v in httpx.get(f"{server.url}/v1/audio/voices").json()["voices"]}


def test_streaming_response_equals_the_whole_response(client):
    body = dict(model="dia", voice="alloy", input=TEXT, response_format="wav", extra_body=GREEDY)
    whole = client.audio.speech.create(**body).content
    with client.audio.speech.with_streaming_response.create(**body) as response:
        pieces = list(response.iter_bytes(4096))
    assert b"".join(pieces) == whole and len(pieces) > 1


def test_sse_events_carry_the_same_audio(server, client):
    whole = client.audio.speech.create(
        model="dia", voice="alloy", input=TEXT, response_format="pcm", extra_body=GREEDY
    ).content
    body = {
        "model": "dia",
        "voice": "alloy",
        "input": TEXT,
        "response_format": "pcm",
        "stream_format": "sse",
        **GREEDY,
    }
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: ")]
    assert [e["type"] for e in events][-1] == "speech.audio.done"
    audio = b"".join(base64.b64decode(e["audio"]) for e in events if e["type"] == "speech.audio.delta")
    assert audio == whole


def test_a_voice_from_the_folder_clones_and_a_bad_file_is_skipped(client, server, served_dia, voices):
    listed = httpx.get(f"{server.url}/v1/audio/voices", timeout=5).json()["voices"]
    names = {v["name"]: v for v in listed}
    assert names["narrator"]["prompt"] and not names["alloy"]["prompt"] and "broken" not in names
    data = client.audio.speech.create(
        model="dia", voice="narrator", input=TEXT, response_format="pcm", extra_body=GREEDY
    ).content
    prompt = served_dia.encode_audio(str(voices / "narrator.wav"))
    want = served_dia.generate(f"[S1] This is how I sound. {TEXT}", prompt, sample_rate=24000, **GREEDY)
    assert data == pcm16(want)


def test_voices_folder_loading(served_dia, voices, tmp_path, caplog):
    loaded = load_voices(served_dia, voices)
    assert "narrator" in loaded and "broken" not in loaded and loaded["alloy"].codes is None
    assert "skipping voice broken.wav" in caplog.text
    with pytest.raises(ValueError, match="voice broken.wav"):
        load_voices(served_dia, voices, strict=True)
    outside = tmp_path / "outside.wav"
    sf.write(outside, 0.1 * np.sin(np.arange(4410) / 5), 44100)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "escape.wav").symlink_to(outside)
    (linked / "escape.txt").write_text("[S1] Hi.")
    assert "escape" not in load_voices(served_dia, linked)
    assert "escape.wav links to a file outside the voices folder" in caplog.text
    secret = tmp_path / "secret.txt"
    secret.write_text("[S1] not for the server")
    sf.write(linked / "talker.wav", 0.1 * np.sin(np.arange(4410) / 5), 44100)
    (linked / "talker.txt").symlink_to(secret)
    assert "talker" not in load_voices(served_dia, linked)  # a transcript linked out is not read either
    assert "talker.txt links to a file outside the voices folder" in caplog.text
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_voices(served_dia, tmp_path / "missing")


def test_four_concurrent_requests_share_the_batch(client, server, served_dia):
    """4 requests at once share decoder steps (counted, not timed), and each is its solo result."""
    texts = [f"[S1] Request number {i}. [S2] Fine." for i in range(4)]

    def speak(text: str) -> bytes:
        body = dict(model="dia", voice="alloy", input=text, response_format="pcm")
        return client.audio.speech.create(
            **body, extra_body={"temperature": 0, "max_new_tokens": 200}
        ).content

    def counted(run):
        before = server.decoder_steps()
        result = run()
        return server.decoder_steps() - before, result

    one = counted(lambda: speak(texts[0]))[0]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        four, results = counted(lambda: list(pool.map(speak, texts)))
    print(f"one request {one:.0f} steps, four at once {four:.0f} steps")
    assert four < 1.5 * one, (one, four)  # one after another would take 4x
    for text, data in zip(texts, results, strict=True):
        assert data == pcm16(served_dia.generate(text, temperature=0, max_new_tokens=200, sample_rate=24000))


def test_bad_requests_get_400_in_openai_shape(server):
    def post(**changes):
        body = {"model": "dia", "voice": "alloy", "input": TEXT, **changes}
        return httpx.post(f"{server.url}/v1/audio/speech", json=body, timeout=30)

    for changes, words in (
        ({"voice": "nobody"}, "unknown voice 'nobody'"),
        ({"voice": "../../etc/passwd"}, "unknown voice"),
        ({"voice": "/etc/passwd"}, "unknown voice"),
        ({"voice": "narrator\x00.wav"}, "unknown voice"),
        ({"voice": "broken"}, "unknown voice"),  # its file was skipped at startup
        ({"response_format": "aac"}, "'wav', 'pcm', 'flac', 'mp3', 'opus'"),
        ({"speed": 1.5}, "speed 1.5 is not supported"),
        ({"input": "[S1] " + "word " * 40}, "long_form"),
        ({"input": ""}, "input"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"instructions": "whisper"}, "instructions"),
        ({"unknown_field": 1}, "unknown_field"),
    ):
        response = post(**changes)
        assert response.status_code == 400, changes
        error = response.json()["error"]
        assert words in error["message"] and error["type"] == "invalid_request_error", (changes, error)
    garbled = httpx.post(
        f"{server.url}/v1/audio/speech", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert garbled.status_code == 400 and "error" in garbled.json()


def test_bodies_over_the_limit_get_413_before_they_are_read(server):
    """By Content-Length, and for a chunked body with none, as it arrives; the server goes on serving."""
    url = f"{server.url}/v1/audio/speech"
    oversized = json.dumps({"model": "dia", "voice": "alloy", "input": "[S1] " + "a" * MAX_BODY_BYTES})
    declared = httpx.post(url, content=oversized, headers={"Content-Type": "application/json"}, timeout=30)

    def chunks():
        for start in range(0, len(oversized), 65536):
            yield oversized[start : start + 65536].encode()

    chunked = httpx.post(url, content=chunks(), headers={"Content-Type": "application/json"}, timeout=30)
    for response in (declared, chunked):
        assert response.status_code == 413
        assert response.json()["error"]["code"] == "body_too_large"
    body = {"model": "dia", "voice": "alloy", "input": TEXT, "response_format": "pcm", **GREEDY}
    assert httpx.post(url, json=body, timeout=60).status_code == 200


def test_long_form_over_the_api(client, served_dia):
    script = " ".join(f"[S{1 + i % 2}] Line number {i} of a script that goes on." for i in range(8))
    data = client.audio.speech.create(
        model="dia",
        voice="alloy",
        input=script,
        response_format="pcm",
        extra_body={"long_form": True, "seed": 2, "max_new_tokens": 40},
    ).content
    want = served_dia.generate(script, long_form=True, seed=2, max_new_tokens=40, sample_rate=24000)
    assert data == pcm16(want)


def test_health_models_and_metrics(server, client):
    health = server.health()
    assert health["ready"] and health["max_batch"] == 4 and health["queue_depth"] == 0
    assert [m.id for m in client.models.list().data] == ["dia"]
    text = httpx.get(f"{server.url}/metrics", timeout=5).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "dia_ort_queue_depth",
        "dia_ort_batch_size",
        "dia_ort_steps_per_second",
        "dia_ort_speech_requests",
    ):
        assert name in families, sorted(families)
    ttfa = families["dia_ort_time_to_first_audio_seconds"]
    count = next(s.value for s in ttfa.samples if s.name.endswith("_count"))
    assert count > 0
    steps = next(s.value for s in families["dia_ort_decoder_steps"].samples)
    assert steps > 0


def test_a_client_that_leaves_frees_its_row(server):
    """It stops decoding: far fewer steps run than its 239-frame budget would take."""
    body = {"model": "dia", "voice": "alloy", "input": TEXT, "response_format": "pcm", "max_new_tokens": 239}
    assert server.health()["batch_occupancy"] == 0
    before = server.decoder_steps()
    with httpx.stream("POST", f"{server.url}/v1/audio/speech", json=body, timeout=60) as response:
        next(response.iter_bytes())  # the first audio: the request is in the batch
    deadline = time.monotonic() + 10
    while server.health()["batch_occupancy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.health()["batch_occupancy"] == 0
    assert server.decoder_steps() - before < 150  # the whole request would take 239 + 15 steps


def test_a_long_form_client_that_leaves_stops_its_script(server):
    """Its part leaves the batch and no next part is submitted: far fewer steps run than the first
    part's 239-frame budget would take, and none once the batch is empty."""
    script = " ".join(f"[S{1 + i % 2}] Line number {i} of a script that goes on and on." for i in range(48))
    body = {"model": "dia", "voice": "alloy", "response_format": "pcm", "long_form": True}
    assert server.health()["batch_occupancy"] == 0
    before = server.decoder_steps()
    with httpx.stream(
        "POST",
        f"{server.url}/v1/audio/speech",
        json={**body, "input": script, "max_new_tokens": 239},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        next(response.iter_bytes())  # the first audio: the script is running
    deadline = time.monotonic() + 10
    while server.health()["batch_occupancy"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.health()["batch_occupancy"] == 0
    stopped = server.decoder_steps()
    time.sleep(0.5)  # time for a next part to join, were one submitted
    assert server.decoder_steps() == stopped and server.health()["batch_occupancy"] == 0
    assert stopped - before < 150  # the first part alone would take 239 + 15 steps


@pytest.fixture(scope="module")
def guarded_server(served_folder):
    running = Server(served_folder, "--api-key", KEY, "--max-batch", "1", "--max-queue", "1")
    yield running
    running.stop()


def test_the_api_key_guards_every_route_but_health_and_the_page(guarded_server):
    url = guarded_server.url
    assert httpx.get(f"{url}/health").status_code == 200
    assert httpx.get(f"{url}/").status_code == 200
    refused = httpx.post(
        f"{url}/v1/audio/voices", json={"name": "x", "transcript": "[S1] Hi.", "audio": "AAAA"}
    )
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    for route in ("/v1/models", "/v1/audio/voices", "/metrics"):
        response = httpx.get(f"{url}{route}", headers={"Authorization": "Bearer wrong"})
        assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        assert KEY not in response.text and "wrong" not in response.text
        assert httpx.get(f"{url}{route}").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
    keyed = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=60)
    data = keyed.audio.speech.create(
        model="dia", voice="alloy", input=TEXT, response_format="pcm", extra_body=GREEDY
    )
    assert len(data.content) > 0
    assert KEY not in guarded_server.output() and "Bearer" not in guarded_server.output()  # never logged


def test_a_full_queue_answers_429_with_retry_after(guarded_server):
    """Max batch 1 and max queue 1: of 6 requests sent at once, those beyond the two are turned away."""
    url, headers = f"{guarded_server.url}/v1/audio/speech", {"Authorization": f"Bearer {KEY}"}
    body = {"model": "dia", "voice": "alloy", "input": TEXT, "response_format": "pcm", "max_new_tokens": 239}
    body["temperature"] = 0
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        responses = list(
            pool.map(lambda _: httpx.post(url, json=body, headers=headers, timeout=60), range(6))
        )
    served = [r for r in responses if r.status_code == 200]
    turned_away = [r for r in responses if r.status_code == 429]
    assert len(served) + len(turned_away) == 6 and len(served) >= 2 and turned_away
    assert all(
        r.headers["retry-after"] == "1" and r.json()["error"]["code"] == "queue_full" for r in turned_away
    )
    assert len({r.content for r in served}) == 1 and len(served[0].content) > 0  # greedy: one result


@pytest.fixture(scope="module")
def rated_server(tiny_folder):
    running = Server(tiny_folder, "--api-key", f"{KEY},{KEY}-2", "--requests-per-minute", "3")
    yield running
    running.stop()


def test_each_key_gets_its_request_rate_and_no_more(rated_server):
    """3 a minute: the first three go through, counted down in OpenAI's headers, the fourth gets 429
    with Retry-After (the openai client raises RateLimitError), and the other key is not affected."""
    url = f"{rated_server.url}/v1/audio/speech"
    body = {"model": "dia", "voice": "alloy", "input": TEXT, "response_format": "pcm", **GREEDY}

    def post(key: str) -> httpx.Response:
        return httpx.post(url, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)

    answers = [post(KEY) for _ in range(4)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert [a.headers["x-ratelimit-remaining-requests"] for a in answers] == ["2", "1", "0", "0"]
    assert all(a.headers["x-ratelimit-limit-requests"] == "3" for a in answers)
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limit_exceeded" and KEY not in refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 20  # one request comes back every 20 s
    keyed = openai.OpenAI(base_url=f"{rated_server.url}/v1", api_key=KEY, max_retries=0, timeout=60)
    with pytest.raises(openai.RateLimitError):
        keyed.audio.speech.create(model="dia", voice="alloy", input=TEXT, response_format="pcm")
    assert post(f"{KEY}-2").content == answers[0].content  # its own bucket; greedy: the same audio
    assert post("sk-unknown").status_code == 401


def test_a_bad_request_rate_is_refused_before_the_model_loads(tmp_path):
    missing = tmp_path / "no-model"
    run = subprocess.run(
        [sys.executable, "-m", "dia_ort", "serve", "--model", str(missing), "--requests-per-minute", "0"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "at least 1 a minute" in run.stderr, run.stderr


def test_the_page_plays_audio_while_it_is_generated(server):
    """Debian's chromium, driven by Playwright: type a script, press Play, hear it (audio time > 0)."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required"],
        )
        try:
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_function("document.getElementById('voice').options.length > 1", timeout=30_000)
            assert "narrator" in page.inner_text("#voice")
            page.fill("#script", "")
            page.click("button[data-tag='[S1]']")
            page.keyboard.type("Hello from the page.")
            page.click("button[data-tag='[S2]']")
            page.keyboard.type("It plays while it is made.")
            assert page.input_value("#script").strip().startswith("[S1] Hello")
            page.fill("#seed", "1")
            page.click("#play")
            page.wait_for_function(
                "Number(document.getElementById('played').textContent) > 0", timeout=60_000
            )
            assert page.inner_text("#ttfa").endswith(" s") and page.inner_text("#error") == ""
            page.wait_for_selector("#download:not([hidden])", timeout=60_000)
            page.screenshot(path=str(ARTIFACTS / "page.png"))
        finally:
            browser.close()


def test_the_page_clones_voices_from_a_file_and_the_microphone_and_stops(server, tmp_path):
    """Chromium (its fake microphone plays a beep): a clip from a file and one recorded become voices;
    a request with one draws its waveform as it streams; Stop cancels it, and the server frees its rows."""
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(exist_ok=True)
    clip = tmp_path / "clip.wav"
    clip.write_bytes(clip_bytes(2.0))
    media = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=shutil.which("chromium"),
            args=["--no-sandbox", "--autoplay-policy=no-user-gesture-required", *media],
        )
        try:
            page = browser.new_page()
            page.goto(server.url)
            page.wait_for_function("document.getElementById('server').textContent.includes('batch')")
            assert page.inner_text("#server").endswith("variant float32 · batch of up to 4 requests")
            page.set_input_files("#voice_file", str(clip))
            page.fill("#voice_name", "from-file")
            page.fill("#voice_text", "[S1] A clip from a file.")
            page.click("#save_voice")
            page.wait_for_function("document.getElementById('voice').value === 'from-file'", timeout=60_000)
            assert page.inner_text("#clip") == "saved as from-file (2.0 s)"
            page.click("#record")
            page.wait_for_timeout(1500)
            page.click("#record")
            page.wait_for_function("document.getElementById('clip').textContent === 'recording'")
            page.fill("#voice_name", "from-mic")
            page.fill("#voice_text", "[S1] A clip from the microphone.")
            page.click("#save_voice")
            page.wait_for_function("document.getElementById('voice').value === 'from-mic'", timeout=60_000)
            assert (
                page.inner_text("#clip").startswith("saved as from-mic") and page.inner_text("#error") == ""
            )
            page.screenshot(path=str(ARTIFACTS / "page-voice.png"), full_page=True)
            page.fill("#script", "[S2] Now I speak with it.")  # within the tiny model's text window
            page.fill("#seed", "2")
            page.click("#play")
            page.wait_for_function(
                "Number(document.getElementById('wave').dataset.samples || 0) > 0", timeout=60_000
            )
            page.screenshot(path=str(ARTIFACTS / "page-wave.png"), full_page=True)
            page.click("#stop")
            page.wait_for_function(
                "document.getElementById('played').textContent === 'stopped'", timeout=10_000
            )
            assert page.inner_text("#error") == ""
        finally:
            browser.close()
    deadline = time.monotonic() + 10
    while server.health()["batch_occupancy"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.health()["batch_occupancy"] == 0
    voices = {v["name"]: v for v in httpx.get(f"{server.url}/v1/audio/voices").json()["voices"]}
    assert (
        voices["from-mic"]["prompt"]
        and voices["from-mic"]["transcript"] == "[S1] A clip from the microphone."
    )


AUDIO_DURATION = """async ([source, type]) => {
    const bytes = Uint8Array.from(atob(source), (c) => c.charCodeAt(0));
    const audio = new Audio(URL.createObjectURL(new Blob([bytes], { type })));
    await new Promise((loaded, failed) => {
        audio.onloadedmetadata = loaded;
        audio.onerror = () => failed(new Error(`cannot open: ${audio.error && audio.error.message}`));
    });
    if (!Number.isFinite(audio.duration)) {  // a stream's length is known once it was read through
        audio.currentTime = 1e9;
        await new Promise((seeked) => (audio.onseeked = seeked));
    }
    return audio.duration;
}"""


def test_chromium_opens_every_format_the_server_and_speak_write(server, client, tiny_folder, tmp_path):
    """Each body the server sends and each file `speak -o` writes opens in Chromium's <audio> with its
    length: exact for wav and flac (a streamed wav too), within the encoder's padding for the lossy
    ones (two 1152-sample frames for a streamed mp3; Chromium counts Opus's and Vorbis's priming too)."""
    from playwright.sync_api import sync_playwright

    from dia_ort.cli import main
    from dia_ort.serving.formats import FORMATS

    seconds = GREEDY["max_new_tokens"] * 512 / 44100
    clips = {}
    for fmt in ("wav", "flac", "mp3", "opus"):
        body = client.audio.speech.create(
            model="dia", voice="alloy", input=TEXT, response_format=fmt, extra_body=GREEDY
        ).content
        clips[f"server {fmt}"] = (body, FORMATS[fmt].media_type)
    for ext, media_type in (
        ("wav", "audio/wav"),
        ("flac", "audio/flac"),
        ("ogg", "audio/ogg"),
        ("mp3", "audio/mpeg"),
    ):
        out = tmp_path / f"speak.{ext}"
        argv = ["speak", "[S1] Hello there.", "--model", str(tiny_folder), "-o", str(out), "--quiet"]
        assert main([*argv, "--seed", "1", "--max-new-tokens", str(GREEDY["max_new_tokens"])]) == 0
        clips[f"speak {ext}"] = (out.read_bytes(), media_type)
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.goto(server.url)
            durations = {
                name: page.evaluate(AUDIO_DURATION, [base64.b64encode(data).decode(), media_type])
                for name, (data, media_type) in clips.items()
            }
        finally:
            browser.close()
    for name, duration in durations.items():
        lossless = name.endswith(("wav", "flac"))
        slack = 1e-5 if lossless else 2 * 1152 / 44100 if name.endswith("mp3") else 0.02
        assert seconds - 1e-5 <= duration <= seconds + slack, (name, duration)
