"""Prometheus metrics. With several worker processes, prometheus_client's
multiprocess mode (PROMETHEUS_MULTIPROC_DIR, which app.operations.processes sets
for each API it starts) adds up what each process counted."""

from __future__ import annotations

import os

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
)

REQUESTS = Counter("rewards_http_requests_total", "HTTP requests answered", ["method", "route", "status"])
LATENCY = Histogram(
    "rewards_http_request_seconds", "Time to answer an HTTP request", ["route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5),
)
RATE_LIMITED = Counter("rewards_rate_limited_total", "Requests refused by a token bucket", ["kind"])
OVERLOADED = Counter("rewards_overload_refusals_total", "Requests refused to shed load", ["reason"])
GROUP_COMMIT_ITEMS = Histogram(
    "rewards_group_commit_items", "Credits sent to the database in one call by group commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1000),
)
RATELIMIT_FALLBACK = Gauge(
    "rewards_ratelimit_local_fallback", "1 while a process limits rates on its own because Redis is away",
    multiprocess_mode="max",
)


# Prometheus' text format; written once here (Litestar would add a second charset).
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def render() -> bytes:
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return generate_latest(registry)
