"""bench/report.py turns a sweep's JSON into bench/report.md and its PNG plots,
and its scale model sizes a rate from the costs it was given. No benchmark
runs here: the figures are made up."""

from __future__ import annotations

import json

import pytest

from bench import report

pytestmark = pytest.mark.single_node("the report is made from files: the topology changes nothing")

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _point(workload: str, connections: int, per_s: float, errors: int = 0, api_ms: float = 0.25) -> dict:
    return {"workload": workload, "connections": connections, "per_s": per_s, "operations": int(per_s * 3),
            "errors": errors, "mean_ms": 5.0, "p50_ms": 4.0, "p95_ms": 8.0, "p99_ms": 12.0,
            "api_cpu_ms": api_ms, "postgres_cpu_ms": 0.5, "workers_cpu_ms": 0.0, "pgbouncer_cpu_ms": 0.05,
            "redis_cpu_ms": 0.02, "machine_cpu_ms": 2.0, "load_average": 1.5}


def _sweep() -> dict:
    points = [_point(workload, c, 100.0 * c ** 0.5) for workload in report.MODELLED for c in (1, 8, 32)]
    # The batched credit's fastest point failed too often to size by: 32 connections stand.
    points.append(_point("HTTP credit, batched", 128, 10_000.0, errors=3000, api_ms=9.0))
    return {"seconds": 3, "api_workers": 2, "users": 1000, "bulk_items": 100, "cores": 2, "citus": "off",
            "citus_workers": 0, "api_server": "uvicorn", "load_average": {"start": [1.0, 1, 1], "end": [2.0, 2, 2]},
            "points": points}


def test_a_sweep_becomes_a_report_with_its_plots(tmp_path):
    sweep = tmp_path / "sweep.json"
    sweep.write_text(json.dumps(_sweep()))
    out = tmp_path / "report.md"

    assert report.main(["--sweep", str(sweep), "--out", str(out), "--targets", "10000,100000"]) == 0

    text = out.read_text()
    for name in ("throughput", "latency", "cpu", "cpu-connections"):
        png = tmp_path / "report" / f"{name}.png"
        assert png.read_bytes()[:8] == PNG_SIGNATURE
        assert f"(report/{name}.png)" in text
    assert "load average" in text.lower()
    # 10,000 credits/s x 0.25 API ms at 60 % of each core: 4.2 cores, 5 processes; the single
    # node's PostgreSQL (0.5 ms) goes to the workers: 8.3 cores, one 16-core node; 100,000: 84 cores, 6 nodes.
    assert "| HTTP credit, batched | 10,000 | 4.2 | 5 | 1 | 1 | 0.0 | 0 | 8.3 | 1 | 1 |" in text
    assert "| HTTP credit, batched | 100,000 | 41.7 | 42 | 9 | 4 | 0.0 | 0 | 83.3 | 6 | 4 |" in text
    assert "the coordinator's own cost is not in this model" in text


def test_the_operating_point_is_the_fastest_with_few_errors():
    points = [_point("x", 8, 500.0), _point("x", 32, 900.0), _point("x", 128, 2000.0, errors=900)]
    assert report.operating_point(points)["connections"] == 32
