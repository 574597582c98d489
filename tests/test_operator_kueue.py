"""A queued FineTuneJob as one Kueue Workload: its body, what Kueue's answer means, the patches written back.
The Workload shapes follow Kueue v0.17.0's v1beta2 API; e2e/test_kueue.py checks them against a real Kueue."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import yaml
from conftest import EXAMPLES
from whetstone_operator import children, kueue

NOW = datetime(2026, 11, 3, 12, 0, tzinfo=UTC)
Json = dict[str, Any]


def job(labels: dict[str, str] | None = None, **spec: Any) -> Json:
    doc = yaml.safe_load((EXAMPLES / "sft-tiny-reverse.yaml").read_text())
    doc["metadata"].update(namespace="team-a", uid="0f3c9a7e-1", generation=1)
    doc["metadata"]["labels"] = {kueue.QUEUE_LABEL: "gpus", **(labels or {})}
    doc["spec"].update(
        nodes=4,
        gpusPerNode=8,
        resources={"requests": {"cpu": "32", "memory": "256Gi"}},
        nodeSelector={"pool": "train"},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )
    doc["spec"].update(spec)
    return doc


def trainer_pod(j: Json) -> Json:
    return children.trainer_pod(j, 0, 0, children.ChildSettings())


def workload_with(conditions: list[Json], admission: Json | None = None, **spec: Any) -> Json:
    status: Json = {"conditions": conditions}
    if admission is not None:
        status["admission"] = admission
    return {
        "metadata": {"name": "finetunejob-x-abcde", "generation": 1, "resourceVersion": "42"},
        "spec": {"active": True, **spec},
        "status": status,
    }


def cond(kind: str, status: str, reason: str = "R", message: str = "") -> Json:
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-11-03T11:00:00Z",
    }


ADMISSION = {
    "clusterQueue": "cluster-gpus",
    "podSetAssignments": [
        {
            "name": "trainer",
            "count": 4,
            "flavors": {"cpu": "default", "memory": "default", "nvidia.com/gpu": "h100"},
        }
    ],
}


def test_the_workload_is_one_pod_set_of_all_nodes_with_per_pod_requests() -> None:
    j = job()
    wl = kueue.workload_for(j, trainer_pod(j))
    assert wl["apiVersion"] == "kueue.x-k8s.io/v1beta2" and wl["kind"] == "Workload"
    assert wl["metadata"]["namespace"] == "team-a"
    (owner,) = wl["metadata"]["ownerReferences"]
    assert owner["kind"] == "FineTuneJob" and owner["uid"] == "0f3c9a7e-1" and owner["controller"]
    assert wl["spec"]["queueName"] == "gpus" and wl["spec"]["active"] is True
    (pod_set,) = wl["spec"]["podSets"]
    assert pod_set["name"] == "trainer" and pod_set["count"] == 4
    (container,) = pod_set["template"]["spec"]["containers"]
    # Per-pod requests: Kueue multiplies by count (4 pods x 8 GPUs = 32 GPUs of quota).
    assert container["resources"]["requests"] == {"cpu": "32", "memory": "256Gi", "nvidia.com/gpu": "8"}
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert "env" not in container and "command" not in container  # only what decides quota and placement
    spec = pod_set["template"]["spec"]
    assert spec["nodeSelector"] == {"pool": "train"}
    assert spec["tolerations"][0]["key"] == "nvidia.com/gpu"
    # Kueue's labels stay off the template; ours stay on.
    assert kueue.QUEUE_LABEL not in pod_set["template"]["metadata"]["labels"]
    assert pod_set["template"]["metadata"]["labels"][children.JOB_LABEL] == "sft-tiny-reverse"
    assert children.RANK_LABEL not in pod_set["template"]["metadata"]["labels"]  # one template for all ranks
    assert "priority" not in wl["spec"] and "priorityClassRef" not in wl["spec"]


def test_the_workload_name_is_stable_per_job_object() -> None:
    a, b = job(), job()
    assert kueue.workload_name(a) == kueue.workload_name(b)
    b["metadata"]["uid"] = "another-uid"
    assert kueue.workload_name(a) != kueue.workload_name(b)
    assert kueue.workload_name(a).startswith("finetunejob-sft-tiny-reverse-")


def test_priority_comes_from_the_workload_priority_class() -> None:
    j = job({kueue.PRIORITY_CLASS_LABEL: "urgent"})
    wl = kueue.workload_for(j, trainer_pod(j), priority=kueue.priority_of({"value": 1000}))
    assert wl["spec"]["priority"] == 1000
    assert wl["spec"]["priorityClassRef"] == {
        "group": "kueue.x-k8s.io",
        "kind": "WorkloadPriorityClass",
        "name": "urgent",
    }
    # Kueue's CRD rejects a priorityClassRef without a priority; say so before the API server does.
    with pytest.raises(ValueError, match="WorkloadPriorityClass urgent"):
        kueue.workload_for(j, trainer_pod(j))


def test_a_job_without_a_queue_has_no_workload() -> None:
    j = job()
    j["metadata"]["labels"] = {}
    assert kueue.queue_name(j) is None
    with pytest.raises(ValueError, match="queue-name"):
        kueue.workload_for(j, trainer_pod(j))


def test_a_suspended_job_makes_an_inactive_workload() -> None:
    j = job(suspend=True)
    assert kueue.workload_for(j, trainer_pod(j))["spec"]["active"] is False
    wl = workload_with([])
    assert kueue.active_patch(j, wl) == {"spec": {"active": False}}
    assert kueue.active_patch(job(), wl) is None


def test_no_pods_until_admitted_and_the_message_names_queue_and_cause() -> None:
    j = job()
    g = kueue.gate(j, None, pods_left=0)
    assert not g.may_run and g.reason == kueue.REASON_QUEUED and "gpus" in g.message
    pending = workload_with(
        [
            cond(
                "QuotaReserved",
                "False",
                "Pending",
                "couldn't assign flavors to pod set trainer: insufficient unused quota for nvidia.com/gpu in "
                "flavor h100, 16 more needed",
            )
        ]
    )
    g = kueue.gate(j, pending, pods_left=0)
    assert not g.may_run and g.reason == kueue.REASON_QUEUED
    assert "LocalQueue gpus" in g.message and "16 more needed" in g.message


def test_admitted_means_the_pods_may_start_on_the_assigned_flavor() -> None:
    admitted = workload_with([cond("QuotaReserved", "True"), cond("Admitted", "True")], ADMISSION)
    g = kueue.gate(job(), admitted, pods_left=0)
    assert g.may_run and g.reason == kueue.REASON_ADMITTED and "cluster-gpus" in g.message
    view = kueue.WorkloadView.of(admitted)
    assert view.flavors == ("default", "h100")  # distinct, in resource-name order
    flavors = {
        "default": {"spec": {}},
        "h100": {
            "spec": {
                "nodeLabels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "tolerations": [
                    {"key": "reserved", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
                ],
            }
        },
    }
    where = kueue.placement(view, flavors)
    pod = kueue.apply_placement(trainer_pod(job()), where)
    assert pod["spec"]["nodeSelector"] == {"pool": "train", "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert [t["key"] for t in pod["spec"]["tolerations"]] == ["nvidia.com/gpu", "reserved"]
    # Applying twice changes nothing (the operator re-renders pods on every attempt).
    assert kueue.apply_placement(pod, where) == pod


def test_a_flavor_that_contradicts_the_jobs_node_selector_is_named() -> None:
    admitted = workload_with([cond("Admitted", "True")], ADMISSION)
    flavors = {"default": {"spec": {}}, "h100": {"spec": {"nodeLabels": {"pool": "inference"}}}}
    where = kueue.placement(kueue.WorkloadView.of(admitted), flavors)
    with pytest.raises(kueue.PlacementConflict, match="pool=train contradicts .* pool=inference"):
        kueue.apply_placement(trainer_pod(job()), where)
    with pytest.raises(KeyError, match="ResourceFlavor h100"):
        kueue.placement(kueue.WorkloadView.of(admitted), {"default": {"spec": {}}})


def test_preemption_stops_the_pods_then_releases_the_quota_once_they_are_gone() -> None:
    preempted = workload_with(
        [
            cond("QuotaReserved", "True"),
            cond("Admitted", "True"),
            cond(
                "Evicted",
                "True",
                "Preempted",
                "Preempted to accommodate a workload (UID: u2) due to prioritization",
            ),
            cond("Preempted", "True", "InClusterQueue", "Preempted to accommodate a workload"),
        ],
        ADMISSION,
    )
    g = kueue.gate(job(), preempted, pods_left=2)
    assert not g.may_run and g.reason == kueue.REASON_PREEMPTED and not g.release_quota
    assert "checkpoints kept" in g.message and "prioritization" in g.message
    g = kueue.gate(job(), preempted, pods_left=0)
    assert g.release_quota

    patch = kueue.release_patch(preempted, NOW)
    assert patch["metadata"] == {"resourceVersion": "42"}  # conditional: Kueue may have written meanwhile
    assert patch["status"]["admission"] is None
    by_type = {c["type"]: c for c in patch["status"]["conditions"]}
    assert by_type["QuotaReserved"]["status"] == "False" and by_type["QuotaReserved"]["reason"] == "Pending"
    assert by_type["QuotaReserved"]["lastTransitionTime"] == "2026-11-03T12:00:00Z"
    assert by_type["Admitted"]["status"] == "False"
    assert by_type["Requeued"]["status"] == "True" and by_type["Requeued"]["reason"] == "Preempted"
    # Kueue's own conditions are kept as they are.
    assert by_type["Evicted"] == preempted["status"]["conditions"][2]

    # Once released, the job waits (not run, nothing more to release) until Kueue admits it again.
    released = workload_with(patch["status"]["conditions"])
    g = kueue.gate(job(), released, pods_left=0)
    assert not g.may_run and not g.release_quota and g.reason == kueue.REASON_PREEMPTED


def test_other_evictions_are_not_requeued_at_once() -> None:
    stopped = workload_with(
        [
            cond("QuotaReserved", "True"),
            cond("Evicted", "True", "ClusterQueueStopped", "The ClusterQueue is stopped"),
        ],
        ADMISSION,
    )
    g = kueue.gate(job(), stopped, pods_left=0)
    assert g.reason == kueue.REASON_EVICTED and "ClusterQueueStopped" in g.message and g.release_quota
    by_type = {c["type"]: c for c in kueue.release_patch(stopped, NOW)["status"]["conditions"]}
    assert by_type["Requeued"]["status"] == "False"
    assert "Admitted" not in by_type  # it was never admitted: no condition invented


def test_finishing_marks_the_workload_finished_once() -> None:
    admitted = workload_with([cond("QuotaReserved", "True"), cond("Admitted", "True")], ADMISSION)
    patch = kueue.finished_patch(admitted, succeeded=True, message="all 4 trainer pod(s) finished", now=NOW)
    (finished,) = [c for c in patch["status"]["conditions"] if c["type"] == "Finished"]
    assert finished["status"] == "True" and finished["reason"] == "Succeeded"
    assert finished["observedGeneration"] == 1
    again = kueue.finished_patch(
        workload_with(patch["status"]["conditions"]), True, "done", NOW.replace(hour=13)
    )
    (kept,) = [c for c in again["status"]["conditions"] if c["type"] == "Finished"]
    assert kept["lastTransitionTime"] == "2026-11-03T12:00:00Z"  # status unchanged: the time stays
    failed = kueue.finished_patch(admitted, succeeded=False, message="backoffLimit exceeded", now=NOW)
    assert [c["reason"] for c in failed["status"]["conditions"] if c["type"] == "Finished"] == ["Failed"]


def test_an_inactive_workload_says_it_holds_no_quota() -> None:
    wl = workload_with([cond("QuotaReserved", "False", "Pending", "x")], active=False)
    assert "inactive" in kueue.gate(job(), wl, 0).message
