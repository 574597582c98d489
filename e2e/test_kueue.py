"""A real Kueue controller (built from its Go module, started by e2e/kueue_local.py) admitting FineTuneJobs
as whetstone's operator will queue them: one Workload per job, owned by the job (kueue.py).

Here the test itself plays the operator's part (create the Workload, read the gate, give the quota back after
a preemption, mark it Finished); what is checked is Kueue's side: a Workload owned by a kind Kueue does not
know is admitted as a whole, one that does not fit waits until quota is freed, a higher priority preempts,
and garbage collection follows the owner. The FineTuneJobs are created suspended and without the queue label,
so an operator running in the same session leaves them alone; only their Workloads are queued.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from helpers import Cluster, wait_for
from kueue_local import start_kueue
from localcluster import LocalCluster, locate_binaries, pid_alive, stop_process_group
from operator_fixtures import crds_applied  # noqa: F401 - fixture
from whetstone_operator import children, kueue

REPO = Path(__file__).resolve().parent.parent
Json = dict[str, Any]
V = kueue.VERSION


@pytest.fixture(scope="session")
def kueue_running(cluster: Cluster) -> Iterator[int]:
    """Kueue in this session's cluster: the one `e2e/cluster up --kueue` started, or one started here (and
    stopped at the end of the session)."""
    state = cluster.state
    pid = state.pids.get("kueue")
    if pid and pid_alive(pid):
        yield pid
        return
    bins = locate_binaries(build=os.environ.get("WHETSTONE_E2E_NO_BUILD") != "1", kueue=True)
    local = LocalCluster(Path(state.cluster_dir))
    local.state = state
    proc = start_kueue(state, bins, local.api_client(), attached=True)
    yield proc.pid
    stop_process_group(proc.pid)
    state.pids.pop("kueue", None)
    state.save()


def create_cluster_scoped(cluster: Cluster, plural: str, body: Json, cleanup: list[tuple[str, str]]) -> Json:
    obj = cluster.custom.create_cluster_custom_object(kueue.GROUP, V, plural, body)
    cleanup.append((plural, body["metadata"]["name"]))
    return obj


@pytest.fixture
def cluster_scoped(cluster: Cluster) -> Iterator[list[tuple[str, str]]]:
    """Cluster-scoped Kueue objects a test creates, deleted afterwards (queues before flavors)."""
    made: list[tuple[str, str]] = []
    yield made
    for plural, name in reversed(made):
        try:
            cluster.custom.delete_cluster_custom_object(kueue.GROUP, V, plural, name)
        except kubernetes.client.ApiException as e:
            if e.status != 404:
                raise


def gpu_queue(
    cluster: Cluster,
    namespace: str,
    cleanup: list[tuple[str, str]],
    gpus: int,
    preemption: Json | None = None,
) -> tuple[str, str]:
    """A ResourceFlavor for the kwok H100 nodes, a ClusterQueue with a GPU quota and a LocalQueue in
    `namespace`; returns (local queue, cluster queue) names once the ClusterQueue is Active."""
    flavor, cq, lq = f"h100-{namespace}", f"gpus-{namespace}", "gpus"
    create_cluster_scoped(
        cluster,
        "resourceflavors",
        {
            "apiVersion": kueue.API_VERSION,
            "kind": "ResourceFlavor",
            "metadata": {"name": flavor},
            "spec": {
                "nodeLabels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
                "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
            },
        },
        cleanup,
    )
    spec: Json = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}},
        "resourceGroups": [
            {
                "coveredResources": ["cpu", "memory", "nvidia.com/gpu"],
                "flavors": [
                    {
                        "name": flavor,
                        "resources": [
                            {"name": "cpu", "nominalQuota": 256},
                            {"name": "memory", "nominalQuota": "2Ti"},
                            {"name": "nvidia.com/gpu", "nominalQuota": gpus},
                        ],
                    }
                ],
            }
        ],
    }
    if preemption:
        spec["preemption"] = preemption
    create_cluster_scoped(
        cluster,
        "clusterqueues",
        {"apiVersion": kueue.API_VERSION, "kind": "ClusterQueue", "metadata": {"name": cq}, "spec": spec},
        cleanup,
    )
    cluster.custom.create_namespaced_custom_object(
        kueue.GROUP,
        V,
        namespace,
        "localqueues",
        {
            "apiVersion": kueue.API_VERSION,
            "kind": "LocalQueue",
            "metadata": {"name": lq, "namespace": namespace},
            "spec": {"clusterQueue": cq},
        },
    )

    def active(plural: str, name: str, ns: str | None = None) -> bool:
        if ns:
            obj = cluster.custom.get_namespaced_custom_object(kueue.GROUP, V, ns, plural, name)
        else:
            obj = cluster.custom.get_cluster_custom_object(kueue.GROUP, V, plural, name)
        conds = (obj.get("status") or {}).get("conditions") or []
        return any(c["type"] == "Active" and c["status"] == "True" for c in conds)

    wait_for(lambda: active("clusterqueues", cq), 60, f"ClusterQueue {cq} Active")
    wait_for(lambda: active("localqueues", lq, namespace), 60, f"LocalQueue {lq} Active")
    return lq, cq


def finetunejob(cluster: Cluster, namespace: str, name: str, nodes: int, gpus: int) -> Json:
    """A FineTuneJob to own a Workload. Stored suspended and without the queue label (an operator in the
    same session then creates nothing for it)."""
    doc = yaml.safe_load((REPO / "manifests" / "examples" / "sft-tiny-reverse.yaml").read_text())
    doc["metadata"] = {"name": name, "namespace": namespace}
    doc["spec"].update(
        nodes=nodes,
        gpusPerNode=gpus,
        suspend=True,
        resources={"requests": {"cpu": "8", "memory": "64Gi"}},
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )
    return cluster.custom.create_namespaced_custom_object(
        "whetstone.dev", "v1alpha1", namespace, "finetunejobs", doc
    )


def queue_workload(
    cluster: Cluster, stored_job: Json, queue: str, priority: tuple[str, int] | None = None
) -> tuple[Json, str]:
    """Create the Workload the operator would create for `stored_job` queued in `queue`; returns the job as
    the operator sees it (labelled, running) and the Workload's name."""
    job = copy.deepcopy(stored_job)
    job["metadata"].setdefault("labels", {})[kueue.QUEUE_LABEL] = queue
    if priority:
        job["metadata"]["labels"][kueue.PRIORITY_CLASS_LABEL] = priority[0]
    job["spec"]["suspend"] = False
    pod = children.trainer_pod(job, 0, 0, children.ChildSettings())
    body = kueue.workload_for(job, pod, priority[1] if priority else None)
    ns = job["metadata"]["namespace"]
    cluster.custom.create_namespaced_custom_object(kueue.GROUP, V, ns, kueue.WORKLOADS, body)
    return job, body["metadata"]["name"]


