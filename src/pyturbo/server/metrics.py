"""Prometheus metrics (`GET /metrics`): tokens, prefill speed, time to first token, which prefill path ran and why,
slots and queue. One registry per server, so tests can run several servers in one process."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 60, 120, 300)
_RATE = (10, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 50000)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("pyturbo_requests", "HTTP API requests by endpoint and status", ["endpoint", "status"],
                                registry=r)
        self.prompt_tokens = Counter("pyturbo_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.cached_tokens = Counter("pyturbo_prompt_tokens_cached",
                                     "Prompt tokens reused from the KV cache instead of prefilled", registry=r)
        self.prefilled_tokens = Counter("pyturbo_prefill_tokens", "Prompt tokens prefilled", registry=r)
        self.generated_tokens = Counter("pyturbo_generated_tokens", "Tokens generated", registry=r)
        self.prefill_rate = Histogram("pyturbo_prefill_tokens_per_second", "Prefill throughput per request",
                                      buckets=_RATE, registry=r)
        self.prefill_seconds = Histogram("pyturbo_prefill_seconds", "Prefill time per request", buckets=_SECONDS,
                                         registry=r)
        self.ttft = Histogram("pyturbo_time_to_first_token_seconds",
                              "Request arrival to first sampled token (queue, prefill, first sample)", buckets=_SECONDS,
                              registry=r)
        self.prefills = Counter("pyturbo_prefills", "Prefills by path and why the standard path ran (fallback reason)",
                                ["path", "reason"], registry=r)
        self.slots_busy = Gauge("pyturbo_slots_busy", "Slots running a request", registry=r)
        self.queue = Gauge("pyturbo_queue_length", "Requests waiting for a slot", registry=r)
        self.up = Gauge("pyturbo_model_up", "1 while the model is loaded and its devices answer", registry=r)
        self.reloads = Counter("pyturbo_model_reloads", "Model reloads after a device failure", registry=r)

    def record(self, outcome) -> None:
        """Account one finished generation (an engine Outcome)."""
        c, p = outcome.completion, outcome.completion.prefill
        self.prompt_tokens.inc(c.n_prompt)
        self.cached_tokens.inc(c.n_cached)
        self.generated_tokens.inc(len(c.tokens))
        if p is not None:
            self.prefilled_tokens.inc(p.n_tokens)
            self.prefill_seconds.observe(p.seconds)
            self.prefill_rate.observe(p.tokens_per_second)
            self.prefills.labels(path=p.path, reason=p.fallback_reason or "").inc()
        if c.tokens or c.finish_reason == "stop":
            self.ttft.observe(outcome.ttft_seconds)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
