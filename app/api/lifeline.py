"""The API's worker processes die with the server process that started them.

uvicorn's (and granian's) workers are children of one server process, which is
the program supervisord watches. When that process is killed outright
(SIGKILL, the OOM killer), nothing tells its workers: they would live on as
orphans holding the listening socket, and every restart of the server would
fail with "address already in use". Linux's parent-death signal ends them
instead."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def tie_to_parent() -> None:
    """Have the kernel send this process SIGTERM when its parent exits."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died before the signal was asked for
        os.kill(os.getpid(), signal.SIGTERM)
