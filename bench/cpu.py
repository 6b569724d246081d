"""CPU time from /proc: what the service's own processes spent, part by part
(every node's PostgreSQL, PgBouncer, Redis, the API), and the whole machine's
busy time, so a benchmark can say what a request cost each part and not only
how long it took on a shared machine."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

from app.operations import citus, processes
from app.settings import Settings

TICKS = os.sysconf("SC_CLK_TCK")
PARTS = ("postgres", "workers", "pgbouncer", "redis", "api")


def process_tree_cpu(root_pid: int) -> float:
    """CPU seconds used so far by a process and its children (the uvicorn
    workers, a postmaster's backends), those that have exited included: their
    time moves to the parent's children's-time fields when it reaps them."""
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(stat.parent.name), int(fields[1])
        if pid == root_pid:
            total += sum(int(value) for value in fields[11:15]) / TICKS  # utime stime cutime cstime
        elif ppid == root_pid:
            total += (int(fields[11]) + int(fields[12])) / TICKS
    return total


def machine_cpu() -> float:
    """CPU seconds spent busy, all cores, since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / TICKS


def _redis_pids(url: str) -> list[int]:
    """The Redis at `url` when it runs on this machine (it renames its command
    line, so it is asked for its pid)."""
    if urlparse(url).hostname not in ("127.0.0.1", "localhost"):
        return []
    import redis  # as app.operations.processes imports it: only where it is used

    try:
        return [int(redis.Redis.from_url(url, socket_timeout=2).info("server")["process_id"])]
    except (redis.RedisError, OSError):
        return []


def service_pids(settings: Settings, api_pid: int) -> dict[str, list[int]]:
    """The roots of what serves a request, by part (PARTS): the single node's
    or Citus coordinator's postmaster and the local Citus workers' (their
    backends are their children), PgBouncer, Redis (when on this machine), the
    API (its workers are its children)."""
    def postmaster(node: Settings) -> int:
        return int((node.pg_data / "postmaster.pid").read_text().split("\n", 1)[0])

    return {"postgres": [postmaster(settings)], "workers": [postmaster(node) for node in citus.local_workers(settings)],
            "pgbouncer": processes.bouncer_pids(settings), "redis": _redis_pids(settings.redis_url), "api": [api_pid]}


def snapshot(pids: dict[str, list[int]]) -> dict[str, float]:
    """CPU seconds so far of each part, and of the machine."""
    return {**{part: sum(process_tree_cpu(pid) for pid in roots) for part, roots in pids.items()},
            "machine": machine_cpu()}


def per_request(before: dict[str, float], after: dict[str, float], requests: int) -> dict[str, float]:
    """CPU milliseconds a request, each part and the machine, between two snapshots."""
    return {f"{part}_cpu_ms": 1000 * (after[part] - before[part]) / max(requests, 1) for part in before}
