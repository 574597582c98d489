"""Gang admission of FineTuneJobs by a real Kueue controller (built from its Go module, started by
e2e/kueue_local.py), driven by the operator: a job labelled kueue.x-k8s.io/queue-name becomes one Workload
owned by the job, has no pod until Kueue admits all of them, is suspended (pods deleted, Checkpoints kept)
when Kueue preempts it, resumes as a new attempt when admitted again, and marks its Workload Finished when it
ends. The pods run on the KWOK GPU pool; a trainer finishing is played by setting its pods' status as a
kubelet would (KWOK is the fake kubelet here and has no trainer to run).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from helpers import Cluster, wait_for
from kueue_local import start_kueue
from localcluster import LocalCluster, locate_binaries, pid_alive, stop_process_group
from operator_fixtures import *  # noqa: F403 - fixtures
from operator_fixtures import GROUP, VERSION, JobWatch, OperatorProcess, kwok_job
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


@pytest.fixture
def kueue_operator(kueue_running: int, operator: OperatorProcess) -> OperatorProcess:
    """The session's operator, watching Kueue's Workloads: it finds Kueue when it starts, so one started
    before Kueue was installed (by an earlier test module) is restarted once."""
    text = operator.log_text()
    if "Kueue serves" not in text[text.rfind("=== start") :]:
        operator.stop()
        operator.start()
    return operator


def queued_job(name: str, queue: str, nodes: int, priority: str | None = None) -> Json:
    """A job for the KWOK GPU pool (8 GPUs a pod), queued in LocalQueue `queue`."""
    body = kwok_job(name, nodes=nodes, gpus=8)
    body["metadata"]["labels"] = {kueue.QUEUE_LABEL: queue}
    if priority:
        body["metadata"]["labels"][kueue.PRIORITY_CLASS_LABEL] = priority
    return body


def condition(status: Json, ctype: str) -> Json:
    return next(c for c in status.get("conditions") or [] if c["type"] == ctype)


def job_workload(cluster: Cluster, job: JobWatch) -> Json:
    """The job's Workload, found by the labels the operator gives it."""
    (wl,) = cluster.custom.list_namespaced_custom_object(
        kueue.GROUP, V, job.namespace, kueue.WORKLOADS, label_selector=f"whetstone.dev/job={job.name}"
    )["items"]
    return wl


def finish_pods(cluster: Cluster, job: JobWatch) -> None:
    """The trainers exit 0: what a kubelet reports then (KWOK leaves these pods running until deleted)."""
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    for pod in job.pods():
        container = pod["spec"]["containers"][0]
        terminated = {"exitCode": 0, "reason": "Completed", "startedAt": now, "finishedAt": now}
        status = {
            "phase": "Succeeded",
            "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}],
            "containerStatuses": [
                {
                    "name": container["name"],
                    "image": container["image"],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "state": {"terminated": terminated},
                }
            ],
        }
        cluster.core.patch_namespaced_pod_status(pod["metadata"]["name"], job.namespace, {"status": status})


def reasons(job: JobWatch) -> list[str]:
    return [e["reason"] for e in sorted(job.events(), key=lambda e: e["metadata"]["creationTimestamp"])]


