"""HTTP load against the API, side by side with the raw SQL credit (pgbench).

    uv run python bench/load.py [--connections 32] [--seconds 15] [--rounds 3] [--workers 2]

Starts an API of its own (uvicorn, `--workers` processes) on the rewards_bench
database through the project's PgBouncer and Redis, with rate limits set out of
the way (this measures the request path, not the buckets), and runs in
interleaved rounds: pgbench credits (8 clients, straight to PostgreSQL), then wrk
credits, then wrk reservations and commits at `--connections`. Reports medians of
requests/s, p50/p95/p99 latency, CPU per request (the API's processes, and the
whole machine), and HTTP credits as a ratio of the raw SQL credit TPS.
"""

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
from bench import serve  # noqa: E402
from bench.run import BENCH, LEDGER_DB, USERS, measure, prepare_ledger  # noqa: E402

TICKS = os.sysconf("SC_CLK_TCK")


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


def _machine_cpu() -> float:
    """CPU seconds spent busy, all cores, since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values[:8]) - idle) / TICKS


def wrk(script: str, url: str, api_key: str, connections: int, seconds: int, out: Path,
        users: int = USERS) -> dict:
    text = subprocess.run(
        ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "-s", str(BENCH / script), url,
         "--", api_key, str(users)],
        check=True, capture_output=True, text=True).stdout
    out.write_text(text)
    return json.loads(re.search(r"^RESULT (.*)$", text, re.MULTILINE).group(1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--server", choices=["uvicorn", "granian"], default=None,
                        help="default: REWARDS_API_SERVER, else uvicorn")
    args = parser.parse_args()
    base = load()
    if args.server:
        base = dataclasses.replace(base, api_server=args.server)
    out_dir = BENCH / "out"
    out_dir.mkdir(exist_ok=True)

    print(f"preparing {LEDGER_DB} ({USERS} funded accounts)...", file=sys.stderr)
    prepare_ledger(base)
    api_key = serve.api_key(base, LEDGER_DB)

    rows: dict[str, list[dict]] = {"SQL credit (pgbench, 8 clients)": [], "HTTP credit": [],
                                   "HTTP reserve+commit": []}
    with serve.api(base, LEDGER_DB, workers=args.workers) as (url, api_pid):
        for round_no in range(1, args.rounds + 1):
            tps, latency = measure(base, ["-D", f"users={USERS}", "-f", str(BENCH / "credit.sql")], LEDGER_DB,
                                   8, args.seconds, out_dir / f"http_sql_credit.round{round_no}.txt")
            rows["SQL credit (pgbench, 8 clients)"].append({"rps": tps, "p50_ms": latency})
            print(f"round {round_no} SQL credit: {tps:.0f} tps", file=sys.stderr)
            for name, script in (("HTTP credit", "http_credit.lua"),
                                 ("HTTP reserve+commit", "http_reserve_commit.lua")):
                api_before, machine_before = process_tree_cpu(api_pid), _machine_cpu()
                result = wrk(script, url, api_key, args.connections, args.seconds,
                              out_dir / f"http_{script[5:-4]}.round{round_no}.txt")
                api_cpu = process_tree_cpu(api_pid) - api_before
                machine_cpu = _machine_cpu() - machine_before
                result |= {"rps": result["requests"] / result["seconds"],
                           "api_cpu_ms": api_cpu * 1000 / result["requests"],
                           "machine_cpu_ms": machine_cpu * 1000 / result["requests"]}
                rows[name].append(result)
                print(f"round {round_no} {name}: {result['rps']:.0f} req/s, p99 {result['p99_ms']:.1f} ms, "
                      f"{result['non_2xx']} non-2xx", file=sys.stderr)

    def median(name: str, field: str) -> float:
        return statistics.median(r[field] for r in rows[name])

    sql_tps = median("SQL credit (pgbench, 8 clients)", "rps")
    print(f"\n{base.api_server}, {args.workers} workers; wrk {args.connections} connections; "
          f"{args.seconds} s x {args.rounds} interleaved rounds, medians\n")
    print("| workload | req/s | p50 ms | p95 ms | p99 ms | API CPU ms/req | machine CPU ms/req | non-2xx | / SQL credit |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    print(f"| SQL credit (pgbench, 8 clients) | {sql_tps:.0f} | | | | | | | 1.00 |")
    for name in ("HTTP credit", "HTTP reserve+commit"):
        print(f"| {name} | {median(name, 'rps'):.0f} | {median(name, 'p50_ms'):.2f} | {median(name, 'p95_ms'):.2f} "
              f"| {median(name, 'p99_ms'):.2f} | {median(name, 'api_cpu_ms'):.3f} | "
              f"{median(name, 'machine_cpu_ms'):.3f} | {sum(r['non_2xx'] for r in rows[name])} | "
              f"{median(name, 'rps') / sql_tps:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
