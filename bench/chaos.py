"""`make chaos`: faults injected, one after another, into the running service
(what `make run` started, with the settings of the environment) under the
bank-style load of bench/bank.py, then every check of bench/verify.py.

    uv run python bench/chaos.py [--faults pgbouncer,postgres,redis,consumer,api-worker[,primary,primary-lost]]
        [--clients 16] [--accounts 500] [--warmup 10] [--settle 15] [--heal-timeout 60]
        [--out bench/out/chaos] [--plot bench/chaos.png]

Each fault kills one process the way a crash would (SIGKILL; PostgreSQL gets
SIGQUIT, its immediate stop) and then nothing is done: the harness only watches
until the process is back and answers (healed), for at most `--heal-timeout`
seconds. Past that it runs `rewards up` itself, so the next fault meets a whole
service, and reports the fault as not healed. With REWARDS_HA=on two faults are
added: the primary node killed (`primary`: supervisord starts its keeper again,
on the same node) and the primary's machine lost (`primary-lost`: kept down
40 s, so that the standby takes over, then back; healed once the promoted
standby takes writes through PgBouncer).

Per fault it reports what the clients saw (HTTP attempts by status, from the
kill to the next fault), how long after the kill writes succeeded again, and
whether and when the service healed itself; then the verifier's checks over the
whole run, a JSON record in `--out` and a plot of requests/s and errors with
each fault marked. Exit 1 when a check fails or a fault did not heal.

Processes are found by what they listen on (PgBouncer, Redis, the audit
consumer's metrics port, the API's workers) or by postmaster.pid, never by name,
so the harness hits this service's processes and no other's.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import psycopg
from psycopg.conninfo import make_conninfo

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.ledger import queries  # noqa: E402
from app.ledger.client import Call, Ledger  # noqa: E402
from app.ledger.errors import LedgerError  # noqa: E402
from app.operations import processes  # noqa: E402
from app.settings import Settings, load  # noqa: E402
from bench import serve, verify  # noqa: E402
from bench.bank import Load, Run  # noqa: E402

WRITES = frozenset({"credit", "debit", "reserve", "commit"})
FAILED = frozenset({0, 500, 502, 503, 504})  # no answer, or the service could not do it


# --- Finding a process by what it listens on ----------------------------------

def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "0A":  # LISTEN
                inodes.add(fields[9])
    return inodes


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def listeners(port: int) -> list[int]:
    """The processes holding a socket that listens on `port` (an API's master
    and its workers share one)."""
    inodes = {f"socket:[{inode}]" for inode in _listening_inodes(port)}
    found = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) in inodes for fd in fd_dir.iterdir()):
                found.append(int(fd_dir.parent.name))
        except OSError:  # gone meanwhile, or not ours to read
            continue
    return sorted(found)


def api_workers(settings: Settings) -> list[int]:
    """The API's worker processes: those on its port whose parent is on it too."""
    pids = listeners(settings.api_port)
    return [pid for pid in pids if _parent(pid) in pids]


def postmaster(settings: Settings) -> list[int]:
    """The running postmaster of the service database: the cluster's, or with
    REWARDS_HA=on the primary node's, none while no node is (a crashed
    primary's standby being promoted) or the monitor does not answer."""
    if not settings.ha:
        return _postmaster_of(settings.pg_data)
    try:
        return _postmaster_of(_primary_node(settings).pg_data)
    except (psycopg.Error, StopIteration):
        return []


def _postmaster_of(pg_data: Path) -> list[int]:
    """The running postmaster's pid (the first line of postmaster.pid), if any."""
    try:
        pid = int((pg_data / "postmaster.pid").read_text().split("\n", 1)[0])
        os.kill(pid, 0)
        return [pid]
    except (OSError, ValueError):
        return []


def _kill(pids: list[int], sig: signal.Signals = signal.SIGKILL) -> list[int]:
    if not pids:
        raise SystemExit("chaos: found no process to kill; is the service up (make run)?")
    for pid in pids:
        os.kill(pid, sig)
    return pids


def _answers(conninfo: str) -> bool:
    try:
        with Ledger.connect(make_conninfo(conninfo, connect_timeout="2")) as ledger:
            ledger(Call(queries.PING))
        return True
    except LedgerError:
        return False


# --- The faults ---------------------------------------------------------------

