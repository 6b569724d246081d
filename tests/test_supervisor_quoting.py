"""A program's command line and environment reach it exactly as given, through
the real supervisord (a scratch one, with its own folder and socket), or are
refused before anything is written when supervisord cannot pass them."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from app.ledger.errors import Refused
from app.operations.supervisor import Program, Supervisor

# Writes what it was given, then stays up (supervisord restarts what exits).
REPORT = """\
import json, os, sys, time
names = sys.argv[2].split(",")
with open(sys.argv[1] + ".part", "w", encoding="utf-8") as out:
    json.dump({"argv": sys.argv[3:], "environment": {name: os.environ.get(name) for name in names}}, out)
os.rename(sys.argv[1] + ".part", sys.argv[1])
time.sleep(3600)
"""

AWKWARD = [
    "plain", "two words", 'a "quoted" word', "it's", "back\\slash", "trailing\\", "\\\"", "'", '"', "",
    " padded ", "tab\there", "a ;not a comment", "a #nor this", "a\t#nor this", ";first", "#first", "100%",
    "%(here)s", "%%", "$HOME", "`date`", "é ü", "a\u00a0;b", "=,=",
]

ENVIRONMENT = {
    "R_SPACES": "two words", "R_DOUBLE": 'say "hi" now', "R_SINGLE": "it's", "R_BACKSLASH": "C:\\dir\\x",
    "R_ESCAPED": 'a\\"b', "R_LIST": "a,b=c,d", "R_PERCENT": "100%(here)s%", "R_EMPTY": "", "R_HASH": "x#y",
    "R_SEMICOLON": "a;b", "R_SPACE_INSIDE": "a b c", "R_UNICODE": "é ü", "R_SHELL": "$HOME `date`",
}


@pytest.fixture
def supervisor(tmp_path: Path) -> Iterator[Supervisor]:
    supervisor = Supervisor(tmp_path / "data", tmp_path / "log")
    try:
        yield supervisor
    finally:
        supervisor.close()


def _given(supervisor: Supervisor, tmp_path: Path, argv: list[str], environment: dict[str, str]) -> dict:
    script, report = tmp_path / "report.py", tmp_path / "report.json"
    script.write_text(REPORT)
    supervisor.ensure(Program("report", [sys.executable, str(script), str(report), ",".join(environment), *argv],
                              tmp_path / "log" / "report.log", environment=environment))
    deadline = time.monotonic() + 30
    while not report.exists():
        assert time.monotonic() < deadline, (tmp_path / "log" / "report.log").read_text()
        time.sleep(0.1)
    return json.loads(report.read_text(encoding="utf-8"))


def test_every_argument_and_variable_reaches_the_program_as_given(supervisor, tmp_path):
    assert _given(supervisor, tmp_path, AWKWARD, ENVIRONMENT) == {"argv": AWKWARD, "environment": ENVIRONMENT}


@pytest.mark.parametrize(("argv", "environment", "named"), [
    (["a\nb"], {}, "argument 3 of report"),
    (["a\rb"], {}, "argument 3 of report"),
    ([], {"R_BOTH": "it's \"both\""}, "the variable R_BOTH of report"),
    ([], {"R_QUOTED": '"quoted"'}, "the variable R_QUOTED of report"),
    ([], {"R_ENDS": "ends'"}, "the variable R_ENDS of report"),
    ([], {"R_COMMENT": "a ;b"}, "the variable R_COMMENT of report"),
    ([], {"R_HASH": "a #b"}, "the variable R_HASH of report"),
    ([], {"R_LINES": "a\nb"}, "the variable R_LINES of report"),
    ([], {"NOT A NAME": "value-1"}, "the variable NOT A NAME of report"),
])
def test_what_supervisord_cannot_pass_is_refused_before_anything_is_written(supervisor, tmp_path, argv,
                                                                             environment, named):
    with pytest.raises(Refused) as refused:
        supervisor.ensure(Program("report", [sys.executable, "-c", "pass", *argv], tmp_path / "report.log",
                                  environment=environment))
    assert named in str(refused.value)
    assert all(value not in str(refused.value) for value in [*argv, *environment.values()])
    assert not (tmp_path / "data").exists()
