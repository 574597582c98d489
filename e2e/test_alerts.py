"""The alert rules with promtool (Debian's prometheus package): valid, unit-tested (helm/alerts_test.yaml),
each alert tested, and shipped by the chart exactly as written."""

from __future__ import annotations

import yaml
from deploy_tools import CHART, REPO, Tools, debian_tool, helm_template, run

RULES = CHART / "files" / "alerts.yaml"
UNIT_TESTS = REPO / "helm" / "alerts_test.yaml"


def alerts() -> list[str]:
    return [
        r["alert"] for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"] if "alert" in r
    ]


def test_promtool_checks_the_rules() -> None:
    checked = run([debian_tool("promtool"), "check", "rules", RULES])
    assert f"SUCCESS: {len(alerts())} rules found" in checked.stdout


def test_promtool_unit_tests_pass_and_cover_every_alert() -> None:
    tested = run([debian_tool("promtool"), "test", "rules", UNIT_TESTS], cwd=UNIT_TESTS.parent)
    assert "SUCCESS" in tested.stdout
    cases = yaml.safe_load(UNIT_TESTS.read_text())["tests"]
    firing = {
        t["alertname"] for case in cases for t in case.get("alert_rule_test", []) if t.get("exp_alerts")
    }
    assert firing == set(alerts()), "every alert needs a unit test in which it fires"


def test_the_chart_ships_the_rules_as_written() -> None:
    tools = Tools.locate()
    values = CHART / "ci" / "monitoring-values.yaml"
    (rule,) = [
        d for d in yaml.safe_load_all(helm_template(tools, values)) if d and d["kind"] == "PrometheusRule"
    ]
    assert rule["spec"]["groups"] == yaml.safe_load(RULES.read_text())["groups"]
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