@dataclass(frozen=True)
class Fault:
    name: str
    what: str
    inject: Callable[[Settings], list[int]]             # the pids it killed
    healed: Callable[[Settings, list[int]], bool]       # back and answering, with new pids


def _back(now: list[int], killed: list[int]) -> bool:
    return bool(now) and not set(now) & set(killed)


def _redis_port(settings: Settings) -> int:
    return urlparse(settings.redis_url).port or 6379


def _primary_node(settings: Settings):
    from app.operations import ha  # noqa: PLC0415  (REWARDS_HA=on only)

    current = ha.primary(settings)
    return next(node for node in ha.nodes(settings) if current is not None and node.port == current.port)


def _kill_primary(settings: Settings) -> list[int]:
    """The primary node lost whole: its keeper, the keeper's children and its
    PostgreSQL (SIGKILL); the pid reported is its postmaster's."""
    from app.operations import ha  # noqa: PLC0415

    node = _primary_node(settings)
    pids = _postmaster_of(node.pg_data)
    ha.kill_node(settings, node)
    return pids


# How long a lost primary's machine stays away: past the failover, so that the
# standby has taken over before it comes back.
LOST_FOR_SECONDS = 40.0


def _lose_primary(settings: Settings) -> list[int]:
    """The primary's machine lost: its keeper, the keeper's children and its
    PostgreSQL killed (SIGKILL) and kept down, so that the standby is promoted;
    LOST_FOR_SECONDS later the machine is back (its keeper started again, as
    its boot would) and rejoins as the standby. The pid reported is the lost
    postmaster's."""
    from app.operations import ha  # noqa: PLC0415

    node = _primary_node(settings)
    pids = _postmaster_of(node.pg_data)
    ha.kill_node(settings, node, keep_down=True)
    threading.Timer(LOST_FOR_SECONDS, ha.restart_node, (settings, node)).start()
    return pids


def _failed_over(settings: Settings, killed: list[int]) -> bool:
    """Another node is the primary and takes writes through PgBouncer (the lost
    machine rejoins as its standby when it is back, after the fault's window
    began: `rewards ha status` shows it)."""
    from app.operations import ha  # noqa: PLC0415

    try:
        node = _primary_node(settings)
        return (_back(_postmaster_of(node.pg_data), killed) and ha.bouncer_target(settings) == node.port
                and _answers(settings.bouncer_conninfo()))
    except (psycopg.Error, StopIteration):
        return False


def _primary_healed(settings: Settings, killed: list[int]) -> bool:
    """Another node takes writes through PgBouncer, and the lost one is back as
    its synchronous standby."""
    from app.operations import ha  # noqa: PLC0415

    try:
        return (ha.settled(settings) and _back(_postmaster_of(_primary_node(settings).pg_data), killed)
                and _answers(settings.bouncer_conninfo()))
    except (psycopg.Error, StopIteration):  # the monitor not answering, or no primary yet
        return False


FAULTS = {fault.name: fault for fault in (
    Fault("pgbouncer", "PgBouncer killed (SIGKILL)",
          lambda s: _kill(listeners(s.bouncer_port)),
          lambda s, killed: _back(listeners(s.bouncer_port), killed) and _answers(s.bouncer_conninfo())),
    Fault("postgres", "PostgreSQL crashed (immediate stop: SIGQUIT to the postmaster)",
          lambda s: _kill(postmaster(s), signal.SIGQUIT),
          lambda s, killed: _back(postmaster(s), killed) and _answers(s.superuser_conninfo())),
    Fault("redis", "Redis killed (SIGKILL)",
          lambda s: _kill(listeners(_redis_port(s))),
          lambda s, killed: _back(listeners(_redis_port(s)), killed) and processes.redis_answers(s.redis_url)),
    Fault("consumer", "audit consumer killed (SIGKILL)",
          lambda s: _kill(listeners(s.audit_metrics_port)),
          lambda s, killed: _back(listeners(s.audit_metrics_port), killed)),
    Fault("api-worker", "one API worker process killed (SIGKILL)",
          lambda s: _kill(api_workers(s)[:1]),
          lambda s, killed: len(set(api_workers(s)) - set(killed)) == s.api_workers),
    Fault("primary", "the primary node killed (keeper, its children and PostgreSQL: SIGKILL)",
          _kill_primary, _primary_healed),
    Fault("primary-lost", f"the primary's machine lost (killed and kept down {LOST_FOR_SECONDS:.0f} s: a failover)",
          _lose_primary, _failed_over),
)}
# The faults only a REWARDS_HA=on service has.
HA_FAULTS = frozenset({"primary", "primary-lost"})


