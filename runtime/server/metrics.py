"""Prometheus metrics of one server instance (its own registry: no process-global state)."""

from __future__ import annotations

from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "pixtral_requests", "HTTP requests by route and status", ["route", "status"], registry=r
        )
        self.prompt_tokens = Counter("pixtral_prompt_tokens", "Prompt tokens processed", registry=r)
        self.cached_tokens = Counter(
            "pixtral_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache", registry=r
        )
        self.completion_tokens = Counter("pixtral_completion_tokens", "Tokens generated", registry=r)
        self.images = Counter("pixtral_images_encoded", "Images run through the vision tower", registry=r)
        self.queue_depth = Gauge("pixtral_queue_depth", "Requests waiting for a generation slot", registry=r)
        self.in_flight = Gauge("pixtral_generations_in_flight", "Generations running", registry=r)
        self.latency = Histogram(
            "pixtral_request_seconds", "Generation request latency", ["route"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.first_token = Histogram(
            "pixtral_time_to_first_token_seconds", "Time to the first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.disconnects = Counter("pixtral_client_disconnects", "Streams cancelled by their client", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
