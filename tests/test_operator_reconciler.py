"""The reconciler (handlers.Reconciler) against an in-memory API server: what it writes, when it writes
nothing, and how it behaves when the server disagrees (a conflict, a refusal, a stale cache).

The fake stands in for the API server's object store only (resourceVersions, merge patches, preconditions);
what the real API server decides (validation, admission, garbage collection) is tested in e2e/."""

from __future__ import annotations

import copy
import json
from collections import Counter
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from kubernetes.client.rest import ApiException
from whetstone_api.wire import TrainerReport
from whetstone_operator import children
from whetstone_operator.config import OperatorConfig
from whetstone_operator.handlers import Reconciler
from whetstone_operator.metrics import OperatorMetrics
from whetstone_operator.poller import PollResult
from whetstone_operator.store import Store

Json = dict[str, Any]
KEY = ("ns", "j")


def merge(target: Json, patch: Json) -> Json:
    out = dict(target)
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


def api_error(status: int, message: str = "") -> ApiException:
    e = ApiException(
        status=status, reason={409: "Conflict", 422: "Unprocessable Entity"}.get(status, "Error")
    )
    e.body = json.dumps({"message": message})
    return e


class FakeKube:
    """The API calls of kube.Kube, on dicts; every call is recorded."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.jobs: dict[str, Json] = {}
        self.pods: dict[str, Json] = {}
        self.checkpoints: dict[str, Json] = {}
        self.events: list[tuple[str, str, str]] = []
        self.created: list[Json] = []
        self.deleted: list[tuple[str, int | None]] = []
        self.refuse: dict[str, Exception] = {}
        self.nodes: dict[str, bool] = {}
        self.workloads: dict[str, Json] = {}
        self.flavors: dict[str, Json] = {}
        self.priority_classes: dict[str, Json] = {}
        self.rv = 10

    def _bump(self, obj: Json) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)

    def get_job(self, namespace: str, name: str) -> Json | None:
        self.calls["get_job"] += 1
        return copy.deepcopy(self.jobs.get(name))

    def patch_job_status(self, namespace: str, name: str, status: Json, resource_version: str) -> Json:
        self.calls["patch_job_status"] += 1
        job = self.jobs[name]
        if job["metadata"]["resourceVersion"] != resource_version:
            raise api_error(409, "the object has been modified")
        job["status"] = merge(job.get("status") or {}, json.loads(json.dumps(status)))
        self._bump(job)
        return copy.deepcopy(job)

    def remove_finalizer(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> None:
        self.calls["remove_finalizer"] += 1
        self.jobs[name]["metadata"]["finalizers"] = finalizers
        self._bump(self.jobs[name])

    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        self.calls["delete_job"] += 1
        self.jobs.pop(name, None)

    def list_pods(self, namespace: str, selector: str) -> list[Json]:
        self.calls["list_pods"] += 1
        return [copy.deepcopy(p) for p in self.pods.values()]

    def _create(self, kind: str, body: Json) -> None:
        self.calls[f"create_{kind}"] += 1
        if kind in self.refuse:
            raise self.refuse[kind]
        self.created.append(body)

    def create_pod(self, namespace: str, body: Json) -> None:
        self._create("pod", body)
        self.pods[body["metadata"]["name"]] = body

    def delete_pod(self, namespace: str, name: str, uid: str, grace_seconds: int | None = None) -> None:
        self.calls["delete_pod"] += 1
        self.deleted.append((name, grace_seconds))

    def create_config_map(self, namespace: str, body: Json) -> None:
        self._create("config_map", body)

    def create_service(self, namespace: str, body: Json) -> None:
        self._create("service", body)

    def create_network_policy(self, namespace: str, body: Json) -> None:
        self._create("network_policy", body)

    def create_checkpoint(self, namespace: str, body: Json) -> Json:
        self.calls["create_checkpoint"] += 1
        self.checkpoints[body["metadata"]["name"]] = body
        return {**body, "metadata": {**body["metadata"], "generation": 1}}

    def patch_checkpoint_status(self, namespace: str, name: str, status: Json) -> None:
        self.calls["patch_checkpoint_status"] += 1

    def orphan_checkpoint(self, namespace: str, name: str) -> None:
        self.calls["orphan_checkpoint"] += 1

    def delete_checkpoint(self, namespace: str, name: str) -> None:
        self.calls["delete_checkpoint"] += 1

    def create_workload(self, namespace: str, body: Json) -> None:
        self._create("workload", body)
        self.workloads[body["metadata"]["name"]] = copy.deepcopy(body)
        self._bump(self.workloads[body["metadata"]["name"]])

    def patch_workload(self, namespace: str, name: str, patch: Json) -> None:
        self.calls["patch_workload"] += 1
        self.workloads[name] = merge(self.workloads[name], patch)

    def patch_workload_status(self, namespace: str, name: str, patch: Json) -> None:
        self.calls["patch_workload_status"] += 1
        wl = self.workloads[name]
        if patch["metadata"]["resourceVersion"] != wl["metadata"]["resourceVersion"]:
            raise api_error(409, "the object has been modified")
        wl["status"] = merge(wl.get("status") or {}, json.loads(json.dumps(patch["status"])))
        self._bump(wl)

    def get_resource_flavor(self, name: str) -> Json | None:
        self.calls["get_resource_flavor"] += 1
        return copy.deepcopy(self.flavors.get(name))

    def get_workload_priority_class(self, name: str) -> Json | None:
        self.calls["get_workload_priority_class"] += 1
        return copy.deepcopy(self.priority_classes.get(name))

    def node_ready(self, name: str) -> bool | None:
        self.calls["node_ready"] += 1
        return self.nodes.get(name)

    def create_event(
        self, obj: Json, kind: str, etype: str, reason: str, message: str, instance: str
    ) -> None:
        self.calls["create_event"] += 1
        self.events.append((etype, reason, message))


class FakePoller:
    def __init__(self) -> None:
        self.results: dict[Any, PollResult] = {}
        self.requested: list[Any] = []

    def due(self, key: Any, interval: float) -> bool:
        return True

    def request(self, key: Any, host: str, port: int) -> bool:
        self.requested.append((key, host, port))
        return True

    def take(self, key: Any) -> PollResult | None:
        return self.results.pop(key, None)

    def forget(self, key: Any) -> None:
        pass


def new_job(**spec: Any) -> Json:
    return {
        "apiVersion": "whetstone.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1, "resourceVersion": "5"},
        "spec": {
            "method": "sft",
            "baseModel": {"uri": "whetstone://tiny"},
            "dataset": {"uri": "pvc://work/train.jsonl"},
            "lora": {},
            "output": {"uri": "pvc://work/out/j"},
            "nodes": 1,
            "backoffLimit": 2,
            "checkpointing": {"everySteps": 10, "keepLast": 2},
            **spec,
        },
    }


class World:
    """A reconciler, its cache and the fake server, with helpers to let the watch catch up."""

    def __init__(self, labels: dict[str, str] | None = None, **spec: Any) -> None:
        self.kube = FakeKube()
        self.store = Store()
        self.metrics = OperatorMetrics()
        self.poller = FakePoller()
        self.leading = True
        config = OperatorConfig(progress_seconds=15, kueue=True)
        self.reconciler = Reconciler(
            config,
            self.kube,
            self.store,
            self.metrics,
            self.poller,
            leading=lambda: self.leading,  # type: ignore[arg-type]
        )
        job = new_job(**spec)
        if labels:
            job["metadata"]["labels"] = labels
        self.kube.jobs["j"] = job
        self.store.put_job(copy.deepcopy(job))

    def watch(self) -> None:
        """Deliver what the server holds to the cache, as the watch streams would."""
        self.store.put_job(copy.deepcopy(self.kube.jobs["j"]))
        for body in self.kube.created:
            kind = body["kind"]
            if kind == "Pod":
                continue
            self.store.put_child(kind, {**body, "metadata": {**body["metadata"]}})
        for pod in self.kube.pods.values():
            self.store.put_pod(pod)
        for wl in self.kube.workloads.values():
            self.store.put_workload(copy.deepcopy(wl))

    def set_pod(self, rank: int, phase: str, **status: Any) -> None:
        name = f"j-node-{rank}"
        pod = self.kube.pods[name]
        pod.setdefault("metadata", {}).setdefault("uid", f"pod-{rank}")
        pod["metadata"].setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        pod["status"] = {"phase": phase, "podIP": f"10.0.0.{rank}", **status}

    def run(self) -> float | None:
        self.kube.calls.clear()
        return self.reconciler.reconcile(KEY)

    @property
    def status(self) -> Json:
        return self.kube.jobs["j"].get("status") or {}


def running_world(**spec: Any) -> World:
    w = World(**spec)
    w.run()
    w.watch()
    w.set_pod(0, "Running")
    w.watch()
    w.run()
    w.watch()
    assert w.status["phase"] == "Running"
    return w


def test_a_new_job_gets_its_children_then_a_steady_job_costs_no_api_call() -> None:
    w = World()
    w.run()
    kinds = [b["kind"] for b in w.kube.created]
    assert kinds == ["ConfigMap", "Service", "NetworkPolicy", "Pod"]
    # The status and its Event come with the pass the watch brings (lifecycle.Plan.write_later).
    assert w.status == {} and w.kube.events == []
    w.watch()
    w.run()
    assert w.status["phase"] == "Pending" and w.kube.events == [
        ("Normal", "Created", "creating 1 trainer pod(s)")
    ]
    w = running_world()
    for _ in range(3):
        w.run()
        assert sum(w.kube.calls.values()) == 0, w.kube.calls


def test_a_jobs_start_is_one_status_write_after_its_pods_and_a_refused_pod_is_not_counted_active() -> None:
    """A new job's first pass only creates; the pass the watch brings writes the status once, and a job
    whose pods already run by then goes to Running in that one write, with both Events. A refused create
    is reported by the next pass."""
    w = World(nodes=2)
    w.run()
    assert w.kube.calls["patch_job_status"] == 0 and w.kube.calls["create_pod"] == 2
    w.run()  # before the watch caught up: nothing to create, nothing to write yet
    assert sum(w.kube.calls.values()) == 0, w.kube.calls
    w.watch()
    w.run()
    assert w.kube.calls["patch_job_status"] == 1 and sum(w.kube.calls.values()) == 2, w.kube.calls
    assert w.status["phase"] == "Pending" and w.status["nodes"] == {"active": 2, "succeeded": 0, "failed": 0}
    w.watch()
    w.run()
    assert sum(w.kube.calls.values()) == 0, w.kube.calls

    fast = World(nodes=2)
    fast.run()
    fast.watch()
    fast.set_pod(0, "Running")
    fast.set_pod(1, "Running")
    fast.watch()
    fast.run()
    assert fast.kube.calls["patch_job_status"] == 1 and fast.status["phase"] == "Running"
    assert fast.status["startTime"] and fast.status["attempt"] == 0 and fast.status["restartCount"] == 0
    assert [e[1] for e in fast.kube.events] == ["Created", "Running"]

    refused = World(nodes=2)
    refused.kube.refuse["pod"] = api_error(422, "pods are forbidden: exceeded quota")
    refused.run()
    refused.watch()
    refused.run()
    assert refused.status["nodes"]["active"] == 0, refused.status
    assert refused.status["phase"] == "Pending" and "exceeded quota" in refused.status["message"]


def creates(w: World) -> Counter[str]:
    return Counter({c: n for c, n in w.kube.calls.items() if c.startswith("create_") and c != "create_event"})


def test_a_pass_before_the_watch_caught_up_creates_nothing_a_second_time(monkeypatch) -> None:
    """Each write queues the job again, mostly before the watch has delivered what the pass created: such a
    pass must not create it all again only to hear AlreadyExists (at start-up, most of the API calls)."""
    w = World()
    w.run()
    assert [b["kind"] for b in w.kube.created] == ["ConfigMap", "Service", "NetworkPolicy", "Pod"]
    assert all(b["metadata"]["ownerReferences"][0]["uid"] == "u" for b in w.kube.created)
    w.store.put_job(copy.deepcopy(w.kube.jobs["j"]))  # only the status write is back from the watch
    for _ in range(2):
        w.run()
        assert not creates(w), creates(w)
    # Delivered, the children are judged by their owner as ever; one deleted later is created again.
    w.watch()
    w.run()
    assert not creates(w) and w.status["phase"] == "Pending"
    service = next(b for b in w.kube.created if b["kind"] == "Service")
    w.store.remove_child("Service", service)
    w.run()
    assert creates(w) == Counter(create_service=1)
    # A create whose watch event never comes is not waited for for ever.
    import whetstone_operator.store as store_module

    monkeypatch.setattr(store_module, "EXPECTATION_SECONDS", -1.0)
    w.store.remove_child("Service", service)
    w.run()
    assert creates(w) == Counter(create_service=1)


def test_a_jobs_children_are_created_at_once_all_owned_and_one_refusal_is_one_backoff_step() -> None:
    """With a create pool, the ConfigMap, Service and NetworkPolicy are in flight together (a barrier that
    only opens with all three waiting), then the pods of every rank together; each is the job's own."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    w = World(nodes=2)
    children_in_flight = threading.Barrier(3, timeout=10)
    pods_in_flight = threading.Barrier(2, timeout=10)
    plain = {k: getattr(w.kube, k) for k in ("create_config_map", "create_service", "create_network_policy")}
    for name, create in plain.items():
        setattr(w.kube, name, lambda ns, body, create=create: (children_in_flight.wait(), create(ns, body)))
    create_pod = w.kube.create_pod
    w.kube.create_pod = lambda ns, body: (pods_in_flight.wait(), create_pod(ns, body))
    with ThreadPoolExecutor(8) as pool:
        w.reconciler.pool = pool
        w.run()
        kinds = [b["kind"] for b in w.kube.created]
        assert sorted(kinds[:3]) == ["ConfigMap", "NetworkPolicy", "Service"] and kinds[3:] == ["Pod", "Pod"]
        assert {b["metadata"]["ownerReferences"][0]["uid"] for b in w.kube.created} == {"u"}
        assert w.kube.events == [] and w.status == {}  # both come with the next pass (Plan.write_later)
        # Two refusals in one pass: reported once, one step of back-off (5 s), the first one named.
        w2 = World()
        w2.reconciler.pool = pool
        w2.kube.refuse["config_map"] = api_error(422, "bad config")
        w2.kube.refuse["network_policy"] = api_error(422, "bad policy")
        assert w2.run() == 0.0
        w2.watch()
        again = w2.run()
    assert w2.kube.calls["create_config_map"] == 0 and again is not None and 4 <= again <= 5
    assert "ConfigMap j-config: bad config" in w2.status["message"]