# --- A run --------------------------------------------------------------------

@dataclass
class Outcome:
    fault: str
    what: str
    injected_at: float                   # seconds on the load's clock
    healed_after: float | None           # None: not within the timeout
    restored: bool                       # the harness ran `rewards up`
    restored_after: float = 0.0          # when that was done, seconds after the kill
    until: float = 0.0                   # the end of its window (the next fault)
    statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    writes_back_after: float | None = None
    failed_writes: int = 0


def _measure(outcome: Outcome, run: Run) -> None:
    """What the clients saw from the kill to the next fault."""
    attempts = [(request.op, attempt) for request in run.requests for attempt in request.attempts
                if outcome.injected_at <= attempt.sent and attempt.sent + attempt.latency < outcome.until]
    outcome.statuses = {str(status): n for status, n in sorted(Counter(a.status for _, a in attempts).items())}
    writes = [a for op, a in attempts if op in WRITES]
    failed_ends = [a.sent + a.latency for a in writes if a.status in FAILED]
    outcome.failed_writes = len(failed_ends)
    if not failed_ends:
        outcome.writes_back_after = 0.0
        return
    # From the kill to the first write acknowledged after the first one failed
    # (failures later than that are in the counts).
    first_failure = min(failed_ends)
    succeeded = [a.sent + a.latency for a in writes
                 if 200 <= a.status < 300 and a.sent + a.latency >= first_failure]
    outcome.writes_back_after = round(min(succeeded) - outcome.injected_at, 2) if succeeded else None


def _a_write_succeeded(load: Load, since: float) -> bool:
    return any(request.op in WRITES and 200 <= attempt.status < 300 and attempt.sent >= since
               for request in list(load.requests)[-500:] for attempt in list(request.attempts))


def chaos(settings: Settings, faults: list[Fault], clients: int, accounts: int, warmup: float, settle: float,
          heal_timeout: float, log: Callable[[str], None] = print) -> tuple[Run, list[Outcome]]:
    key = serve.api_key(settings, settings.database, name="chaos")
    url = f"http://{settings.api_host}:{settings.api_port}"
    # A client gives a request up only well after the harness would have restored the service.
    load = Load(url, key, clients=clients, accounts=accounts, give_up=heal_timeout + 120)
    load.start()
    outcomes = []
    try:
        time.sleep(warmup)
        for fault in faults:
            load.mark(fault.name)
            injected_at = load.now()
            killed = fault.inject(settings)
            log(f"{injected_at:7.1f} s  {fault.what}: pids {killed}")
            healed_after, restored, restored_after = None, False, 0.0
            while load.now() - injected_at < heal_timeout:
                time.sleep(0.2)
                if fault.healed(settings, killed):
                    healed_after = round(load.now() - injected_at, 2)
                    break
            if healed_after is None:
                log(f"{load.now():7.1f} s  {fault.name} not back after {heal_timeout:.0f} s: running `rewards up`")
                processes.up(settings)
                restored = True
                restored_after = round(load.now() - injected_at, 2)
            else:
                log(f"{load.now():7.1f} s  {fault.name} back by itself after {healed_after} s")
            outcomes.append(Outcome(fault.name, fault.what, injected_at, healed_after, restored, restored_after))
            # The next fault only once writes go through again, so that each
            # window holds one fault's effects.
            back_since = load.now()
            while not _a_write_succeeded(load, back_since) and load.now() - back_since < heal_timeout:
                time.sleep(0.2)
            time.sleep(settle)
    finally:
        run = load.finish()
    for outcome, following in zip(outcomes, [*outcomes[1:], None]):
        outcome.until = following.injected_at if following else run.seconds
        _measure(outcome, run)
    return run, outcomes


