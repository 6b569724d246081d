"""Where the API spends its CPU on a credit: the HTTP credit under wrk, measured
and then sampled with py-spy.

    uv run python bench/profile_api.py [--connections 64] [--seconds 10] [--workers 1]

Starts an API of its own on a database of its own, rewards_bench_profile
(bench/serve.py: rate limits out of the way), runs bench/http_credit.lua at
`--connections` twice: first plain, for requests a second and the API's CPU per
credit; then under `py-spy record --nonblocking` (its samples cost the API a
little), whose collapsed stacks go to bench/out/profile_api.txt. Prints both
figures and the functions holding the most samples, on their own and with what
they call.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.settings import load  # noqa: E402
from bench import serve  # noqa: E402
from bench.cpu import process_tree_cpu  # noqa: E402
from bench.load import wrk  # noqa: E402
from bench.run import BENCH  # noqa: E402

DATABASE = "rewards_bench_profile"
USERS = 100_000


def _top(collapsed: Path, count: int) -> tuple[list[tuple[str, float]], list[tuple[str, float]]]:
    """The frames with the most samples: at the top of the stack (self), and
    anywhere in it (with what they call), as shares of all samples."""
    own: collections.Counter[str] = collections.Counter()
    anywhere: collections.Counter[str] = collections.Counter()
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")
        weight = int(samples)
        total += weight
        own[frames[-1]] += weight
        for frame in set(frames):
            anywhere[frame] += weight
    share = lambda counter: [(frame, n / total) for frame, n in counter.most_common(count)]  # noqa: E731
    return share(own), share(anywhere)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    base = load()
    out_dir = BENCH / "out"
    out_dir.mkdir(exist_ok=True)
    collapsed = out_dir / "profile_api.txt"

    serve.database(base, DATABASE)
    api_key = serve.api_key(base, DATABASE)
    with serve.api(base, DATABASE, workers=args.workers) as (url, api_pid):
        wrk("http_credit.lua", url, api_key, args.connections, 2, out_dir / "profile_api.warmup.txt", users=USERS)
        cpu_before = process_tree_cpu(api_pid)
        plain = wrk("http_credit.lua", url, api_key, args.connections, args.seconds,
                    out_dir / "profile_api.wrk.txt", users=USERS)
        cpu = process_tree_cpu(api_pid) - cpu_before
        spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "--subprocesses", "--format", "raw",
                                "--duration", str(args.seconds), "--pid", str(api_pid), "--output", str(collapsed)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wrk("http_credit.lua", url, api_key, args.connections, args.seconds, out_dir / "profile_api.spied.txt",
            users=USERS)
        spy.wait(timeout=60)

    rps = plain["requests"] / plain["seconds"]
    print(f"HTTP credit, {args.connections} connections, {args.workers} API worker(s), {args.seconds} s: "
          f"{rps:.0f} req/s, p99 {plain['p99_ms']:.1f} ms, {plain['non_2xx']} non-2xx, "
          f"API CPU {1e6 * cpu / plain['requests']:.0f} µs per credit\n")
    own, anywhere = _top(collapsed, args.top)
    for title, rows in (("samples on top of the stack", own), ("samples anywhere in the stack", anywhere)):
        print(f"| {title} | share |\n|---|---:|")
        for frame, share in rows:
            print(f"| `{frame}` | {100 * share:.1f}% |")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
