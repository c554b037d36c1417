"""The shipped alert rules (deploy/prometheus/alerts.yml): valid, and each alert fires as its
unit test in alerts_test.yml says (promtool, from Debian's prometheus package)."""

from __future__ import annotations

import re
import subprocess

import yaml

from tests.conftest import ROOT, need_program

RULES = ROOT / "deploy" / "prometheus" / "alerts.yml"
RULE_TESTS = ROOT / "deploy" / "prometheus" / "alerts_test.yml"


def test_promtool_checks_the_rules() -> None:
    promtool = need_program("promtool")
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_has_a_passing_unit_test() -> None:
    promtool = need_program("promtool")
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    tests = yaml.safe_load(RULE_TESTS.read_text())["tests"]
    tested = {case["alertname"] for test in tests for case in test["alert_rule_test"] if case.get("exp_alerts")}
    quiet_first = {
        case["alertname"] for test in tests for case in test["alert_rule_test"] if not case.get("exp_alerts")
    }
    assert alerts == tested, f"alerts without a firing test: {alerts - tested}"
    assert alerts == quiet_first, f"alerts without a quiet test: {alerts - quiet_first}"
    done = subprocess.run(
        [promtool, "test", "rules", RULE_TESTS.name],
        cwd=RULE_TESTS.parent,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert re.search(r"^\s*SUCCESS", done.stdout, re.M), done.stdout
