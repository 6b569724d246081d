"""Settings: each is read from its variable, and the README's table is the one
the settings themselves describe."""

from dataclasses import fields

import pytest

from app.settings import PROJECT_ROOT, Settings, Tier, load, readme_table


def test_the_readme_lists_every_setting_as_the_code_declares_it():
    assert readme_table() in (PROJECT_ROOT / "README.md").read_text()


def test_every_setting_is_read_from_its_own_variable():
    env = {"REWARDS_PG_PORT": "6000", "REWARDS_RATE_GLOBAL": "7/9", "REWARDS_NOTIFY_URL": "http://x/y",
           "REWARDS_DATA_DIR": "/tmp/somewhere", "REWARDS_POOL_WAIT_SECONDS": "0.25"}
    settings = load(env)
    assert settings.pg_port == 6000 and settings.rate_global == Tier(7.0, 9)
    assert settings.notify_url == "http://x/y" and settings.pool_wait_seconds == 0.25
    assert str(settings.data_dir) == "/tmp/somewhere"
    assert len({spec.metadata["env"] for spec in fields(Settings)}) == len(fields(Settings))


def test_defaults_apply_when_unset():
    settings = load({})
    assert settings.pg_port == 25432 and settings.notify_url is None and settings.pg_host is None
    assert settings.data_dir == PROJECT_ROOT / ".data" and settings.api_workers >= 1


def test_a_bad_rate_tier_is_refused():
    with pytest.raises(ValueError):
        load({"REWARDS_RATE_USER_EARN": "0/5"})
