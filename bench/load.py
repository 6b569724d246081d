"""HTTP load against the API, side by side with the raw SQL credit and balance
read (pgbench).

    uv run python bench/load.py [--connections 32] [--seconds 15] [--rounds 3] [--workers 2] [--json FILE]

Starts an API of its own (uvicorn, `--workers` processes) on the rewards_bench
database through the project's PgBouncer and Redis, with rate limits set out of
the way (this measures the request path, not the buckets), and runs in
interleaved rounds: pgbench credits and balance reads (8 clients, straight to
PostgreSQL), then wrk credits, reservations and commits, and balance reads at
`--connections`. Reports medians of requests/s, mean and p50/p95/p99 latency
(pgbench's mean only), CPU per request of each part of the service (the API's
processes, PostgreSQL, PgBouncer, Redis, from /proc) and of the whole machine,
each workload as a ratio of the raw SQL credit's TPS, and the HTTP balance read
against the raw SQL balance read and the HTTP credit. `--json` writes every
round's figures, the medians and the ratios."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.settings import load  # noqa: E402
from bench import cpu, serve  # noqa: E402
from bench.run import BENCH, LEDGER_DB, USERS, measure, prepare_ledger  # noqa: E402


def wrk(script: str, url: str, api_key: str, connections: int, seconds: int, out: Path,
        users: int = USERS) -> dict:
    text = subprocess.run(
        ["wrk", "-t", str(min(2, connections)), "-c", str(connections), "-d", f"{seconds}s",
         "-s", str(BENCH / script), url, "--", api_key, str(users)],
        check=True, capture_output=True, text=True).stdout
    out.write_text(text)
    return json.loads(re.search(r"^RESULT (.*)$", text, re.MULTILINE).group(1))


SQL_WORKLOADS = {"SQL credit (pgbench, 8 clients)": "credit.sql", "SQL balance (pgbench, 8 clients)": "balance.sql"}
HTTP_WORKLOADS = {"HTTP credit": "http_credit.lua", "HTTP reserve+commit": "http_reserve_commit.lua",
                  "HTTP balance": "http_balance.lua"}
CPU_COLUMNS = {"api_cpu_ms": "API", "postgres_cpu_ms": "PostgreSQL", "workers_cpu_ms": "Citus workers",
               "pgbouncer_cpu_ms": "PgBouncer", "redis_cpu_ms": "Redis", "machine_cpu_ms": "machine"}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--server", choices=["uvicorn", "granian"], default=None,
                        help="default: REWARDS_API_SERVER, else uvicorn")
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    base = load()
    if args.server:
        base = dataclasses.replace(base, api_server=args.server)
    out_dir = BENCH / "out"
    out_dir.mkdir(exist_ok=True)

    print(f"preparing {LEDGER_DB} ({USERS} funded accounts)...", file=sys.stderr)
    prepare_ledger(base)
    api_key = serve.api_key(base, LEDGER_DB)

    rows: dict[str, list[dict]] = {name: [] for name in (*SQL_WORKLOADS, *HTTP_WORKLOADS)}
    with serve.api(base, LEDGER_DB, workers=args.workers) as (url, api_pid):
        pids = cpu.service_pids(base, api_pid)
        for round_no in range(1, args.rounds + 1):
            for name, script in SQL_WORKLOADS.items():
                before = cpu.snapshot(pids)
                result = measure(base, ["-D", f"users={USERS}", "-f", str(BENCH / script)], LEDGER_DB, 8,
                                 args.seconds, out_dir / f"http_sql_{script[:-4]}.round{round_no}.txt")
                result |= {"rps": result["tps"], **cpu.per_request(before, cpu.snapshot(pids), result["transactions"])}
                rows[name].append(result)
                print(f"round {round_no} {name}: {result['rps']:.0f} tps", file=sys.stderr)
            for name, script in HTTP_WORKLOADS.items():
                before = cpu.snapshot(pids)
                result = wrk(script, url, api_key, args.connections, args.seconds,
                             out_dir / f"http_{script[5:-4]}.round{round_no}.txt")
                result |= {"rps": result["requests"] / result["seconds"],
                           **cpu.per_request(before, cpu.snapshot(pids), result["requests"])}
                rows[name].append(result)
                print(f"round {round_no} {name}: {result['rps']:.0f} req/s, p99 {result['p99_ms']:.1f} ms, "
                      f"{result['non_2xx']} non-2xx", file=sys.stderr)

    medians = {name: {field: statistics.median(r[field] for r in results) for field in results[0]
                      if field in ("rps", "mean_ms", "p50_ms", "p95_ms", "p99_ms", *CPU_COLUMNS)}
               for name, results in rows.items()}
    sql_credit, sql_balance = (medians[name]["rps"] for name in SQL_WORKLOADS)
    ratios = {"http_balance_per_sql_balance": medians["HTTP balance"]["rps"] / sql_balance,
              "http_balance_per_http_credit": medians["HTTP balance"]["rps"] / medians["HTTP credit"]["rps"],
              "sql_balance_per_sql_credit": sql_balance / sql_credit}

    def cell(name: str, field: str, digits: int) -> str:
        return f"{medians[name][field]:.{digits}f}" if field in medians[name] else ""

    print(f"\n{base.api_server}, {args.workers} workers; wrk {args.connections} connections; "
          f"{args.seconds} s x {args.rounds} interleaved rounds, medians; CPU ms a request, by part\n")
    print("| workload | req/s | mean ms | p50 ms | p95 ms | p99 ms | " + " | ".join(
        f"{label} CPU" for label in CPU_COLUMNS.values()) + " | non-2xx | / SQL credit |")
    print("|---|" + "---:|" * (7 + len(CPU_COLUMNS)))
    for name in rows:
        failed = sum(r.get("non_2xx", 0) + r.get("socket_errors", 0) for r in rows[name])
        print(f"| {name} | {cell(name, 'rps', 0)} | {cell(name, 'mean_ms', 2)} | {cell(name, 'p50_ms', 2)} | "
              f"{cell(name, 'p95_ms', 2)} | {cell(name, 'p99_ms', 2)} | "
              + " | ".join(cell(name, field, 3) for field in CPU_COLUMNS)
              + f" | {failed if name in HTTP_WORKLOADS else ''} | {medians[name]['rps'] / sql_credit:.2f} |")
    print(f"\nHTTP balance / SQL balance: {ratios['http_balance_per_sql_balance']:.2f}; "
          f"HTTP balance / HTTP credit: {ratios['http_balance_per_http_credit']:.2f}; "
          f"SQL balance / SQL credit: {ratios['sql_balance_per_sql_credit']:.2f}; "
          f"load average {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps({
            "server": base.api_server, "workers": args.workers, "connections": args.connections,
            "seconds": args.seconds, "rounds": rows, "median": medians, "ratios": ratios,
            "load_average": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
