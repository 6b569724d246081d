"""Prometheus metrics. With several worker processes, prometheus_client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set by `rewards api up`) adds up
what each process counted."""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess

REQUESTS = Counter("rewards_http_requests_total", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram(
    "rewards_http_request_seconds", "Time to answer an HTTP request", ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5),
)
RATE_LIMITED = Counter("rewards_rate_limited_total", "Requests refused by a token bucket", ["kind"])
OVERLOADED = Counter("rewards_overload_refusals_total", "Requests refused to shed load", ["reason"])
RATELIMIT_FALLBACK = Gauge(
    "rewards_ratelimit_local_fallback", "1 while a process limits rates on its own because Redis is away",
    multiprocess_mode="max",
)


def render() -> tuple[bytes, str]:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry), CONTENT_TYPE_LATEST