def test_status_writes_apply_only_to_the_version_they_were_planned_from() -> None:
    w = World()
    w.run()
    w.watch()
    w.set_pod(0, "Running")
    w.watch()
    # Another writer (a second replica, a user) changes the job after our cache saw it.
    w.kube.jobs["j"]["metadata"]["resourceVersion"] = "999"
    again = w.run()
    assert w.kube.calls["patch_job_status"] == 1 and again == 0.0
    assert w.status == {}, "a plan on an outdated job is never written"
    assert w.kube.calls["get_job"] == 1 and w.store.job(KEY)["metadata"]["resourceVersion"] == "999"
    w.run()
    assert w.status["phase"] == "Running"


def test_a_restart_is_decided_again_on_a_fresh_list_of_pods() -> None:
    w = running_world()
    # The cache says rank 0 failed; the API server says it runs (the cache was wrong, or a watch was missed).
    stale = copy.deepcopy(w.kube.pods["j-node-0"])
    stale["status"] = {
        "phase": "Failed",
        "containerStatuses": [{"name": "trainer", "state": {"terminated": {"exitCode": 1}}}],
    }
    w.store.put_pod(stale)
    w.run()
    assert w.kube.calls["list_pods"] == 1 and w.kube.calls["get_job"] == 1
    assert w.kube.calls["delete_pod"] == 0 and w.status["phase"] == "Running" and "restartCount" in w.status
    assert w.status["restartCount"] == 0