def test_a_job_that_fits_starts_whole_and_one_that_does_not_waits_without_pods_until_the_first_finishes(
    cluster: Cluster, namespace: str, kueue_operator: OperatorProcess, cluster_scoped: list[tuple[str, str]]
) -> None:
    lq, cq = gpu_queue(cluster, namespace, cluster_scoped, gpus=16)
    first = JobWatch(cluster, namespace, "first")
    first.create(queued_job("first", lq, nodes=2))
    first.wait_phase("Running", timeout=120)
    said = {e["reason"]: e["message"] for e in first.events()}
    assert f"LocalQueue {lq}" in said["Queued"] and f"ClusterQueue {cq}" in said["Admitted"]
    pods = first.pods()
    assert sorted(p["metadata"]["name"] for p in pods) == ["first-node-0", "first-node-1"]
    for p in pods:
        # Placed on the ResourceFlavor Kueue assigned (the job itself names no GPU model); no queue label.
        assert p["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert kueue.QUEUE_LABEL not in p["metadata"]["labels"]
    wl = job_workload(cluster, first)
    assert wl["metadata"]["ownerReferences"][0]["uid"] == first.get()["metadata"]["uid"]
    assert wl["spec"]["podSets"][0]["count"] == 2

    # 16 GPUs of quota are taken: the second job waits in the queue, suspended, and creates no pod.
    second = JobWatch(cluster, namespace, "second")
    second.create(queued_job("second", lq, nodes=1))
    status = second.wait(lambda s: "insufficient" in (s.get("message") or "") and s, "judged by Kueue", 90)
    assert status["phase"] == "Suspended" and condition(status, "Suspended")["reason"] == "Queued"
    assert f"LocalQueue {lq}" in status["message"]
    assert second.pods() == [] and "Queued" in reasons(second)

    finish_pods(cluster, first)
    first.wait_phase("Succeeded", timeout=90)
    wait_for(
        lambda: kueue.WorkloadView.of(job_workload(cluster, first)).finished, 60, "first's Workload Finished"
    )
    second.wait_phase("Running", timeout=120)
    assert [p["metadata"]["name"] for p in second.pods()] == ["second-node-0"]

    # Deleting a job deletes its Workload (garbage collection through the owner reference).
    second.delete()
    wait_for(
        lambda: (
            not cluster.custom.list_namespaced_custom_object(
                kueue.GROUP, V, namespace, kueue.WORKLOADS, label_selector="whetstone.dev/job=second"
            )["items"]
        ),
        90,
        "second's Workload garbage-collected with the job",
    )


def test_a_higher_priority_job_preempts_a_lower_one_which_keeps_its_checkpoints_and_resumes(
    cluster: Cluster, namespace: str, kueue_operator: OperatorProcess, cluster_scoped: list[tuple[str, str]]
) -> None:
    lq, _ = gpu_queue(
        cluster, namespace, cluster_scoped, gpus=16, preemption={"withinClusterQueue": "LowerPriority"}
    )
    for level, value in (("low", 10), ("high", 1000)):
        create_cluster_scoped(
            cluster,
            kueue.WORKLOAD_PRIORITY_CLASSES,
            {
                "apiVersion": kueue.API_VERSION,
                "kind": "WorkloadPriorityClass",
                "metadata": {"name": f"{level}-{namespace}"},
                "value": value,
            },
            cluster_scoped,
        )
    low = JobWatch(cluster, namespace, "low")
    low.create(queued_job("low", lq, nodes=2, priority=f"low-{namespace}"))
    before = low.wait_phase("Running", timeout=120)
    assert job_workload(cluster, low)["spec"]["priority"] == 10
    # A checkpoint the trainer reported (the operator records it so); the trainer is not run here.
    ckpt = children.checkpoint_resource(
        low.get(), 20, "s3://e2e-out/low/checkpoints/step-00000020", "resumable"
    )
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "checkpoints", ckpt)

    high = JobWatch(cluster, namespace, "high")
    high.create(queued_job("high", lq, nodes=2, priority=f"high-{namespace}"))
    status = low.wait(
        lambda s: s.get("phase") == "Suspended" and condition(s, "Suspended")["reason"] == "Preempted" and s,
        "preempted",
        120,
    )
    assert "checkpoints kept" in status["message"]
    wait_for(lambda: low.pods() == [], 60, "low's pods deleted")
    assert "Preempted" in reasons(low)
    high.wait_phase("Running", timeout=120)
    low_status = low.status()
    assert low_status["phase"] == "Suspended" and low.pods() == []
    assert f"queued again in LocalQueue {lq}" in low_status["message"]
    assert [c["metadata"]["name"] for c in low.checkpoints()] == [ckpt["metadata"]["name"]]

    # The high-priority job ends: the low one is admitted again and resumes as a new attempt.
    finish_pods(cluster, high)
    high.wait_phase("Succeeded", timeout=90)
    after = low.wait_phase("Running", timeout=120)
    assert after["attempt"] > before["attempt"] and after.get("restartCount", 0) == 0
    assert {p["metadata"]["labels"]["whetstone.dev/attempt"] for p in low.pods()} == {str(after["attempt"])}
    assert [c["metadata"]["name"] for c in low.checkpoints()] == [ckpt["metadata"]["name"]]


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
