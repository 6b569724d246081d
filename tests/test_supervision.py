"""Supervision: a stack of its own (`rewards up` in a scratch data folder, every
program under its supervisord) whose programs are killed and restarted while a
credit is followed from the API through the audit stream to the receiver of
notifications. Every wait is bounded."""

from __future__ import annotations

import dataclasses
import http.server
import os
import re
import shutil
import signal
import tempfile
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psycopg
import pytest
import redis

from app.ledger import keys
from app.ledger.client import Ledger
from app.operations import processes
from app.operations.supervisor import Supervisor
from app.settings import Settings
from tests.conftest import SETTINGS

pytestmark = pytest.mark.single_node("a stack of its own on one node: a Citus worker is the same program")

WAIT = 60.0  # the longest any program may take to come back


class Receiver(http.server.ThreadingHTTPServer):
    """The app's notification endpoint: answers 204 and keeps the ids."""

    def __init__(self) -> None:
        self.ids: set[str] = set()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                self.rfile.read(int(self.headers["Content-Length"]))
                receiver.ids.add(self.headers["X-Rewards-Notification-Id"])
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@dataclass
class Stack:
    settings: Settings
    secret: str
    receiver: Receiver

    @property
    def supervisor(self) -> Supervisor:
        return Supervisor.of(self.settings)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=f"http://127.0.0.1:{self.settings.api_port}", timeout=10,
                            headers={"Authorization": f"Bearer {self.secret}"})

    def pid(self, program: str) -> int | None:
        return self.supervisor.pid(program)


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    folder = Path(tempfile.mkdtemp(prefix="rewards-supervision-"))
    receiver = Receiver()
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    port = processes.free_port
    settings = dataclasses.replace(
        SETTINGS, data_dir=folder / "data", pg_port=port(), pg_host=None, citus="off", citus_workers=0,
        bouncer_port=port(), api_port=port(), api_workers=1, pool_min=4,
        redis_url=f"redis://127.0.0.1:{port()}/0", audit_metrics_port=port(), notify_metrics_port=port(),
        notify_url=f"http://127.0.0.1:{receiver.server_address[1]}/notify")
    try:
        processes.up(settings)
        with Ledger.connect(settings.superuser_conninfo()) as ledger:
            _, secret = keys.create(ledger, "supervision", ["points:earn", "points:read"])
        yield Stack(settings, secret, receiver)
    finally:
        processes.down(settings)
        receiver.shutdown()
        shutil.rmtree(folder, ignore_errors=True)


