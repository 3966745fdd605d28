"""The server's Prometheus metrics: requests by outcome, the scheduler's queue, batch and speed, and
the time to first audio."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dia_ort.scheduler import Scheduler


class Metrics:
    """The server's Prometheus metrics, in a registry of its own (one per app)."""

    def __init__(self, scheduler: Scheduler) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "dia_ort_speech_requests", "Speech requests by outcome", ["status"], registry=self.registry
        )
        queue = Gauge("dia_ort_queue_depth", "Requests waiting for a batch row", registry=self.registry)
        queue.set_function(lambda: scheduler.queue_depth)
        batch = Gauge("dia_ort_batch_size", "Requests in the running batch", registry=self.registry)
        batch.set_function(lambda: scheduler.occupancy)
        rate = Gauge("dia_ort_steps_per_second", "Decoder steps per second, recent", registry=self.registry)
        rate.set_function(lambda: scheduler.steps_per_second)
        steps = Gauge("dia_ort_decoder_steps", "Decoder steps run since the start", registry=self.registry)
        steps.set_function(lambda: scheduler.steps)
        self.first_audio = Histogram(
            "dia_ort_time_to_first_audio_seconds",
            "From submission to the first audio chunk",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32),
            registry=self.registry,
        )
