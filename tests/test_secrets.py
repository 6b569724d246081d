"""The secrets `rewards up` makes: generated once, readable by root only, read
by every process, never a default printed anywhere; and a password that needs
quoting works everywhere it is written (libpq conninfo, PgBouncer's files)."""

from __future__ import annotations

import dataclasses
import shutil
import stat
import tempfile
from pathlib import Path

import psycopg
import pytest

from app import secrets
from app.operations import cluster, processes
from app.settings import PROJECT_ROOT, MissingSecret, load
from tests.conftest import SETTINGS

# Everything libpq and PgBouncer treat specially: quotes, a space, a backslash, '='.
AWKWARD = "it's a \"pass\" \\with = signs"


def test_first_start_generates_each_secret_once_readable_by_root_only(tmp_path):
    env = {"REWARDS_DATA_DIR": str(tmp_path)}
    unset = load(env)
    assert unset.api_password is None and unset.notify_secret is None
    with pytest.raises(MissingSecret, match="REWARDS_API_DB_PASSWORD"):
        unset.api_conninfo()

    made = secrets.ensure(unset)
    assert len(made.api_password) >= 32 and len(made.notify_secret) >= 32
    assert made.api_password != made.notify_secret
    folder = tmp_path / "secrets"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("api-db-password", "notify-secret"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600
    # Every process reads the same ones; starting again makes no new ones.
    assert (load(env).api_password, load(env).notify_secret) == (made.api_password, made.notify_secret)
    assert secrets.ensure(load(env)) == load(env)


def test_a_secret_set_in_the_environment_wins_and_is_not_written(tmp_path):
    env = {"REWARDS_DATA_DIR": str(tmp_path), "REWARDS_NOTIFY_SECRET": "from-the-environment"}
    made = secrets.ensure(load(env))
    assert made.notify_secret == "from-the-environment"
    assert not (tmp_path / "secrets" / "notify-secret").exists()
    assert (tmp_path / "secrets" / "api-db-password").exists()


def test_the_readme_prints_no_secret():
    readme = (PROJECT_ROOT / "README.md").read_text()
    assert "rewards-api-dev" not in readme and "rewards-notify-dev" not in readme


def test_an_awkward_password_survives_the_conninfo():
    settings = dataclasses.replace(SETTINGS, api_password=AWKWARD)
    for conninfo in (settings.api_conninfo(), settings.bouncer_conninfo()):
        assert psycopg.conninfo.conninfo_to_dict(conninfo)["password"] == AWKWARD


@pytest.mark.single_node("a cluster of the test's own, the same on either topology")
def test_an_awkward_password_logs_in_directly_and_through_pgbouncer():
    folder = Path(tempfile.mkdtemp(prefix="rewards secrets "))  # a space in every path too
    settings = dataclasses.replace(
        SETTINGS, data_dir=folder / "data", pg_port=processes.free_port(), bouncer_port=processes.free_port(),
        pg_host=None, citus="off", citus_workers=0, api_password=AWKWARD)
    try:
        cluster.up(settings)
        processes.bouncer_up(settings)
        for conninfo in (settings.api_conninfo(), settings.bouncer_conninfo()):
            with psycopg.connect(conninfo, connect_timeout=10) as conn:
                assert conn.execute("SELECT current_user").fetchone()[0] == "rewards_api"
        # A wrong password is still refused: the quoting let nothing else in.
        wrong = dataclasses.replace(settings, api_password=AWKWARD + "x")
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(wrong.bouncer_conninfo(), connect_timeout=10)
    finally:
        processes.bouncer_down(settings)
        cluster.down(settings)
        shutil.rmtree(folder, ignore_errors=True)
