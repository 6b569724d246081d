"""The `rewards` command line: `rewards db up`, `rewards ledger verify USER`, ..."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace

from app import earning_cli
from app.audit import stream
from app.ledger import calls, keys, sources
from app.ledger.client import Ledger
from app.ledger.errors import InvalidArgument, LedgerError, Refused, translated
from app.operations import citus, cluster, migrate, nodes, processes, rebalance
from app.settings import MissingSecret, load


def _up(args: argparse.Namespace) -> int:
    settings = load()
    processes.up(settings)
    print(f"Rewards Ledger is up: http://{settings.api_host}:{settings.api_port} "
          f"(PgBouncer on 127.0.0.1:{settings.bouncer_port}, PostgreSQL on port {settings.pg_port})")
    return 0


def _setup(args: argparse.Namespace) -> int:
    settings = load()
    workers = [nodes.Address.parse(text) for text in args.worker]
    if workers and settings.citus != "on":
        raise InvalidArgument(f"Citus workers need REWARDS_CITUS=on (it is {settings.citus})", "worker")
    if settings.ha:
        # PgBouncer's file would name REWARDS_PG_PORT, which is the monitor's under HA.
        raise InvalidArgument("rewards setup prepares servers it did not start, and REWARDS_HA=on runs nodes "
                              "`rewards up` starts itself: unset REWARDS_HA", "REWARDS_HA")
    processes.setup(settings, [replace(settings, pg_host=node.host, pg_port=node.port) for node in workers])
    print(f"database {settings.database} on {settings.pg_host or settings.socket_dir}:{settings.pg_port} migrated"
          + (f" with the workers {', '.join(map(str, workers))}" if workers else "")
          + f"; PgBouncer's files written to {settings.data_dir / 'pgbouncer'}")
    return 0


def _down(args: argparse.Namespace) -> int:
    processes.down(load())
    return 0


def _status(args: argparse.Namespace) -> int:
    settings = load()
    programs = processes.status(settings)
    if not programs:
        print(f"nothing runs under the supervisor of {settings.data_dir}")
        return 1
    width = max(len(p.name) for p in programs)
    for program in programs:
        print(f"{program.name:<{width}}  {program.state:<8}  {program.detail}")
    return 0 if all(p.state == "RUNNING" for p in programs) else 1


@contextmanager
def _ledger() -> Iterator[Ledger]:
    """The ledger as the cluster's superuser, over its Unix socket."""
    with Ledger.connect(load().superuser_conninfo()) as ledger:
        yield ledger


def _keys_create(args: argparse.Namespace) -> int:
    scopes = keys.parse_scopes(args.scopes)
    with _ledger() as ledger:
        key, secret = keys.create(ledger, args.name, scopes)
    print(f"key {key.key_id} ({key.name}): {', '.join(key.scopes)}", file=sys.stderr)
    print("the key is shown once, now:", file=sys.stderr)
    print(secret)
    return 0


def _keys_list(args: argparse.Namespace) -> int:
    with _ledger() as ledger:
        for key in ledger(calls.list_keys()):
            state = f"revoked {key.revoked_at:%Y-%m-%d %H:%M}" if key.revoked_at else "active"
            print(f"{key.key_id}\t{key.name}\t{','.join(key.scopes)}\t{state}")
    return 0


def _keys_revoke(args: argparse.Namespace) -> int:
    with _ledger() as ledger:
        key = ledger(calls.revoke_key(args.key_id))
    if key is None:
        print(f"no key {args.key_id}", file=sys.stderr)
        return 1
    print(f"key {key.key_id} ({key.name}) revoked at {key.revoked_at}")
    return 0


def _print_secrets(rows: list) -> None:
    for row in rows:
        state = ("retired " + f"{row.retired_at:%Y-%m-%d %H:%M}" if row.retired_at else
                 "disabled" if row.disabled_at else "in use")
        print(f"{row.source}\tsecret {row.secret_id}\tsha256 {row.fingerprint_hex}...\t"
              f"made {row.created_at:%Y-%m-%d %H:%M}\t{state}")