def test_a_failure_restarts_the_group_and_the_message_carries_the_trainers_error() -> None:
    w = running_world()
    w.set_pod(
        0,
        "Failed",
        containerStatuses=[
            {
                "name": "trainer",
                "state": {
                    "terminated": {"exitCode": 1, "reason": "Error", "message": "RuntimeError: NCCL timeout"}
                },
            }
        ],
    )
    w.watch()
    w.run()
    assert w.status["phase"] == "Restarting" and w.status["attempt"] == 1 and w.status["restartCount"] == 1
    assert "RuntimeError: NCCL timeout" in w.status["message"]
    assert w.kube.deleted == [("j-node-0", None)]
    assert ("Warning", "PodFailed", w.status["message"]) in w.kube.events


def test_a_refused_create_is_reported_with_the_servers_message_and_retried_after_a_backoff() -> None:
    w = World()
    w.kube.refuse["pod"] = api_error(422, 'Pod "j-node-0" is invalid: spec.volumes[3].name: Invalid value')
    again = w.run()
    assert w.kube.calls["create_pod"] == 1 and again == 0.0
    w.watch()
    again = w.run()
    created = next(c for c in w.status["conditions"] if c["type"] == "Created")
    assert created["status"] == "False" and created["reason"] == "FailedCreate"
    assert (
        created["message"] == 'Pod j-node-0: Pod "j-node-0" is invalid: spec.volumes[3].name: Invalid value'
    )
    assert ("Warning", "FailedCreate", created["message"]) in w.kube.events
    assert w.kube.calls["create_pod"] == 0 and again is not None and 1 <= again <= 5, "no hot loop"
    w.watch()
    for _ in range(3):
        w.run()
    assert w.kube.calls["create_pod"] == 0
    # The client refusing to send a body (pydantic) is a refusal too.
    w2 = World()
    w2.kube.refuse["pod"] = ValueError("1 validation error for CoreV1Api.create_namespaced_pod")
    w2.run()
    w2.watch()
    w2.run()
    assert "validation error" in w2.status["message"]


