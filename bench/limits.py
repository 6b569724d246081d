"""The limits: credits per second on one hot account (every client on one
account row, so one row lock on one node), and credits spread over many
accounts, through SQL (pgbench straight to PostgreSQL) and through HTTP (wrk
through the API and PgBouncer), on a single node and on a coordinator with two
workers, side by side in interleaved rounds.

    make run                                              # the single node
    REWARDS_DATA_DIR=$PWD/.data-citus REWARDS_PG_PORT=54400 REWARDS_BOUNCER_PORT=64400 \\
      REWARDS_API_PORT=8400 REWARDS_AUDIT_METRICS_PORT=9400 \\
      REWARDS_CITUS=on REWARDS_CITUS_WORKERS=2 make run   # the Citus cluster
    uv run python bench/limits.py --citus REWARDS_DATA_DIR=$PWD/.data-citus --citus REWARDS_PG_PORT=54400 \\
      --citus REWARDS_BOUNCER_PORT=64400 --citus REWARDS_CITUS=on --citus REWARDS_CITUS_WORKERS=2 \\
      [--seconds 10] [--rounds 3]

The single node is the environment's topology; `--citus VAR=VALUE` (repeated)
overrides it for the other. Each gets a database of its own (rewards_limits,
distributed on the Citus one) and an API of its own (2 processes, rate limits
out of the way). Per workload: median credits/s, and the CPU the service spent
per credit (its PostgreSQL nodes' processes, PgBouncer and the API's, from
/proc: not the load generator's nor anyone else's on a shared machine), and
credits per CPU-second, which is what a core buys.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.operations import citus  # noqa: E402
from app.settings import Settings, load  # noqa: E402
from bench import serve  # noqa: E402
from bench.cpu import process_tree_cpu, service_pids  # noqa: E402
from bench.load import wrk  # noqa: E402
from bench.run import BENCH, measure  # noqa: E402

DATABASE = "rewards_limits"
SPREAD = 100_000  # accounts the spread workloads pick from
WORKLOADS = ("SQL, one hot account", "SQL, spread", "HTTP, one hot account", "HTTP, spread")


def _cpu(pids: list[int]) -> float:
    return sum(process_tree_cpu(pid) for pid in pids)


def _round(name: str, settings: Settings, url: str, key: str, pids: list[int], seconds: int,
           out: Path) -> dict[str, dict]:
    results = {}
    for workload in WORKLOADS:
        users = 1 if "hot" in workload else SPREAD
        before = _cpu(pids)
        if workload.startswith("SQL"):
            tps = measure(settings, ["-D", f"users={users}", "-f", str(BENCH / "credit.sql")], DATABASE, 8,
                          seconds, out / f"limits_{name}_{workload[:4]}{users}.txt")["tps"]
            credits = tps * seconds
        else:
            result = wrk("http_credit.lua", url, key, 32, seconds, out / f"limits_{name}_{workload[:4]}{users}.txt",
                          users=users)
            tps, credits = result["requests"] / result["seconds"], result["requests"]
        cpu = _cpu(pids) - before
        results[workload] = {"tps": tps, "cpu_ms": cpu * 1000 / credits, "per_cpu_second": credits / cpu}
        print(f"{name} {workload}: {tps:.0f} credits/s, {cpu * 1000 / credits:.2f} CPU ms each", file=sys.stderr)
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--citus", action="append", default=[], metavar="VAR=VALUE",
                        help="the Citus cluster's settings, over the environment's")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    single = load()
    cluster = load({**os.environ, **dict(pair.split("=", 1) for pair in args.citus)})
    if single.citus == "on" or cluster.citus != "on" or not citus.local_workers(cluster):
        raise SystemExit("needs the single node in the environment and a Citus cluster with workers in --citus")
    topologies = {"single node": single, f"coordinator + {len(citus.local_workers(cluster))} workers": cluster}
    out = BENCH / "out"
    out.mkdir(exist_ok=True)

    rows: dict[str, dict[str, list[dict]]] = {name: {w: [] for w in WORKLOADS} for name in topologies}
    with ExitStack() as stack:
        served = {}
        for name, settings in topologies.items():
            print(f"preparing {DATABASE} on the {name}...", file=sys.stderr)
            serve.database(settings, DATABASE)
            url, pid = stack.enter_context(serve.api(settings, DATABASE, workers=2))
            parts = service_pids(settings, pid)
            served[name] = (url, serve.api_key(settings, DATABASE),
                            [*parts["postgres"], *parts["workers"], *parts["pgbouncer"], *parts["api"]])
        for round_no in range(1, args.rounds + 1):
            for name, settings in topologies.items():
                url, key, pids = served[name]
                for workload, result in _round(name.split()[0], settings, url, key, pids, args.seconds,
                                               out).items():
                    rows[name][workload].append(result)
            print(f"round {round_no} done", file=sys.stderr)

    def median(name: str, workload: str, field: str) -> float:
        return statistics.median(r[field] for r in rows[name][workload])

    first, second = topologies
    print(f"\n{args.seconds} s x {args.rounds} interleaved rounds, medians; pgbench 8 clients, wrk 32 connections; "
          f"API 2 processes\n")
    print(f"| workload | {first} credits/s | {second} credits/s | ratio | {first} CPU ms/credit | "
          f"{second} CPU ms/credit | {first} credits per CPU-s | {second} credits per CPU-s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for workload in WORKLOADS:
        a, b = median(first, workload, "tps"), median(second, workload, "tps")
        print(f"| {workload} | {a:.0f} | {b:.0f} | {b / a:.2f} | {median(first, workload, 'cpu_ms'):.2f} | "
              f"{median(second, workload, 'cpu_ms'):.2f} | {median(first, workload, 'per_cpu_second'):.0f} | "
              f"{median(second, workload, 'per_cpu_second'):.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
