"""`dia-ort serve --ray --replicas 2`: a local Ray instance, Ray's HTTP proxy, two replicas.

The server runs as a user starts it (a subprocess on a loopback port) and is driven with the official
`openai` client. A replica is killed mid-run the way a crash kills it (SIGKILL to its process).
"""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from pathlib import Path

import httpx
import openai
import pytest

from bench.server import Server
from dia_ort import Dia
from dia_ort.audio import pcm16
from dia_ort.serving.app import ServerSettings
from dia_ort.serving.ray import REPLICA_HEADER, Scaling, app_builder

TEXT = "[S1] Hello from a replica. [S2] Which one?"
FRAMES = 40


@pytest.fixture(scope="module")
def ray_server(tiny_folder):
    running = Server(
        tiny_folder, "--ray", "--replicas", "2", "--max-batch", "2", "--max-queue", "4", timeout=300
    )
    yield running
    running.stop()


@pytest.fixture(scope="module")
def replica_dia(tiny_folder) -> Dia:
    """The library as each replica runs it: with 2 replicas on 2 cores, one thread each. ONNX
    Runtime's kernels split work by thread count, so other counts can round the last bit apart."""
    return Dia(tiny_folder, device="cpu", threads=max(1, (os.cpu_count() or 1) // 2))


@pytest.fixture(scope="module")
def client(ray_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{ray_server.url}/v1", api_key="unused", max_retries=0, timeout=120)


def speak(client: openai.OpenAI, seed: int) -> tuple[bytes, str]:
    """One request through Ray's proxy: its pcm and the replica that answered."""
    response = client.audio.speech.with_raw_response.create(
        model="dia",
        voice="alloy",
        input=TEXT,
        response_format="pcm",
        extra_body={"seed": seed, "max_new_tokens": FRAMES},
    )
    return response.content, response.headers[REPLICA_HEADER]


def replica_pids() -> list[int]:
    """The processes of this machine's Ray Serve replicas of dia-ort (Ray names them in their title)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if "ServeReplica:" in title and "dia-ort" in title:
                pids.append(int(entry.name))
    return pids


def test_concurrent_requests_reach_both_replicas_and_equal_the_library(client, replica_dia):
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda seed: speak(client, seed), range(8)))
    assert len({replica for _, replica in answers}) == 2, [replica for _, replica in answers]
    for seed, (audio, _) in enumerate(answers):
        assert audio == pcm16(replica_dia.generate(TEXT, seed=seed, max_new_tokens=FRAMES, sample_rate=24000))


def test_streaming_through_rays_proxy(client, ray_server, replica_dia):
    """Chunks come as they are made, and join to the library's audio; SSE events pass through too."""
    want = pcm16(replica_dia.generate(TEXT, seed=5, max_new_tokens=200, sample_rate=24000))
    body = {"model": "dia", "voice": "alloy", "input": TEXT, "response_format": "pcm"}
    body |= {"seed": 5, "max_new_tokens": 200}
    chunks = []
    with httpx.stream("POST", f"{ray_server.url}/v1/audio/speech", json=body, timeout=120) as response:
        assert response.status_code == 200 and response.headers[REPLICA_HEADER]
        chunks = list(response.iter_bytes())
    assert len(chunks) > 2 and b"".join(chunks) == want
    events = httpx.post(
        f"{ray_server.url}/v1/audio/speech", json={**body, "stream_format": "sse"}, timeout=120
    )
    assert events.text.count("speech.audio.delta") > 1 and events.text.rstrip().endswith(
        '"speech.audio.done"}'
    )


def test_a_killed_replica_is_replaced_and_no_request_hangs(client, ray_server):
    """SIGKILL one replica while 6 requests run: each gets its audio or an error, never a hang."""
    before = set(replica_pids())
    assert len(before) == 2, before
    body = {"model": "dia", "voice": "alloy", "input": TEXT, "response_format": "pcm", "max_new_tokens": 200}

    def request(seed: int) -> str:
        try:
            response = httpx.post(
                f"{ray_server.url}/v1/audio/speech", json={**body, "seed": seed}, timeout=60
            )
        except httpx.TransportError as exc:  # the stream broke off with the replica: an error, in time
            return f"broken: {type(exc).__name__}"
        return (
            "audio" if response.status_code == 200 and response.content else f"error {response.status_code}"
        )

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(request, seed) for seed in range(6)]
        time.sleep(1.0)  # the requests are running
        os.kill(sorted(before)[0], signal.SIGKILL)
        outcomes = [f.result(timeout=90) for f in futures]  # bounded: a hang fails here
    assert all(o == "audio" or o.startswith(("error", "broken")) for o in outcomes), outcomes
    assert "audio" in outcomes  # the other replica went on serving

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        now = set(replica_pids())
        if len(now) == 2 and now != before:
            break
        time.sleep(0.5)
    assert len(now) == 2 and now != before, (before, now)
    replicas = set()
    while len(replicas) < 2 and time.monotonic() < deadline:
        try:
            replicas.add(speak(client, seed=1)[1])
        except openai.APIError:  # the new replica may still be starting behind the proxy
            time.sleep(0.5)
    assert len(replicas) == 2


def test_ray_serves_command_line_builder_checks_its_arguments(tiny_folder):
    """`serve run dia_ort.serving.ray:app_builder key=value ...`: the arguments become the settings."""
    app = app_builder({"model": str(tiny_folder), "max_batch": "3", "replicas": "2", "num_cpus": "0.5"})
    assert app is not None
    with pytest.raises(ValueError, match="unknown arguments \\['modle'\\]"):
        app_builder({"modle": str(tiny_folder)})
    with pytest.raises(ValueError, match="model=DIR"):
        app_builder({"replicas": "2"})
    with pytest.raises(ValueError, match="true or false"):
        app_builder({"model": "m", "strict_voices": "maybe"})
    # a `serve deploy` file's args, as YAML reads them
    assert app_builder({"model": "m", "replicas": 2, "strict_voices": True, "num_cpus": 0.5, "voices": None})
    options = Scaling(min_replicas=1, max_replicas=4).options(ServerSettings(model="m", max_batch=3))
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 3,
    }
    assert "num_replicas" not in options