def _print_new_secret(rows: list, secret: str, next_step: str) -> None:
    _print_secrets(rows)
    print(f"the new secret is shown once, now ({next_step}):", file=sys.stderr)
    print(secret)


def _sources_create(args: argparse.Namespace) -> int:
    with _ledger() as ledger:
        rows, secret = sources.create(ledger, load().required("callback_master_key"), args.source)
    _print_new_secret(rows, secret, "give it to the partner")
    return 0


def _sources_rotate(args: argparse.Namespace) -> int:
    with _ledger() as ledger:
        rows, secret = sources.rotate(ledger, load().required("callback_master_key"), args.source)
    _print_new_secret(rows, secret, "both verify until `rewards sources finish-rotation`")
    return 0


def _sources_finish_rotation(args: argparse.Namespace) -> int:
    with _ledger() as ledger:
        _print_secrets(ledger(calls.finish_callback_rotation(args.source)))
    return 0


def _sources_disable(args: argparse.Namespace) -> int:
    with _ledger() as ledger:
        _print_secrets(ledger(calls.disable_callback_source(args.source)))
    return 0


def _sources_list(args: argparse.Namespace) -> int:
    with _ledger() as ledger:
        _print_secrets(ledger(calls.list_callback_sources()))
def _keys_limit(args: argparse.Namespace) -> int:
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources is not None else None
    with _ledger() as ledger:
        key = ledger(calls.limit_key(args.key_id, sources, args.tier))
    if key is None:
        print(f"no key {args.key_id}", file=sys.stderr)
        return 1
    print(f"key {key.key_id} ({key.name}): sources {','.join(key.sources) if key.sources else 'any'}, "
          f"rate tier {key.rate_tier or 'default'}")
    return 0


def _audit_streams(args: argparse.Namespace) -> list:
    # One slot per node whose WAL carries ledger changes, found in pg_dist_node
    # under Citus; the single node otherwise. All applied to the history, in the
    # service database, as the role that writes it.
    return stream.discover(load().local_conninfo("rewards_audit_writer"), args.slot)


def _serve_metrics(port: int, process: str) -> None:
    """The process's /metrics on 127.0.0.1:`port`. A port already taken is
    logged and the process goes on without its metrics: its work (the history,
    the notifications, PgBouncer on the primary) matters more than their
    series, whose absence `up` shows, and exiting would only have its
    supervisor start it again into the same taken port until it gave up."""
    from prometheus_client import start_http_server

    try:
        start_http_server(port, addr="127.0.0.1")
    except OSError as exc:
        logging.getLogger(f"rewards.{process}").error(
            "metrics not served: port %s could not be bound (%s); going on without them", port, exc)


def _audit_run(args: argparse.Namespace) -> int:
    from prometheus_client import REGISTRY

    from app import logs
    from app.audit import metrics

    logs.configure()
    settings = load()
    streams: list = []
    if settings.audit_metrics_port:
        # Each scrape also reads every node the stream reads (run() adds new ones to `streams`).
        REGISTRY.register(metrics.NodeCollector(lambda: [s.source_conninfo for s in streams],
                                                settings.local_conninfo("rewards_audit_writer")))
        _serve_metrics(settings.audit_metrics_port, "audit")
    # run() finds the nodes itself, waiting for the database when it is away.
    stream.run(streams, rediscover=lambda: _audit_streams(args))
    return 0


def _audit_status(args: argparse.Namespace) -> int:
    for stream in _audit_streams(args):
        lag = stream.lag()
        print(json.dumps(lag, default=str) if lag else json.dumps({"slot": stream.slot, "state": "no such slot"}))
        stream.close()
    return 0


def _audit_retention(args: argparse.Namespace) -> int:
    from app.audit import history

    with _ledger() as ledger:
        if args.keep or args.forever:
            ledger(history.set_retention(None if args.forever else args.keep))
        row = ledger(history.retention())
        print(f"history: {row['retention'] or 'kept forever'}, whole since {row['horizon']}")
    return 0


