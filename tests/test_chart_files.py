"""The chart's files that need no helm to check: generated copies are fresh (CRDs, dashboard, the argocd-cm
snippet), the values schema covers every value and rejects unknown keys, and the dashboard and the alerts
name only metrics that exist. The helm renders are checked in e2e/test_chart.py (the real helm)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
import dashboard  # noqa: E402 (scripts/ is not a package)
import render_deploy  # noqa: E402

CHART = ROOT / "helm" / "whetstone"

# The per-method trainer metrics of the contract between the methods and the dashboard (interfaces.md,
# "metric names"), without the whetstone_trainer_ prefix. The trainer defines them with its methods.
METHOD_METRICS = {
    "dpo_reward_chosen",
    "dpo_reward_rejected",
    "dpo_reward_margin",
    "preference_accuracy",
    "eval_preference_accuracy",
    "reward_mean",
    "reward_std",
    "reward_min",
    "reward_max",
    "grader_reward_mean",
    "pass_rate",
    "advantage_mean",
    "advantage_std",
    "kl",
    "clip_fraction",
    "entropy",
    "filtered_group_rate",
    "response_length_mean",
    "response_length_max",
    "truncation_rate",
    "rollout_tokens_per_second",
    "grader_latency_seconds_bucket",
    "grader_latency_seconds_count",
    "grader_errors_total",
    "eval_reward_mean",
}


def test_generated_files_are_fresh() -> None:
    for path, text in render_deploy.without_helm().items():
        assert path.read_text() == text, f"{path} is stale: python scripts/render_deploy.py"


def test_the_charts_crds_are_the_repositorys() -> None:
    copies = sorted(p.name for p in (CHART / "files" / "crds").glob("*.yaml"))
    assert copies == sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))


def _walk(
    values: Any, schema: dict[str, Any], where: str, problems: list[str], in_list: bool = False
) -> None:
    if schema.get("type") == "object" and isinstance(values, dict):
        properties = schema.get("properties")
        if properties is None:
            return  # a map (labels) or a free-form Kubernetes structure (resources, affinity)
        if schema.get("additionalProperties") is not False:
            problems.append(f"{where or '<root>'}: additionalProperties must be false (a typo must fail)")
        for key, value in values.items():
            if key not in properties:
                problems.append(f"{where}.{key}: in values.yaml but not in values.schema.json")
            else:
                _walk(value, properties[key], f"{where}.{key}".lstrip("."), problems, in_list)
        for key in properties:
            if key not in values and key != "global" and not in_list:
                problems.append(f"{where}.{key}: in the schema but without a default in values.yaml")
    elif schema.get("type") == "array" and isinstance(values, list):
        for i, item in enumerate(values):
            _walk(item, schema.get("items", {}), f"{where}[{i}]", problems, in_list=True)


@pytest.mark.parametrize(
    "values", ["values.yaml", "values-local.yaml", "ci/monitoring-values.yaml", "ci/namespaced-values.yaml"]
)
def test_the_schema_covers_every_value(values: str) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    problems: list[str] = []
    doc = yaml.safe_load((CHART / values).read_text())
    _walk(doc, schema, "", problems)
    if values != "values.yaml":  # override files set some values only
        problems = [p for p in problems if "without a default" not in p]
    assert problems == []


def operator_series() -> set[str]:
    from whetstone_operator.metrics import OperatorMetrics

    names = set()
    for family in OperatorMetrics().registry.collect():
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
        names |= {family.name + s for s in suffixes}
    return names


def trainer_series() -> set[str]:
    # Every series has a job label, so none has samples before a run: the names come from metrics.ALL.
    from whetstone_trainer.metrics import ALL, PREFIX

    names = set()
    for m in ALL:
        base = PREFIX + m.name.removesuffix("_total")
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(m.kind, [""])
        names |= {base + s for s in suffixes}
    return names


def named_metrics(expr: str) -> set[str]:
    return set(re.findall(r"\b(whetstone_[a-z_]+)\b", expr))


def test_dashboard_and_alerts_name_only_metrics_that_exist() -> None:
    known = operator_series() | trainer_series() | {f"whetstone_trainer_{m}" for m in METHOD_METRICS}
    exprs = [expr for row in dashboard.ROWS for panel in row.panels for expr, _ in panel.queries]
    rules = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())["groups"]
    exprs += [rule["expr"] for group in rules for rule in group["rules"]]
    unknown = {m for expr in exprs for m in named_metrics(expr)} - known
    assert unknown == set()
    # And the dashboard shows every operator metric and every metric the trainer serves today.
    panels = {
        m for row in dashboard.ROWS for p in row.panels for expr, _ in p.queries for m in named_metrics(expr)
    }
    families = {
        re.sub(r"_(total|bucket|count|sum|created)$", "", m) for m in operator_series() | trainer_series()
    }
    assert {f for f in families if not any(u.startswith(f) for u in panels)} == set()


def test_the_dashboard_is_grafana_json_with_unique_ids_and_no_overlap() -> None:
    board = json.loads((CHART / "files" / "dashboards" / "whetstone.json").read_text())
    ids = [p["id"] for p in board["panels"]]
    assert len(ids) == len(set(ids))
    cells = set()
    for panel in board["panels"]:
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, panel["title"]
                cells.add((x, y))
    assert {v["name"] for v in board["templating"]["list"]} == {"datasource", "namespace", "job"}


def test_rbac_of_the_chart_and_base_come_from_the_renderer() -> None:
    from whetstone_operator import rbac

    assert rbac.HELM_FILE == CHART / "templates" / "rbac.yaml"
    assert (ROOT / "manifests" / "base" / "rbac.yaml").read_text() == rbac.render_kustomize()
    assert "rbac.yaml" in (ROOT / "manifests" / "base" / "kustomization.yaml").read_text()


def test_health_scripts_use_no_standard_library() -> None:
    # argocd-cm scripts run without Lua's standard libraries (only base and table); e2e runs them for real.
    for path in Path(ROOT / "manifests" / "argocd" / "health").glob("*/*/health.lua"):
        code = "\n".join(line.split("--")[0] for line in path.read_text().splitlines())
        assert not re.search(r"\b(string|os|io|math|debug)\.|:\w+\(", code), path


def test_the_argocd_application_points_at_the_chart_with_values_it_accepts() -> None:
    apps = list(yaml.safe_load_all((ROOT / "manifests" / "argocd" / "application.yaml").read_text()))
    chart_app = next(a for a in apps if a["spec"]["source"].get("path") == "helm/whetstone")
    assert (ROOT / chart_app["spec"]["source"]["path"] / "Chart.yaml").exists()
    schema = json.loads((CHART / "values.schema.json").read_text())
    problems: list[str] = []
    _walk(chart_app["spec"]["source"]["helm"]["valuesObject"], schema, "", problems)
    assert [p for p in problems if "without a default" not in p] == []
