"""Every call the operator makes to the API server, in one place. Each method declares the RBAC it needs
(`@api_call(group, resource, verb)`); the operator's rules (rbac.py) are checked against these declarations
and the watched resources (tests/test_operator_rbac.py), so no rule is missing and none unused. Each call is
also counted (`calls`), which bench/operator_scale.py reads to report API calls per job.

Requests never go through the kubernetes client's generated API classes: those import some 250 pydantic
model modules (about a CPU second, and seconds of start-up on a busy node, before the operator can act) and
validate each call's arguments, only to send JSON the operator already holds as dicts. Short requests go over
the operator's own keep-alive connections (transport.py) with the client's configuration (kubeconfig or
in-cluster auth, TLS, token refresh); watches, and every request where transport.py does not apply (a proxy),
through the client's ApiClient. Answers are parsed only where read.
"""

from __future__ import annotations

import functools
import json
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import kubernetes
from kubernetes.client.rest import ApiException
from whetstone_api import API_GROUP, API_VERSION

from .kueue import GROUP as KUEUE_GROUP
from .kueue import VERSION as KUEUE_VERSION
from .transport import Transport

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


def _q(segment: str) -> str:
    return quote(segment, safe="")


def api_path(group: str, version: str, plural: str, namespace: str | None = None, name: str = "") -> str:
    """The REST path of a collection (no `name`) or an object; core resources have group "". A subresource
    is appended by the caller ("/status")."""
    path = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if namespace is not None:
        path += f"/namespaces/{_q(namespace)}"
    path += f"/{plural}"
    return path + (f"/{_q(name)}" if name else "")


# Content types of patches: custom resources take merge patches; built-in kinds strategic merge patches
# (the generated client's choices for the calls this module replaced).
MERGE_PATCH = "application/merge-patch+json"
STRATEGIC_MERGE_PATCH = "application/strategic-merge-patch+json"


def not_found(e: Exception) -> bool:
    return isinstance(e, ApiException) and e.status == 404