def _ledger_retention(args: argparse.Namespace) -> int:
    with _ledger() as ledger:
        if args.keep:
            ledger(calls.check_idempotency_retention(args.keep))
            ledger(calls.set_idempotency_retention(args.keep))
        print(f"idempotency records: kept {ledger(calls.idempotency_retention())['retention']}")
    return 0


def _notify_retention(args: argparse.Namespace) -> int:
    from app.audit import notify

    with _ledger() as ledger:
        if args.keep:
            ledger(notify.check_retention(args.keep))
            ledger(notify.set_retention(args.keep))
        print(f"delivered notifications: kept {ledger(notify.retention())['retention']}")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    from pathlib import Path

    from app.audit import reconcile

    report = reconcile.reconcile(load().superuser_conninfo(), batch_size=args.batch_size, repair=args.repair,
                                 pause=args.pause, progress=reconcile.print_progress,
                                 stream_wait=args.stream_wait, slot=args.slot)
    print(file=sys.stderr)
    print(reconcile.summary(report))
    reconcile.write_report(report, Path(args.report))
    print(f"JSON report: {args.report}")
    return 1 if report.findings else 0


def _notify_run(args: argparse.Namespace) -> int:
    from app import logs
    from app.audit.notify import Sender

    settings = load()
    if not settings.notify_url:
        print("REWARDS_NOTIFY_URL is not set: notifications wait in audit.notifications", file=sys.stderr)
        return 2
    logs.configure()
    if settings.notify_metrics_port:
        _serve_metrics(settings.notify_metrics_port, "notify")
    Sender(settings.local_conninfo("rewards_notifier"), settings.notify_url, settings.required("notify_secret"),
           max_attempts=settings.notify_max_attempts).run()
    return 0


def _notify_dead(args: argparse.Namespace) -> int:
    from app.audit import notify

    with _ledger() as ledger:
        for row in ledger(notify.dead()):
            print(json.dumps(row, default=str))
    return 0


def _notify_resend(args: argparse.Namespace) -> int:
    from app.audit import notify

    with _ledger() as ledger:
        for notification_id in args.notification_ids:
            queued = ledger(notify.resend(notification_id))
            print(f"{notification_id}: {'queued again' if queued else 'not a dead notification'}")
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
    with _ledger() as ledger:
        check = ledger(calls.verify_chain(args.user_id))
    print(json.dumps(asdict(check)))
    return 0 if check.ok else 2


def _ledger_expire(args: argparse.Namespace) -> int:
    with _ledger() as ledger:
        result = ledger(calls.expire_reservations(args.batch_size))
    print(json.dumps(asdict(result)))
    return 0


def _ledger_settle(args: argparse.Namespace) -> int:
    with _ledger() as ledger:
        result = ledger(calls.settle_lots(args.batch_size))
    print(json.dumps(asdict(result)))
    return 0


def _size(count: int) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    raise AssertionError  # unreachable


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}{'s' * (number != 1)}"


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _print_status(state: citus.Status) -> None:
    if state.citus is None:
        node = state.nodes[0]
        print(f"single node (no citus extension in database {load().database}): {node.host}:{node.port}")
    elif not state.nodes:
        print(f"Citus {state.citus}, but no node is registered in pg_dist_node (not even the coordinator)")
    else:
        workers = sum(n.role == "worker" for n in state.nodes)
        print(f"Citus {state.citus}: a coordinator and {_count(workers, 'worker') if workers else 'no workers'}")
        width = max(len(f"{n.host}:{n.port}") for n in state.nodes)
        print(f"  {'node':<{width}}  {'role':<11}  {'holds shards':<12}  {'active':<6}  {'shards':>6}  "
              f"{'size':>9}  {'reference':>9}")
        for n in state.nodes:
            print(f"  {f'{n.host}:{n.port}':<{width}}  {n.role:<11}  {'yes' if n.shouldhaveshards else 'no':<12}  "
                  f"{'yes' if n.active else 'NO':<6}  {n.shards:>6}  {_size(n.bytes):>9}  {n.reference_shards:>9}")
        skew = state.skew
        if skew.shards is None:
            print(f"skew: - (a node among the {skew.nodes} that should hold shards holds none)")
        else:
            print(f"skew: {_ratio(skew.shards)} by shards, {_ratio(skew.bytes)} by size "
                  f"(max/min over {_count(skew.nodes, 'node')})")
    print("logical slots:")
    width = max((len(f"{n.host}:{n.port}") for n in state.nodes), default=0)
    for n in state.nodes:
        where = f"{n.host}:{n.port}".ljust(width)
        if n.error:
            print(f"  {where}  did not answer: {n.error}")
        for slot in n.slots:
            lag = "-" if slot.lag_bytes is None else _size(slot.lag_bytes)
            print(f"  {where}  {slot.slot} ({slot.plugin}, {slot.database}, "
                  f"{'active' if slot.active else 'idle'})  confirmed {slot.confirmed_flush_lsn}  lag {lag}")
        if not n.error and not n.slots:
            print(f"  {where}  none")
    if state.citus is not None:
        print("write functions:")
        for f in state.functions:
            verdict = (f"delegated by {f.distribution_argument} ({f.how})" if f.delegated
                       else f"NOT delegated: {f.why_not()}")
            print(f"  ledger.{f.name:<22} {verdict}")