def workload(cluster: Cluster, namespace: str, name: str) -> Json:
    return cluster.custom.get_namespaced_custom_object(kueue.GROUP, V, namespace, kueue.WORKLOADS, name)


def wait_gate(
    cluster: Cluster, job: Json, name: str, what: str, probe: Any, timeout: float = 90
) -> kueue.Gate:
    ns = job["metadata"]["namespace"]
    return wait_for(
        lambda: (g := kueue.gate(job, workload(cluster, ns, name), pods_left=0)) and probe(g) and g,
        timeout,
        f"Workload {name}: {what}",
    )


def patch_status(cluster: Cluster, namespace: str, name: str, make_patch: Any) -> None:
    """Write `make_patch(workload)` to the Workload's status as the operator does: the patch carries the
    resourceVersion it was computed from; on a conflict (Kueue wrote in between) read again and retry."""
    for _ in range(10):
        body = make_patch(workload(cluster, namespace, name))
        try:
            cluster.custom.patch_namespaced_custom_object_status(
                kueue.GROUP, V, namespace, kueue.WORKLOADS, name, body
            )
            return
        except kubernetes.client.ApiException as e:
            if e.status != 409:
                raise
    raise AssertionError(f"Workload {name}: 10 conflicting writes in a row")


def test_kueue_admits_into_a_gpu_cluster_queue(
    cluster: Cluster, kueue_running: int, namespace: str, cluster_scoped: list[tuple[str, str]]
) -> None:
    # Smoke: Kueue is up, its webhooks answer (the API server calls them on every write below), and a
    # ClusterQueue with a GPU quota, its ResourceFlavor and a LocalQueue are accepted and Active.
    lq, cq = gpu_queue(cluster, namespace, cluster_scoped, gpus=16)
    obj = cluster.custom.get_cluster_custom_object(kueue.GROUP, V, "clusterqueues", cq)
    quotas = obj["spec"]["resourceGroups"][0]["flavors"][0]["resources"]
    assert {"name": "nvidia.com/gpu", "nominalQuota": "16"} in quotas  # quantities come back as strings
    # Kueue's validating webhook answers by URL: a Workload asking for the resource Kueue reserves for itself
    # ("pods") passes the CRD schema and is refused by the webhook alone.
    bad = {
        "apiVersion": kueue.API_VERSION,
        "kind": "Workload",
        "metadata": {"name": "asks-for-pods", "namespace": namespace},
        "spec": {
            "queueName": lq,
            "podSets": [
                {
                    "name": "main",
                    "count": 1,
                    "template": {
                        "spec": {
                            "restartPolicy": "Never",
                            "containers": [
                                {"name": "c", "image": "x", "resources": {"requests": {"pods": 1}}}
                            ],
                        }
                    },
                }
            ],
        },
    }
    with pytest.raises(kubernetes.client.ApiException) as refused:
        cluster.custom.create_namespaced_custom_object(kueue.GROUP, V, namespace, kueue.WORKLOADS, bad)
    assert "reserved for internal kueue use" in refused.value.body