class Kube:
    def __init__(self, api: kubernetes.client.ApiClient, transport: Transport | None = None) -> None:
        self.api = api
        self.transport = transport
        self.calls: Counter[tuple[str, str]] = Counter()
        self._calls_lock = threading.Lock()
        self.on_call: Callable[[str, str], None] | None = None

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
    ) -> Any:
        """One request with the client's auth; the answer (its bytes in .data), ApiException unless 2xx."""
        if self.transport is not None:
            data = None if body is None else json.dumps(body).encode()
            answer = self.transport.request(
                method, f"{path}?{urlencode(query)}" if query else path, data, content_type
            )
            if not 200 <= answer.status <= 299:
                raise ApiException.from_response(http_resp=answer, body=None, data=None)
            return answer
        resp = self._send(method, path, body, query, content_type)
        # Always read the answer to its end: only then does urllib3 put the connection back in the pool. An
        # answer left unread (every create's) cost a new TCP and TLS connection per request, on both sides.
        resp.read()
        resp.response.release_conn()
        if not 200 <= resp.status <= 299:
            raise ApiException.from_response(http_resp=resp, body=None, data=None)
        return resp

    def _send(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: dict[str, str] | None = None,
        content_type: str = "application/json",
        timeout: tuple[float, float] | None = None,
    ) -> Any:
        """The request sent, its answer not yet read (resp.response streams it)."""
        headers = {"Accept": "application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        # The body is left out of param_serialize: its sanitize_for_serialization walks every value of the
        # dict (a pod is some 400 of them) to convert model objects this module never sends; the REST client
        # JSON-encodes the dict itself. The bearer token (and its refresh) never reads the body.
        method, url, headers, _, _ = self.api.param_serialize(
            method,
            path,
            query_params=list(query.items()) if query else None,
            header_params=headers,
            auth_settings=["BearerToken"],
        )
        return self.api.call_api(method, url, header_params=headers, body=body, _request_timeout=timeout)

    def _get(self, path: str) -> Json | None:
        """The object at `path`; None when it does not exist."""
        try:
            return _json(self.request("GET", path))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    # --- discovery (a non-resource URL every authenticated user may read: no RBAC rule)

    def served_resources(self, group: str, version: str) -> set[str]:
        """The resources the API server serves in group/version; empty while the group's CRDs are missing."""
        try:
            listing = _json(self.request("GET", f"/apis/{group}/{version}"))
            return {r["name"] for r in listing.get("resources") or []}
        except ApiException as e:
            if e.status == 404:
                return set()
            raise

    # --- list and watch (informers.py); the RBAC of each watched resource is handlers.WATCHED's, not counted

    def list_objects(self, path: str, selector: str | None) -> tuple[list[Json], str]:
        """Every object at the collection `path` (label-selected) and the list's resourceVersion. Items get
        the list's kind and apiVersion, as the watch delivers them."""
        listing = _json(self.request("GET", path, query={"labelSelector": selector} if selector else None))
        kind = str(listing.get("kind") or "").removesuffix("List")
        api_version = listing.get("apiVersion")
        items = listing.get("items") or []
        for item in items:
            item.setdefault("kind", kind)
            item.setdefault("apiVersion", api_version)
        return items, listing["metadata"]["resourceVersion"]

    def watch_objects(
        self, path: str, selector: str | None, resource_version: str, seconds: int
    ) -> Iterator[Json]:
        """The watch events of the collection `path` from `resource_version`, with bookmarks, until the
        server ends the watch (after `seconds`)."""
        query = {
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(seconds),
        }
        if selector:
            query["labelSelector"] = selector
        resp = self._send("GET", path, query=query, timeout=(10.0, seconds + 30.0))
        try:
            if not 200 <= resp.status <= 299:
                resp.read()
                raise ApiException.from_response(http_resp=resp, body=None, data=None)
            for line in resp.response:
                if line.strip():
                    yield json.loads(line)
        finally:
            resp.response.release_conn()

    # --- FineTuneJobs

    @api_call(API_GROUP, FTJ, "get")
    def get_job(self, namespace: str, name: str) -> Json | None:
        return self._get(api_path(API_GROUP, API_VERSION, FTJ, namespace, name))

    @api_call(API_GROUP, f"{FTJ}/status", "patch")
    def patch_job_status(self, namespace: str, name: str, status: Json, resource_version: str) -> Json:
        """A merge patch of .status that applies only to `resource_version` (409 Conflict otherwise): a
        decision taken on an outdated job is never written."""
        body = {"metadata": {"resourceVersion": resource_version}, "status": status}
        path = api_path(API_GROUP, API_VERSION, FTJ, namespace, name) + "/status"
        return _json(self.request("PATCH", path, body, content_type=MERGE_PATCH))

    @api_call(API_GROUP, FTJ, "patch")
    def remove_finalizer(
        self, namespace: str, name: str, finalizers: list[str], resource_version: str
    ) -> None:
        body = {"metadata": {"finalizers": finalizers, "resourceVersion": resource_version}}
        self.request(
            "PATCH", api_path(API_GROUP, API_VERSION, FTJ, namespace, name), body, content_type=MERGE_PATCH
        )

    @api_call(API_GROUP, FTJ, "delete")
    def delete_job(self, namespace: str, name: str, uid: str) -> None:
        try:
            self.request(
                "DELETE",
                api_path(API_GROUP, API_VERSION, FTJ, namespace, name),
                {"preconditions": {"uid": uid}},
            )
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    # --- pods

    @api_call("", "pods", "list")
    def list_pods(self, namespace: str, selector: str) -> list[Json]:
        resp = self.request("GET", api_path("", "v1", "pods", namespace), query={"labelSelector": selector})
        return _json(resp).get("items", [])

    @api_call("", "pods", "create")
    def create_pod(self, namespace: str, body: Json) -> None:
        self.request("POST", api_path("", "v1", "pods", namespace), body)

    @api_call("", "pods", "delete")
    def delete_pod(self, namespace: str, name: str, uid: str, grace_seconds: int | None = None) -> None:
        """Delete the pod `name` only if it is still the one with `uid` (never a newer pod of that name)."""
        body: Json = {"preconditions": {"uid": uid}} if uid else {}
        if grace_seconds is not None:
            body["gracePeriodSeconds"] = grace_seconds
        try:
            self.request("DELETE", api_path("", "v1", "pods", namespace, name), body)
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    # --- the job's other children

    @api_call("", "configmaps", "create")
    def create_config_map(self, namespace: str, body: Json) -> None:
        self.request("POST", api_path("", "v1", "configmaps", namespace), body)

    @api_call("", "services", "create")
    def create_service(self, namespace: str, body: Json) -> None:
        self.request("POST", api_path("", "v1", "services", namespace), body)

    @api_call("networking.k8s.io", "networkpolicies", "create")
    def create_network_policy(self, namespace: str, body: Json) -> None:
        self.request("POST", api_path("networking.k8s.io", "v1", "networkpolicies", namespace), body)

    # --- Checkpoints

    @api_call(API_GROUP, CKPT, "create")
    def create_checkpoint(self, namespace: str, body: Json) -> Json:
        return _json(self.request("POST", api_path(API_GROUP, API_VERSION, CKPT, namespace), body))

    @api_call(API_GROUP, f"{CKPT}/status", "patch")
    def patch_checkpoint_status(self, namespace: str, name: str, status: Json) -> None:
        path = api_path(API_GROUP, API_VERSION, CKPT, namespace, name) + "/status"
        self.request("PATCH", path, {"status": status}, content_type=MERGE_PATCH)

    @api_call(API_GROUP, CKPT, "patch")
    def orphan_checkpoint(self, namespace: str, name: str) -> None:
        """Drop the ownerReference of a Checkpoint the user keeps: it outlives its job."""
        body = {"metadata": {"ownerReferences": None}}
        self.request(
            "PATCH", api_path(API_GROUP, API_VERSION, CKPT, namespace, name), body, content_type=MERGE_PATCH
        )

    @api_call(API_GROUP, CKPT, "delete")
    def delete_checkpoint(self, namespace: str, name: str) -> None:
        try:
            self.request("DELETE", api_path(API_GROUP, API_VERSION, CKPT, namespace, name))
        except ApiException as e:
            if e.status != 404:
                raise

    # --- Kueue: the Workload of a queued job, and the cluster-scoped objects it refers to

    @api_call(KUEUE_GROUP, "workloads", "create")
    def create_workload(self, namespace: str, body: Json) -> None:
        self.request("POST", api_path(KUEUE_GROUP, KUEUE_VERSION, "workloads", namespace), body)

    @api_call(KUEUE_GROUP, "workloads", "patch")
    def patch_workload(self, namespace: str, name: str, patch: Json) -> None:
        """A merge patch of the Workload's spec (spec.active follows the job's spec.suspend)."""
        path = api_path(KUEUE_GROUP, KUEUE_VERSION, "workloads", namespace, name)
        self.request("PATCH", path, patch, content_type=MERGE_PATCH)

    @api_call(KUEUE_GROUP, "workloads/status", "patch")
    def patch_workload_status(self, namespace: str, name: str, patch: Json) -> None:
        """A merge patch of .status carrying the resourceVersion it was computed from (kueue.py): 409 when
        Kueue wrote in between."""
        path = api_path(KUEUE_GROUP, KUEUE_VERSION, "workloads", namespace, name) + "/status"
        self.request("PATCH", path, patch, content_type=MERGE_PATCH)

    @api_call(KUEUE_GROUP, "resourceflavors", "get")
    def get_resource_flavor(self, name: str) -> Json | None:
        """The ResourceFlavor Kueue assigned (its node labels and tolerations place the pods); None: gone."""
        return self._get(api_path(KUEUE_GROUP, KUEUE_VERSION, "resourceflavors", None, name))

    @api_call(KUEUE_GROUP, "workloadpriorityclasses", "get")
    def get_workload_priority_class(self, name: str) -> Json | None:
        """The WorkloadPriorityClass a job names (its value is the Workload's priority); None: missing."""
        return self._get(api_path(KUEUE_GROUP, KUEUE_VERSION, "workloadpriorityclasses", None, name))

    # --- TrainingSessions: a Deployment and a Service each, status from the service, Checkpoints

    @api_call("apps", "deployments", "create")
    def create_deployment(self, namespace: str, body: Json) -> None:
        self.request("POST", api_path("apps", "v1", "deployments", namespace), body)

    @api_call("apps", "deployments", "get")
    def get_deployment(self, namespace: str, name: str) -> Json | None:
        return self._get(api_path("apps", "v1", "deployments", namespace, name))

    @api_call("apps", "deployments", "patch")
    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        path = api_path("apps", "v1", "deployments", namespace, name)
        self.request("PATCH", path, {"spec": {"replicas": replicas}}, content_type=STRATEGIC_MERGE_PATCH)

    @api_call(API_GROUP, "trainingsessions/status", "patch")
    def patch_session_status(self, namespace: str, name: str, status: Json) -> None:
        path = api_path(API_GROUP, API_VERSION, "trainingsessions", namespace, name) + "/status"
        self.request("PATCH", path, {"status": status}, content_type=MERGE_PATCH)

    @api_call(API_GROUP, CKPT, "list")
    def list_checkpoints(self, namespace: str, selector: str) -> list[Json]:
        resp = self.request(
            "GET", api_path(API_GROUP, API_VERSION, CKPT, namespace), query={"labelSelector": selector}
        )
        return _json(resp).get("items", [])

    # --- RewardGraders

    @api_call(API_GROUP, "rewardgraders/status", "patch")
    def patch_grader_status(self, namespace: str, name: str, status: Json) -> Json | None:
        """The grader's verdict; None when it was deleted meanwhile."""
        path = api_path(API_GROUP, API_VERSION, "rewardgraders", namespace, name) + "/status"
        try:
            return _json(self.request("PATCH", path, {"status": status}, content_type=MERGE_PATCH))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    # --- nodes, events, leases

    @api_call("", "nodes", "get")
    def node_ready(self, name: str) -> bool | None:
        """Whether the node reports Ready; None when it does not exist."""
        node = self._get(api_path("", "v1", "nodes", None, name))
        if node is None:
            return None
        conditions = (node.get("status") or {}).get("conditions") or []
        return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)

    @api_call("", "events", "create")
    def create_event(
        self,
        obj: Json,
        kind: str,
        etype: str,
        reason: str,
        message: str,
        instance: str,
        when: datetime | None = None,
    ) -> None:
        meta = obj["metadata"]
        now = (when or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
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
        self.request("POST", api_path("", "v1", "events", meta["namespace"]), body)

    @api_call("coordination.k8s.io", "leases", "get")
    def get_lease(self, namespace: str, name: str) -> Json | None:
        return self._get(api_path("coordination.k8s.io", "v1", "leases", namespace, name))

    @api_call("coordination.k8s.io", "leases", "create")
    def create_lease(self, namespace: str, body: Json) -> Json:
        return _json(self.request("POST", api_path("coordination.k8s.io", "v1", "leases", namespace), body))

    @api_call("coordination.k8s.io", "leases", "update")
    def replace_lease(self, namespace: str, name: str, body: Json) -> Json:
        """Update with the body's resourceVersion: 409 when another replica wrote first."""
        return _json(
            self.request("PUT", api_path("coordination.k8s.io", "v1", "leases", namespace, name), body)
        )
