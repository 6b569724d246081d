"""The `rewards` command line: `rewards db up`, `rewards ledger verify USER`, ..."""

from __future__ import annotations

import argparse
import json
import sys

import psycopg
from psycopg.rows import dict_row

from app import cluster, keys, migrate, queries, services
from app.settings import load


def _up(args: argparse.Namespace) -> int:
    settings = load()
    services.up(settings)
    print(f"Rewards Ledger is up: http://{settings.api_host}:{settings.api_port} "
          f"(PgBouncer on 127.0.0.1:{settings.bouncer_port}, PostgreSQL on port {settings.pg_port})")
    return 0


def _down(args: argparse.Namespace) -> int:
    services.down(load())
    return 0


def _superuser() -> psycopg.Connection:
    return psycopg.connect(load().superuser_conninfo(), autocommit=True, row_factory=dict_row)


def _keys_create(args: argparse.Namespace) -> int:
    scopes = [scope.strip() for scope in args.scopes.split(",") if scope.strip()]
    unknown = sorted(set(scopes) - set(keys.SCOPES))
    if unknown or not scopes:
        print(f"unknown scopes {unknown}; choose from {', '.join(keys.SCOPES)}", file=sys.stderr)
        return 2
    with _superuser() as conn:
        info, secret = keys.create(conn, args.name, scopes)
    print(f"key {info['key_id']} ({info['name']}): {', '.join(info['scopes'])}", file=sys.stderr)
    print("the key is shown once, now:", file=sys.stderr)
    print(secret)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    with _superuser() as conn:
        for info in keys.list_all(conn):
            state = f"revoked {info['revoked_at']:%Y-%m-%d %H:%M}" if info["revoked_at"] else "active"
            print(f"{info['key_id']}\t{info['name']}\t{','.join(info['scopes'])}\t{state}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    with _superuser() as conn:
        info = keys.revoke(conn, args.key_id)
    if info is None:
        print(f"no key {args.key_id}", file=sys.stderr)
        return 1
    print(f"key {info['key_id']} ({info['name']}) revoked at {info['revoked_at']}")
    return 0


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
    with _superuser() as conn:
        result = conn.execute(queries.VERIFY_CHAIN, {"user_id": args.user_id}).fetchone()
    print(json.dumps(result))
    return 0 if result["ok"] else 2


def _ledger_expire(args: argparse.Namespace) -> int:
    with _superuser() as conn:
        result = conn.execute(queries.EXPIRE_RESERVATIONS, {"batch_size": args.batch_size}).fetchone()
    print(json.dumps(result))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewards", description="Rewards Ledger operations")
    groups = parser.add_subparsers(dest="group", required=True)

    groups.add_parser("up", help="database, PgBouncer, Redis and the API (safe to repeat)").set_defaults(func=_up)
    groups.add_parser("down", help="stop everything `rewards up` started").set_defaults(func=_down)

    key_commands = groups.add_parser("keys", help="API keys").add_subparsers(dest="command", required=True)
    create = key_commands.add_parser("create", help="make a key; it is printed once")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", required=True, help=f"comma-separated: {', '.join(keys.SCOPES)}")
    create.set_defaults(func=_keys_create)
    key_commands.add_parser("list", help="every key, active or revoked").set_defaults(func=_keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", type=int)
    revoke.set_defaults(func=_keys_revoke)

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
