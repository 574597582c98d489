"""The control plane itself: versions, nodes, scheduling by GPU requests, garbage collection."""

from __future__ import annotations

import uuid

import kubernetes
import pytest
from helpers import GPU_TOLERATION, Cluster, Json, wait_for
from localcluster import RUNNER_NODE_LABEL

GPU_NODES = [f"gpu-node-{i}" for i in range(4)]


def test_server_reports_the_stamped_version(cluster: Cluster) -> None:
    version = kubernetes.client.VersionApi(cluster.api).get_code()
    # Unstamped builds report v0.0.0-master, which breaks Helm kubeVersion checks.
    assert version.git_version.startswith("v1.")
    assert version.major == "1"
    assert not version.git_version.startswith("v0.0.0")


def test_gpu_nodes_and_runner_nodes_are_ready(cluster: Cluster) -> None:
    def ready_nodes() -> dict[str, Json]:
        nodes = {
            n.metadata.name: cluster.api.sanitize_for_serialization(n) for n in cluster.core.list_node().items
        }
        ready = {
            name: n
            for name, n in nodes.items()
            if any(c["type"] == "Ready" and c["status"] == "True" for c in n["status"].get("conditions", []))
        }
        return ready if set(GPU_NODES + cluster.state.runner_nodes) <= set(ready) else {}

    nodes = wait_for(ready_nodes, 120, "all nodes Ready")
    for name in GPU_NODES:
        node = nodes[name]
        assert node["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert node["metadata"]["labels"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in node["spec"]["taints"]
    for name in cluster.state.runner_nodes:
        assert nodes[name]["metadata"]["labels"][RUNNER_NODE_LABEL] == "true"


def gpu_pod(name: str, gpus: int) -> Json:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name},
        "spec": {
            "tolerations": [GPU_TOLERATION],
            "containers": [
                {
                    "name": "main",
                    "image": "trainer:latest",
                    "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
                }
            ],
        },
    }


def test_a_pod_for_eight_gpus_lands_on_a_gpu_node(cluster: Cluster, namespace: str) -> None:
    cluster.core.create_namespaced_pod(namespace, gpu_pod("eight", 8))
    pod = cluster.wait_pod_phase(namespace, "eight", ("Running",))
    assert pod["spec"]["nodeName"] in GPU_NODES
    # kwok played the kubelet: a fake pod IP from its CIDR and a ready container.
    assert pod["status"]["podIP"].startswith("10.244.")
    assert pod["status"]["containerStatuses"][0]["ready"] is True


def test_a_pod_for_nine_gpus_stays_pending(cluster: Cluster, namespace: str) -> None:
    cluster.core.create_namespaced_pod(namespace, gpu_pod("nine", 9))

    def unschedulable() -> Json | None:
        pod = cluster.pod(namespace, "nine")
        for c in pod.get("status", {}).get("conditions") or []:
            if c["type"] == "PodScheduled" and c["status"] == "False" and c.get("reason") == "Unschedulable":
                return pod
        return None

    pod = wait_for(unschedulable, 120, "the scheduler to report the 9-GPU pod Unschedulable")
    assert pod["status"]["phase"] == "Pending"
    assert not pod["spec"].get("nodeName")
    message = next(c["message"] for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    assert "nvidia.com/gpu" in message


def test_a_gpu_pod_without_the_toleration_stays_pending(cluster: Cluster, namespace: str) -> None:
    pod = gpu_pod("untolerated", 1)
    pod["spec"]["tolerations"] = []
    cluster.core.create_namespaced_pod(namespace, pod)

    def message() -> str | None:
        p = cluster.pod(namespace, "untolerated")
        conds = [c for c in p.get("status", {}).get("conditions") or [] if c["type"] == "PodScheduled"]
        return conds[0].get("message") if conds and conds[0]["status"] == "False" else None

    assert "untolerated taint" in wait_for(message, 120, "the scheduler to reject the pod")


@pytest.mark.parametrize("exit_code, phase", [("0", "Succeeded"), ("3", "Failed")])
def test_kwok_stage_finishes_annotated_pods(
    cluster: Cluster, namespace: str, exit_code: str, phase: str
) -> None:
    pod = gpu_pod(f"exit-{exit_code}", 1)
    pod["metadata"]["annotations"] = {
        "e2e.whetstone.dev/exit-code": exit_code,
        "e2e.whetstone.dev/run-ms": "500",
    }
    cluster.core.create_namespaced_pod(namespace, pod)
    done = cluster.wait_pod_phase(namespace, pod["metadata"]["name"], ("Succeeded", "Failed"))
    assert done["status"]["phase"] == phase
    assert done["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == int(exit_code)


def test_garbage_collector_deletes_owned_children(cluster: Cluster, namespace: str) -> None:
    parent = cluster.core.create_namespaced_config_map(
        namespace, {"metadata": {"name": "parent"}, "data": {"role": "owner"}}
    )
    owner = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": "parent",
        "uid": parent.metadata.uid,
        "blockOwnerDeletion": True,
    }
    for i in range(3):
        cluster.core.create_namespaced_config_map(
            namespace, {"metadata": {"name": f"child-{i}", "ownerReferences": [owner]}}
        )
    cluster.core.create_namespaced_config_map(namespace, {"metadata": {"name": "bystander"}})
    cluster.core.delete_namespaced_config_map(
        "parent", namespace, body=kubernetes.client.V1DeleteOptions(propagation_policy="Foreground")
    )

    def children_gone() -> bool:
        names = {cm.metadata.name for cm in cluster.core.list_namespaced_config_map(namespace).items}
        return not names & {"parent", "child-0", "child-1", "child-2"}

    wait_for(children_gone, 120, "the garbage collector to delete the children and the parent")
    cluster.core.read_namespaced_config_map("bystander", namespace)


def test_namespace_deletion_removes_its_objects(cluster: Cluster) -> None:
    name = f"e2e-ns-{uuid.uuid4().hex[:6]}"
    cluster.core.create_namespace({"metadata": {"name": name}})
    cluster.core.create_namespaced_config_map(name, {"metadata": {"name": "x"}})
    cluster.core.delete_namespace(name)

    def gone() -> bool:
        try:
            cluster.core.read_namespace(name)
            return False
        except kubernetes.client.ApiException as e:
            return e.status == 404

    wait_for(gone, 120, f"namespace {name} to be deleted by the namespace controller")
