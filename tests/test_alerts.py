"""The alert rules (dashboards/alerts.yaml): valid for Prometheus, complete, and unit-tested with
`promtool test rules` so that each alert both fires and stays quiet where it must.

tests/test_dashboards.py loads the same file into a real Prometheus scraping a real fleet.
"""

from __future__ import annotations

import re
import subprocess
from typing import Any

import yaml

from tests.prometheus_fixtures import prometheus_tool
from tests.support import ROOT

DASHBOARDS = ROOT / "dashboards"
RULES = DASHBOARDS / "alerts.yaml"
UNIT_TESTS = DASHBOARDS / "alerts_test.yaml"
SEVERITIES = {"critical", "warning", "info"}
# What the issue asks to be alerted on, and the alerts that cover it.
REQUIRED = {
    "a budget above 90 %": {"CrawlwardenQuotaNearlySpent", "CrawlwardenBudgetSaturated"},
    "a site answering 429/503": {"CrawlwardenSiteThrottling"},
    "opt-out refusals rising": {"CrawlwardenOptOutRefusalsRising"},
    "fetch log spool growing or failing": {
        "CrawlwardenFetchLogSpoolGrowing",
        "CrawlwardenFetchLogFailing",
    },
    "Redis errors": {"CrawlwardenRedisErrors"},
    # (probe: Redis down 40 s refused every request and paged no one)
    "requests refused for want of Redis": {"CrawlwardenRefusingForBudgetStore"},
    "a replica down": {"CrawlwardenReplicaDown"},
}


def alerts() -> list[dict[str, Any]]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for g in groups for rule in g["rules"] if "alert" in rule]


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [prometheus_tool("promtool"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=DASHBOARDS,
    )


def test_promtool_checks_the_rules():
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_every_alert_has_for_severity_and_annotations_that_name_what_it_groups_by():
    names = [rule["alert"] for rule in alerts()]
    assert len(names) == len(set(names))
    for need, covering in REQUIRED.items():
        assert covering <= set(names), need
    for rule in alerts():
        name = rule["alert"]
        assert name.startswith("Crawlwarden"), name
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        annotations = rule["annotations"]
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        # An alert about a site, a team or a replica says which, in its summary.
        grouped = set()
        for by in re.findall(r"by \(([^)]*)\)", rule["expr"]):
            grouped |= {label.strip() for label in by.split(",")}
        for label in ("site", "team", "instance") if grouped else ():
            if label in grouped:
                assert f"$labels.{label}" in annotations["summary"], (name, label)


def test_promtool_unit_tests_fire_and_stay_quiet_for_every_alert():
    result = promtool("test", "rules", str(UNIT_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    fires: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(UNIT_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (fires if check.get("exp_alerts") else quiet).add(check["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - fires == set(), "alerts no unit test makes fire"
    assert names - quiet == set(), "alerts no unit test checks staying quiet"