def _cluster_status(args: argparse.Namespace) -> int:
    state = citus.status(load())
    if args.json:
        print(json.dumps(state.as_json(), indent=2))
    else:
        _print_status(state)
    for problem in state.problems:
        print(f"rewards: {problem}", file=sys.stderr)
    return 1 if state.problems else 0


def _cluster_place_anchors(args: argparse.Namespace) -> int:
    settings = load()
    if citus.status(settings).citus is None:
        raise Refused("a single node has no shards to anchor budgets to (its anchors are fixed ranges)")
    missing = citus.place_budget_anchors(settings)
    print(f"budget anchors placed: one per shard of ledger.accounts ({missing} without)")
    return 1 if missing else 0


def _print_ha(report: dict) -> None:
    print(f"pg_auto_failover formation {report['formation']}, monitor {report['monitor']}: "
          f"primary {report['primary'] or '-'}")
    for n in report["nodes"]:
        state = n["reported_state"] if n["reported_state"] == n["assigned_state"] \
            else f"{n['reported_state']} -> {n['assigned_state']}"
        print(f"  {n['name']:<6} {n['host']}:{n['port']}  {state:<28} {'healthy' if n['healthy'] else 'UNHEALTHY':<9} "
              f"timeline {n['timeline']} at {n['lsn']}")
    if report["primary"] and "synchronous_commit" in report:
        print(f"commits on {report['primary']}: synchronous_commit = {report['synchronous_commit']}, "
              f"synchronous_standby_names = '{report['synchronous_standby_names']}'")
        for r in report["replication"]:
            seconds = "-" if r["replay_lag_seconds"] is None else f"{r['replay_lag_seconds']:.3f} s"
            print(f"  {r['standby']}: {r['state']}, {r['sync_state']}, flush lag {_size(r['flush_lag_bytes'] or 0)}, "
                  f"replay lag {_size(r['replay_lag_bytes'] or 0)} ({seconds})")
        if not report["replication"]:
            print("  no standby is connected")


def _ha_status(args: argparse.Namespace) -> int:
    from app.operations import ha

    report = ha.status(load())
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        _print_ha(report)
    for problem in report["problems"]:
        print(f"rewards: {problem}", file=sys.stderr)
    return 1 if report["problems"] else 0


def _ha_failover(args: argparse.Namespace) -> int:
    from app.operations import ha

    settings = load()
    done = ha.switchover(settings, timeout=args.timeout)
    print(f"switched over from {done['from']} to {done['to']} in {done['seconds']} s; the old primary is its "
          f"standby and PgBouncer points at {done['to']}")
    _print_ha(ha.status(settings))
    return 0


def _ha_follow(args: argparse.Namespace) -> int:
    from app import logs
    from app.operations import ha

    logs.configure()
    settings = load()
    if settings.ha_metrics_port:
        _serve_metrics(settings.ha_metrics_port, "ha")
    ha.follow(settings, retarget=lambda port: processes.bouncer_retarget(settings, port))


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, default=str))


