"""Notifications: signed, delivered at least once with an id to dedupe on,
retried then parked, re-sent by hand, and never in the way of a credit."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from app.audit.notify import Sender
from app.ledger.client import Ledger
from tests.conftest import SETTINGS
from tests.ledger import credit, debit
from tests.test_audit_stream import stream  # noqa: F401  (the fixture)

SECRET = "test-secret"


class Receiver:
    """The app's notification service, played on loopback."""

    def __init__(self) -> None:
        self.received: list[dict] = []
        self.status = 200
        self.gate = threading.Event()
        self.gate.set()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.gate.wait(30)
                receiver.received.append({"body": body, "headers": dict(self.headers)})
                self.send_response(receiver.status)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/points"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.gate.set()
        self.server.shutdown()


@pytest.fixture
def receiver():
    receiver = Receiver()
    yield receiver
    receiver.close()


@pytest.fixture
def notifier(db):
    with Ledger.connect(SETTINGS.local_conninfo("rewards_notifier", db.info.dbname)) as ledger:
        yield ledger


def _sender(db, receiver, **options) -> Sender:
    return Sender(SETTINGS.local_conninfo("rewards_notifier", db.info.dbname), receiver.url, SECRET,
                  base_delay=0.0, timeout=2.0, **options)


def _drain(stream):  # noqa: F811
    while stream.poll():
        pass


def test_notifications_are_signed_and_carry_an_id(db, stream, receiver, notifier):  # noqa: F811
    credit(db, "alice", "c1", 100)
    debit(db, "alice", "d1", 30)
    _drain(stream)
    sender = _sender(db, receiver)
    with httpx.Client() as http:
        assert sender.run_once(notifier, http) == 2
    assert len(receiver.received) == 2
    for message in receiver.received:
        headers = {k.lower(): v for k, v in message["headers"].items()}
        timestamp, signature = (part.split("=", 1)[1] for part in headers["x-rewards-signature"].split(","))
        expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + message["body"], hashlib.sha256).hexdigest()
        assert hmac.compare_digest(signature, expected)
        payload = json.loads(message["body"])
        assert headers["x-rewards-notification-id"] == payload["id"]
    # Sent in parallel, so they arrive in any order: the entry id orders them.
    payloads = sorted((json.loads(m["body"]) for m in receiver.received), key=lambda p: p["entry_id"])
    assert [p["type"] for p in payloads] == ["points.credit", "points.debit"]
    statuses = db.execute("SELECT status FROM audit.notifications").fetchall()
    assert {s["status"] for s in statuses} == {"delivered"}


def test_a_failing_receiver_ends_in_the_dead_letters_and_a_resend_works(db, stream, receiver, notifier,
                                                                        monkeypatch, capsys):  # noqa: F811
    from app import cli

    credit(db, "alice", "c1", 100)
    _drain(stream)
    receiver.status = 503
    sender = _sender(db, receiver, max_attempts=3)
    with httpx.Client() as http:
        for _ in range(3):
            sender.run_once(notifier, http)
    row = db.execute("SELECT notification_id, status, attempts, last_error FROM audit.notifications").fetchone()
    assert (row["status"], row["attempts"], row["last_error"]) == ("dead", 3, "HTTP 503")
    assert len(receiver.received) == 3

    monkeypatch.setenv("REWARDS_DATABASE", db.info.dbname)
    assert cli.main(["notify", "dead"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["notification_id"] == row["notification_id"]
    assert cli.main(["notify", "resend", str(row["notification_id"])]) == 0

    receiver.status = 204
    with httpx.Client() as http:
        assert sender.run_once(notifier, http) == 1
    assert db.execute("SELECT status FROM audit.notifications").fetchone()["status"] == "delivered"


def test_backoff_grows_with_full_jitter():
    sender = Sender("", "", "", base_delay=1.0, max_delay=60.0)
    assert all(0 <= sender.backoff(1) <= 2 for _ in range(100))
    assert all(0 <= sender.backoff(10) <= 60 for _ in range(100))
    assert len({round(sender.backoff(5), 6) for _ in range(20)}) > 1


def test_a_slow_receiver_does_not_hold_up_credits(db, stream, receiver, notifier):  # noqa: F811
    credit(db, "alice", "c0", 1)
    _drain(stream)
    receiver.gate.clear()  # the receiver now hangs on every request
    sender = _sender(db, receiver)
    stuck = threading.Thread(target=lambda: sender.run_once(notifier, httpx.Client(timeout=30)))
    stuck.start()
    try:
        # While a delivery hangs, the ledger and the stream go on.
        for i in range(20):
            assert credit(db, "alice", f"c{i + 1}", 1)["status"] == "ok"
        _drain(stream)
        assert db.execute("SELECT count(*) AS n FROM audit.notifications").fetchone()["n"] == 21
        assert stuck.is_alive()
    finally:
        receiver.gate.set()
        stuck.join(10)
