"""The `rewards` command line: `rewards db up`, `rewards ledger verify USER`, ..."""

from __future__ import annotations

import argparse
import json
import sys

import psycopg
from psycopg.rows import dict_row

from app import cluster, migrate, queries
from app.settings import load


def _db_up(args: argparse.Namespace) -> int:
    settings = load()
    cluster.up(settings)
    print(f"PostgreSQL is up: psql '{settings.superuser_conninfo()}'")
    return 0


def _db_down(args: argparse.Namespace) -> int:
    cluster.down(load())
    return 0


def _db_status(args: argparse.Namespace) -> int:
    settings = load()
    running = cluster.is_running(settings)
    print(f"cluster {settings.pg_data}: {'running' if running else 'stopped'} on port {settings.pg_port}")
    if running:
        migrate.current(settings.superuser_conninfo())
    return 0 if running else 1


def _db_migrate(args: argparse.Namespace) -> int:
    migrate.upgrade(load().superuser_conninfo(), args.revision)
    return 0


def _ledger_verify(args: argparse.Namespace) -> int:
    with psycopg.connect(load().superuser_conninfo(), row_factory=dict_row) as conn:
        result = conn.execute(queries.VERIFY_CHAIN, {"user_id": args.user_id}).fetchone()
    print(json.dumps(result))
    return 0 if result["ok"] else 2


def _ledger_expire(args: argparse.Namespace) -> int:
    with psycopg.connect(load().superuser_conninfo(), autocommit=True, row_factory=dict_row) as conn:
        result = conn.execute(queries.EXPIRE_RESERVATIONS, {"batch_size": args.batch_size}).fetchone()
    print(json.dumps(result))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewards", description="Rewards Ledger operations")
    groups = parser.add_subparsers(dest="group", required=True)

    db = groups.add_parser("db", help="the project's PostgreSQL cluster").add_subparsers(dest="command", required=True)
    db.add_parser("up", help="create, configure, start and migrate (safe to repeat)").set_defaults(func=_db_up)
    db.add_parser("down", help="stop the cluster").set_defaults(func=_db_down)
    db.add_parser("status", help="is it running, and at which revision").set_defaults(func=_db_status)
    migrate_cmd = db.add_parser("migrate", help="apply migrations up to a revision")
    migrate_cmd.add_argument("revision", nargs="?", default="head")
    migrate_cmd.set_defaults(func=_db_migrate)

    ledger = groups.add_parser("ledger", help="ledger checks").add_subparsers(dest="command", required=True)
    verify = ledger.add_parser("verify", help="verify one account's hash chain; exit 2 when broken")
    verify.add_argument("user_id")
    verify.set_defaults(func=_ledger_verify)
    expire = ledger.add_parser("expire", help="expire reservations past their deadline now")
    expire.add_argument("--batch-size", type=int, default=100)
    expire.set_defaults(func=_ledger_expire)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
