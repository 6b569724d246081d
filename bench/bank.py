"""A bank's clients against the HTTP API, and a record of everything they were told.

    uv run python bench/bank.py --url http://127.0.0.1:8000 --key KEY [--clients 16]
        [--seconds 30] [--accounts 500] [--out bench/out/bank.json] [--verify]

Each client is one coroutine doing what an app backend does, one request at a
time: credits, debits, and reservations each followed by its commit (for all of
the hold or part of it), on accounts picked at random from a shared set, so
clients meet on the same account rows. Every request carries its own
Idempotency-Key and is sent again, with the same key and body, when no answer
came (a connection error or a timeout), on 429 and on 502/503/504, after the
answer's Retry-After or a jittered backoff, until it gets an answer it can keep
or `give_up` seconds have passed (then it is lost). A few answered requests are
sent once more on purpose, as by a client that never saw the answer: the
replay must return the same answer.

Per HTTP attempt it records when it was sent, the latency and the status (and
why, for one sent again: the transport error, or the problem's type and
detail); per request, the operation, the account, the key, the body and the
final answer (every acknowledged result). `Run.timeline()` has attempts per
second with p50/p99 and the errors by status, `Run.problems()` what a client
would call a failure (a 503 refusing overload that a retry then answered is
none: `Run.overloaded_then_answered()` lists those with the API's reason), and
bench/verify.py checks the record against the database.

Used by bench/growth.py, the growth-under-load test and `make chaos`; run on
its own it drives any API (`--verify` then checks the service database).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import random
import statistics
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.api.problems import TYPE_PREFIX  # noqa: E402 (importable once the project is on the path)

RETRIED = frozenset({0, 429, 502, 503, 504})  # 0: no answer at all
BUSINESS_REFUSALS = frozenset({409})
RESERVATION_TTL_SECONDS = 3600  # longer than any run: nothing expires under the load


@dataclass
class Attempt:
    sent: float        # seconds since the run started
    latency: float     # seconds
    status: int        # 0: no answer (connection refused or dropped, timeout)
    error: str | None = None    # no answer: why; an answer retried: its problem's type and detail


@dataclass
class Request:
    op: str            # credit, debit, reserve, commit
    user: str
    key: str
    path: str
    body: dict
    attempts: list[Attempt] = field(default_factory=list)
    status: int | None = None   # the answer kept; None: never got one (lost)
    answer: dict | None = None
    replay_of: int | None = None  # the index of the answered request this one repeats

    @property
    def acknowledged(self) -> bool:
        return self.status is not None and 200 <= self.status < 300

    @property
    def latency(self) -> float:
        """From the first send to the answer kept, retries and waits included."""
        last = self.attempts[-1]
        return last.sent + last.latency - self.attempts[0].sent


OVERLOADED = TYPE_PREFIX + "overloaded"


def _refused_as_overloaded(attempt: Attempt) -> bool:
    """A 503 the API sent as its early refusal of overload (lock_timeout,
    statement_timeout, no connection or no group free in time, too many
    requests in flight): the call was rolled back or never sent (or, for a
    timeout that fell just after the commit, is remembered under its key),
    so a retry under the same key gets the one answer the request has."""
    return attempt.status == 503 and (attempt.error or "").partition(" ")[0] == OVERLOADED


def _percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


@dataclass
class Run:
    started_at: float  # Unix time of second 0
    seconds: float
    clients: int
    users: list[str]
    requests: list[Request]
    marks: dict[str, float]  # events during the run (e.g. a move's start and end), seconds since start

    def timeline(self) -> list[dict]:
        """One row per second: HTTP attempts answered in it, p50/p99 of their
        latency, and every status that is not a success or a business refusal."""
        seconds: dict[int, list[Attempt]] = defaultdict(list)
        for request in self.requests:
            for attempt in request.attempts:
                seconds[int(attempt.sent + attempt.latency)].append(attempt)
        rows = []
        for second in range(0, max(seconds, default=-1) + 1):
            attempts = seconds.get(second, [])
            latencies = [a.latency * 1000 for a in attempts]
            errors = Counter(a.status for a in attempts
                             if not (200 <= a.status < 300 or a.status in BUSINESS_REFUSALS))
            rows.append({"second": second, "requests": len(attempts),
                         "p50_ms": _percentile(latencies, 0.5) if latencies else None,
                         "p99_ms": _percentile(latencies, 0.99) if latencies else None,
                         "errors": {str(status): n for status, n in sorted(errors.items())}})
        return rows

    def window(self, start: float, end: float) -> dict:
        """Throughput and latency of the attempts answered between two moments."""
        latencies = [a.latency * 1000 for r in self.requests for a in r.attempts
                     if start <= a.sent + a.latency < end]
        span = max(end - start, 1e-9)
        return {"seconds": round(span, 1), "requests": len(latencies), "rps": len(latencies) / span,
                "p50_ms": _percentile(latencies, 0.5) if latencies else None,
                "p99_ms": _percentile(latencies, 0.99) if latencies else None}

    def summary(self) -> dict:
        attempts = [a for r in self.requests for a in r.attempts]
        finals = Counter(f"{r.op} {r.status if r.status is not None else 'lost'}" for r in self.requests)
        answered = [r.latency * 1000 for r in self.requests if r.status is not None]
        return {"seconds": round(self.seconds, 1), "clients": self.clients, "accounts": len(self.users),
                "requests": len(self.requests), "attempts": len(attempts),
                "attempts_per_second": len(attempts) / self.seconds if self.seconds else 0.0,
                "retried": sum(len(r.attempts) > 1 for r in self.requests),
                "replayed": sum(r.replay_of is not None for r in self.requests),
                "lost": sum(r.status is None for r in self.requests),
                "overloaded_then_answered": sum(_refused_as_overloaded(a) for r in self.requests
                                                if r.status is not None for a in r.attempts),
                "attempt_statuses": dict(sorted(Counter(str(a.status) for a in attempts).items())),
                "final": dict(sorted(finals.items())),
                "request_p50_ms": statistics.median(answered) if answered else None,
                "request_p99_ms": _percentile(answered, 0.99) if answered else None}

    def problems(self, allowed: frozenset[int] = frozenset({409, 429})) -> list[str]:
        """What a client would call a failure: an attempt answered with a status
        neither a success nor `allowed` (0 for no answer), a request never
        answered, a final refusal that is not a business one, a replay that got
        another answer than the original. A request refused as overloaded and
        then answered on a retry did not fail (overloaded_then_answered() has
        them); one that was never answered did, as did a 503 saying the
        database was unavailable."""
        found = []
        bad = [(r.op, a) for r in self.requests for a in r.attempts
               if not (200 <= a.status < 300 or a.status in allowed
                       or (_refused_as_overloaded(a) and r.status is not None))]
        why = {(op, a.status): a.error for op, a in reversed(bad)}  # the first one's
        found += [f"{n} {op} attempts answered {status or 'nothing'}" + (f" (first: {why[op, status]})"
                                                                         if why[op, status] else "")
                  for (op, status), n in sorted(Counter((op, a.status) for op, a in bad).items())]
        lost = [r for r in self.requests if r.status is None]
        if lost:
            found.append(f"{len(lost)} requests never answered, e.g. {lost[0].op} {lost[0].user} {lost[0].key}")
        refused = Counter((r.op, r.status) for r in self.requests
                          if r.status is not None and r.status >= 300 and r.status not in BUSINESS_REFUSALS)
        found += [f"{n} {op} requests ended in {status}" for (op, status), n in sorted(refused.items())]
        for request in self.requests:
            if request.replay_of is not None:
                original = self.requests[request.replay_of]
                if (request.status, request.answer) != (original.status, original.answer):
                    found.append(f"replay of {original.op} {original.key} answered {request.status} "
                                 f"{request.answer}, first {original.status} {original.answer}")
        return found

    def overloaded_then_answered(self) -> list[str]:
        """Attempts refused as overloaded whose request a retry then answered,
        by operation and the API's reason: not failures, but where the load
        met the limits (bench/verify.py checks that each took effect once)."""
        seen = Counter((r.op, a.error.partition(" ")[2]) for r in self.requests
                       if r.status is not None for a in r.attempts if _refused_as_overloaded(a))
        return [f"{n} {op} attempts answered 503 ({reason}), then retried and answered"
                for (op, reason), n in sorted(seen.items())]

    def as_json(self) -> dict:
        return {"started_at": self.started_at, "summary": self.summary(), "marks": self.marks,
                "timeline": self.timeline(), "users": self.users,
                "requests": [dataclasses.asdict(r) for r in self.requests]}

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.as_json()))


def _body(response: httpx.Response) -> dict:
    try:
        return response.json()
    except ValueError:  # not JSON: kept as text, for the record
        return {"text": response.text}


def _why(response: httpx.Response) -> str:
    """A retried answer's problem type and detail, for the record."""
    body = _body(response)
    return f"{body.get('type', '-')} {body.get('detail') or body.get('text') or body.get('title', '')}".strip()


