"""The operator's RBAC is what its code needs: every API call (kube.py declares each one's group, resource and
verb) and every watch is allowed, no rule is unused, nothing talks to the API server around kube.py, and the
rendered files are fresh."""

from __future__ import annotations

import ast
from pathlib import Path

from whetstone_operator import rbac
from whetstone_operator.handlers import WATCHED
from whetstone_operator.kube import API_CALLS

OPERATOR = Path(rbac.__file__).resolve().parent


def granted(rules: list[dict]) -> set[tuple[str, str, str]]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }


def needed() -> set[tuple[str, str, str]]:
    calls = set(API_CALLS.values())
    watches = {(w.group, w.plural, verb) for w in WATCHED for verb in ("list", "watch")}
    return calls | watches


def test_every_call_and_watch_is_allowed_and_every_rule_is_used() -> None:
    rules = granted(rbac.RULES) | granted(rbac.NODE_RULES) | granted(rbac.LEASE_RULES)
    assert needed() - rules == set(), "calls the RBAC does not allow"
    unused = rules - needed() - granted(rbac.ADMISSION_RULES) - granted(rbac.KOPF_RULES)
    assert unused == set(), f"rules no code uses: {sorted(unused)}"
    # Leases only in the operator's namespace, nodes only read.
    assert {r for _, r, _ in granted(rbac.RULES)}.isdisjoint({"leases", "nodes"})


def test_no_module_but_kube_talks_to_the_api_server() -> None:
    clients = {"CoreV1Api", "CustomObjectsApi", "NetworkingV1Api", "CoordinationV1Api", "AppsV1Api"}
    offenders = []
    for path in sorted(OPERATOR.glob("*.py")):
        if path.name == "kube.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in clients:
                offenders.append(f"{path.name}:{node.lineno} {node.attr}")
    assert offenders == []


def test_cluster_wide_and_namespaced_modes() -> None:
    cluster = {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in rbac.objects()}
    assert ("ClusterRole", "whetstone-operator", None) in cluster
    assert ("Role", "whetstone-operator-leader", "whetstone-system") in cluster
    scoped = rbac.objects(watch=["team-a", "team-b"])
    kinds = {(o["kind"], o["metadata"]["name"], o["metadata"].get("namespace")) for o in scoped}
    assert {("Role", "whetstone-operator", "team-a"), ("Role", "whetstone-operator", "team-b")} <= kinds
    assert {
        ("RoleBinding", "whetstone-operator", "team-a"),
        ("RoleBinding", "whetstone-operator", "team-b"),
    } <= kinds
    cluster_roles = [o for o in scoped if o["kind"] == "ClusterRole"]
    assert [r["metadata"]["name"] for r in cluster_roles] == ["whetstone-operator-nodes"]
    assert cluster_roles[0]["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
        {
            "apiGroups": ["kueue.x-k8s.io"],
            "resources": ["resourceflavors", "workloadpriorityclasses"],
            "verbs": ["get"],
        },
    ]


def test_rbac_files_are_fresh() -> None:
    assert rbac.KUSTOMIZE_FILE.read_text() == rbac.render_kustomize(), "run python -m whetstone_operator.rbac"
    assert rbac.HELM_FILE.read_text() == rbac.render_helm(), "run python -m whetstone_operator.rbac"
    assert "{{- range $ns := .Values.watchNamespaces }}" in rbac.render_helm()