def _cluster_add_node(args: argparse.Namespace) -> int:
    settings = load()
    if args.local == bool(args.node):
        raise InvalidArgument("give the node as HOST:PORT, or --local for one more local worker", "node")
    added = (nodes.add_local(settings, args.slot) if args.local
             else nodes.add(settings, nodes.Address.parse(args.node), args.slot))
    if args.json:
        _print_json(asdict(added))
        return 0
    print(f"checked {added.host}:{added.port}: PostgreSQL {added.postgresql}, Citus {added.citus}")
    for line in added.checked:
        print(f"  ok  {line}")
    where = f" (a local worker in {added.folder}, started by `rewards up`)" if added.folder else ""
    print(f"added node {added.nodeid}{where}; audit slot {added.slot} made, then the node marked to hold shards")
    print("its shards come with `rewards cluster rebalance --wait`")
    return 0


def _moves(job: rebalance.Job) -> str:
    return f"{job.done}/{job.total} tasks"


def _moving(job: rebalance.Job) -> str:
    return "; ".join(f"{m.command.removeprefix('SELECT pg_catalog.')} {m.source} -> {m.target}"
                     + (f" ({m.phase})" if m.phase and sys.stderr.isatty() else "") for m in job.running)


def _progress_printer() -> Callable[[rebalance.Job], None]:
    """A bar redrawn in place on a terminal; a line per change otherwise (a log)."""
    shown: list[tuple] = []
    terminal = sys.stderr.isatty()

    def show(job: rebalance.Job) -> None:
        if terminal:
            width = 30
            filled = width * job.done // job.total if job.total else width
            text = f"\r[{'#' * filled}{'.' * (width - filled)}] {_moves(job)}  {job.state}  {_moving(job)}"
            print(text[:200].ljust(120), end="" if not job.over else "\n", file=sys.stderr, flush=True)
            return
        state = (job.state, job.done)
        if not shown or shown[-1] != state:
            shown.append(state)
            moving = f", now {_moving(job)}" if job.running else ""
            print(f"job {job.job_id}: {job.state}, {_moves(job)}{moving}", file=sys.stderr, flush=True)

    return show


def _print_post_check(check: rebalance.PostCheck) -> None:
    rows = ", ".join(f"{name} {count}" for name, count in check.after.items())
    changed = ", ".join(f"{name} {delta:+d}" for name, delta in check.changed.items())
    if check.lost:
        print(f"post-check: FEWER rows than before the move: {changed} (now {rows})")
    elif check.changed:
        print(f"post-check: no rows lost; written during the move: {changed} (now {rows})")
    else:
        print(f"post-check: rows per distributed table unchanged ({rows})")
    print("  history: " + ("caught up with every node" if check.history_caught_up
                           else "NOT caught up: is `rewards audit run` running?"))
    print(f"  reconcile: {check.accounts_checked} accounts, "
          + ("all agree" if not check.findings else f"{check.findings} discrepancies (run `rewards reconcile`)"))


def _cluster_rebalance(args: argparse.Namespace) -> int:
    settings = load()
    with nodes.coordinator(settings) as ledger:
        if args.stop:
            job = rebalance.stop(ledger)
            if args.json:
                _print_json({"job": asdict(job)})
            else:
                print(f"rebalance job {job.job_id} {job.state} after {_moves(job)}; "
                      "`rewards cluster rebalance` starts it again where it stopped")
            return 0
        if not args.wait:
            rebalance.check(settings, ledger, args.slot)
            job = rebalance.start(ledger)
            if args.json:
                _print_json({"job": asdict(job) if job else None})
            elif job is None:
                print("nothing to move: the shards are balanced")
            else:
                print(f"rebalance job {job.job_id} {job.state}: {_moves(job)} in the background; follow it with "
                      "`rewards cluster rebalance --wait`, stop it with `rewards cluster rebalance --stop`")
            return 0
        before = rebalance.counts(ledger)
        job = rebalance.run(settings, ledger, args.slot, progress=None if args.json else _progress_printer())
        check = rebalance.post_check(settings, ledger, before, args.slot)
    if args.json:
        _print_json({"job": asdict(job) if job else None, "post_check": asdict(check) | {
            "changed": check.changed, "lost": check.lost, "ok": check.ok}})
    else:
        print("nothing to move: the shards are balanced" if job is None else
              f"rebalance job {job.job_id} finished: {_moves(job)} in "
              f"{(job.finished_at - job.started_at).total_seconds():.0f} s")
        _print_post_check(check)
    return 0 if check.ok else 1