def problems(run: Run, outcomes: list[Outcome], verdict: verify.Verdict) -> list[str]:
    # Retried statuses are what faults look like to a client; a 500, a request
    # never answered or a replay answered differently is a failure whatever
    # the fault.
    found = run.problems(allowed=frozenset({0, 409, 429, 502, 503, 504}))
    found += [f"{o.fault}: not healed within the timeout (restored by `rewards up`)" for o in outcomes if o.restored]
    return found + verdict.problems


def plot(run: Run, outcomes: list[Outcome], path: Path) -> None:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    timeline = run.timeline()
    seconds = [row["second"] for row in timeline]
    figure, axis = plt.subplots(figsize=(11, 4.5))
    axis.plot(seconds, [row["requests"] for row in timeline], label="HTTP attempts answered /s", linewidth=1)
    statuses = sorted({status for row in timeline for status in row["errors"]}, key=int)
    for status in statuses:
        axis.plot(seconds, [row["errors"].get(status, 0) for row in timeline], linewidth=1,
                  label="no answer /s" if status == "0" else f"{status} /s")
    top = max((row["requests"] for row in timeline), default=1)
    for outcome in outcomes:
        axis.axvline(outcome.injected_at, color="black", linestyle="--", linewidth=0.8)
        axis.text(outcome.injected_at + 0.3, top * 1.02, outcome.fault, rotation=90, va="bottom", fontsize=8)
        if outcome.healed_after is not None:
            axis.axvspan(outcome.injected_at, outcome.injected_at + outcome.healed_after, color="red", alpha=0.12)
        else:
            axis.axvspan(outcome.injected_at, outcome.injected_at + outcome.restored_after, color="grey", alpha=0.2)
    axis.set_xlabel("seconds since the load started")
    axis.set_ylabel("per second")
    axis.set_ylim(0, top * 1.25)
    axis.set_title("make chaos: the bank load under faults (dashed: kill; red: until healed; grey: until restored)")
    axis.legend(loc="lower right", fontsize=8)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def table(outcomes: list[Outcome]) -> list[str]:
    lines = ["| fault | healed by itself after | writes succeeded again after | failed write attempts | "
             "attempts by status (kill to next fault) |", "|---|---|---|---|---|"]
    for o in outcomes:
        healed = f"{o.healed_after} s" if o.healed_after is not None else "no (restored by `rewards up`)"
        back = f"{o.writes_back_after} s" if o.writes_back_after is not None else "never"
        seen = ", ".join(f"{'no answer' if s == '0' else s}: {n}" for s, n in o.statuses.items())
        lines.append(f"| {o.what} | {healed} | {back} | {o.failed_writes} | {seen} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faults", default=None, help=f"comma-separated, in order (default: {','.join(FAULTS)})")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--warmup", type=float, default=10)
    parser.add_argument("--settle", type=float, default=15, help="seconds of load after each fault heals")
    parser.add_argument("--heal-timeout", type=float, default=60)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "chaos")
    parser.add_argument("--plot", type=Path, default=Path(__file__).resolve().parent / "out" / "chaos.png")
    args = parser.parse_args()
    settings = load()
    names = args.faults.split(",") if args.faults else [name for name in FAULTS
                                                        if settings.ha or name not in HA_FAULTS]
    unknown = [name for name in names if name not in FAULTS]
    if unknown:
        print(f"chaos: no fault {', '.join(unknown)} (known: {', '.join(FAULTS)})", file=sys.stderr)
        return 2
    if not settings.audit_metrics_port and "consumer" in names:
        print("chaos: the consumer fault finds the consumer by REWARDS_AUDIT_METRICS_PORT, which is 0", file=sys.stderr)
        return 2
    run, outcomes = chaos(settings, [FAULTS[name] for name in names], args.clients, args.accounts, args.warmup,
                          args.settle, args.heal_timeout)
    verdict = verify.verify(run, settings.superuser_conninfo())
    args.out.mkdir(parents=True, exist_ok=True)
    run.save(args.out / "run.json")
    (args.out / "faults.json").write_text(json.dumps([dataclasses.asdict(o) for o in outcomes], indent=1))
    plot(run, outcomes, args.plot)
    print(json.dumps(run.summary(), indent=1))
    print("\n".join(table(outcomes)))
    print("\n".join(verdict.lines()))
    found = problems(run, outcomes, verdict)
    for problem in found:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"record in {args.out}, plot in {args.plot}; {'no problem' if not found else f'{len(found)} problems'}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