def test_a_job_that_does_not_fit_waits_until_the_first_finishes(
    cluster: Cluster,
    kueue_running: int,
    crds_applied: list[str],  # noqa: F811
    namespace: str,
    cluster_scoped: list[tuple[str, str]],
) -> None:
    lq, cq = gpu_queue(cluster, namespace, cluster_scoped, gpus=16)
    first, first_wl = queue_workload(cluster, finetunejob(cluster, namespace, "first", nodes=2, gpus=8), lq)
    gate = wait_gate(cluster, first, first_wl, "admitted", lambda g: g.may_run)
    assert gate.reason == kueue.REASON_ADMITTED and cq in gate.message
    admitted = workload(cluster, namespace, first_wl)
    (assignment,) = admitted["status"]["admission"]["podSetAssignments"]
    assert assignment["count"] == 2 and assignment["resourceUsage"]["nvidia.com/gpu"] in (16, "16")
    # The flavor's node labels and tolerations are what the pods would get.
    flavors = {
        f"h100-{namespace}": cluster.custom.get_cluster_custom_object(
            kueue.GROUP, V, "resourceflavors", f"h100-{namespace}"
        )
    }
    where = kueue.placement(kueue.WorkloadView.of(admitted), flavors)
    assert where.node_selector == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}

    second, second_wl = queue_workload(
        cluster, finetunejob(cluster, namespace, "second", nodes=1, gpus=8), lq
    )
    gate = wait_gate(cluster, second, second_wl, "judged inadmissible", lambda g: "insufficient" in g.message)
    assert not gate.may_run and gate.reason == kueue.REASON_QUEUED and f"LocalQueue {lq}" in gate.message

    # Kueue leaves a Workload owned by a kind it does not know alone: still there, still admitted.
    assert kueue.WorkloadView.of(workload(cluster, namespace, first_wl)).admitted
    assert not kueue.WorkloadView.of(workload(cluster, namespace, second_wl)).quota_reserved

    patch_status(
        cluster, namespace, first_wl, lambda wl: kueue.finished_patch(wl, True, "done", datetime.now(UTC))
    )
    wait_gate(cluster, second, second_wl, "admitted after the first finished", lambda g: g.may_run)

    # Deleting the job deletes its Workload (garbage collection through the owner reference).
    cluster.custom.delete_namespaced_custom_object(
        "whetstone.dev", "v1alpha1", namespace, "finetunejobs", "first"
    )

    def gone() -> bool:
        try:
            workload(cluster, namespace, first_wl)
            return False
        except kubernetes.client.ApiException as e:
            return e.status == 404

    wait_for(gone, 90, f"Workload {first_wl} garbage-collected with its FineTuneJob")


