"""supervisord, one per data folder: every long-running process `rewards up`
starts is one of its programs, so a process that dies is started again by the
supervisor, not by a loop of ours.

Its files live in `<data>/supervisor/`: supervisord.conf (written by us, the
same every time), programs/<name>.conf (one per program, written when the
program is wanted, deleted when it is not), the control socket and the pid
file. supervisord stops itself when its last program is removed, so `rewards
down` leaves nothing running. On production hosts systemd takes this place
(ops/systemd/)."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from app.ledger.errors import Refused
from app.settings import Settings

SUPERVISORD_CONF = """\
; Written by `rewards up`: the supervisor of everything under {data_dir}.
[unix_http_server]
file = {home}/supervisord.sock
chmod = 0700

[supervisord]
pidfile = {home}/supervisord.pid
logfile = {log_dir}/supervisord.log
childlogdir = {log_dir}
identifier = rewards:{data_dir}

[rpcinterface:supervisor]
supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl = unix://{home}/supervisord.sock

[include]
; Relative to this file: `files` is a list split at spaces, and the data
; folder's path may hold some.
files = programs/*.conf
"""

# States (supervisorctl status) in which the program is, or will be again, up.
ALIVE = frozenset({"STARTING", "RUNNING", "BACKOFF"})


class SupervisorctlFailed(SystemExit):
    """A supervisorctl command supervisord refused or could not carry out (a
    signal to a program that is not running, say)."""


@dataclass(frozen=True)
class Program:
    """One supervised process: how to run it and how to stop it."""

    name: str
    command: list[str]
    log_file: Path
    user: str | None = None            # the OS user it runs as (supervisord runs as root)
    directory: Path | None = None
    environment: dict[str, str] = field(default_factory=dict)
    # Lower starts first and stops last.
    priority: int = 500
    stopsignal: str = "TERM"
    # How long a stop may take before supervisord kills it (SIGKILL).
    stopwaitsecs: int = 10
    # Stop and kill the whole process group: only for programs whose children
    # must not outlive them (the API's workers), never PostgreSQL's backends.
    stopasgroup: bool = False
    # It counts as started once up this long; each failure before that waits a
    # second longer, up to startretries, then it is FATAL until `rewards up`.
    startsecs: int = 1
    startretries: int = 20

    def conf(self) -> str:
        """The program's file; Refused, before anything is written, for a value
        supervisord would not hand to the program exactly as given."""
        lines = [
            f"[program:{self.name}]",
            f"command = {_command(self.name, self.command)}",
            f"priority = {self.priority}",
            "autostart = true",
            # Restarted whenever it exits, however it exits.
            "autorestart = true",
            f"startsecs = {self.startsecs}",
            f"startretries = {self.startretries}",
            f"stopsignal = {self.stopsignal}",
            f"stopwaitsecs = {self.stopwaitsecs}",
            f"stopasgroup = {str(self.stopasgroup).lower()}",
            f"killasgroup = {str(self.stopasgroup).lower()}",
            "redirect_stderr = true",
            f"stdout_logfile = {_value(str(self.log_file), f'the log file of {self.name}')}",
            "stdout_logfile_maxbytes = 100MB",
            "stdout_logfile_backups = 5",
        ]
        if self.user:
            lines.append(f"user = {_value(self.user, f'the user of {self.name}')}")
        if self.directory:
            lines.append(f"directory = {_value(str(self.directory), f'the directory of {self.name}')}")
        if self.environment:
            lines.append("environment = " + ",".join(
                _variable(self.name, key, value) for key, value in sorted(self.environment.items())))
        return "\n".join(lines) + "\n"


# How supervisord 4.2.5 reads its files back. Its ini parser ends a value at a
# ; or # that follows a blank (an inline comment), strips blanks at both ends,
# and holds no line break in a value; then it replaces the text %(here)s
# wherever it stands, and expands %(name)s. `command` is then split as a POSIX
# shell line (shlex.split), and
# `environment` by shlex's non-POSIX lexer into KEY=VALUE tokens: a value is
# one quoted token taken as it stands (no escapes: a backslash is itself, a
# quote fits only between quotes of the other kind), then stripped of every
# quote at either end.
_LINE_BREAK_OR_NUL = re.compile(r"[\n\r\0]")
_INLINE_COMMENT = re.compile(r"(?:^|\s)[;#]")
_BLANK_BEFORE_COMMENT = re.compile(r"(?<=\s)(?=[;#])")
_VARIABLE_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _refused(what: str, why: str) -> Refused:
    # Never the value itself: it may be a password.
    return Refused(f"supervisord cannot pass {what} as it is ({why}): nothing was written")


def _value(text: str, what: str) -> str:
    """`text` as an ini value that supervisord reads back as it is."""
    if _LINE_BREAK_OR_NUL.search(text):
        raise _refused(what, "it holds a line break or a NUL")
    if text != text.strip():
        raise _refused(what, "it begins or ends with a blank")
    if _INLINE_COMMENT.search(text):
        raise _refused(what, "a ; or # after a blank starts a comment")
    return _literal(text)


def _literal(text: str) -> str:
    """`text` as supervisord's expansion gives it back: each % doubled, and no
    %(here)s left for the text replacement (an empty %(here).0s cuts it)."""
    return text.replace("%", "%%").replace("%%(here)s", "%%%(here).0s(here)s")


def _command(name: str, argv: list[str]) -> str:
    """The line whose POSIX split is `argv`, with no blank right before a ; or
    #: an argument holding one is quoted in pieces cut there ('a '';b' is the
    one argument `a ;b`)."""
    for index, argument in enumerate(argv):
        if _LINE_BREAK_OR_NUL.search(argument):
            raise _refused(f"argument {index} of {name}", "it holds a line break or a NUL")
    line = " ".join("".join(shlex.quote(piece) for piece in _BLANK_BEFORE_COMMENT.split(argument))
                    for argument in argv)
    return _value(line, f"the command of {name}")


def _variable(name: str, key: str, value: str) -> str:
    """KEY="VALUE", or KEY='VALUE' when VALUE holds a double quote."""
    what = f"the variable {key} of {name}"
    if not _VARIABLE_NAME.fullmatch(key):
        raise _refused(what, "its name is not letters, digits and underscores")
    if value[:1] in ("'", '"') or value[-1:] in ("'", '"'):
        raise _refused(what, "it begins or ends with a quote, which supervisord strips")
    if '"' in value and "'" in value:
        raise _refused(what, "it holds both kinds of quote")
    if _LINE_BREAK_OR_NUL.search(value) or _INLINE_COMMENT.search(value):
        raise _refused(what, "it holds a line break, a NUL, or a ; or # after a blank")
    quote = "'" if '"' in value else '"'
    return f"{key}={quote}{_literal(value)}{quote}"


@dataclass(frozen=True)
class Status:
    name: str
    state: str
    detail: str  # "pid 123, uptime 0:01:02", or why it is not running


class Supervisor:
    """The supervisord of one data folder."""

    @classmethod
    def of(cls, settings: Settings) -> Supervisor:
        return cls(settings.data_dir, settings.log_dir)

    def __init__(self, data_dir: Path, log_dir: Path) -> None:
        self.data_dir = data_dir
        self.home = data_dir / "supervisor"
        self.log_dir = log_dir
        self.conf_file = self.home / "supervisord.conf"
        self.programs_dir = self.home / "programs"

    # --- supervisord itself ---------------------------------------------------

    def _ctl(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(["supervisorctl", "-c", str(self.conf_file), *args],
                                check=False, capture_output=True, text=True)
        if check and result.returncode != 0:
            raise SupervisorctlFailed(f"supervisorctl {' '.join(args)}: {(result.stdout + result.stderr).strip()}")
        return result

    def answers(self) -> bool:
        # `pid` prints supervisord's pid (exit 0) when its socket answers.
        return self.conf_file.exists() and self._ctl("pid").returncode == 0

    def _start(self) -> None:
        text = SUPERVISORD_CONF.format(
            data_dir=_value(str(self.data_dir), "the data folder"), home=_value(str(self.home), "the data folder"),
            log_dir=_value(str(self.log_dir), "the log folder"))
        for folder in (self.home, self.programs_dir, self.log_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # Program files hold the services' environment, passwords included.
        self.home.chmod(0o700)
        self.conf_file.write_text(text)
        if self.answers():
            return
        subprocess.run(["supervisord", "-c", str(self.conf_file)], check=True, capture_output=True, text=True)
        deadline = time.monotonic() + 15
        while not self.answers():
            if time.monotonic() > deadline:
                raise SystemExit(f"supervisord did not answer within 15 s; see {self.log_dir / 'supervisord.log'}")
            time.sleep(0.1)

    def shutdown(self) -> None:
        """Stop every program (in reverse priority) and supervisord."""
        if not self.answers():
            return
        pid = int(self._ctl("pid").stdout.strip())
        self._ctl("shutdown")
        # `shutdown` returns once asked: wait for supervisord to be gone.
        while _alive(pid):
            time.sleep(0.1)

    def close(self) -> None:
        """Stop everything and forget every program."""
        self.shutdown()
        for path in self.programs_dir.glob("*.conf"):
            path.unlink()

    # --- its programs ---------------------------------------------------------

    def _conf_path(self, name: str) -> Path:
        return self.programs_dir / f"{name}.conf"

    def has(self, name: str) -> bool:
        return self._conf_path(name).exists()

    def ensure(self, program: Program) -> None:
        """The program configured as given and running: started when it is
        not, restarted only when its configuration changed (so `rewards up`
        twice changes nothing)."""
        text = program.conf()
        self._start()
        path = self._conf_path(program.name)
        if not path.exists() or path.read_text() != text:
            path.write_text(text)
            path.chmod(0o600)
        # `update` adds, changes (restarts) or leaves the program as its file says.
        self._ctl("update", program.name, check=True)
        if self.status(program.name).state not in ALIVE:
            self._ctl("start", program.name)

    def remove(self, name: str) -> None:
        """Stop the program and forget it; the last one takes supervisord along."""
        if not self.has(name):
            return
        if self.answers():
            self._ctl("stop", name)
        self._conf_path(name).unlink()
        if not any(self.programs_dir.glob("*.conf")):
            self.shutdown()
        elif self.answers():
            self._ctl("update", name)

    def signal(self, name: str, signal: str) -> None:
        self._ctl("signal", signal, name, check=True)

    def pid(self, name: str) -> int | None:
        result = self._ctl("pid", name)
        return int(result.stdout) if result.stdout.strip().isdigit() and int(result.stdout) else None

    def status(self, name: str | None = None) -> Status | list[Status]:
        """One program's status, or every program's (an empty list when
        supervisord is not running)."""
        if not self.answers():
            found: list[Status] = []
        else:
            found = [Status(*(line.split(None, 2) + [""])[:3])
                     for line in self._ctl("status", *([name] if name else [])).stdout.splitlines() if line.strip()]
        if name is None:
            return found
        return next((s for s in found if s.name == name), Status(name, "ABSENT", "not configured"))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
