"""The generated CRDs in crds/ against the real API server: schema, CEL, defaults, status subresource, GC."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import kubernetes
import pytest
import yaml
from helpers import Cluster, Json, wait_for

pytestmark = pytest.mark.crds

REPO = Path(__file__).resolve().parent.parent
# WHETSTONE_E2E_CRDS_DIR: try the tests against CRDs from elsewhere (e.g. a candidate generator output).
CRD_FILES = sorted(Path(os.environ.get("WHETSTONE_E2E_CRDS_DIR", REPO / "crds")).glob("*.yaml"))
EXAMPLES = sorted((REPO / "manifests" / "examples").glob("*.yaml"))
GROUP, VERSION, PLURAL = "whetstone.dev", "v1alpha1", "finetunejobs"


def example_documents() -> list[tuple[str, Json]]:
    docs = []
    for path in EXAMPLES:
        for i, doc in enumerate(yaml.safe_load_all(path.read_text())):
            if doc and doc.get("apiVersion", "").startswith(f"{GROUP}/"):
                docs.append((f"{path.name}#{i}", doc))
    return docs


def finetunejob_example() -> Json:
    for _, doc in example_documents():
        if doc["kind"] == "FineTuneJob":
            return doc
    pytest.skip("no FineTuneJob example in manifests/examples yet")


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> Iterator[list[str]]:
    if not CRD_FILES:
        pytest.skip("no CRDs generated into crds/ yet")
    names = []
    for path in CRD_FILES:
        for crd in yaml.safe_load_all(path.read_text()):
            name = crd["metadata"]["name"]
            names.append(name)
            try:
                cluster.extensions.create_custom_resource_definition(crd)
            except kubernetes.client.ApiException as e:
                if e.status != 409:  # a reused cluster may have them from an earlier run
                    raise
                current = cluster.extensions.read_custom_resource_definition(name)
                crd["metadata"]["resourceVersion"] = current.metadata.resource_version
                cluster.extensions.replace_custom_resource_definition(name, crd)

    def established(name: str) -> bool:
        crd = cluster.extensions.read_custom_resource_definition(name)
        conds = {c.type: c.status for c in (crd.status.conditions or [])}
        return conds.get("Established") == "True" and conds.get("NamesAccepted") == "True"

    for name in names:
        wait_for(lambda name=name: established(name), 60, f"CRD {name} Established")
    yield names


def create(cluster: Cluster, namespace: str, obj: Json, **kwargs: object) -> Json:
    group, version = obj["apiVersion"].split("/")
    plural = {
        "FineTuneJob": "finetunejobs",
        "RewardGrader": "rewardgraders",
        "Checkpoint": "checkpoints",
        "TrainingSession": "trainingsessions",
    }[obj["kind"]]
    return cluster.custom.create_namespaced_custom_object(group, version, namespace, plural, obj, **kwargs)


def rejection(cluster: Cluster, namespace: str, obj: Json) -> str:
    with pytest.raises(kubernetes.client.ApiException) as info:
        create(cluster, namespace, obj)
    assert info.value.status == 422, info.value.body
    return str(json.loads(info.value.body)["message"])


def test_crds_are_established(cluster: Cluster, crds: list[str]) -> None:
    assert "finetunejobs.whetstone.dev" in crds
    crd = cluster.extensions.read_custom_resource_definition("finetunejobs.whetstone.dev")
    assert crd.spec.names.kind == "FineTuneJob"
    assert any(v.name == VERSION and v.served and v.storage for v in crd.spec.versions)


@pytest.mark.parametrize(
    "name, doc", example_documents() or [("none", {})], ids=lambda v: v if isinstance(v, str) else ""
)
def test_examples_are_accepted(
    cluster: Cluster, crds: list[str], namespace: str, name: str, doc: Json
) -> None:
    if not doc:
        pytest.skip("no examples yet")
    created = create(cluster, namespace, copy.deepcopy(doc))
    assert created["metadata"]["uid"]
    if doc["kind"] == "FineTuneJob":
        # Structural-schema defaults are applied by the API server, so the operator can rely on them.
        assert created["spec"]["suspend"] is False
        assert created["spec"]["nodes"] >= 1


def with_job(mutate: Callable[[Json], None]) -> Callable[[], Json]:
    def build() -> Json:
        job = copy.deepcopy(finetunejob_example())
        job["metadata"] = {"name": "broken"}
        mutate(job)
        return job

    return build


def hp(key: str, value: object) -> Callable[[Json], None]:
    return lambda j: j["spec"].setdefault("hyperparameters", {}).__setitem__(key, value)


def as_method(method: str, section: Json | None) -> Callable[[Json], None]:
    def mutate(j: Json) -> None:
        for m in ("sft", "dpo", "rft"):
            j["spec"].pop(m, None)
        j["spec"]["method"] = method
        if section is not None:
            j["spec"][method] = section

    return mutate


def use_lora(lora: Json) -> Callable[[Json], None]:
    def mutate(j: Json) -> None:
        j["spec"].pop("fullParameter", None)
        j["spec"]["lora"] = lora

    return mutate


def set_path(path: str, value: object) -> Callable[[Json], None]:
    def mutate(j: Json) -> None:
        *parents, last = path.split(".")
        node = j
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return mutate


def delete(path: str) -> Callable[[Json], None]:
    def mutate(j: Json) -> None:
        *parents, last = path.split(".")
        node = j
        for p in parents:
            node = node[p]
        node.pop(last)

    return mutate


def both(*mutations: Callable[[Json], None]) -> Callable[[Json], None]:
    def mutate(j: Json) -> None:
        for m in mutations:
            m(j)

    return mutate


# (id, mutation of the valid example, substrings the API server's message must contain)
INVALID: list[tuple[str, Callable[[Json], None], list[str]]] = [
    ("method-not-in-enum", set_path("spec.method", "ppo"), ["spec.method", "Unsupported value"]),
    ("baseModel-missing", delete("spec.baseModel"), ["spec.baseModel", "Required value"]),
    ("output-missing", delete("spec.output"), ["spec.output", "Required value"]),
    ("dataset-uri-empty", set_path("spec.dataset.uri", ""), ["spec.dataset.uri"]),
    ("learningRate-zero", hp("learningRate", 0), ["spec.hyperparameters.learningRate"]),
    ("learningRate-above-one", hp("learningRate", 2.0), ["spec.hyperparameters.learningRate"]),
    ("batchSize-zero", hp("batchSize", 0), ["spec.hyperparameters.batchSize"]),
    (
        "scheduler-not-in-enum",
        hp("scheduler", "exponential"),
        ["spec.hyperparameters.scheduler", "Unsupported value"],
    ),
    (
        "gradientAccumulation-does-not-divide-batch",
        both(hp("batchSize", 16), hp("gradientAccumulationSteps", 3)),
        ["spec.hyperparameters.gradientAccumulationSteps", "must divide batchSize"],
    ),
    ("nodes-zero", set_path("spec.nodes", 0), ["spec.nodes"]),
    ("gpusPerNode-too-many", set_path("spec.gpusPerNode", 17), ["spec.gpusPerNode"]),
    ("keepLast-zero", set_path("spec.checkpointing.keepLast", 0), ["spec.checkpointing.keepLast"]),
    (
        "lora-and-fullParameter",
        both(set_path("spec.lora", {"rank": 8}), set_path("spec.fullParameter", {})),
        ["spec.lora", "spec.fullParameter"],
    ),
    (
        "neither-lora-nor-fullParameter",
        lambda j: [j["spec"].pop(k, None) for k in ("lora", "fullParameter")],
        ["spec.lora", "spec.fullParameter"],
    ),
    ("lora-rank-zero", use_lora({"rank": 0}), ["spec.lora.rank"]),
    ("lora-dropout-above-one", use_lora({"dropout": 1.5}), ["spec.lora.dropout"]),
    ("dpo-without-dpo-section", as_method("dpo", None), ["spec.dpo", "required when method is dpo"]),
    (
        "dpo-with-sft-section",
        both(as_method("dpo", {}), set_path("spec.sft", {})),
        ["spec.sft", "only allowed"],
    ),
    (
        "dpo-lossType-not-in-enum",
        as_method("dpo", {"lossType": "kto"}),
        ["spec.dpo.lossType", "Unsupported value"],
    ),
    ("dpo-beta-zero", as_method("dpo", {"beta": 0}), ["spec.dpo.beta"]),
    ("rft-without-rft-section", as_method("rft", None), ["spec.rft", "required when method is rft"]),
    ("rft-without-graders", as_method("rft", {"graders": []}), ["spec.rft.graders"]),
    (
        "rft-klBeta-with-dapo",
        as_method("rft", {"algorithm": "dapo", "graders": [{"name": "exact"}], "klBeta": 0.1}),
        ["spec.rft.klBeta", "grpo"],
    ),
    (
        "rft-samplesPerPrompt-one",
        as_method("rft", {"graders": [{"name": "g"}], "samplesPerPrompt": 1}),
        ["spec.rft.samplesPerPrompt"],
    ),
    (
        "toleration-operator-not-in-enum",
        set_path("spec.tolerations", [{"key": "nvidia.com/gpu", "operator": "Maybe"}]),
        ["spec.tolerations[0].operator"],
    ),
    ("name-not-a-dns-label", set_path("metadata.name", "two.labels"), ["metadata.name", "DNS label"]),
]


@pytest.mark.parametrize("mutation, expected", [pytest.param(m, e, id=i) for i, m, e in INVALID])
def test_invalid_finetunejobs_are_rejected(
    cluster: Cluster, crds: list[str], namespace: str, mutation: Callable[[Json], None], expected: list[str]
) -> None:
    message = rejection(cluster, namespace, with_job(mutation)())
    for text in expected:
        assert text in message, message


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
