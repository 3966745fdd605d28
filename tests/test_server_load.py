"""The real server under load on loopback (bench.load's bounded asyncio client), and fuzzed bodies.

50 clients for a bounded time, each with an API key of its own: most stream speech, some leave
mid-stream, send a wrong key, malformed JSON or a body over the limit, and a client that the full
queue turns away retries soon enough to go over its key's request rate. Every answer is the right
status in OpenAI's error shape, no key gets more requests through than its rate allows, every
completed stream equals the library's result for its seed, /health answers within 1 s throughout,
disconnected requests free their rows, and memory comes back near where it started.
"""

from __future__ import annotations

import asyncio
import hashlib
import time

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.load import TEXT, client_keys, run_load
from bench.server import Server
from dia_ort.audio import pcm16

KEY = "sk-load-test"
CLIENTS = 50
SECONDS = 20
FRAMES = 40
PER_MINUTE = 12  # each key's request rate: low enough that a 2-core AMD EPYC VM, whose clients get about 23 speech requests each in 20 s, still crosses it
RSS_GROWTH_LIMIT = 150 * 2**20  # bytes the server may keep after the load, against its warm state


@pytest.fixture(scope="module")
def server(tiny_folder):
    keys = ",".join([KEY, *client_keys(CLIENTS)])
    limits = ["--max-batch", "4", "--max-queue", "8", "--requests-per-minute", str(PER_MINUTE)]
    running = Server(tiny_folder, "--api-key", keys, *limits)
    yield running
    running.stop()


def speech(server: Server, **changes) -> httpx.Response:
    body = {"model": "dia", "voice": "alloy", "input": TEXT, "response_format": "pcm", **changes}
    return httpx.post(
        f"{server.url}/v1/audio/speech", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )


def wait_until_idle(server: Server, seconds: float = 15) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        health = server.health()
        if health["batch_occupancy"] == 0 and health["queue_depth"] == 0:
            return health
        time.sleep(0.1)
    raise AssertionError(f"the server is still busy {seconds} s after the load: {server.health()}")


def test_fifty_clients_for_twenty_seconds(server, tiny_dia):
    for _ in range(2):  # warm: the batch's buffers and ONNX Runtime's arenas at their working size
        asyncio.run(run_load(server.url, KEY, clients=8, seconds=1, frames=FRAMES, max_requests=1))
    wait_until_idle(server)
    warm = server.resident_bytes()

    keys = client_keys(CLIENTS)
    report = asyncio.run(run_load(server.url, keys, clients=CLIENTS, seconds=SECONDS, frames=FRAMES))
    summary = report.summary()
    print(f"load: {summary}")

    expected = {
        "speech": {(200, ""), (429, "queue_full"), (429, "rate_limit_exceeded")},
        "wrong_key": {(401, "invalid_api_key")},
        "malformed": {(400, "invalid_body")},
    }
    expected["leave"] = expected["speech"]
    for outcome in report.outcomes:
        if outcome.kind == "oversized":  # refused before its body is read; the client may see the close
            assert outcome.status == 413 or "Error" in outcome.error, outcome
        else:
            assert (outcome.status, outcome.code) in expected[outcome.kind], outcome
    completed = report.completed()
    codes = {o.code for o in report.outcomes}
    assert len(completed) >= 10 and {"queue_full", "rate_limit_exceeded"} <= codes, summary["statuses"]
    allowed = PER_MINUTE * (1 + report.wall / 60)  # a full bucket, and what refills during the run
    for client in range(CLIENTS):
        counted = [
            o
            for o in report.outcomes
            if o.client == client and o.kind in ("speech", "leave") and o.code != "rate_limit_exceeded"
        ]
        assert len(counted) <= allowed, (client, len(counted), allowed)
    for outcome in completed[:12]:  # each equals the library's own result for its seed
        want = pcm16(tiny_dia.generate(TEXT, seed=outcome.seed, max_new_tokens=FRAMES, sample_rate=24000))
        assert outcome.sha256 == hashlib.sha256(want).hexdigest(), outcome
    assert report.health_failures == 0 and summary["health_max"] < 1.0, summary

    health = wait_until_idle(server)  # the clients that left freed their rows
    assert health["ready"]
    growth = server.resident_bytes() - warm
    print(f"server memory: warm {warm / 2**20:.0f} MiB, after the load {growth / 2**20:+.0f} MiB")
    assert growth < RSS_GROWTH_LIMIT
    assert speech(server, seed=1, max_new_tokens=FRAMES).status_code == 200  # and it still serves


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
FIELDS = st.sampled_from(
    ["model", "input", "voice", "response_format", "speed", "stream_format", "instructions", "seed",
     "temperature", "top_p", "top_k", "cfg_scale", "cfg_filter_top_k", "max_new_tokens", "long_form", "x"]
)  # fmt: skip


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(
    changes=st.dictionaries(FIELDS, JSON_VALUES, max_size=4),
    drop=st.sets(st.sampled_from(["model", "input", "voice"])),
)
def test_any_request_body_gets_an_answer_never_a_500(server, changes, drop):
    """A body with any fields changed to any JSON value: 200 with audio, or a 4xx in OpenAI's shape."""
    body = {
        "model": "dia",
        "voice": "alloy",
        "input": "[S1] Hi.",
        "response_format": "pcm",
        "max_new_tokens": 8,
    }
    body = {k: v for k, v in {**body, **changes}.items() if k not in drop}
    if isinstance(body.get("max_new_tokens"), int) and body["max_new_tokens"] > 8:
        body["max_new_tokens"] = 8  # keep each generation short; the bound itself is tested above
    response = httpx.post(
        f"{server.url}/v1/audio/speech", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    )
    if response.status_code == 200:
        assert len(response.content) % 2 == 0 or body.get("response_format") not in (None, "pcm")
        return
    assert 400 <= response.status_code < 500, (body, response.status_code, response.text)
    error = response.json()["error"]
    assert error["message"] and error["type"], error
