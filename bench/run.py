"""pgbench, side by side: each ledger operation against pgbench's built-in
tpcb-like on the same cluster with the same clients, in interleaved rounds.

    uv run python bench/run.py [--clients 8] [--seconds 15] [--rounds 3] [--json FILE]

Runs in databases of their own (rewards_bench, rewards_tpcb), never the service's.
rewards_bench is made as the service's database is: under REWARDS_CITUS=on on
every node and distributed, so the ledger's figures are the cluster's (each call
delegated to the worker holding its user). rewards_tpcb stays a plain database
on the coordinator's PostgreSQL: pgbench's yardstick for this server.
Prints a Markdown table of median TPS, median mean latency, and each TPS as a
ratio of tpcb-like's; raw pgbench output goes to bench/out/, and with `--json`
every round's figures and the medians to FILE.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from pathlib import Path

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict, make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.ledger import calls, queries  # noqa: E402
from app.ledger.client import Ledger  # noqa: E402
from app.settings import load  # noqa: E402
from bench import serve  # noqa: E402

BENCH = Path(__file__).resolve().parent
LOGIN_SECONDS = 0.05  # a SCRAM login through PgBouncer, at most, as measured here (see measure)
_QUERIES = queries.named(BENCH / "queries.sql")
LEDGER_DB = "rewards_bench"
TPCB_DB = "rewards_tpcb"
USERS = 100_000
SCRIPTS = {
    "credit": "credit.sql",
    "action claim (rules)": "action.sql",
    "debit": "debit.sql",
    "reserve+commit": "reserve_commit.sql",
    "balance read": "balance.sql",
}


def _recreate(settings, name: str) -> None:
    with psycopg.connect(settings.superuser_conninfo("postgres"), autocommit=True) as admin:
        admin.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def prepare_ledger(settings, database: str = LEDGER_DB, users: int = USERS) -> None:
    """A fresh `database` (distributed under Citus) with `users` accounts
    funded through the ledger itself, so debits spend."""
    serve.database(settings, database)
    clients = 8
    pgbench(settings, database, ["-n", "-c", str(clients), "-j", "2", "-t", str(users // clients),
                                 "-D", f"per={users // clients}", "-D", "n=0", "-f", str(BENCH / "fund.sql")])
    with psycopg.connect(settings.superuser_conninfo(database), autocommit=True) as conn:
        funded = conn.execute(_QUERIES["funded_accounts"]).fetchone()[0]
        if funded != users // clients * clients:
            raise SystemExit(f"{funded} of {users} bench accounts were funded")
        # What bench/action.sql earns by: a rule with caps it stays under and
        # a campaign in its window, so each claim evaluates all of them.
        now = datetime.now(timezone.utc)
        Ledger(conn)(calls.put_rule("bench", "ad_view", fixed_points=10, daily_cap=1_000_000,
                                    lifetime_cap=1_000_000_000))
        Ledger(conn)(calls.put_campaign("bench", None, "bench double", now - timedelta(days=1),
                                        now + timedelta(days=1), multiplier_percent=200,
                                        action_types=["ad_view"]))
        conn.execute(_QUERIES["vacuum_analyze"])


def _prepare(settings) -> None:
    prepare_ledger(settings)
    _recreate(settings, TPCB_DB)
    pgbench(settings, TPCB_DB, ["-i", "-q", "-s", "10"])


def pgbench(settings, dbname: str, args: list[str], through_bouncer: bool = False,
            aborts_ok: bool = False) -> subprocess.CompletedProcess:
    """pgbench on `dbname` as the superuser straight to PostgreSQL, or
    `through_bouncer` as the API connects (its role, through PgBouncer). With
    `aborts_ok` a run some of whose clients aborted (exit status 2: a wait
    refused under overload) is a result, not a failure."""
    env = dict(os.environ)
    if through_bouncer:
        # The password in the environment, not on a command line others can read.
        conninfo = conninfo_to_dict(settings.bouncer_conninfo(dbname))
        env["PGPASSWORD"] = conninfo.pop("password")
        target = [make_conninfo(**conninfo)]
    else:
        target = ["-h", str(settings.socket_dir), "-p", str(settings.pg_port), "-U", settings.pg_superuser, dbname]
    done = subprocess.run([str(settings.pg_bin / "pgbench"), *args, *target], capture_output=True, text=True,
                          env=env)
    finished = "transactions actually processed" in done.stdout
    if done.returncode and not (aborts_ok and done.returncode == 2 and finished):
        raise subprocess.CalledProcessError(done.returncode, done.args, done.stdout, done.stderr)
    return done


def measure(settings, args: list[str], dbname: str, clients: int, seconds: int, out: Path,
            percentiles: bool = False, through_bouncer: bool = False) -> dict:
    """pgbench for `seconds`, its output kept in `out`: its TPS, transactions,
    mean latency and clients aborted; with `percentiles`, also p50/p95/p99 from
    its per-transaction log (written to a scratch folder, a line per
    transaction); `through_bouncer` as pgbench() says (aborts then counted)."""
    # pgbench's -T runs from its start, its clients' logins included, and a
    # SCRAM login through PgBouncer's one thread took up to 50 ms here: 512
    # clients would finish nothing in a few seconds. The run is longer by that
    # much, and its TPS is pgbench's own "without initial connection time".
    duration = seconds + (math.ceil(clients * LOGIN_SECONDS) if through_bouncer else 0)
    with tempfile.TemporaryDirectory(prefix="pgbench-") as scratch:
        logging = ["-l", "--log-prefix", f"{scratch}/tx"] if percentiles else []
        done = pgbench(settings, dbname, ["-n", "-c", str(clients), "-j", str(min(2, clients)), "-T", str(duration),
                                          *logging, *args], through_bouncer=through_bouncer, aborts_ok=through_bouncer)
        latencies = sorted(int(fields[2]) / 1000 for log in Path(scratch).glob("tx*")
                           for fields in map(str.split, log.read_text().splitlines()) if fields[2].isdigit())
    text = done.stdout
    out.write_text(text + done.stderr)
    # A run that finished no transaction (every client still connecting, or
    # aborted) prints neither its rate nor its latency.
    tps, mean = (re.search(pattern, text) for pattern in (r"tps = ([\d.]+) \(without initial connection time\)",
                                                          r"latency average = ([\d.]+) ms"))
    result = {"tps": float(tps.group(1)) if tps else 0.0,
              "transactions": int(re.search(r"number of transactions actually processed: (\d+)", text).group(1)),
              **({"mean_ms": float(mean.group(1))} if mean else {}),
              "aborted_clients": len(re.findall(r"^client \d+ aborted", done.stderr, re.MULTILINE))}
    if latencies:
        result |= {f"p{q}_ms": latencies[min(len(latencies) - 1, len(latencies) * q // 100)] for q in (50, 95, 99)}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write every figure to this file")
    args = parser.parse_args()
    settings = load()
    out_dir = BENCH / "out"
    out_dir.mkdir(exist_ok=True)

    print(f"preparing {LEDGER_DB} ({USERS} funded accounts) and {TPCB_DB} (scale 10)...", file=sys.stderr)
    _prepare(settings)

    with psycopg.connect(settings.superuser_conninfo(LEDGER_DB), autocommit=True) as conn:
        distributed = Ledger(conn)(calls.citus_installed())["citus"]

    runs: dict[str, list[dict]] = {"tpcb-like": [], **{name: [] for name in SCRIPTS}}
    for round_no in range(1, args.rounds + 1):
        for name in runs:
            if name == "tpcb-like":
                bench_args, dbname = ["-b", "tpcb-like"], TPCB_DB
            else:
                bench_args, dbname = ["-D", f"users={USERS}", "-D", f"distributed={int(distributed)}",
                                      "-f", str(BENCH / SCRIPTS[name])], LEDGER_DB
            slug = re.sub(r"\W+", "_", name)
            result = measure(settings, bench_args, dbname, args.clients, args.seconds,
                             out_dir / f"{slug}.round{round_no}.txt")
            runs[name].append(result)
            print(f"round {round_no} {name}: {result['tps']:.0f} tps, {result['mean_ms']:.2f} ms", file=sys.stderr)

    medians = {name: {field: statistics.median(r[field] for r in results) for field in ("tps", "mean_ms")}
               for name, results in runs.items()}
    baseline = medians["tpcb-like"]["tps"]
    print(f"\n{args.clients} clients, {args.seconds} s x {args.rounds} interleaved rounds, medians\n")
    print("| workload | TPS | mean latency (ms) | TPS / tpcb-like |")
    print("|---|---:|---:|---:|")
    for name, median in medians.items():
        median["per_tpcb_like"] = median["tps"] / baseline
        print(f"| {name} | {median['tps']:.0f} | {median['mean_ms']:.2f} | {median['per_tpcb_like']:.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"clients": args.clients, "seconds": args.seconds, "rounds": runs,
                                         "median": medians, "load_average": os.getloadavg()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
