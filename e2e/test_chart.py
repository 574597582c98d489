"""The Helm chart with the real helm (built by e2e/tools/build.sh): lint and render with every values file,
a typo in values fails on the schema, the generated install files are fresh, and the kustomize base and
overlays render exactly what the chart does (one source of truth). No cluster: test_tryout installs it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploy_tools import CHART, REPO, Json, Tools, helm_template, run

sys.path.insert(0, str(REPO / "scripts"))
import render_deploy  # noqa: E402 (scripts/ is not a package)

VALUES = [None, *sorted((CHART / "ci").glob("*.yaml")), CHART / "values-local.yaml"]


@pytest.fixture(scope="module")
def tools() -> Tools:
    return Tools.locate()


def objects(text: str) -> list[Json]:
    return [d for d in yaml.safe_load_all(text) if d]


def by_key(items: list[Json]) -> dict[tuple[str, str, str], Json]:
    return {render_deploy.key(o): o for o in items}


@pytest.mark.parametrize("values", VALUES, ids=lambda v: v.name if v else "defaults")
def test_lint_and_template(tools: Tools, values: Path | None) -> None:
    extra = ["--values", str(values)] if values else []
    linted = run([tools.helm, "lint", CHART, "--strict", "--kube-version", "1.37.2", *extra])
    assert "1 chart(s) linted, 0 chart(s) failed" in linted.stdout
    rendered = by_key(objects(helm_template(tools, *([values] if values else []))))
    kinds = sorted({k for k, _, _ in rendered})
    deployment = next(o for (k, _, _), o in rendered.items() if k == "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    args = pod["containers"][0]["args"]
    replicas = 2 if values and values.name == "namespaced-values.yaml" else 1
    assert deployment["spec"]["replicas"] == replicas and deployment["spec"]["strategy"] == {
        "type": "Recreate"
    }
    assert (
        pod["securityContext"]["runAsNonRoot"]
        and pod["containers"][0]["securityContext"]["readOnlyRootFilesystem"]
    )
    if values is None:
        assert kinds == [
            "ClusterRole",
            "ClusterRoleBinding",
            "CustomResourceDefinition",
            "Deployment",
            "Role",
            "RoleBinding",
            "Service",
            "ServiceAccount",
        ]
        assert "--leader-elect" in args and "--lease-name=whetstone-operator" in args
        assert "--operator-pod-label=app.kubernetes.io/component=operator" in args
        assert "--trainer-toleration=nvidia.com/gpu:NoSchedule" in args
        crd = rendered[("CustomResourceDefinition", "", "finetunejobs.whetstone.dev")]
        assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
        assert crd["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"] == "-1"
    elif values.name == "monitoring-values.yaml":
        assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"} <= set(kinds)
        assert "--status-port-from-namespace=monitoring" in args
    elif values.name == "namespaced-values.yaml":
        assert "CustomResourceDefinition" not in kinds
        # RBAC only in the watched namespaces (and the Lease's Role in the release's).
        roles = {(ns, name) for (k, ns, name) in rendered if k == "Role"}
        assert roles == {
            ("team-a", "ft-operator"),
            ("team-b", "ft-operator"),
            ("whetstone-system", "ft-operator-leader"),
        }
        assert ("ClusterRole", "", "ft-operator") not in rendered
        assert [a for a in args if a.startswith("--namespace")] == [
            "--namespace=team-a",
            "--namespace=team-b",
        ]
        assert pod["containers"][0]["image"].endswith("@sha256:" + "0" * 64)
        assert "--trainer-toleration=dedicated=training:NoExecute" in args
        rules = next(o for (k, _, _), o in rendered.items() if k == "PrometheusRule")
        names = [r["alert"] for g in rules["spec"]["groups"] for r in g["rules"]]
        assert "WhetstoneRewardCollapse" not in names and "WhetstoneOperatorDown" in names
    else:  # the local profile
        assert pod["nodeSelector"] == {"whetstone.dev/e2e-runner": "true"}
        assert "--host=$(POD_IP)" in args and "--trainer-node-selector=whetstone.dev/e2e-runner=true" in args
        assert {"PersistentVolume", "PersistentVolumeClaim"} <= set(kinds)


@pytest.mark.parametrize(
    ("values", "named"),
    [
        ({"operator": {"resyncSecond": 5}}, "resyncSecond"),
        ({"metrics": {"serviceMonitor": {"enable": True}}}, "enable"),
        ({"trainer": {"statusPort": "8080"}}, "statusPort"),
        ({"trainer": {"tolerations": [{"key": "gpu", "effect": "NoSchedul"}]}}, "effect"),
    ],
)
def test_a_mistake_in_values_fails_on_the_schema(
    tools: Tools, tmp_path: Path, values: Any, named: str
) -> None:
    path = tmp_path / "values.yaml"
    path.write_text(yaml.safe_dump(values))
    for command in ("template", "lint"):
        argv = [tools.helm, command, *(["whetstone"] if command == "template" else []), CHART]
        failed = run([*argv, "--values", path, "--kube-version", "1.37.2"], check=False)
        assert failed.returncode != 0, command
        out = failed.stdout + failed.stderr
        assert "values don't meet the specifications of the schema" in out and named in out, out


def test_several_replicas_need_leader_election(tools: Tools) -> None:
    argv = [tools.helm, "template", "whetstone", CHART, "--set", "operator.replicas=2"]
    failed = run([*argv, "--set", "operator.leaderElection=false"], check=False)
    assert (
        failed.returncode != 0 and "operator.replicas above 1 needs operator.leaderElection" in failed.stderr
    )
    assert "replicas: 2" in run(argv).stdout


def test_generated_install_files_are_fresh(tools: Tools) -> None:
    for path, text in render_deploy.from_chart(str(tools.helm)).items():
        assert path.read_text() == text, f"{path} is stale: python scripts/render_deploy.py"


def normalised(items: list[Json]) -> dict[tuple[str, str, str], Json]:
    return by_key([render_deploy.strip_helm_labels(o) for o in items])


@pytest.mark.parametrize(
    ("folder", "values"),
    [
        ("base", None),
        ("overlays/prometheus", CHART / "ci" / "monitoring-values.yaml"),
        ("overlays/local", CHART / "values-local.yaml"),
    ],
)
def test_kustomize_renders_what_the_chart_renders(tools: Tools, folder: str, values: Path | None) -> None:
    built = normalised(objects(run([tools.kubectl, "kustomize", REPO / "manifests" / folder]).stdout))
    chart = normalised(objects(helm_template(tools, *([values] if values else []))))
    # kustomize adds the operator's Namespace (helm install --create-namespace makes it); no other change.
    namespace = built.pop(("Namespace", "", "whetstone-system"))
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert sorted(built) == sorted(chart)
    for k in chart:
        assert built[k] == chart[k], k
