"""The operator's permissions, defined once and derived from what the code does: every API call in kube.py
declares its (group, resource, verb), every watch in handlers.WATCHED needs list + watch, and
tests/test_operator_rbac.py fails when a rule is missing or unused.

Two modes, like KubeRay's single-namespace install:
- cluster-wide (the operator watches all namespaces): a ClusterRole and ClusterRoleBinding;
- given namespaces (`whetstone operator -n a -n b`): a Role and RoleBinding in each, nothing cluster-wide but
  `get` on nodes (whether a node is gone, before a stuck pod is force-deleted).
In both modes the Lease of leader election is reachable only in the operator's own namespace.

Renders the kustomize base (`manifests/base/rbac.yaml`, cluster-wide) and the Helm chart's template
(`helm/whetstone/templates/rbac.yaml`, both modes: `.Values.watchNamespaces` lists the namespaces).

    python -m whetstone_operator.rbac                      # rewrite both files
    python -m whetstone_operator.rbac --namespaces a,b     # print the namespaced objects
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

NAME = "whetstone-operator"
NAMESPACE = "whetstone-system"
Json = dict[str, Any]


def _rule(group: str, resources: list[str], verbs: list[str]) -> Json:
    return {"apiGroups": [group], "resources": resources, "verbs": verbs}


# Everything in job namespaces (ClusterRole, or a Role per watched namespace).
RULES: list[Json] = [
    # The jobs: watched; read fresh before destructive decisions; a finalizer of an earlier version removed
    # (patch); deleted after ttlSecondsAfterFinished.
    _rule("whetstone.dev", ["finetunejobs"], ["get", "list", "watch", "patch", "delete"]),
    _rule("whetstone.dev", ["finetunejobs/status"], ["patch"]),
    # Not a call the operator makes: the OwnerReferencesPermissionEnforcement admission plugin asks for it
    # when a child names the job with blockOwnerDeletion.
    *(
        ADMISSION_RULES := [
            _rule("whetstone.dev", ["finetunejobs/finalizers", "trainingsessions/finalizers"], ["update"])
        ]
    ),
    # TrainingSessions run on kopf's own handlers: kopf watches them and keeps its progress (and, for the
    # resync timer, a finalizer) on the object.
    *(KOPF_RULES := [_rule("whetstone.dev", ["trainingsessions"], ["list", "watch", "patch"])]),
    # A session's status comes from its service; its Deployment is created, and scaled to 0 on suspend.
    _rule("whetstone.dev", ["trainingsessions/status"], ["patch"]),
    _rule("apps", ["deployments"], ["get", "create", "patch"]),
    # RFT jobs wait for their graders and snapshot them; each grader's test cases are checked when its spec
    # changes and its status says the verdict (graders.py).
    _rule("whetstone.dev", ["rewardgraders"], ["list", "watch"]),
    _rule("whetstone.dev", ["rewardgraders/status"], ["patch"]),
    # One Checkpoint per saved checkpoint: pruned ones deleted, kept ones orphaned (patch).
    _rule("whetstone.dev", ["checkpoints"], ["list", "watch", "create", "patch", "delete"]),
    _rule("whetstone.dev", ["checkpoints/status"], ["patch"]),
    # The trainer pods: watched, listed fresh before destructive decisions, created per attempt, deleted.
    _rule("", ["pods"], ["list", "watch", "create", "delete"]),
    _rule("", ["services", "configmaps"], ["list", "watch", "create"]),
    _rule("networking.k8s.io", ["networkpolicies"], ["list", "watch", "create"]),
    # Gang admission with Kueue: a queued job's Workload is created (owned by the job), watched for Kueue's
    # answer, its spec.active follows spec.suspend (patch), and its status is written where Kueue's job
    # framework would: the quota given back after an eviction, Finished at the end.
    _rule("kueue.x-k8s.io", ["workloads"], ["list", "watch", "create", "patch"]),
    _rule("kueue.x-k8s.io", ["workloads/status"], ["patch"]),
    # One Event per state change.
    _rule("", ["events"], ["create"]),
]
# Cluster-scoped, in both modes: nodes (is a stuck pod's node gone?), and Kueue's ResourceFlavors (where an
# admitted job's pods go) and WorkloadPriorityClasses (a queued job's priority).
NODE_RULES: list[Json] = [
    _rule("", ["nodes"], ["get"]),
    _rule("kueue.x-k8s.io", ["resourceflavors", "workloadpriorityclasses"], ["get"]),
]
# In the operator's own namespace only.
LEASE_RULES: list[Json] = [_rule("coordination.k8s.io", ["leases"], ["get", "create", "update"])]


def _binding(
    kind: str, name: str, role_kind: str, account: str, sa_namespace: str, namespace: str | None = None
) -> Json:
    meta: Json = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": kind,
        "metadata": meta,
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": name},
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": sa_namespace}],
    }


def _role(kind: str, name: str, rules: list[Json], namespace: str | None = None) -> Json:
    meta: Json = {"name": name}
    if namespace is not None:
        meta["namespace"] = namespace
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": kind, "metadata": meta, "rules": rules}


def objects(namespace: str = NAMESPACE, name: str = NAME, watch: list[str] | None = None) -> list[Json]:
    """ServiceAccount, the job-namespace rules (cluster-wide, or one Role per namespace in `watch`), the
    node rule and the Lease rule."""
    out: list[Json] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}
    ]
    if watch:
        for ns in watch:
            out.append(_role("Role", name, RULES, ns))
            out.append(_binding("RoleBinding", name, "Role", name, namespace, ns))
    else:
        out.append(_role("ClusterRole", name, RULES))
        out.append(_binding("ClusterRoleBinding", name, "ClusterRole", name, namespace))
    out.append(_role("ClusterRole", f"{name}-nodes", NODE_RULES))
    out.append(_binding("ClusterRoleBinding", f"{name}-nodes", "ClusterRole", name, namespace))
    out.append(_role("Role", f"{name}-leader", LEASE_RULES, namespace))
    out.append(_binding("RoleBinding", f"{name}-leader", "Role", name, namespace, namespace))
    return out


ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_FILE = ROOT / "manifests" / "base" / "rbac.yaml"
HELM_FILE = ROOT / "helm" / "whetstone" / "templates" / "rbac.yaml"
HEADER = "# Generated by `python -m whetstone_operator.rbac`; do not edit.\n"


def render_kustomize() -> str:
    return HEADER + yaml.safe_dump_all(objects(), sort_keys=False)


def _helm_text(docs: list[Json]) -> str:
    text = yaml.safe_dump_all(docs, sort_keys=False)
    return (
        text.replace("HELM_NAMESPACE", "{{ $.Release.Namespace }}")
        .replace("HELM_NAME", '{{ include "whetstone.operatorName" $ }}')
        .replace("HELM_WATCHED", "{{ $ns }}")
    )


def render_helm() -> str:
    """Both modes: cluster-wide unless `.Values.watchNamespaces` lists namespaces."""
    # Placeholders survive YAML dumping as plain strings and become template expressions afterwards.
    every = objects("HELM_NAMESPACE", "HELM_NAME", ["HELM_WATCHED"])
    account, role, binding, *rest = every
    cluster = objects("HELM_NAMESPACE", "HELM_NAME")[1:3]
    header = HEADER.replace("#", "{{- /*", 1).rstrip("\n") + " */}}\n"
    return (
        header
        + _helm_text([account])
        + "{{- if .Values.watchNamespaces }}\n{{- range $ns := .Values.watchNamespaces }}\n---\n"
        + _helm_text([role, binding])
        + "{{- end }}\n{{- else }}\n---\n"
        + _helm_text(cluster)
        + "{{- end }}\n---\n"
        + _helm_text(rest)
    )


def write_all() -> list[Path]:
    out = []
    for path, text in ((KUSTOMIZE_FILE, render_kustomize()), (HELM_FILE, render_helm())):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        out.append(path)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m whetstone_operator.rbac")
    parser.add_argument("--namespaces", help="comma-separated namespaces the operator watches: print Roles")
    parser.add_argument("--operator-namespace", default=NAMESPACE, help="the operator's own namespace")
    parser.add_argument("--name", default=NAME, help="name of the ServiceAccount and roles")
    args = parser.parse_args(argv)
    if args.namespaces:
        watch = [n for n in args.namespaces.split(",") if n]
        docs = objects(args.operator_namespace, args.name, watch)
        print(HEADER + yaml.safe_dump_all(docs, sort_keys=False), end="")
        return 0
    for p in write_all():
        print(p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
