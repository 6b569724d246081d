"""The Prometheus alert rules (ops/prometheus/alerts.yml): valid for promtool,
each one firing and staying quiet as its unit tests say
(tests/prometheus/alerts_test.yml), and every metric they read exported by the
code and documented in the README."""

from __future__ import annotations

import re
import shutil
import subprocess

import pytest
import yaml

from app.settings import PROJECT_ROOT

RULES = PROJECT_ROOT / "ops" / "prometheus" / "alerts.yml"
UNIT_TESTS = PROJECT_ROOT / "tests" / "prometheus" / "alerts_test.yml"
CONFIG = PROJECT_ROOT / "ops" / "prometheus" / "prometheus.yml"
METRIC = re.compile(r"\brewards_[a-z_]+\b")


@pytest.fixture(scope="module")
def promtool() -> str:
    path = shutil.which("promtool")
    assert path, "promtool is missing: ops/install.sh installs Debian's prometheus package, which has it"
    return path


def _run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, cwd=PROJECT_ROOT)
    assert done.returncode == 0, done.stdout + done.stderr


def _rules() -> list[dict]:
    return [rule for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]]


def test_the_rules_are_valid(promtool):
    _run(promtool, "check", "rules", str(RULES))
    _run(promtool, "check", "config", "--syntax-only", str(CONFIG))


def test_each_rule_fires_and_stays_quiet_as_its_unit_tests_say(promtool):
    _run(promtool, "test", "rules", str(UNIT_TESTS))


def test_every_rule_has_a_test_that_fires_and_one_that_stays_quiet():
    tested: dict[str, list[bool]] = {}
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            tested.setdefault(check["alertname"], []).append(bool(check["exp_alerts"]))
    for rule in _rules():
        assert sorted(set(tested.get(rule["alert"], []))) == [False, True], rule["alert"]


def test_every_metric_a_rule_reads_is_exported_and_documented():
    code = "".join(path.read_text() for path in (PROJECT_ROOT / "app").rglob("*.py"))
    readme = PROJECT_ROOT.joinpath("README.md").read_text()
    alerts_section = readme[readme.index("\n## Alerts\n"):]
    for rule in _rules():
        assert f"`{rule['alert']}`" in alerts_section, rule["alert"]
        for metric in set(METRIC.findall(rule["expr"])):
            assert f'"{metric}"' in code, f"{rule['alert']} reads {metric}, which nothing exports"
            assert re.search(f"`{metric}[`{{]", alerts_section), f"{metric} is not documented in the README's Alerts"
