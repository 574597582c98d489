"""The operator's cache of what it watches, filled by the informers' watches (handlers.start_watches) and
read by the reconcile workers: the jobs as they are, and of their children only the views the lifecycle
needs. Reading the cache instead of the API server is what keeps a resync of 500 jobs cheap: a pass costs
API calls only for what changes.

Two rules keep the cache honest:
- a job's body never goes back in time: our own status writes put the server's answer here at once, and a
  watch event older than that (by resourceVersion) is ignored, so a decision is never made on a status the
  operator has already replaced;
- a pod that disappears leaves a tombstone (its last view, marked gone) for a while, so a pod that vanished
  between two passes (evicted, preempted) is still judged by what happened to it.

And one rule keeps the operator from repeating itself: a child the operator created is *expected* (client-go's
ControllerExpectations) until its watch event arrives, so a pass that runs in between (every write queues the
job again) does not create it a second time only to be told AlreadyExists. At start-up, with hundreds of jobs
queued at once, those repeated creates were three quarters of all API calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from .children import JOB_LABEL
from .views import CheckpointView, ChildView, GraderView, PodView, controller_uid

Json = dict[str, Any]
Key = tuple[str, str]  # (namespace, job name)

TOMBSTONE_SECONDS = 600.0
# A created child whose watch event has not come in this long is forgotten (the next pass creates it again,
# and AlreadyExists or the watch settles it): a watch that dropped the event must not block the job for ever.
EXPECTATION_SECONDS = 30.0


@dataclass(frozen=True)
class Expected:
    """A child created for the job with `owner_uid` (a pod: of `attempt`), not yet seen by the watch."""

    kind: str
    name: str
    owner_uid: str
    attempt: int
    at: float


def _rv(obj: Json) -> int | None:
    try:
        return int((obj.get("metadata") or {}).get("resourceVersion", ""))
    except ValueError:
        return None


def key_of(obj: Json) -> Key:
    meta = obj.get("metadata") or {}
    return meta.get("namespace", ""), meta.get("name", "")


def job_key_of(obj: Json) -> Key | None:
    """The job a labelled child belongs to (by name: ownership is judged by the lifecycle)."""
    meta = obj.get("metadata") or {}
    job = (meta.get("labels") or {}).get(JOB_LABEL)
    return (meta.get("namespace", ""), job) if job else None


class Store:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._jobs: dict[Key, Json] = {}
        self._pods: dict[Key, dict[str, PodView]] = {}
        self._tombstone_at: dict[tuple[Key, str], float] = {}
        self._children: dict[Key, dict[str, ChildView]] = {}
        self._checkpoints: dict[Key, dict[str, CheckpointView]] = {}
        self._graders: dict[Key, GraderView] = {}
        self._grader_bodies: dict[Key, Json] = {}
        self._workloads: dict[Key, dict[str, Json]] = {}
        self._expected: dict[Key, dict[tuple[str, str], Expected]] = {}

    # --- jobs

    def put_job(self, obj: Json) -> Key:
        key = key_of(obj)
        with self._lock:
            old = self._jobs.get(key)
            same = old is not None and (old.get("metadata") or {}).get("uid") == obj["metadata"].get("uid")
            new_rv, old_rv = _rv(obj), (_rv(old) if old else None)
            if same and new_rv is not None and old_rv is not None and new_rv < old_rv:
                return key  # an event from before our own write
            self._jobs[key] = obj
        return key

    def remove_job(self, obj: Json) -> Key:
        key = key_of(obj)
        with self._lock:
            old = self._jobs.get(key)
            if old is not None and old["metadata"].get("uid") == obj["metadata"].get("uid"):
                del self._jobs[key]
                self._expected.pop(key, None)
        return key

    def job(self, key: Key) -> Json | None:
        with self._lock:
            return self._jobs.get(key)

    def job_keys(self) -> list[Key]:
        with self._lock:
            return list(self._jobs)

    def jobs_in(self, namespace: str) -> Iterator[Json]:
        with self._lock:
            jobs = [j for (ns, _), j in self._jobs.items() if ns == namespace]
        yield from jobs

    # --- pods

    def put_pod(self, obj: Json) -> Key | None:
        key = job_key_of(obj)
        if key is None:
            return None
        view = PodView.of(obj)
        with self._lock:
            self._pods.setdefault(key, {})[view.name] = view
            self._tombstone_at.pop((key, view.name), None)
            self._seen(key, "Pod", view.name)
        return key

    def remove_pod(self, obj: Json) -> Key | None:
        key = job_key_of(obj)
        if key is None:
            return None
        view = PodView.of(obj)
        with self._lock:
            self._seen(key, "Pod", view.name)
            pods = self._pods.setdefault(key, {})
            current = pods.get(view.name)
            if current is not None and current.uid not in ("", view.uid):
                return key  # a newer pod of that name is already here
            pods[view.name] = PodView(**{**view.__dict__, "gone": True})
            self._tombstone_at[(key, view.name)] = time.monotonic()
        return key

    def pods(self, key: Key) -> list[PodView]:
        now = time.monotonic()
        with self._lock:
            pods = self._pods.get(key, {})
            for name in [n for n, p in pods.items() if p.gone]:
                if now - self._tombstone_at.get((key, name), now) > TOMBSTONE_SECONDS:
                    del pods[name]
                    self._tombstone_at.pop((key, name), None)
            return list(pods.values())

    def replace_pods(self, key: Key, listed: list[Json]) -> list[PodView]:
        """The pods of a fresh LIST replace the cached ones; cached pods missing from it become tombstones.
        A pod whose deletion the watch delivered while the LIST was under way stays a tombstone: the listed
        copy is older, and nothing would ever come to bury it again (the job would wait for it for ever)."""
        views = {v.name: v for v in map(PodView.of, listed)}
        now = time.monotonic()
        with self._lock:
            for name in views:
                self._seen(key, "Pod", name)
            pods = self._pods.setdefault(key, {})
            for name, old in list(pods.items()):
                if name not in views and not old.gone:
                    pods[name] = PodView(**{**old.__dict__, "gone": True})
                    self._tombstone_at[(key, name)] = now
            for name, view in views.items():
                old = pods.get(name)
                if old is not None and old.gone and old.uid and old.uid == view.uid:
                    continue
                pods[name] = view
                self._tombstone_at.pop((key, name), None)
            return list(pods.values())

    # --- ConfigMap, Service, NetworkPolicy

    def put_child(self, kind: str, obj: Json) -> Key | None:
        key = job_key_of(obj)
        if key is None or obj["metadata"].get("name") not in _child_names(key[1], kind):
            return None
        with self._lock:
            self._children.setdefault(key, {})[kind] = ChildView.of(kind, obj)
            self._seen(key, kind, obj["metadata"]["name"])
        return key

    def remove_child(self, kind: str, obj: Json) -> Key | None:
        key = job_key_of(obj)
        if key is None:
            return None
        with self._lock:
            self._seen(key, kind, obj["metadata"].get("name", ""))
            children = self._children.get(key, {})
            current = children.get(kind)
            if current is not None and current.name == obj["metadata"].get("name"):
                del children[kind]
        return key

    def children(self, key: Key) -> dict[str, ChildView]:
        with self._lock:
            return dict(self._children.get(key, {}))

    # --- children created but not yet seen by the watch

    def expect(self, key: Key, kind: str, name: str, owner_uid: str, attempt: int = 0) -> None:
        """The operator created `kind` `name` for the job with `owner_uid`: count it as there until the
        watch delivers it (or EXPECTATION_SECONDS pass)."""
        with self._lock:
            # The watch may have been quicker than the create's answer: then there is nothing to wait for.
            if kind == "Pod":
                pod = self._pods.get(key, {}).get(name)
                if pod is not None and not pod.gone and pod.owner_uid == owner_uid and pod.attempt == attempt:
                    return
            else:
                child = self._children.get(key, {}).get(kind)
                if child is not None and child.name == name and child.owner_uid == owner_uid:
                    return
            self._expected.setdefault(key, {})[(kind, name)] = Expected(
                kind, name, owner_uid, attempt, time.monotonic()
            )

    def expected(self, key: Key, owner_uid: str) -> list[Expected]:
        """The children created for the job with `owner_uid` that the watch has not delivered yet."""
        now = time.monotonic()
        with self._lock:
            pending = self._expected.get(key)
            if not pending:
                return []
            for k, e in list(pending.items()):
                if now - e.at > EXPECTATION_SECONDS:
                    del pending[k]
            return [e for e in pending.values() if e.owner_uid == owner_uid]

    def _seen(self, key: Key, kind: str, name: str) -> None:
        pending = self._expected.get(key)
        if pending is not None:
            pending.pop((kind, name), None)
            if not pending:
                del self._expected[key]

    # --- Checkpoints

    def put_checkpoint(self, obj: Json) -> Key | None:
        key = job_key_of(obj)
        if key is None:
            return None
        view = CheckpointView.of(obj)
        with self._lock:
            self._checkpoints.setdefault(key, {})[view.name] = view
        return key

    def remove_checkpoint(self, obj: Json) -> Key | None:
        key = job_key_of(obj)
        if key is None:
            return None
        with self._lock:
            self._checkpoints.get(key, {}).pop(obj["metadata"].get("name", ""), None)
        return key

    def checkpoints(self, key: Key) -> list[CheckpointView]:
        with self._lock:
            return list(self._checkpoints.get(key, {}).values())

    # --- Kueue Workloads of queued jobs (whole objects: their status is patched from them)

    def put_workload(self, obj: Json) -> Key | None:
        key = job_key_of(obj)
        if key is None:
            return None
        with self._lock:
            self._workloads.setdefault(key, {})[obj["metadata"]["name"]] = obj
        return key

    def remove_workload(self, obj: Json) -> Key | None:
        key = job_key_of(obj)
        if key is None:
            return None
        with self._lock:
            self._workloads.get(key, {}).pop(obj["metadata"].get("name", ""), None)
        return key

    def workload(self, key: Key, uid: str) -> Json | None:
        """The Workload the job with `uid` controls (one of an earlier job of that name may linger)."""
        with self._lock:
            found = [w for w in self._workloads.get(key, {}).values() if controller_uid(w["metadata"]) == uid]
        return found[0] if found else None

    # --- RewardGraders

    def put_grader(self, obj: Json) -> Key:
        key = key_of(obj)
        with self._lock:
            self._graders[key] = GraderView.of(obj)
            self._grader_bodies[key] = obj
        return key

    def remove_grader(self, obj: Json) -> Key:
        key = key_of(obj)
        with self._lock:
            self._graders.pop(key, None)
            self._grader_bodies.pop(key, None)
        return key

    def graders(self, namespace: str) -> dict[str, GraderView]:
        with self._lock:
            return {name: g for (ns, name), g in self._graders.items() if ns == namespace}

    def grader_body(self, namespace: str, name: str) -> Json | None:
        with self._lock:
            return self._grader_bodies.get((namespace, name))


def _child_names(job: str, kind: str) -> set[str]:
    from .children import config_map_name

    return {config_map_name(job)} if kind == "ConfigMap" else {job}
