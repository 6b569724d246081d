"""Growth under load: a bank's clients (bench/bank.py) run against the API while
a third worker is added and the shards are rebalanced onto it, as a DBA does it.

    REWARDS_CITUS=on REWARDS_CITUS_WORKERS=2 make run
    uv run python bench/growth.py [--clients 16] [--accounts 2000] [--before 30] [--after 30] [--keep]

On the running cluster's service database (the one the DBA's commands work on):
an API of its own (2 processes, rate limits out of the way), the audit consumer
`make run` started, then `--before` seconds of load, the DBA's commands run
while the load goes on (`rewards cluster add-node --local`, then `rewards
cluster rebalance --wait` with its post-check), and `--after` seconds more.
Then every request must have been answered with a success or a business 409 (a
429, if any, retried), and bench/verify.py's checks must hold. Prints
throughput and p50/p99 before, during and after the move as a Markdown table,
keeps the record in bench/out/growth.json and draws bench/growth.png:
requests/s and p99 per second, the move's start and end marked. Exit 1 on any
problem. Once the load has stopped, the new worker is drained away again
(`rewards cluster drain`), so that the next run starts from the same two
workers; `--keep` keeps it.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.operations import citus  # noqa: E402
from app.settings import PROJECT_ROOT, load  # noqa: E402
from bench import serve  # noqa: E402
from bench.bank import Load, Run  # noqa: E402
from bench.verify import verify  # noqa: E402

BENCH = Path(__file__).resolve().parent
MOVE_STARTED, NODE_ADDED, MOVE_ENDED = "move started", "node added", "move ended"


def cluster_command(*args: str) -> subprocess.CompletedProcess[str]:
    """`rewards cluster ...` on the cluster of this environment; its progress
    and refusals go to stderr, as a DBA would see them."""
    return subprocess.run([sys.executable, "-m", "app.cli", "cluster", *args], cwd=PROJECT_ROOT,
                          stdout=subprocess.PIPE, stderr=sys.stderr, text=True)


def phases(run: Run) -> dict[str, dict]:
    started, ended = run.marks[MOVE_STARTED], run.marks[MOVE_ENDED]
    return {"before": run.window(0, started), "during": run.window(started, ended),
            "after": run.window(ended, run.seconds)}


def table(run: Run) -> str:
    rows = phases(run)
    base = rows["before"]["rps"]
    lines = ["| phase | seconds | requests | req/s | p50 ms | p99 ms | req/s / before |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, row in rows.items():
        lines.append(f"| {name} the move | {row['seconds']:.0f} | {row['requests']} | {row['rps']:.0f} | "
                     f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['rps'] / base:.2f} |")
    return "\n".join(lines)


def plot(run: Run, path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    from matplotlib import pyplot  # noqa: PLC0415

    timeline = run.timeline()
    seconds = [row["second"] for row in timeline]
    figure, (rate, tail) = pyplot.subplots(2, 1, sharex=True, figsize=(10, 6))
    rate.plot(seconds, [row["requests"] for row in timeline], color="tab:blue")
    rate.set_ylabel("requests/s")
    rate.set_ylim(bottom=0)
    tail.plot(seconds, [row["p99_ms"] for row in timeline], color="tab:red")
    tail.set_ylabel("p99 latency (ms)")
    tail.set_ylim(bottom=0)
    tail.set_xlabel("seconds since the load started")
    for axes in (rate, tail):
        axes.axvspan(run.marks[MOVE_STARTED], run.marks[MOVE_ENDED], color="tab:orange", alpha=0.15)
        for name in (MOVE_STARTED, NODE_ADDED, MOVE_ENDED):
            axes.axvline(run.marks[name], color="tab:orange", linestyle="--" if name == NODE_ADDED else "-")
        axes.grid(alpha=0.3)
    for name in (MOVE_STARTED, NODE_ADDED, MOVE_ENDED):
        rate.annotate(name, (run.marks[name], rate.get_ylim()[1]), xytext=(3, -12), textcoords="offset points",
                      fontsize=8, color="tab:orange")
    summary = run.summary()
    figure.suptitle(f"A third worker added and the shards rebalanced under load: {summary['clients']} clients, "
                    f"{summary['requests']} requests, {summary['lost']} lost", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--accounts", type=int, default=2000)
    parser.add_argument("--before", type=float, default=30)
    parser.add_argument("--after", type=float, default=30)
    parser.add_argument("--workers", type=int, default=2, help="API processes")
    parser.add_argument("--keep", action="store_true", help="keep the new worker afterwards (not drained)")
    args = parser.parse_args()
    settings = load()
    workers = citus.local_workers(settings)
    if settings.citus != "on" or len(workers) < 2:
        raise SystemExit("needs the local Citus cluster: REWARDS_CITUS=on REWARDS_CITUS_WORKERS=2 make run")

    key = serve.api_key(settings, settings.database, "growth-bench")
    problems: list[str] = []
    with serve.api(settings, settings.database, workers=args.workers) as (url, _):
        load_ = Load(url, key, clients=args.clients, accounts=args.accounts)
        load_.start()
        time.sleep(args.before)
        load_.mark(MOVE_STARTED)
        added = cluster_command("add-node", "--local", "--json")
        load_.mark(NODE_ADDED)
        if added.returncode == 0:
            moved = cluster_command("rebalance", "--wait")
            print(moved.stdout, file=sys.stderr)
            if moved.returncode != 0:
                problems.append(f"rewards cluster rebalance --wait exited {moved.returncode}")
        else:
            problems.append(f"rewards cluster add-node --local exited {added.returncode}")
        load_.mark(MOVE_ENDED)
        time.sleep(args.after)
        run = load_.finish()
    run.save(BENCH / "out" / "growth.json")
    plot(run, BENCH / "growth.png")

    problems += run.problems(allowed=frozenset({409, 429}))
    verdict = verify(run, settings.superuser_conninfo())
    problems += verdict.problems
    if added.returncode == 0 and not args.keep:
        node = json.loads(added.stdout)
        drained = cluster_command("drain", f"{node['host']}:{node['port']}")
        if drained.returncode != 0:
            problems.append(f"rewards cluster drain exited {drained.returncode}")
    print(f"\n{args.clients} clients on {args.accounts} accounts, API {args.workers} processes; the move took "
          f"{run.marks[MOVE_ENDED] - run.marks[MOVE_STARTED]:.0f} s (the node added after "
          f"{run.marks[NODE_ADDED] - run.marks[MOVE_STARTED]:.0f} s)\n")
    print(table(run))
    print(f"\n{json.dumps(run.summary())}\n")
    print("\n".join(verdict.lines()))
    for note in run.overloaded_then_answered():
        print(f"not a problem: {note}", file=sys.stderr)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