def _cluster_drain(args: argparse.Namespace) -> int:
    settings = load()
    drained = nodes.drain(settings, nodes.Address.parse(args.node), args.slot, args.timeout,
                          progress=None if args.json else _progress_printer())
    if args.json:
        _print_json(asdict(drained))
        return 0
    print(f"drained {drained.host}:{drained.port} (node {drained.nodeid}): {drained.moves} moves; the audit consumer "
          f"confirmed its slot past {drained.confirmed_lsn}")
    print(f"removed it from the cluster and dropped its audit slot {drained.slot}"
          + (f"; deleted the local worker's folder {drained.folder_deleted}" if drained.folder_deleted else ""))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rewards", description="Rewards Ledger operations")
    groups = parser.add_subparsers(dest="group", required=True)

    groups.add_parser("up", help="database, PgBouncer, Redis and the API (safe to repeat)").set_defaults(func=_up)
    groups.add_parser("down", help="stop everything `rewards up` started").set_defaults(func=_down)
    setup = groups.add_parser(
        "setup", help="what `rewards up` does before it starts anything, on database nodes it does not run "
                      "(REWARDS_PG_HOST): secrets, workers registered, migration, PgBouncer's files (safe to repeat)")
    setup.add_argument("--worker", action="append", default=[], metavar="HOST:PORT",
                       help="a Citus worker to register before the migration distributes (REWARDS_CITUS=on)")
    setup.set_defaults(func=_setup)
    groups.add_parser("status", help="each supervised program and its state; exit 1 unless all run").set_defaults(
        func=_status)

    key_commands = groups.add_parser("keys", help="API keys").add_subparsers(dest="command", required=True)
    create = key_commands.add_parser("create", help="make a key; it is printed once")
    create.add_argument("--name", required=True)
    create.add_argument("--scopes", required=True, help=f"comma-separated: {', '.join(keys.SCOPES)}")
    create.set_defaults(func=_keys_create)
    key_commands.add_parser("list", help="every key, active or revoked").set_defaults(func=_keys_list)
    revoke = key_commands.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id", type=int)
    revoke.set_defaults(func=_keys_revoke)
    limit = key_commands.add_parser("limit", help="limit the action sources a key may report, set its rate tier")
    limit.add_argument("key_id", type=int)
    limit.add_argument("--sources", help="comma-separated sources it may report (default: any)")
    limit.add_argument("--tier", help="a rate tier REWARDS_RATE_TIERS names (default: REWARDS_RATE_API_KEY)")
    limit.set_defaults(func=_keys_limit)

    earning_cli.register(groups, _ledger)

    source_commands = groups.add_parser(
        "sources", help="partners that send signed callbacks, and their secrets").add_subparsers(
        dest="command", required=True)
    for name, func, text in (
            ("create", _sources_create, "register a source; its secret is printed once"),
            ("rotate", _sources_rotate, "a second secret (printed once); both verify until the rotation is finished"),
            ("finish-rotation", _sources_finish_rotation, "retire the older secret: only the newest verifies"),
            ("disable", _sources_disable, "refuse the source's callbacks from now on")):
        command = source_commands.add_parser(name, help=text)
        command.add_argument("source", help="the name in POST /v1/callbacks/{source}")
        command.set_defaults(func=func)
    source_commands.add_parser("list", help="every source's secrets: in use, retired, disabled").set_defaults(
        func=_sources_list)

    audit = groups.add_parser("audit", help="the change stream into the audit history").add_subparsers(
        dest="command", required=True)
    for name, func, text in (("run", _audit_run, "apply the ledger's changes to the history, forever"),
                             ("status", _audit_status, "the stream's lag in bytes and its last commit")):
        command = audit.add_parser(name, help=text)
        command.add_argument("--slot", default=stream.DEFAULT_SLOT,
                             help="the slot's name (a Citus node N's is <slot>_node<N>)")
        command.set_defaults(func=func)

    notify = groups.add_parser("notify", help="notifications to the app").add_subparsers(dest="command", required=True)
    notify.add_parser("run", help="deliver the outbox to REWARDS_NOTIFY_URL, forever").set_defaults(func=_notify_run)
    notify.add_parser("dead", help="notifications parked after repeated failures").set_defaults(func=_notify_dead)
    resend = notify.add_parser("resend", help="queue dead notifications again")
    resend.add_argument("notification_ids", type=int, nargs="+")
    resend.set_defaults(func=_notify_resend)
    kept = notify.add_parser("retention", help="show or set how long delivered notifications are kept")
    kept.add_argument("--keep", help="an interval, e.g. '30 days': older delivered ones are deleted")
    kept.set_defaults(func=_notify_retention)

    retention = audit.add_parser("retention", help="show or set how long history partitions are kept")
    which = retention.add_mutually_exclusive_group()
    which.add_argument("--keep", help="an interval, e.g. '7 years': older monthly partitions are dropped")
    which.add_argument("--forever", action="store_true", help="keep every partition (the default)")
    retention.set_defaults(func=_audit_retention)

    rec = groups.add_parser("reconcile", help="prove balances, entries, chains and history agree; exit 1 if not")
    rec.add_argument("--batch-size", type=int, default=500)
    rec.add_argument("--pause", type=float, default=0.0, help="seconds between batches, to spare live traffic")
    rec.add_argument("--report", default="reconcile-report.json")
    rec.add_argument("--repair", action="store_true", help="copy entries missing from the history from the ledger")
    rec.add_argument("--stream-wait", type=float, default=30.0,
                     help="longest wait for the audit stream to deliver what a batch found missing")
    rec.add_argument("--slot", default=stream.DEFAULT_SLOT,
                     help="the audit consumer's slot (`rewards audit run --slot`): the only one waited on")
    rec.set_defaults(func=_reconcile)

    db = groups.add_parser("db", help="the project's PostgreSQL cluster").add_subparsers(dest="command", required=True)
    db.add_parser("up", help="create, configure, start and migrate (safe to repeat)").set_defaults(func=_db_up)
    db.add_parser("down", help="stop the cluster").set_defaults(func=_db_down)
    db.add_parser("status", help="is it running, and at which revision").set_defaults(func=_db_status)
    migrate_cmd = db.add_parser("migrate", help="apply migrations up to a revision")
    migrate_cmd.add_argument("revision", nargs="?", default="head")
    migrate_cmd.set_defaults(func=_db_migrate)

    # The DBA's commands on the Citus cluster; add-node, rebalance and drain join status here.
    cluster_commands = groups.add_parser("cluster", help="the Citus cluster: its nodes, shards, slots").add_subparsers(
        dest="command", required=True)
    cluster_status = cluster_commands.add_parser(
        "status", help="nodes, shards and size per node, skew, slots and lag, delegation; exit 1 on a problem")
    cluster_status.add_argument("--json", action="store_true", help="the same as one JSON document")
    cluster_status.set_defaults(func=_cluster_status)
    slot_help = "the audit consumer's slot (`rewards audit run --slot`)"
    add_node = cluster_commands.add_parser(
        "add-node", help="check a server, register it with its audit slot, let it hold shards (exit 2: refused)")
    add_node.add_argument("node", nargs="?", help="HOST:PORT of a prepared server (see the README, For DBAs)")
    add_node.add_argument("--local", action="store_true",
                          help="start one more local worker (worker-<i> in the data folder, on port pg+i)")
    add_node.add_argument("--slot", default=stream.DEFAULT_SLOT, help=slot_help)
    add_node.add_argument("--json", action="store_true", help="the result as one JSON document")
    add_node.set_defaults(func=_cluster_add_node)
    rebalance_cmd = cluster_commands.add_parser(
        "rebalance", help="move shards until every node holds its share, in the background (citus_rebalance_start)")
    rebalance_how = rebalance_cmd.add_mutually_exclusive_group()
    rebalance_how.add_argument("--wait", action="store_true",
                               help="show progress until it ends, then check row counts and reconcile; exit 1 if not clean")
    rebalance_how.add_argument("--stop", action="store_true", help="stop the running job (running it again resumes)")
    rebalance_cmd.add_argument("--slot", default=stream.DEFAULT_SLOT, help=slot_help)
    rebalance_cmd.add_argument("--json", action="store_true", help="the result as one JSON document")
    rebalance_cmd.set_defaults(func=_cluster_rebalance)
    cluster_commands.add_parser(
        "place-anchors", help="one budget anchor per shard of ledger.accounts again, after a shard split "
                              "(`cluster status` says when)").set_defaults(func=_cluster_place_anchors)
    drain_cmd = cluster_commands.add_parser(
        "drain", help="move every shard off a node, then remove it with its audit slot (and a local worker's folder)")
    drain_cmd.add_argument("node", help="HOST:PORT as `rewards cluster status` shows it")
    drain_cmd.add_argument("--timeout", type=float, default=120.0,
                           help="seconds to wait for the audit consumer to confirm the node's last changes")
    drain_cmd.add_argument("--slot", default=stream.DEFAULT_SLOT, help=slot_help)
    drain_cmd.add_argument("--json", action="store_true", help="the result as one JSON document")
    drain_cmd.set_defaults(func=_cluster_drain)

    ha_commands = groups.add_parser("ha", help="the primary and its synchronous standby (REWARDS_HA=on)").add_subparsers(
        dest="command", required=True)
    ha_status = ha_commands.add_parser(
        "status", help="nodes, their states, synchronous replication and lag; exit 1 on a problem")
    ha_status.add_argument("--json", action="store_true", help="the same as one JSON document")
    ha_status.set_defaults(func=_ha_status)
    failover = ha_commands.add_parser(
        "failover", help="a planned switchover to the standby; returns once it is done, then reports")
    failover.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for it")
    failover.set_defaults(func=_ha_failover)
    ha_commands.add_parser("follow", help="point PgBouncer at the primary whenever it changes, forever").set_defaults(
        func=_ha_follow)

    ledger = groups.add_parser("ledger", help="ledger checks").add_subparsers(dest="command", required=True)
    verify = ledger.add_parser("verify", help="verify one account's hash chain; exit 2 when broken")
    verify.add_argument("user_id")
    verify.set_defaults(func=_ledger_verify)
    expire = ledger.add_parser("expire", help="expire reservations past their deadline now")
    expire.add_argument("--batch-size", type=int, default=100)
    expire.set_defaults(func=_ledger_expire)
    kept = ledger.add_parser("retention", help="show or set how long idempotency records are kept")
    kept.add_argument("--keep", help="an interval, e.g. '90 days' (at least a day and longer than the longest "
                                     "hold): a retry of an older key is a new request")
    kept.set_defaults(func=_ledger_retention)
    settle = ledger.add_parser("settle", help="mature pending points and expire what is left of old lots now")
    settle.add_argument("--batch-size", type=int, default=100)
    settle.set_defaults(func=_ledger_settle)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Refusals and outages end in one line on stderr and a non-zero exit:
    2 for an argument the ledger refused or a precondition that does not hold,
    1 for anything else it could not do."""
    args = _parser().parse_args(argv)
    try:
        with translated():
            return args.func(args)
    except InvalidArgument as exc:
        print(f"rewards: {exc}" + (f" ({exc.field})" if exc.field else ""), file=sys.stderr)
        return 2
    except Refused as exc:
        print(f"rewards: {exc}", file=sys.stderr)
        return 2
    except (LedgerError, MissingSecret) as exc:
        print(f"rewards: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