def test_a_stuck_pod_is_force_deleted_only_when_its_node_is_gone_or_not_ready() -> None:
    w = running_world(suspend=False)
    w.kube.jobs["j"]["spec"]["suspend"] = True
    w.watch()
    w.run()
    assert w.status["phase"] == "Suspended" and w.kube.deleted == [("j-node-0", None)]
    w.kube.deleted.clear()
    past = (datetime.now(UTC) - timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    pod = w.kube.pods["j-node-0"]
    pod["metadata"]["deletionTimestamp"] = past
    pod["spec"]["nodeName"] = "gpu-node-1"
    w.watch()
    w.kube.nodes["gpu-node-1"] = True
    w.run()
    assert w.kube.deleted == [] and w.kube.calls["node_ready"] == 1
    w.kube.nodes["gpu-node-1"] = False
    w.run()
    assert w.kube.deleted == [("j-node-0", 0)]
    assert w.kube.events[-1][1] == "ForceDeletedPod" and "not ready" in w.kube.events[-1][2]


def test_the_trainers_report_becomes_progress_and_bounded_checkpoints() -> None:
    w = running_world()
    checkpoints = [{"step": s, "uri": f"/mnt/pvc/work/out/j/checkpoints/step-{s:08d}"} for s in range(1, 101)]
    checkpoints.append({"step": 500, "uri": "/mnt/pvc/elsewhere/x"})
    body = {
        "job": "j",
        "phase": "Training",
        "step": 100,
        "totalSteps": 200,
        "loss": None,
        "reward": 0.5,
        "checkpoints": checkpoints,
    }
    report = TrainerReport.parse(json.dumps(body).encode())
    w.poller.results[("ns", "j", "u")] = PollResult(report, None, 0.0)
    w.run()
    assert w.status["progress"]["step"] == 100 and "loss" not in w.status["progress"]
    assert w.kube.calls["create_checkpoint"] == 2, "at most keepLast new Checkpoints per pass"
    assert sorted(w.kube.checkpoints) == ["j-step-00000099", "j-step-00000100"]
    assert w.status["latestCheckpoint"]["name"] == "j-step-00000100"
    assert any(e[1] == "CheckpointRefused" and "pvc://elsewhere/x" in e[2] for e in w.kube.events)
    metrics = w.metrics.exposition().decode()
    assert 'whetstone_job_step{job="j",namespace="ns"} 100.0' in metrics
    assert 'whetstone_job_reward{job="j",namespace="ns"} 0.5' in metrics
    w.reconciler.forget("ns", "j", "u")
    assert "whetstone_job_step{" not in w.metrics.exposition().decode()
    assert w.poller.requested and w.poller.requested[-1][1:] == ("10.0.0.0", 8080)


def test_a_job_not_running_is_never_polled() -> None:
    w = World()
    w.run()
    w.watch()
    w.set_pod(0, "Pending")
    w.watch()
    w.run()
    assert w.poller.requested == []


def test_the_finalizer_of_an_earlier_version_is_removed_and_a_deleted_job_left_alone() -> None:
    w = World()
    w.kube.jobs["j"]["metadata"]["finalizers"] = ["whetstone.dev/finalizer"]
    w.watch()
    w.run()
    assert w.kube.calls["remove_finalizer"] == 1 and w.kube.jobs["j"]["metadata"]["finalizers"] == []
    w.kube.jobs["j"]["metadata"]["finalizers"] = ["whetstone.dev/finalizer"]
    w.kube.jobs["j"]["metadata"]["deletionTimestamp"] = "2026-11-28T18:00:00Z"
    w.watch()
    w.run()
    assert w.kube.calls["remove_finalizer"] == 1 and w.kube.calls["create_pod"] == 0


def test_a_replica_that_does_not_lead_does_nothing() -> None:
    w = World()
    w.leading = False
    w.run()
    assert sum(w.kube.calls.values()) == 0


def test_kept_checkpoints_are_orphaned_in_any_phase() -> None:
    w = World()
    w.kube.jobs["j"]["status"] = {"phase": "Succeeded"}
    w.watch()
    body = children.checkpoint_resource(
        w.kube.jobs["j"], 10, "pvc://work/out/j/checkpoints/step-00000010", "resumable"
    )
    body["metadata"]["annotations"] = {"whetstone.dev/keep": "true"}
    w.store.put_checkpoint(body)
    w.run()
    assert w.kube.calls["orphan_checkpoint"] == 1


@pytest.mark.parametrize("gpus", [0, 8])
def test_pods_are_created_for_cpu_and_gpu_jobs(gpus: int) -> None:
    w = World(gpusPerNode=gpus, nodes=2)
    w.run()
    pods = [b for b in w.kube.created if b["kind"] == "Pod"]
    assert [p["metadata"]["name"] for p in pods] == ["j-node-0", "j-node-1"]
    resources = pods[0]["spec"]["containers"][0].get("resources", {})
    assert resources.get("limits", {}).get("nvidia.com/gpu") == (str(gpus) if gpus else None)


def test_a_queued_job_waits_for_kueue_then_runs_where_its_flavor_says_and_finishes_its_workload() -> None:
    w = World(
        labels={"kueue.x-k8s.io/queue-name": "gpus", "kueue.x-k8s.io/priority-class": "high"},
        gpusPerNode=8,
        tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
    )
    w.run()
    # A missing WorkloadPriorityClass is refused like any create, and said.
    assert w.kube.workloads == {} and w.kube.pods == {}
    w.run()
    assert w.status["phase"] == "Suspended" and "WorkloadPriorityClass high" in w.status["message"]
    w.kube.priority_classes["high"] = {"metadata": {"name": "high"}, "value": 1000}
    w.reconciler._failures.clear()  # the back-off passed
    w.run()
    (wl,) = w.kube.workloads.values()
    assert wl["spec"]["priority"] == 1000 and wl["spec"]["podSets"][0]["count"] == 1
    assert wl["metadata"]["ownerReferences"][0]["uid"] == "u" and w.kube.pods == {}
    w.watch()
    w.run()
    assert w.kube.pods == {} and w.status["phase"] == "Suspended"
    # Kueue admits it on flavor h100: the pods go to its nodes, with its tolerations.
    w.kube.flavors["h100"] = {
        "metadata": {"name": "h100"},
        "spec": {
            "nodeLabels": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
            "tolerations": [{"key": "pool", "operator": "Equal", "value": "h100", "effect": "NoSchedule"}],
        },
    }
    wl["status"] = {
        "conditions": [
            {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": ""},
            {"type": "Admitted", "status": "True", "reason": "Admitted", "message": ""},
        ],
        "admission": {
            "clusterQueue": "cq",
            "podSetAssignments": [{"name": "trainer", "count": 1, "flavors": {"nvidia.com/gpu": "h100"}}],
        },
    }
    w.watch()
    w.run()
    w.watch()
    w.run()
    (pod,) = w.kube.pods.values()
    assert pod["spec"]["nodeSelector"]["nvidia.com/gpu.product"] == "NVIDIA-H100-80GB-HBM3"
    assert {"key": "pool", "operator": "Equal", "value": "h100", "effect": "NoSchedule"} in pod["spec"][
        "tolerations"
    ]
    assert any(e[1] == "Admitted" and "ClusterQueue cq" in e[2] for e in w.kube.events)
    w.watch()
    w.set_pod(0, "Succeeded")
    w.watch()
    w.run()
    assert w.status["phase"] == "Succeeded"
    w.watch()
    w.run()
    finished = [c for c in wl["status"]["conditions"] if c["type"] == "Finished"]
    assert finished and finished[0]["status"] == "True" and finished[0]["reason"] == "Succeeded"


def test_end_of_job_checkpoints_whose_create_failed_are_created_by_a_later_pass() -> None:
    """The export Checkpoint is planned on the pass that ends the job; an API error there must not lose it."""
    w = running_world()
    w.set_pod(0, "Succeeded")
    w.watch()
    create = w.kube.create_checkpoint
    failing = {"left": 1}

    def flaky(namespace: str, body: Json) -> Json:
        if failing["left"]:
            failing["left"] -= 1
            raise api_error(500, "etcdserver: request timed out")
        return create(namespace, body)

    w.kube.create_checkpoint = flaky  # type: ignore[method-assign]
    with pytest.raises(ApiException):
        w.run()
    assert w.status["phase"] == "Succeeded" and not w.kube.checkpoints
    w.watch()
    w.run()
    assert [b["spec"]["uri"] for b in w.kube.checkpoints.values()] == ["pvc://work/out/j/final"]
    w.watch()
    w.run()
    assert w.kube.calls["create_checkpoint"] == 0


def test_end_of_job_checkpoints_refused_for_good_are_told_once_and_dropped() -> None:
    w = running_world()
    w.set_pod(0, "Succeeded")
    w.watch()
    refusals = {"n": 0}

    def refuse(namespace: str, body: Json) -> Json:
        refusals["n"] += 1
        raise api_error(403, 'checkpoints "j-final" is forbidden: exceeded quota')

    w.kube.create_checkpoint = refuse  # type: ignore[method-assign]
    w.run()  # no exception: the pass completes, and says why
    assert w.status["phase"] == "Succeeded" and refusals["n"] == 1
    assert [e[1] for e in w.kube.events].count("CheckpointRefused") == 1
    assert "exceeded quota" in next(e[2] for e in w.kube.events if e[1] == "CheckpointRefused")
    assert w.metrics.jobs._phase[("ns", "j")] == "Succeeded"
    w.watch()
    w.run()
    assert refusals["n"] == 1, "a refusal for good is not retried"


def test_a_retried_end_of_job_plan_does_not_redo_what_was_done() -> None:
    from whetstone_operator.reports import FinalPlan

    w = running_world()
    job = w.kube.jobs["j"]
    final = FinalPlan("pvc://work/out/j/final", 40, True, delete=["j-step-10"], mark_pruned=["j-step-20"])
    deletes = {"left": 1}

    def flaky_delete(namespace: str, name: str) -> None:
        if deletes["left"]:
            deletes["left"] -= 1
            raise api_error(503, "the server is currently unable to handle the request")

    w.kube.delete_checkpoint = flaky_delete  # type: ignore[method-assign]
    with pytest.raises(ApiException):
        w.reconciler._sync_final(job, final)
    assert len(w.kube.checkpoints) == 1 and final.create_final is False and final.delete == ["j-step-10"]
    w.kube.checkpoints.clear()  # the user deletes the export meanwhile: it stays deleted
    w.kube.calls.clear()
    w.kube.patch_checkpoint_status = lambda ns, name, status: (_ for _ in ()).throw(api_error(404))  # type: ignore[method-assign]
    w.reconciler._sync_final(job, final)  # the prune of a Checkpoint deleted meanwhile is done, not an error
    assert not w.kube.checkpoints and w.kube.calls["create_checkpoint"] == 0
    assert final.delete == [] and final.mark_pruned == []


def test_a_new_job_whose_pods_the_watch_never_shows_still_gets_a_status() -> None:
    """write_later waits for pods on their way; a create answered AlreadyExists by an object the watch does
    not show (no labels of ours) leaves nothing on its way, and the next pass writes the status."""
    w = World()
    w.kube.refuse["pod"] = api_error(409, 'pods "j-node-0" already exists')
    w.run()
    assert w.status == {} and w.kube.calls["create_pod"] == 1
    w.watch()
    w.run()
    assert w.status["phase"] == "Pending" and w.kube.calls["patch_job_status"] == 1
