"""`dia-ort serve` as a Ray Serve application: the same app in every replica, over a Ray cluster.

Each replica is a Ray actor that builds the server once (`build_app`: the model folder loaded, the
voices encoded, its own continuous-batching scheduler started) and then answers the requests Ray's
HTTP proxy sends it. Ray brings what one process cannot: replicas spread over machines, replaced
when they die, autoscaled on the requests in flight, and rolled over on `serve deploy`.

Every response names its replica in the `x-dia-ort-replica` header. Needs the `ray` extra.

`serve run dia_ort.serving.ray:app_builder model=models/dia replicas=2` runs it from Ray's own
command line; every `ServerSettings` field, plus `replicas`, `min_replicas`, `max_replicas`,
`num_cpus` and `num_gpus`, can be given as `key=value`.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fastapi import FastAPI
from ray import serve
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from dia_ort.serving.app import ServerSettings, build_app

REPLICA_HEADER = "x-dia-ort-replica"
DEPLOYMENT_NAME = "dia-ort"


@dataclass(frozen=True)
class Scaling:
    """How many replicas, and what each holds of a node.

    Fixed at `replicas`, or autoscaled between `min_replicas` and `max_replicas` (when
    `max_replicas` is set) to keep about `max_batch` requests in flight per replica: a replica
    with a full batch has no room left, so more requests than that mean another replica is due.
    """

    replicas: int = 1
    min_replicas: int = 1
    max_replicas: int | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0

    def options(self, settings: ServerSettings) -> dict[str, Any]:
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus},
            # more than this and the replica would answer 429: let Ray's proxy hold them instead
            "max_ongoing_requests": settings.max_batch + settings.max_queue,
            "health_check_period_s": 2,
        }
        if self.max_replicas is None:
            options["num_replicas"] = self.replicas
        else:
            options["autoscaling_config"] = {
                "min_replicas": self.min_replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": settings.max_batch,
            }
        return options


class ReplicaHeader:
    """ASGI middleware: name the replica that answered in each response's headers."""

    def __init__(self, app: ASGIApp, replica: str) -> None:
        self.app, self.replica = app, replica.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def named_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.replica)],
                }
            await send(message)

        await self.app(scope, receive, named_send if scope["type"] == "http" else send)


class Replica:
    """One replica of the server; Ray wraps it around the app (`serve.ingress`) and calls
    `check_health` every few seconds, replacing a replica whose check fails."""

    app: FastAPI  # set by Ray's ingress wrapper

    def check_health(self) -> None:
        if not self.app.state.scheduler.alive:
            raise RuntimeError("the scheduler thread of this replica has stopped")


def application(settings: ServerSettings, scaling: Scaling = Scaling()) -> serve.Application:
    """The Ray Serve application of the speech server: pass it to `serve.run`."""

    def replica_app() -> FastAPI:  # runs in each replica, once, when Ray starts it
        app = build_app(settings)
        app.add_middleware(ReplicaHeader, replica=serve.get_replica_context().replica_id.unique_id)
        return app

    ingress = serve.ingress(replica_app)(Replica)
    return serve.deployment(ingress, name=DEPLOYMENT_NAME, **scaling.options(settings)).bind()


def app_builder(args: dict[str, Any]) -> serve.Application:
    """`serve run dia_ort.serving.ray:app_builder model=DIR [key=value ...]` (Ray's application builder).

    `serve run` passes strings; a `serve deploy` config file's `args:` may hold YAML's numbers,
    booleans and nulls, which are taken as they are written.
    """
    kinds = {f.name: f for f in (*fields(ServerSettings), *fields(Scaling))}
    unknown = sorted(set(args) - set(kinds))
    if unknown:
        raise ValueError(f"unknown arguments {unknown}; known: {sorted(kinds)}")
    if "model" not in args:
        raise ValueError("give the model folder or Hub id: model=DIR")
    values = {name: _parse(kinds[name].type, value) for name, value in args.items()}
    settings = ServerSettings(**{k: v for k, v in values.items() if k in _names(ServerSettings)})
    scaling = Scaling(**{k: v for k, v in values.items() if k in _names(Scaling)})
    return application(settings, scaling)


def _names(cls: type) -> set[str]:
    return {f.name for f in fields(cls)}


def _parse(kind: str, value: object) -> object:
    """A `key=value` argument as its field's type (the annotations are strings: `from __future__`)."""
    if value is None:
        return None
    value = str(value)
    if kind.startswith("bool"):
        if value.lower() not in ("true", "false", "1", "0"):
            raise ValueError(f"expected true or false, got {value!r}")
        return value.lower() in ("true", "1")
    if kind.startswith("int"):
        return int(value)
    if kind.startswith("float"):
        return float(value)
    return value