def test_a_higher_priority_job_preempts_a_lower_one(
    cluster: Cluster,
    kueue_running: int,
    crds_applied: list[str],  # noqa: F811
    namespace: str,
    cluster_scoped: list[tuple[str, str]],
) -> None:
    lq, cq = gpu_queue(
        cluster, namespace, cluster_scoped, gpus=16, preemption={"withinClusterQueue": "LowerPriority"}
    )
    priorities = {}
    for level, value in (("low", 10), ("high", 1000)):
        name = f"{level}-{namespace}"
        create_cluster_scoped(
            cluster,
            kueue.WORKLOAD_PRIORITY_CLASSES,
            {
                "apiVersion": kueue.API_VERSION,
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": name},
                "value": value,
            },
            cluster_scoped,
        )
        wpc = cluster.custom.get_cluster_custom_object(kueue.GROUP, V, kueue.WORKLOAD_PRIORITY_CLASSES, name)
        priorities[level] = (name, kueue.priority_of(wpc))

    low, low_wl = queue_workload(cluster, finetunejob(cluster, namespace, "low", 2, 8), lq, priorities["low"])
    wait_gate(cluster, low, low_wl, "admitted", lambda g: g.may_run)
    high, high_wl = queue_workload(
        cluster, finetunejob(cluster, namespace, "high", 2, 8), lq, priorities["high"]
    )

    # Kueue preempts the low one: Evicted (Preempted) and Preempted (InClusterQueue). The operator stops its
    # pods (here there are none) and then gives the quota back.
    gate = wait_gate(cluster, low, low_wl, "preempted", lambda g: g.reason == kueue.REASON_PREEMPTED)
    assert not gate.may_run and gate.release_quota and "checkpoints kept" in gate.message
    view = kueue.WorkloadView.of(workload(cluster, namespace, low_wl))
    assert view.evicted_reason == "Preempted" and view.preempted_reason == "InClusterQueue"
    assert not kueue.gate(high, workload(cluster, namespace, high_wl), 0).may_run  # not before the release
    patch_status(cluster, namespace, low_wl, lambda wl: kueue.release_patch(wl, datetime.now(UTC)))

    wait_gate(cluster, high, high_wl, "admitted after the preemption", lambda g: g.may_run)
    requeued = workload(cluster, namespace, low_wl)
    assert not kueue.WorkloadView.of(requeued).quota_reserved
    assert any(c["type"] == "Requeued" and c["status"] == "True" for c in requeued["status"]["conditions"])

    # When the high-priority job ends, the low one is admitted again (and resumes from its checkpoints).
    patch_status(
        cluster, namespace, high_wl, lambda wl: kueue.finished_patch(wl, True, "done", datetime.now(UTC))
    )
    gate = wait_gate(cluster, low, low_wl, "admitted again", lambda g: g.may_run)
    assert not kueue.WorkloadView.of(workload(cluster, namespace, low_wl)).evicted
