"""`python -m bench.load`: the speech server under load from a bounded asyncio client, on loopback.

C clients send requests for a fixed time, each a mix of what a busy server meets: most stream
speech, and some leave mid-stream, send a wrong API key, malformed JSON or a body over the limit.
Each client has an API key of its own, so that a server with a request rate limits each alone; a
client told 429 waits as Retry-After says, but at most a fifth of a second, so a busy client goes
over its rate. Meanwhile /health is polled. Every loop is bounded in count and in time. Reported:
completed requests per minute, latency percentiles, the answers by status and the slowest /health.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.process import REPO
from bench.server import Server

KINDS = ("speech", "speech", "speech", "speech", "leave", "wrong_key", "malformed", "oversized")
TEXT = "[S1] Under load. [S2] Still answering."
# over the server's 2 MiB body limit; built once, so that the client's event loop does not stall on it
OVERSIZED_BODY = json.dumps({"model": "dia", "voice": "alloy", "input": "[S1] " + "a" * 3 * 2**20}).encode()
JSON = {"Content-Type": "application/json"}
HEALTH_EVERY = 0.1  # seconds between /health polls
RETRY_AT_MOST = 0.2  # seconds a client told 429 waits, whatever Retry-After asks


@dataclass(frozen=True)
class Outcome:
    """One request: its kind, the status it got, its wall time and the audio bytes that came."""

    kind: str
    status: int
    seconds: float
    seed: int
    client: int = 0
    code: str = ""  # the error code of an answer in OpenAI's error shape
    first_audio: float | None = None  # seconds from sending to the first body bytes of a 200
    audio_bytes: int = 0
    sha256: str = ""  # of the whole body: a streamed answer can be checked against the library's
    error: str = ""  # a transport error's description (then status is 0)
    retry_after: float = 0.0  # the Retry-After of a 429, in seconds


@dataclass
class LoadReport:
    outcomes: list[Outcome] = field(default_factory=list)
    health_seconds: list[float] = field(default_factory=list)
    health_failures: int = 0
    wall: float = 0.0

    def statuses(self) -> dict[str, int]:
        return dict(Counter(f"{o.kind} {o.status} {o.code}".strip() for o in self.outcomes))

    def completed(self) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == "speech" and o.status == 200]

    def summary(self) -> dict:
        completed = self.completed()
        latencies = sorted(o.seconds for o in completed)
        firsts = sorted(o.first_audio for o in completed if o.first_audio is not None)
        return {
            "requests": len(self.outcomes),
            "completed_per_minute": 60 * len(latencies) / self.wall if self.wall else 0.0,
            "latency_p50": percentile(latencies, 0.5),
            "latency_p95": percentile(latencies, 0.95),
            "latency_max": latencies[-1] if latencies else 0.0,
            "first_audio_p50": percentile(firsts, 0.5),
            "first_audio_p95": percentile(firsts, 0.95),
            "health_max": max(self.health_seconds, default=0.0),
            "health_median": statistics.median(self.health_seconds) if self.health_seconds else 0.0,
            "statuses": self.statuses(),
        }


def percentile(ordered: list[float], p: float) -> float:
    """The `p` quantile (nearest rank) of ascending values; 0 when there are none."""
    return ordered[min(len(ordered) - 1, round(p * (len(ordered) - 1)))] if ordered else 0.0


async def _request(
    http: httpx.AsyncClient, url: str, key: str | None, kind: str, seed: int, frames: int | None, client: int
) -> Outcome:
    """Send one request of `kind` and read its answer (all of it, or the first bytes for "leave");
    `frames` None: as long as the model speaks the text (Dia2, which takes no max_new_tokens)."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    body = {"model": "dia", "voice": "alloy", "input": TEXT, "response_format": "pcm", "seed": seed}
    if frames is not None:
        body["max_new_tokens"] = frames
    content = None
    if kind == "wrong_key":
        headers = {"Authorization": "Bearer not-the-key"}
    elif kind == "malformed":
        content, headers = b'{"model": "dia", "input": ', {**headers, **JSON}
    elif kind == "oversized":
        content, headers = OVERSIZED_BODY, {**headers, **JSON}
    began = time.perf_counter()
    size, digest = 0, hashlib.sha256()
    request = http.build_request(
        "POST", f"{url}/v1/audio/speech", headers=headers, content=content, json=None if content else body
    )
    response = await http.send(request, stream=True)
    first, refusal = None, b""
    try:
        async for data in response.aiter_bytes():
            first = first or time.perf_counter() - began
            size += len(data)
            digest.update(data)
            if response.status_code != 200:
                refusal += data
            if kind == "leave" and size:
                break  # leave mid-stream: closing the response drops the connection
    finally:
        await response.aclose()
    wall = time.perf_counter() - began
    code = _error_code(refusal) if response.status_code != 200 else ""
    retry_after = float(response.headers.get("retry-after", 0))
    return Outcome(
        kind,
        response.status_code,
        wall,
        seed,
        client,
        code=code,
        first_audio=first,
        audio_bytes=size,
        sha256=digest.hexdigest(),
        retry_after=retry_after,
    )


