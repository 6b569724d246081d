"""pgbench, side by side: each ledger operation against pgbench's built-in
tpcb-like on the same cluster with the same clients, in interleaved rounds.

    uv run python bench/run.py [--clients 8] [--seconds 15] [--rounds 3]

Runs in databases of their own (rewards_bench, rewards_tpcb), never the service's.
rewards_bench is made as the service's database is: under REWARDS_CITUS=on on
every node and distributed, so the ledger's figures are the cluster's (each call
delegated to the worker holding its user). rewards_tpcb stays a plain database
on the coordinator's PostgreSQL: pgbench's yardstick for this server.
Prints a Markdown table of median TPS, median mean latency, and each TPS as a
ratio of tpcb-like's; raw pgbench output goes to bench/out/.
"""

from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
from pathlib import Path

import psycopg
from psycopg import sql

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.ledger import queries  # noqa: E402
from app.settings import load  # noqa: E402
from bench import serve  # noqa: E402

BENCH = Path(__file__).resolve().parent
_QUERIES = queries.named(BENCH / "queries.sql")
LEDGER_DB = "rewards_bench"
TPCB_DB = "rewards_tpcb"
USERS = 100_000
SCRIPTS = {
    "credit": "credit.sql",
    "debit": "debit.sql",
    "reserve+commit": "reserve_commit.sql",
    "balance read": "balance.sql",
}


def _recreate(settings, name: str) -> None:
    with psycopg.connect(settings.superuser_conninfo("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def prepare_ledger(settings) -> None:
    """A fresh rewards_bench database (distributed under Citus) with USERS
    accounts funded through the ledger itself, so debits spend."""
    serve.database(settings, LEDGER_DB)
    clients = 8
    pgbench(settings, LEDGER_DB, ["-n", "-c", str(clients), "-j", "2", "-t", str(USERS // clients),
                                  "-D", f"per={USERS // clients}", "-D", "n=0", "-f", str(BENCH / "fund.sql")])
    with psycopg.connect(settings.superuser_conninfo(LEDGER_DB), autocommit=True) as conn:
        funded = conn.execute(_QUERIES["funded_accounts"]).fetchone()[0]
        if funded != USERS:
            raise SystemExit(f"{funded} of {USERS} bench accounts were funded")
        conn.execute(_QUERIES["vacuum_analyze"])


def _prepare(settings) -> None:
    prepare_ledger(settings)
    _recreate(settings, TPCB_DB)
    pgbench(settings, TPCB_DB, ["-i", "-q", "-s", "10"])


def pgbench(settings, dbname: str, args: list[str]) -> str:
    command = [str(settings.pg_bin / "pgbench"), "-h", str(settings.socket_dir), "-p", str(settings.pg_port),
               "-U", settings.pg_superuser, *args, dbname]
    return subprocess.run(command, check=True, capture_output=True, text=True).stdout


def measure(settings, args: list[str], dbname: str, clients: int, seconds: int,
            out: Path) -> tuple[float, float]:
    """pgbench for `seconds`; its TPS and mean latency, its output kept in `out`."""
    text = pgbench(settings, dbname, ["-n", "-c", str(clients), "-j", "2", "-T", str(seconds), *args])
    out.write_text(text)
    tps = float(re.search(r"tps = ([\d.]+) \(without initial connection time\)", text).group(1))
    latency = float(re.search(r"latency average = ([\d.]+) ms", text).group(1))
    return tps, latency


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    settings = load()
    out_dir = BENCH / "out"
    out_dir.mkdir(exist_ok=True)

    print(f"preparing {LEDGER_DB} ({USERS} funded accounts) and {TPCB_DB} (scale 10)...", file=sys.stderr)
    _prepare(settings)

    runs: dict[str, list[tuple[float, float]]] = {"tpcb-like": [], **{name: [] for name in SCRIPTS}}
    for round_no in range(1, args.rounds + 1):
        for name in runs:
            if name == "tpcb-like":
                bench_args, dbname = ["-b", "tpcb-like"], TPCB_DB
            else:
                bench_args, dbname = ["-D", f"users={USERS}", "-f", str(BENCH / SCRIPTS[name])], LEDGER_DB
            slug = re.sub(r"\W+", "_", name)
            result = measure(settings, bench_args, dbname, args.clients, args.seconds,
                              out_dir / f"{slug}.round{round_no}.txt")
            runs[name].append(result)
            print(f"round {round_no} {name}: {result[0]:.0f} tps, {result[1]:.2f} ms", file=sys.stderr)

    baseline = statistics.median(tps for tps, _ in runs["tpcb-like"])
    print(f"\n{args.clients} clients, {args.seconds} s x {args.rounds} interleaved rounds, medians\n")
    print("| workload | TPS | mean latency (ms) | TPS / tpcb-like |")
    print("|---|---:|---:|---:|")
    for name, results in runs.items():
        tps = statistics.median(r[0] for r in results)
        latency = statistics.median(r[1] for r in results)
        print(f"| {name} | {tps:.0f} | {latency:.2f} | {tps / baseline:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
