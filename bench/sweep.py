"""Throughput, latency and CPU a request against the number of connections,
for every way a credit or a balance read reaches the ledger.

    uv run python bench/sweep.py [--connections 1,8,32,128,512] [--seconds 3] [--workers 2]
        [--users 10000] [--bulk-items 100] [--json FILE]

On a database of its own (rewards_bench_sweep, `--users` funded accounts,
distributed under Citus) with two APIs of its own (bench/serve.py: rate limits
out of the way), one with group commit and one without
(REWARDS_GROUP_COMMIT=off), it measures at each connection count, the
workloads interleaved so that a burst of load from elsewhere on the machine
falls on all of them:

- SQL credit and SQL balance: pgbench through PgBouncer as the API's role (as
  the API reaches the database; PostgreSQL alone would refuse 512 clients),
  latencies from pgbench's per-transaction log;
- HTTP credit, unbatched and batched: wrk on the two APIs;
- HTTP bulk: clients posting `--bulk-items` credits in each
  POST /v1/credits/bulk, back to back (throughput in credits written);
- HTTP balance: wrk GETs of a balance.

For each point: operations a second, mean and p50/p95/p99 latency, errors
(non-2xx answers, socket errors, pgbench clients aborted), and CPU ms an
operation of each part of the service (bench/cpu.py) and of the machine, with
the load average. `--json` writes them all; bench/report.py turns that into
bench/report.md and its plots.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.operations import citus  # noqa: E402
from app.settings import load  # noqa: E402
from bench import cpu, serve  # noqa: E402
from bench.bulk import bulk_load  # noqa: E402
from bench.load import wrk  # noqa: E402
from bench.run import BENCH, measure, prepare_ledger  # noqa: E402

DATABASE = "rewards_bench_sweep"
WORKLOADS = ("SQL credit", "HTTP credit, unbatched", "HTTP credit, batched", "HTTP bulk", "SQL balance",
             "HTTP balance")


def _point(workload: str, connections: int, args, base, key: str, apis: dict, out: Path) -> dict:
    """One workload at one connection count: its figures and CPU an operation."""
    batched = workload != "HTTP credit, unbatched"
    url, pids = apis[batched]
    log = out / f"sweep_{workload.replace(' ', '_').replace(',', '')}_{connections}.txt"
    before = cpu.snapshot(pids)
    if workload.startswith("SQL"):
        script = "credit.sql" if "credit" in workload else "balance.sql"
        result = measure(base, ["-D", f"users={args.users}", "-f", str(BENCH / script)], DATABASE, connections,
                         args.seconds, log, percentiles=True, through_bouncer=True)
        operations, rate, errors = result["transactions"], result["tps"], result["aborted_clients"]
    elif workload == "HTTP bulk":
        result = asyncio.run(bulk_load(url, key, connections, args.bulk_items, args.seconds, users=args.users))
        log.write_text(json.dumps(result))
        operations, rate = result["entries"], result["entries"] / result["seconds"]
        errors = result["non_200"] + result["transport_errors"]
        result["requests_per_s"] = result["requests"] / result["seconds"]
    else:
        script = "http_balance.lua" if "balance" in workload else "http_credit.lua"
        result = wrk(script, url, key, connections, args.seconds, log, users=args.users)
        operations, rate = result["requests"], result["requests"] / result["seconds"]
        errors = result["non_2xx"] + result["socket_errors"]
    return {"workload": workload, "connections": connections, "per_s": rate, "operations": operations,
            "errors": errors, **{f: result[f] for f in ("mean_ms", "p50_ms", "p95_ms", "p99_ms") if f in result},
            **({"requests_per_s": result["requests_per_s"]} if "requests_per_s" in result else {}),
            **cpu.per_request(before, cpu.snapshot(pids), operations), "load_average": os.getloadavg()[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", default="1,8,32,128,512",
                        type=lambda text: [int(n) for n in text.split(",")])
    parser.add_argument("--seconds", type=int, default=3, help="each point's length")
    parser.add_argument("--workers", type=int, default=2, help="each API's processes")
    parser.add_argument("--users", type=int, default=10_000, help="accounts the load picks from")
    parser.add_argument("--bulk-items", type=int, default=100, help="credits in each bulk request")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    base = load()
    out = BENCH / "out"
    out.mkdir(exist_ok=True)

    print(f"preparing {DATABASE} ({args.users} funded accounts)...", file=sys.stderr)
    prepare_ledger(base, DATABASE, args.users)
    key = serve.api_key(base, DATABASE)
    started_load = os.getloadavg()
    points = []
    with serve.api(base, DATABASE, workers=args.workers) as (batched_url, batched_pid), \
            serve.api(dataclasses.replace(base, group_commit=False), DATABASE, workers=args.workers) as (
                unbatched_url, unbatched_pid):
        apis = {True: (batched_url, cpu.service_pids(base, batched_pid)),
                False: (unbatched_url, cpu.service_pids(base, unbatched_pid))}
        for connections in args.connections:
            for workload in WORKLOADS:
                point = _point(workload, connections, args, base, key, apis, out)
                points.append(point)
                print(f"{workload} at {connections}: {point['per_s']:.0f}/s, p99 {point.get('p99_ms', 0):.1f} ms, "
                      f"{point['errors']} errors, load {point['load_average']:.1f}", file=sys.stderr)
                if args.json:  # after every point: a run cut short keeps what it measured
                    _write(args.json, args, base, started_load, points)

    print(f"\n{args.seconds} s a point; API {args.workers} processes; {args.users} accounts; bulk of "
          f"{args.bulk_items}; load average {started_load[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end\n")
    print("| workload | connections | per s | p50 ms | p99 ms | errors | API CPU ms | PostgreSQL CPU ms | "
          "PgBouncer CPU ms | machine CPU ms |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p in points:
        print(f"| {p['workload']} | {p['connections']} | {p['per_s']:.0f} | {p.get('p50_ms', 0):.2f} | "
              f"{p.get('p99_ms', 0):.2f} | {p['errors']} | {p['api_cpu_ms']:.3f} | "
              f"{p['postgres_cpu_ms'] + p['workers_cpu_ms']:.3f} | {p['pgbouncer_cpu_ms']:.3f} | "
              f"{p['machine_cpu_ms']:.3f} |")
    return 0


def _write(path: Path, args, base, started_load: tuple, points: list[dict]) -> None:
    path.write_text(json.dumps({
        "seconds": args.seconds, "api_workers": args.workers, "users": args.users,
        "bulk_items": args.bulk_items, "cores": os.cpu_count(), "citus": base.citus,
        "citus_workers": len(citus.local_workers(base)), "api_server": base.api_server,
        "load_average": {"start": started_load, "end": os.getloadavg()}, "points": points}, indent=2))


if __name__ == "__main__":
    sys.exit(main())
