"""Bulk grants through HTTP, side by side with the raw SQL credit (pgbench).

    uv run python bench/bulk.py [--items 1000] [--connections 4] [--seconds 15] [--rounds 3] [--workers 2]

Starts an API of its own on a database of its own, rewards_bench_bulk
(bench/serve.py: rate limits out of the way; no funding, credits need none) and runs in interleaved rounds: pgbench credits (8
clients, straight to PostgreSQL, one credit a transaction), then `--connections`
clients each sending POST /v1/credits/bulk of `--items` credits (random users of
the bench's, fresh keys) back to back. Reports entries written a second (the
items answered 201), requests a second with p50/p99, the API's CPU per entry,
and entries a second as a ratio of the SQL credit's TPS (issue 10's target: 3x).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import time
import uuid
from pathlib import Path

import httpx
import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.settings import load  # noqa: E402
from bench import serve  # noqa: E402
from bench.cpu import process_tree_cpu  # noqa: E402
from bench.run import BENCH, USERS, measure  # noqa: E402

DATABASE = "rewards_bench_bulk"


async def bulk_load(url: str, api_key: str, connections: int, items: int, seconds: float,
                    users: int = USERS) -> dict:
    """`connections` clients posting bulk grants for `seconds`: counts and latencies."""
    run = uuid.uuid4().hex[:8]
    latencies: list[float] = []
    counts = {"requests": 0, "entries": 0, "item_refusals": 0, "non_200": 0, "transport_errors": 0}
    encoder = msgspec.json.Encoder()

    async def client(number: int) -> None:
        rng = random.Random(number)
        sequence = 0
        async with httpx.AsyncClient(base_url=url, timeout=30,
                                     headers={"Authorization": f"Bearer {api_key}",
                                              "Content-Type": "application/json"}) as http:
            while time.monotonic() < deadline:
                body = encoder.encode({"items": [
                    {"user_id": f"bench-{rng.randint(1, users)}",
                     "idempotency_key": f"bulk-{run}-{number}-{sequence}-{i}",
                     "amount": 10, "reason": "bench bulk"} for i in range(items)]})
                sequence += 1
                started = time.perf_counter()
                try:
                    response = await http.post("/v1/credits/bulk", content=body)
                except httpx.TransportError:  # a timeout or a dropped connection under overload
                    counts["transport_errors"] += 1
                    continue
                latencies.append(time.perf_counter() - started)
                counts["requests"] += 1
                if response.status_code != 200:
                    counts["non_200"] += 1
                    continue
                answers = response.json()["items"]
                written = sum(1 for answer in answers if answer["status"] == 201)
                counts["entries"] += written
                counts["item_refusals"] += len(answers) - written

    started = time.monotonic()
    deadline = started + seconds
    await asyncio.gather(*(client(n) for n in range(connections)))
    elapsed = time.monotonic() - started
    latencies = sorted(latencies) or [float("nan")]  # no request answered in time
    return {**counts, "seconds": elapsed,
            **{f"p{q}_ms": 1000 * latencies[min(len(latencies) - 1, len(latencies) * q // 100)] for q in (50, 95, 99)}}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    base = load()
    out_dir = BENCH / "out"
    out_dir.mkdir(exist_ok=True)

    serve.database(base, DATABASE)
    api_key = serve.api_key(base, DATABASE)

    rounds: list[dict] = []
    with serve.api(base, DATABASE, workers=args.workers) as (url, api_pid):
        for round_no in range(1, args.rounds + 1):
            tps = measure(base, ["-D", f"users={USERS}", "-f", str(BENCH / "credit.sql")], DATABASE,
                          8, args.seconds, out_dir / f"bulk_sql_credit.round{round_no}.txt")["tps"]
            cpu_before = process_tree_cpu(api_pid)
            result = asyncio.run(bulk_load(url, api_key, args.connections, args.items, args.seconds))
            api_cpu = process_tree_cpu(api_pid) - cpu_before
            result |= {"sql_credit_tps": tps, "entries_per_s": result["entries"] / result["seconds"],
                       "requests_per_s": result["requests"] / result["seconds"],
                       "api_cpu_us_per_entry": 1e6 * api_cpu / max(result["entries"], 1)}
            rounds.append(result)
            print(f"round {round_no}: SQL credit {tps:.0f} tps; bulk {result['entries_per_s']:.0f} entries/s, "
                  f"p99 {result['p99_ms']:.0f} ms, {result['non_200']} non-200, "
                  f"{result['item_refusals']} item refusals", file=sys.stderr)

    def median(field: str) -> float:
        return statistics.median(r[field] for r in rounds)

    summary = {"items": args.items, "connections": args.connections, "workers": args.workers,
               "seconds": args.seconds, "rounds": rounds,
               "median": {field: median(field) for field in (
                   "sql_credit_tps", "entries_per_s", "requests_per_s", "p50_ms", "p99_ms", "api_cpu_us_per_entry")}}
    m = summary["median"]
    print(f"\nbulk of {args.items} items, {args.connections} connections, {args.workers} API workers; "
          f"{args.seconds} s x {args.rounds} interleaved rounds, medians\n")
    print("| workload | entries/s | requests/s | p50 ms | p99 ms | API CPU µs/entry | / SQL credit |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    print(f"| SQL credit (pgbench, 8 clients) | {m['sql_credit_tps']:.0f} | | | | | 1.00 |")
    print(f"| HTTP bulk credits | {m['entries_per_s']:.0f} | {m['requests_per_s']:.1f} | {m['p50_ms']:.0f} | "
          f"{m['p99_ms']:.0f} | {m['api_cpu_us_per_entry']:.0f} | {m['entries_per_s'] / m['sql_credit_tps']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
