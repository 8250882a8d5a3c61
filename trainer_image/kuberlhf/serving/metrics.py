"""Prometheus metrics of the chat server, in a registry per app (so several apps in one process, as in tests,
do not collide)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class ServeMetrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "kuberlhf_serve_http_requests",
            "HTTP requests by route and status code",
            ["path", "method", "status"],
            registry=r,
        )
        self.completions = Counter(
            "kuberlhf_serve_chat_completions", "Finished chat completions", ["stream", "finish_reason"], registry=r
        )
        self.prompt_tokens = Counter("kuberlhf_serve_prompt_tokens", "Prompt tokens processed", registry=r)
        self.completion_tokens = Counter("kuberlhf_serve_completion_tokens", "Completion tokens generated", registry=r)
        self.latency = Histogram(
            "kuberlhf_serve_chat_completion_seconds",
            "Chat completion latency, request to last token",
            ["stream"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token = Histogram(
            "kuberlhf_serve_time_to_first_token_seconds",
            "Streaming: request to first answer text",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge("kuberlhf_serve_generations_in_flight", "Generations running now", registry=r)
        self.waiting = Gauge("kuberlhf_serve_generations_waiting", "Requests queued for a generation slot", registry=r)
        self.rejected = Counter("kuberlhf_serve_rejected", "Requests refused before generation", ["reason"], registry=r)
        self.model_ready = Gauge("kuberlhf_serve_model_ready", "1 once the model is loaded", registry=r)
