"""What the API's pool paid for checking each connection it handed out.

    uv run python bench/pool_check.py [--calls 1000] [--rounds 4]

One ledger call after another (a balance read, through PgBouncer, on the
API's own pool and client: app.api.pool.make_pool, AsyncLedger), in
interleaved rounds: with psycopg_pool's check of every connection at checkout
(an empty query, what the pool did until the retry on a lost connection
replaced it) and without (what it does now). Prints each round's and the
median milliseconds per call.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path

from psycopg_pool import AsyncConnectionPool

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.api.pool import make_pool  # noqa: E402
from app.ledger import calls  # noqa: E402
from app.ledger.client import AsyncLedger  # noqa: E402
from app.settings import load  # noqa: E402


async def per_call_ms(checked: bool, count: int) -> float:
    pool = make_pool(load())
    if checked:
        pool._check = AsyncConnectionPool.check_connection  # the check= the pool was made with before
    await pool.open(wait=True)
    try:
        ledger = AsyncLedger(pool)
        for _ in range(50):  # warm: the pool's connections made, PgBouncer's server ones too
            await ledger(calls.balance("bench-pool-check"))
        started = time.perf_counter()
        for _ in range(count):
            await ledger(calls.balance("bench-pool-check"))
        return (time.perf_counter() - started) / count * 1000
    finally:
        await pool.close()


async def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    rounds: dict[bool, list[float]] = {True: [], False: []}
    for _ in range(args.rounds):
        for checked in (True, False):
            rounds[checked].append(await per_call_ms(checked, args.calls))
    for checked, name in ((True, "checked at checkout"), (False, "not checked (now)")):
        print(f"{name}: {' '.join(f'{ms:.2f}' for ms in rounds[checked])} ms/call, "
              f"median {statistics.median(rounds[checked]):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