class Load:
    """Clients against one API. `run()` blocks; `start()` and `finish()` run the
    same in a thread of its own while the caller does something else (and
    `mark()`s when), and `stop()` ends it early: every client finishes its
    request in hand, retries included, and stops."""

    def __init__(self, url: str, api_key: str, clients: int = 16, accounts: int = 500, prefix: str | None = None,
                 seed: int | None = None, replays: float = 0.02, timeout: float = 10.0, give_up: float = 60.0):
        self.url = url
        self.api_key = api_key
        self.clients = clients
        self.prefix = prefix or f"bank-{uuid.uuid4().hex[:6]}"
        self.users = [f"{self.prefix}-{i}" for i in range(accounts)]
        self.random = random.Random(seed)
        self.replays = replays
        self.timeout = timeout
        self.give_up = give_up
        self.requests: list[Request] = []
        self.marks: dict[str, float] = {}
        self._stopped = threading.Event()
        self._thread: threading.Thread | None = None
        self._run: Run | None = None
        self._t0 = 0.0

    def now(self) -> float:
        """Seconds since the run started, on the run's clock."""
        return time.monotonic() - self._t0

    def mark(self, name: str) -> None:
        self.marks[name] = self.now()

    def stop(self) -> None:
        self._stopped.set()

    def run(self, seconds: float | None) -> Run:
        """For `seconds`, or until stop() when None."""
        return asyncio.run(self._main(seconds))

    def start(self, seconds: float | None = None) -> None:
        self._thread = threading.Thread(target=lambda: setattr(self, "_run", self.run(seconds)), daemon=True)
        self._thread.start()
        while not self._t0:
            time.sleep(0.01)

    def finish(self) -> Run:
        self.stop()
        self._thread.join()
        return self._run

    async def _main(self, seconds: float | None) -> Run:
        limits = httpx.Limits(max_connections=self.clients, max_keepalive_connections=self.clients)
        headers = {"Authorization": f"Bearer {self.api_key}"}
        async with httpx.AsyncClient(base_url=self.url, headers=headers, limits=limits,
                                     timeout=self.timeout) as http:
            started_at, self._t0 = time.time(), time.monotonic()
            if seconds is not None:
                asyncio.get_running_loop().call_later(seconds, self._stopped.set)
            await asyncio.gather(*(self._client(http, i) for i in range(self.clients)))
            elapsed = self.now()
        return Run(started_at=started_at, seconds=elapsed, clients=self.clients, users=self.users,
                   requests=self.requests, marks=dict(self.marks))

    async def _client(self, http: httpx.AsyncClient, number: int) -> None:
        rng = random.Random(self.random.random())
        while not self._stopped.is_set():
            user = rng.choice(self.users)
            pick = rng.random()
            if pick < 0.45:
                await self._send(http, rng, "credit", user, f"/v1/accounts/{user}/credits",
                                 {"amount": rng.randint(1, 100), "reason": "bank credit"})
            elif pick < 0.65:
                await self._send(http, rng, "debit", user, f"/v1/accounts/{user}/debits",
                                 {"amount": rng.randint(1, 60), "reason": "bank debit"})
            else:
                held = await self._send(http, rng, "reserve", user, f"/v1/accounts/{user}/reservations",
                                        {"amount": rng.randint(1, 60), "ttl_seconds": RESERVATION_TTL_SECONDS,
                                         "reason": "bank redemption"})
                if held.acknowledged:
                    hold = held.answer["amount"]
                    await self._send(http, rng, "commit", user,
                                     f"/v1/accounts/{user}/reservations/{held.answer['reservation_id']}/commit",
                                     {"amount": rng.randint(max(1, hold // 2), hold), "reason": "bank commit"})

    async def _send(self, http: httpx.AsyncClient, rng: random.Random, op: str, user: str, path: str,
                    body: dict, replay_of: int | None = None) -> Request:
        request = Request(op=op, user=user, key=uuid.uuid4().hex if replay_of is None else
                          self.requests[replay_of].key, path=path, body=body, replay_of=replay_of)
        self.requests.append(request)
        index = len(self.requests) - 1
        first = self.now()
        for attempt_no in itertools.count():
            sent = self.now()
            try:
                response = await http.post(path, json=body, headers={"Idempotency-Key": request.key})
            except httpx.TransportError as exc:
                request.attempts.append(Attempt(sent, self.now() - sent, 0, f"{type(exc).__name__}: {exc}"))
                wait = None
            else:
                if response.status_code not in RETRIED:
                    request.attempts.append(Attempt(sent, self.now() - sent, response.status_code))
                    request.status, request.answer = response.status_code, _body(response)
                    break
                request.attempts.append(Attempt(sent, self.now() - sent, response.status_code, _why(response)))
                wait = response.headers.get("Retry-After")
            if self.now() - first > self.give_up:
                break  # lost: status stays None
            backoff = float(wait) if wait else min(2.0, 0.05 * 2 ** attempt_no) * rng.random()
            await asyncio.sleep(backoff)
        if replay_of is None and request.status is not None and rng.random() < self.replays:
            await self._send(http, rng, op, user, path, body, replay_of=index)
        return request


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default=None, help="default: the API of the settings (REWARDS_API_PORT)")
    parser.add_argument("--key", required=True, help="an API key with points:earn and points:redeem")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--accounts", type=int, default=500)
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out" / "bank.json")
    parser.add_argument("--verify", action="store_true", help="then check the service database (bench/verify.py)")
    args = parser.parse_args()
    from app.settings import load  # noqa: PLC0415
    from bench import verify  # noqa: PLC0415

    settings = load()
    url = args.url or f"http://{settings.api_host}:{settings.api_port}"
    run = Load(url, args.key, clients=args.clients, accounts=args.accounts).run(args.seconds)
    run.save(args.out)
    print(json.dumps(run.summary(), indent=1))
    problems = run.problems()
    if args.verify:
        verdict = verify.verify(run, settings.superuser_conninfo())
        print("\n".join(verdict.lines()))
        problems += verdict.problems
    for note in run.overloaded_then_answered():
        print(f"not a problem: {note}", file=sys.stderr)
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    print(f"record in {args.out}; {'no problem' if not problems else f'{len(problems)} problems'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