def _eventually(check: Callable[[], object], what: str, timeout: float = WAIT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"{what} within {timeout:.0f} s"
        time.sleep(0.2)


def _credit(stack: Stack, user: str) -> int:
    """A credit, sent again with its key until acknowledged; its entry id."""
    key = uuid.uuid4().hex
    deadline = time.monotonic() + WAIT
    with stack.client() as http:
        while True:
            try:
                answer = http.post(f"/v1/accounts/{user}/credits", json={"amount": 5, "reason": "supervision"},
                                   headers={"Idempotency-Key": key})
                if answer.status_code == 201:
                    return answer.json()["entry_id"]
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"a credit acknowledged within {WAIT:.0f} s"
            time.sleep(0.2)


def _in_history(stack: Stack, user: str, entry_id: int) -> bool:
    with psycopg.connect(stack.settings.superuser_conninfo()) as conn:
        return conn.execute("SELECT 1 FROM audit.entries WHERE user_id = %s AND entry_id = %s",
                            (user, entry_id)).fetchone() is not None


def _serves(stack: Stack) -> None:
    """A credit goes in through the API and PgBouncer, reaches the history by
    the stream, and its notification the receiver."""
    user = f"u-{uuid.uuid4().hex[:12]}"
    entry_id = _credit(stack, user)
    _eventually(lambda: _in_history(stack, user, entry_id), "the credit in the history")
    _eventually(lambda: f"{user}:{entry_id}" in stack.receiver.ids, "the credit's notification delivered")
    assert redis.Redis.from_url(stack.settings.redis_url).ping()


def _reconnects(port: int, process: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    found = re.search(rf'^rewards_database_reconnects_total{{process="{process}"}} (\S+)$', text, re.M)
    return float(found[1]) if found else 0.0


def test_up_again_changes_nothing(stack):
    # A program still inside supervisord's startsecs shows no pid yet: compare running pids only.
    _eventually(lambda: all(s.state == "RUNNING" for s in stack.supervisor.status()), "every program running")
    before = {s.name: s.detail.split(",")[0] for s in stack.supervisor.status()}
    assert set(before) == {"postgres", "pgbouncer", f"redis-{stack.settings.redis_url.split(':')[-1].split('/')[0]}",
                           f"api-{stack.settings.api_port}", "audit", "notify"}
    processes.up(stack.settings)
    assert {s.name: s.detail.split(",")[0] for s in stack.supervisor.status()} == before


@pytest.mark.parametrize("program", ["postgres", "pgbouncer", "redis", "api", "audit", "notify"])
def test_a_killed_program_comes_back_and_serves(stack, program):
    name = {"redis": f"redis-{stack.settings.redis_url.split(':')[-1].split('/')[0]}",
            "api": f"api-{stack.settings.api_port}"}.get(program, program)
    killed = stack.pid(name)
    assert killed
    os.kill(killed, signal.SIGKILL)
    _eventually(lambda: stack.pid(name) not in (None, killed)
                and stack.supervisor.status(name).state == "RUNNING", f"{name} running again")
    _serves(stack)


def _crash_postgres(stack: Stack) -> None:
    """An immediate shutdown (no checkpoint: a crash, as far as the data goes);
    supervisord starts PostgreSQL again, which recovers from its WAL."""
    postmaster = stack.pid("postgres")
    stack.supervisor.signal("postgres", "QUIT")
    _eventually(lambda: stack.pid("postgres") not in (None, postmaster), "PostgreSQL started again")


def test_the_consumer_lives_through_a_postgres_crash(stack):
    consumer = stack.pid("audit")
    before = _reconnects(stack.settings.audit_metrics_port, "audit")
    _serves(stack)
    # Written before, across and after the crash: each retried until acknowledged.
    users = [f"u-{uuid.uuid4().hex[:12]}" for _ in range(6)]
    written = [(users[0], _credit(stack, users[0]))]
    _crash_postgres(stack)
    written += [(user, _credit(stack, user)) for user in users[1:]]
    for user, entry_id in written:
        _eventually(lambda: _in_history(stack, user, entry_id), "every acknowledged credit in the history")
    assert stack.pid("audit") == consumer, "the consumer exited (supervisord started another)"
    assert _reconnects(stack.settings.audit_metrics_port, "audit") > before


def test_the_sender_lives_through_a_database_restart(stack):
    sender = stack.pid("notify")
    before = _reconnects(stack.settings.notify_metrics_port, "notify")
    _serves(stack)
    _crash_postgres(stack)
    # The sender polls every half second: it has met the crash by the time a
    # credit made afterwards is streamed.
    _serves(stack)
    assert stack.pid("notify") == sender, "the sender exited (supervisord started another)"
    assert _reconnects(stack.settings.notify_metrics_port, "notify") > before


def test_the_api_lives_through_a_pgbouncer_restart(stack):
    """Every connection the API's pool holds is dropped with PgBouncer; the
    requests after it, each sent once, all succeed."""
    with stack.client() as http:
        # Fill the pool (pool_min = 4) with connections that then sit idle.
        for _ in range(8):
            assert http.get(f"/v1/accounts/u-{uuid.uuid4().hex[:12]}/balance").status_code in (200, 404)
        stack.supervisor.signal("pgbouncer", "KILL")
        _eventually(lambda: processes.port_answers(stack.settings.bouncer_port), "PgBouncer listening again")
        answers = [http.post(f"/v1/accounts/u-{uuid.uuid4().hex[:12]}/credits",
                             json={"amount": 1, "reason": "after the restart"},
                             headers={"Idempotency-Key": uuid.uuid4().hex}).status_code for _ in range(12)]
    assert answers == [201] * 12


def test_pgbouncer_is_retargeted_by_its_own_process_not_through_its_supervisor(stack):
    """`rewards ha follow` signals PgBouncer itself (as under systemd, where
    there is no supervisorctl): the process supervisord runs is the one found,
    it re-reads its ini and keeps serving; with none running, the retarget
    raises ProcessLookupError for the follower to try again."""
    settings = stack.settings
    assert processes.bouncer_pids(settings) == [stack.pid("pgbouncer")]
    before = (settings.log_dir / "pgbouncer.log").read_text().count("got SIGHUP")
    processes.bouncer_retarget(settings, settings.pg_port)
    _eventually(lambda: (settings.log_dir / "pgbouncer.log").read_text().count("got SIGHUP") > before,
                "PgBouncer's reload in its log")
    assert processes.bouncer_pids(settings) == [stack.pid("pgbouncer")]
    _serves(stack)
    elsewhere = dataclasses.replace(settings, data_dir=settings.data_dir.parent / "no-bouncer")
    (elsewhere.data_dir / "pgbouncer").mkdir(parents=True)
    with pytest.raises(ProcessLookupError):
        processes.bouncer_retarget(elsewhere, settings.pg_port)