def _error_code(body: bytes) -> str:
    """The `code` of an answer in OpenAI's error shape; "" for any other body."""
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return ""


async def _client(
    http: httpx.AsyncClient,
    url: str,
    key: str | None,
    index: int,
    deadline: float,
    frames: int | None,
    max_requests: int,
    report: LoadReport,
    kinds: tuple[str, ...],
) -> None:
    for number in range(max_requests):
        if time.monotonic() >= deadline:
            return
        kind, seed = kinds[(index + number) % len(kinds)], index * 1000 + number
        try:
            outcome = await _request(http, url, key, kind, seed, frames, index)
        except httpx.HTTPError as exc:
            outcome = Outcome(kind, 0, 0.0, seed, index, error=f"{type(exc).__name__}: {exc}")
        report.outcomes.append(outcome)
        if outcome.status == 429:
            await asyncio.sleep(min(outcome.retry_after, RETRY_AT_MOST))


def _poll_health(url: str, stop: threading.Event, report: LoadReport) -> None:
    """Time /health every HEALTH_EVERY seconds, from a thread of its own: the clients' event loop,
    busy with 50 streams, would otherwise add its own delays to the server's."""
    with httpx.Client(timeout=5) as http:
        while not stop.wait(HEALTH_EVERY):
            began = time.perf_counter()
            try:
                http.get(f"{url}/health").raise_for_status()
                report.health_seconds.append(time.perf_counter() - began)
            except httpx.HTTPError:
                report.health_failures += 1


async def run_load(
    url: str,
    keys: str | list[str] | None,
    clients: int = 50,
    seconds: float = 20,
    frames: int | None = 40,
    max_requests: int = 200,
    kinds: tuple[str, ...] = KINDS,
    timeout: float = 120,
) -> LoadReport:
    """`clients` concurrent clients for `seconds` (each at most `max_requests` requests), /health polled.

    `keys` is one API key for every client, or a list of which client i uses key i (mod its length).

    Requests still running at the deadline finish (each bounded by `timeout` seconds).
    """
    report = LoadReport()
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=clients + 2)
    stop = threading.Event()
    health = threading.Thread(target=_poll_health, args=(url, stop, report))
    health.start()
    try:
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
            began = time.perf_counter()
            deadline = time.monotonic() + seconds
            await asyncio.gather(
                *(
                    _client(http, url, _key(keys, i), i, deadline, frames, max_requests, report, kinds)
                    for i in range(clients)
                )
            )
            report.wall = time.perf_counter() - began
    finally:
        stop.set()
        health.join()
    return report


def _key(keys: str | list[str] | None, client: int) -> str | None:
    return keys[client % len(keys)] if isinstance(keys, list) else keys


def client_keys(clients: int) -> list[str]:
    """An API key for each client (for `--api-key`, joined by commas)."""
    return [f"sk-load-client-{i}" for i in range(clients)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=REPO / "models" / "bench-tiny")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--frames", type=int, default=86, help="max_new_tokens of each speech request")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--requests-per-minute", type=int, default=30, help="the server's rate per key")
    args = parser.parse_args(argv)
    keys = client_keys(args.clients)
    flags = ["--dtype", args.dtype, "--api-key", ",".join(keys), "--max-batch", str(args.max_batch)]
    flags += ["--max-queue", str(args.max_queue), "--requests-per-minute", str(args.requests_per_minute)]
    server = Server(args.model, *flags, timeout=600)
    try:
        idle = server.resident_bytes()
        report = asyncio.run(run_load(server.url, keys, args.clients, args.seconds, args.frames))
        time.sleep(2)
        summary = report.summary() | {
            "rss_before_mib": idle / 2**20,
            "rss_after_mib": server.resident_bytes() / 2**20,
            "health_failures": report.health_failures,
        }
    finally:
        server.stop()
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
