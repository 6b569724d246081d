"""supervisord's listener for programs that gave up (`[eventlistener:revive]`
in every data folder's supervisord.conf).

supervisord retries a program that dies within `startsecs` of its start
`startretries` times, each wait a second longer than the last, and then leaves
it FATAL: down until someone runs `rewards up`. The cause is often gone a few
minutes later (a port that was taken, a database or a disk that came back), so
each program that goes FATAL is started again `delay` seconds later, for as
long as it keeps failing: supervisord's own retries then run again. Retrying
supervisord's way alone, forever (a huge startretries), would not do: its wait
grows by a second with each attempt and is unbounded, so after a day down a
program would be tried once every few minutes.

Stdlib only, and short: it must start in a moment. The protocol is
supervisord's: READY, a header line, a payload, RESULT 2 OK.

    python -m app.operations.revive SUPERVISORD_CONF DELAY_SECONDS
"""

from __future__ import annotations

import subprocess
import sys
import threading


def _fields(line: bytes) -> dict[str, str]:
    return dict(token.split(":", 1) for token in line.decode().split())


def revive(conf: str, name: str) -> None:
    """Start the program again, unless someone stopped or started it meanwhile."""
    status = subprocess.run(["supervisorctl", "-c", conf, "status", name], capture_output=True, text=True)
    if status.stdout.split()[1:2] != ["FATAL"]:
        return
    print(f"{name} had given up (FATAL): starting it again", file=sys.stderr, flush=True)
    started = subprocess.run(["supervisorctl", "-c", conf, "start", name], capture_output=True, text=True)
    print(f"{name}: {(started.stdout + started.stderr).strip()}", file=sys.stderr, flush=True)


def main(conf: str, delay: float) -> None:
    events, answers = sys.stdin.buffer, sys.stdout.buffer
    while True:
        answers.write(b"READY\n")
        answers.flush()
        header = events.readline()
        if not header:
            return  # supervisord is gone
        fields = _fields(header)
        payload = _fields(events.read(int(fields["len"])))
        if fields["eventname"] == "PROCESS_STATE_FATAL":
            print(f"{payload['processname']} gave up (FATAL): starting it again in {delay:g} s",
                  file=sys.stderr, flush=True)
            threading.Timer(delay, revive, (conf, payload["processname"])).start()
        answers.write(b"RESULT 2\nOK")
        answers.flush()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
