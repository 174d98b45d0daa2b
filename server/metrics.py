"""Prometheus metrics (prometheus_client), in a registry of the app's own."""

import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160)


class Metrics:
    def __init__(self, engine_unfinished: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("tablefree_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("tablefree_e2e_request_latency_seconds", "Completion request latency",
                                 buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("tablefree_time_to_first_token_seconds", "Time to the first generated token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("tablefree_prompt_tokens", "Prompt tokens processed", registry=r)
        self.generation_tokens = Counter("tablefree_generation_tokens", "Tokens generated", registry=r)
        self.running = Gauge("tablefree_num_requests_running", "Engine requests producing tokens", registry=r)
        self.waiting = Gauge("tablefree_num_requests_waiting", "Engine requests before their first token", registry=r)
        unfinished = Gauge("tablefree_engine_unfinished_requests", "Requests the engine still holds", registry=r)
        unfinished.set_function(engine_unfinished)
        self.admitted = Gauge("tablefree_admitted_sequences", "Sequences holding a slot of --max-concurrent-requests",
                              registry=r)


class RequestTimer:
    """Tracks one engine request: waiting -> running -> done, with its TTFT and latency."""

    def __init__(self, metrics: Metrics, prompt_tokens: int) -> None:
        self.metrics, self.start, self.first = metrics, time.monotonic(), None
        metrics.prompt_tokens.inc(prompt_tokens)
        metrics.waiting.inc()

    def tokens(self, count: int) -> None:
        if count and self.first is None:
            self.first = time.monotonic()
            self.metrics.ttft.observe(self.first - self.start)
            self.metrics.waiting.dec()
            self.metrics.running.inc()
        self.metrics.generation_tokens.inc(count)

    def done(self) -> None:
        (self.metrics.running if self.first is not None else self.metrics.waiting).dec()
        self.metrics.latency.observe(time.monotonic() - self.start)
