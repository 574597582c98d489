"""Every call the operator makes to the API server, in one place. Each method declares the RBAC it needs
(`@api_call(group, resource, verb)`); the operator's rules (rbac.py) are checked against these declarations
and the watched resources (tests/test_operator_rbac.py), so no rule is missing and none unused. Each call is
also counted (`calls`), which bench/operator_scale.py reads to report API calls per job.

Responses the operator does not read are not deserialised (`_preload_content=False`): parsing them into the
client's models is most of a Python client's CPU.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

import kubernetes
from kubernetes.client.rest import ApiException
from whetstone_api import API_GROUP, API_VERSION

from .kueue import GROUP as KUEUE_GROUP
from .kueue import VERSION as KUEUE_VERSION

Json = dict[str, Any]
F = TypeVar("F", bound=Callable[..., Any])

FTJ = "finetunejobs"
CKPT = "checkpoints"
COMPONENT = "whetstone-operator"

# (apiGroup, resource, verb) of every method below, by method name.
API_CALLS: dict[str, tuple[str, str, str]] = {}


def api_call(group: str, resource: str, verb: str) -> Callable[[F], F]:
    def mark(fn: F) -> F:
        API_CALLS[fn.__name__] = (group, resource, verb)

        @functools.wraps(fn)
        def counted(self: Kube, *args: Any, **kwargs: Any) -> Any:
            with self._calls_lock:
                self.calls[(resource, verb)] += 1
            if self.on_call is not None:
                self.on_call(resource, verb)
            return fn(self, *args, **kwargs)

        return counted  # type: ignore[return-value]

    return mark


def _json(resp: Any) -> Json:
    return json.loads(resp.data)


def not_found(e: Exception) -> bool:
    return isinstance(e, ApiException) and e.status == 404


class Kube:
    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        self.api = api
        self.core = kubernetes.client.CoreV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.networking = kubernetes.client.NetworkingV1Api(api)
        self.coordination = kubernetes.client.CoordinationV1Api(api)
        self.apps = kubernetes.client.AppsV1Api(api)
        self.calls: Counter[tuple[str, str]] = Counter()
        self._calls_lock = threading.Lock()
        self.on_call: Callable[[str, str], None] | None = None

    # --- discovery (a non-resource URL every authenticated user may read: no RBAC rule)

    def served_resources(self, group: str, version: str) -> set[str]:
        """The resources the API server serves in group/version; empty while the group's CRDs are missing."""
        try:
            return {r.name for r in self.custom.get_api_resources(group, version).resources}
        except ApiException as e:
            if e.status == 404:
                return set()
            raise

    # --- FineTuneJobs

    @api_call(API_GROUP, FTJ, "get")
    def get_job(self, namespace: str, name: str) -> Json | None:
        try:
            return _json(
                self.custom.get_namespaced_custom_object(
                    API_GROUP, API_VERSION, namespace, FTJ, name, _preload_content=False
                )
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    @api_call(API_GROUP, f"{FTJ}/status", "patch")
    def patch_job_status(self, namespace: str, name: str, status: Json, resource_version: str) -> Json:
        """A merge patch of .status that applies only to `resource_version` (409 Conflict otherwise): a
        decision taken on an outdated job is never written."""
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        return _json(
            self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, FTJ, name, body, _preload_content=False
            )
        )

    @api_call(API_GROUP, FTJ, "patch")
    def remove_finalizer(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> None:
        body = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        self.custom.patch_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, FTJ, name, body, _preload_content=False
        )

    @api_call(API_GROUP, FTJ, "delete")
    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                API_GROUP,
                API_VERSION,
                namespace,
                FTJ,
                name,
                body={"preconditions": {"uid": uid}},
                _preload_content=False,
            )
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    # --- pods

    @api_call("", "pods", "list")
    def list_pods(self, namespace: str, selector: str) -> list[Json]:
        resp = self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        return _json(resp).get("items", [])

    @api_call("", "pods", "create")
    def create_pod(self, namespace: str, body: Json) -> None:
        self.core.create_namespaced_pod(namespace, body, _preload_content=False)

    @api_call("", "pods", "delete")
    def delete_pod(self, namespace: str, name: str, uid: str, grace_seconds: int | None = None) -> None:
        """Delete the pod `name` only if it is still the one with `uid` (never a newer pod of that name)."""
        body: Json = {"preconditions": {"uid": uid}} if uid else {}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            self.core.delete_namespaced_pod(name, namespace, body=body, _preload_content=False)
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    # --- the job's other children

    @api_call("", "configmaps", "create")
    def create_config_map(self, namespace: str, body: Json) -> None:
        self.core.create_namespaced_config_map(namespace, body, _preload_content=False)

    @api_call("", "services", "create")
    def create_service(self, namespace: str, body: Json) -> None:
        self.core.create_namespaced_service(namespace, body, _preload_content=False)

    @api_call("networking.k8s.io", "networkpolicies", "create")
    def create_network_policy(self, namespace: str, body: Json) -> None:
        self.networking.create_namespaced_network_policy(namespace, body, _preload_content=False)

    # --- Checkpoints

    @api_call(API_GROUP, CKPT, "create")
    def create_checkpoint(self, namespace: str, body: Json) -> Json:
        return _json(
            self.custom.create_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, CKPT, body, _preload_content=False
            )
        )

    @api_call(API_GROUP, f"{CKPT}/status", "patch")
    def patch_checkpoint_status(self, namespace: str, name: str, status: Json) -> None:
        self.custom.patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, namespace, CKPT, name, {"status": status}, _preload_content=False
        )

    @api_call(API_GROUP, CKPT, "patch")
    def orphan_checkpoint(self, namespace: str, name: str) -> None:
        """Drop the ownerReference of a Checkpoint the user keeps: it outlives its job."""
        body = {"metadata": {"ownerReferences": None}}
        self.custom.patch_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, CKPT, name, body, _preload_content=False
        )

    @api_call(API_GROUP, CKPT, "delete")
    def delete_checkpoint(self, namespace: str, name: str) -> None:
        try:
            self.custom.delete_namespaced_custom_object(
                API_GROUP, API_VERSION, namespace, CKPT, name, _preload_content=False
            )
        except ApiException as e:
            if e.status != 404:
                raise

    # --- Kueue: the Workload of a queued job, and the cluster-scoped objects it refers to

    @api_call(KUEUE_GROUP, "workloads", "create")
    def create_workload(self, namespace: str, body: Json) -> None:
        self.custom.create_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, namespace, "workloads", body, _preload_content=False
        )

    @api_call(KUEUE_GROUP, "workloads", "patch")
    def patch_workload(self, namespace: str, name: str, patch: Json) -> None:
        """A merge patch of the Workload's spec (spec.active follows the job's spec.suspend)."""
        self.custom.patch_namespaced_custom_object(
            KUEUE_GROUP, KUEUE_VERSION, namespace, "workloads", name, patch, _preload_content=False
        )

    @api_call(KUEUE_GROUP, "workloads/status", "patch")
    def patch_workload_status(self, namespace: str, name: str, patch: Json) -> None:
        """A merge patch of .status carrying the resourceVersion it was computed from (kueue.py): 409 when
        Kueue wrote in between."""
        self.custom.patch_namespaced_custom_object_status(
            KUEUE_GROUP, KUEUE_VERSION, namespace, "workloads", name, patch, _preload_content=False
        )

    @api_call(KUEUE_GROUP, "resourceflavors", "get")
    def get_resource_flavor(self, name: str) -> Json | None:
        """The ResourceFlavor Kueue assigned (its node labels and tolerations place the pods); None: gone."""
        try:
            return _json(
                self.custom.get_cluster_custom_object(
                    KUEUE_GROUP, KUEUE_VERSION, "resourceflavors", name, _preload_content=False
                )
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    @api_call(KUEUE_GROUP, "workloadpriorityclasses", "get")
    def get_workload_priority_class(self, name: str) -> Json | None:
        """The WorkloadPriorityClass a job names (its value is the Workload's priority); None: missing."""
        try:
            return _json(
                self.custom.get_cluster_custom_object(
                    KUEUE_GROUP, KUEUE_VERSION, "workloadpriorityclasses", name, _preload_content=False
                )
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    # --- TrainingSessions: a Deployment and a Service each, status from the service, Checkpoints

    @api_call("apps", "deployments", "create")
    def create_deployment(self, namespace: str, body: Json) -> None:
        self.apps.create_namespaced_deployment(namespace, body, _preload_content=False)

    @api_call("apps", "deployments", "get")
    def get_deployment(self, namespace: str, name: str) -> Json | None:
        try:
            return _json(self.apps.read_namespaced_deployment(name, namespace, _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    @api_call("apps", "deployments", "patch")
    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        self.apps.patch_namespaced_deployment(
            name, namespace, {"spec": {"replicas": replicas}}, _preload_content=False
        )

    @api_call(API_GROUP, "trainingsessions/status", "patch")
    def patch_session_status(self, namespace: str, name: str, status: Json) -> None:
        self.custom.patch_namespaced_custom_object_status(
            API_GROUP,
            API_VERSION,
            namespace,
            "trainingsessions",
            name,
            {"status": status},
            _preload_content=False,
        )

    @api_call(API_GROUP, CKPT, "list")
    def list_checkpoints(self, namespace: str, selector: str) -> list[Json]:
        resp = self.custom.list_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, CKPT, label_selector=selector, _preload_content=False
        )
        return _json(resp).get("items", [])

    # --- RewardGraders

    @api_call(API_GROUP, "rewardgraders/status", "patch")
    def patch_grader_status(self, namespace: str, name: str, status: Json) -> Json | None:
        """The grader's verdict; None when it was deleted meanwhile."""
        try:
            return _json(
                self.custom.patch_namespaced_custom_object_status(
                    API_GROUP,
                    API_VERSION,
                    namespace,
                    "rewardgraders",
                    name,
                    {"status": status},
                    _preload_content=False,
                )
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    # --- nodes, events, leases

    @api_call("", "nodes", "get")
    def node_ready(self, name: str) -> bool | None:
        """Whether the node reports Ready; None when it does not exist."""
        try:
            node = _json(self.core.read_node(name, _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return None
            raise
        conditions = (node.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    @api_call("", "events", "create")
    def create_event(
        self, obj: Json, kind: str, etype: str, reason: str, message: str, instance: str
    ) -> None:
        meta = obj["metadata"]
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion", f"{API_GROUP}/{API_VERSION}"),
                "kind": kind,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": etype,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": instance[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False)

    @api_call("coordination.k8s.io", "leases", "get")
    def get_lease(self, namespace: str, name: str) -> Json | None:
        try:
            return _json(self.coordination.read_namespaced_lease(name, namespace, _preload_content=False))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    @api_call("coordination.k8s.io", "leases", "create")
    def create_lease(self, namespace: str, body: Json) -> Json:
        return _json(self.coordination.create_namespaced_lease(namespace, body, _preload_content=False))

    @api_call("coordination.k8s.io", "leases", "update")
    def replace_lease(self, namespace: str, name: str, body: Json) -> Json:
        """Update with the body's resourceVersion: 409 when another replica wrote first."""
        return _json(
            self.coordination.replace_namespaced_lease(name, namespace, body, _preload_content=False)
        )
