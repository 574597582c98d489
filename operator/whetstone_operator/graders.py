"""RewardGraders: the operator checks each one and says in its status whether jobs may use it.

A check validates the spec, resolves a weighted grader's children among the namespace's RewardGraders, and
runs the test cases with whetstone_graders.run_test_cases, the code `whetstone grader test` runs. User code
never runs in the operator's process: python, regex and similarity graders run in sandbox worker processes
(whetstone_graders.sandbox), and http and modelJudge graders are not called at all (the operator neither
calls user-given URLs nor reads Secrets); they are Ready once valid, with reason RemoteGraderUntested.

Decide, then act: `needs_check`, `verdict`, `status_of` and `event_of` decide (tested without a cluster);
`GraderChecker` keeps a cache of the RewardGraders from the watch, a queue of graders to check and a few
threads, and acts: one status write and one Event per change. A grader is checked when its spec changes
(metadata.generation differs from status.observedGeneration), never on a resync; a weighted grader is checked
again when one of its children appears, changes or goes away.

    graders.register(registry)     # in operator_main: the watch of rewardgraders feeds the checker
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from whetstone_api import API_GROUP, API_VERSION
from whetstone_api import reasons as R
from whetstone_api.rewardgrader import REMOTE_TYPES, RewardGraderSpec
from whetstone_graders import GraderConfigError, MissingGrader, run_test_cases
from whetstone_graders.graderset import grader_order

Json = dict[str, Any]
Key = tuple[str, str]
LOG = logging.getLogger("whetstone.operator")
PLURAL = "rewardgraders"
PENDING, FAILED = "Pending", "Failed"


@dataclass(frozen=True)
class Verdict:
    """What a check found: the phase, the Ready condition's reason, a message, and the test-case counts."""

    phase: str
    reason: str
    message: str
    passed: int | None = None
    total: int | None = None

    @property
    def ready(self) -> bool:
        return self.phase == R.READY


def generation(obj: Json) -> int:
    return int((obj.get("metadata") or {}).get("generation") or 1)


def needs_check(obj: Json) -> bool:
    """Whether the grader's status does not describe its current spec."""
    return (obj.get("status") or {}).get("observedGeneration") != generation(obj)


def children(obj: Json) -> list[str]:
    weighted = (obj.get("spec") or {}).get("weighted") or {}
    graders = weighted.get("graders") if isinstance(weighted, dict) else None
    return sorted(graders) if isinstance(graders, dict) else []


def _first_error(e: ValueError) -> str:
    """The first problem of a pydantic ValidationError (a ValueError), as spec.<field>: <message>."""
    errors = getattr(e, "errors", None)
    if not callable(errors):
        return str(e)
    err = errors()[0]
    where = ".".join(str(p) for p in err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    return f"spec.{where}: {message}" if where else f"spec: {message}"


def verdict(obj: Json, namespace_graders: Mapping[str, Json]) -> Verdict:
    """Check one RewardGrader against the RewardGraders of its namespace (by name). Runs its test cases, in
    sandbox worker processes."""
    name = obj["metadata"]["name"]
    try:
        spec = RewardGraderSpec.model_validate(obj.get("spec") or {})
    except ValueError as e:
        return Verdict(FAILED, R.REASON_INVALID_SPEC, _first_error(e))
    graders = {**namespace_graders, name: obj}
    specs: dict[str, RewardGraderSpec] = {name: spec}
    needed = [name]
    while needed:  # the children, their children, ...; each parsed once
        for child in children(graders[needed.pop()]):
            if child in specs or child not in graders:
                continue
            try:
                specs[child] = RewardGraderSpec.model_validate(graders[child].get("spec") or {})
            except ValueError as e:
                return Verdict(FAILED, R.REASON_INVALID_SPEC, f"child {child} is invalid: {_first_error(e)}")
            needed.append(child)
    try:
        order = grader_order([name], specs)
    except MissingGrader as e:
        return Verdict(PENDING, R.REASON_CHILD_MISSING, str(e))
    except GraderConfigError as e:
        return Verdict(FAILED, R.REASON_INVALID_SPEC, str(e))
    remote = [n for n in order if specs[n].type in REMOTE_TYPES]
    if remote:
        return Verdict(
            R.READY,
            R.REASON_REMOTE_UNTESTED,
            f"valid; the operator does not call {specs[remote[0]].type} graders ({remote[0]}), so their "
            "test cases run with `whetstone grader test` and in the trainer",
            None,
            len(spec.test_cases),
        )
    report = run_test_cases(name, spec, specs)
    if report.problem:
        return Verdict(FAILED, R.REASON_INVALID_SPEC, report.problem)
    if not report.cases:
        return Verdict(R.READY, R.REASON_NO_TEST_CASES, "valid and loads; no test cases", 0, 0)
    if report.ok:
        return Verdict(R.READY, R.REASON_TEST_CASES_PASSED, report.summary(), report.passed, report.total)
    return Verdict(FAILED, R.REASON_TEST_CASE_FAILED, report.summary(), report.passed, report.total)


def rfc3339(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def status_of(v: Verdict, observed: int, old: Json | None, now: datetime) -> Json:
    """The status (a merge patch: message null clears it) for verdict `v` of generation `observed`."""
    previous = next(
        (c for c in (old or {}).get("conditions") or [] if c.get("type") == R.COND_GRADER_READY), {}
    )
    condition_status = "True" if v.ready else "False"
    changed_at = previous.get("lastTransitionTime")
    if previous.get("status") != condition_status or not changed_at:
        changed_at = rfc3339(now)
    return {
        "phase": v.phase,
        "conditions": [
            {
                "type": R.COND_GRADER_READY,
                "status": condition_status,
                "reason": v.reason,
                "message": v.message,
                "lastTransitionTime": changed_at,
                "observedGeneration": observed,
            }
        ],
        "observedGeneration": observed,
        "testCasesPassed": v.passed,
        "testCasesTotal": v.total,
        "message": None if v.ready else v.message,
    }


def event_of(old: Json | None, v: Verdict) -> tuple[str, str, str] | None:
    """(type, reason, message) of the Event for this verdict, or None when nothing changed."""
    old = old or {}
    previous = next((c for c in old.get("conditions") or [] if c.get("type") == R.COND_GRADER_READY), {})
    if (old.get("phase"), previous.get("reason"), previous.get("message")) == (v.phase, v.reason, v.message):
        return None
    return ("Normal" if v.phase != FAILED else "Warning", v.reason, v.message)


def _default_api() -> Any:
    import kubernetes

    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    return kubernetes.client.ApiClient(configuration)


class GraderChecker:
    """The RewardGraders seen on the watch, a queue of those to check, and the threads that check them."""

    def __init__(
        self,
        api: Callable[[], Any] = _default_api,
        threads: int = 2,
        leading: Callable[[], bool] = lambda: True,
        check: Callable[[Json, Mapping[str, Json]], Verdict] = verdict,
    ) -> None:
        self._api_factory, self._api = api, None
        self.threads, self.leading, self.check = threads, leading, check
        self._graders: dict[Key, Json] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[Key, bool]] = queue.Queue()
        self._queued: set[Key] = set()
        self._started = False

    # --- what the watch says

    def observe(self, event_type: str | None, obj: Json) -> None:
        meta = obj.get("metadata") or {}
        key = (meta.get("namespace", ""), meta.get("name", ""))
        with self._lock:
            old = self._graders.get(key)
            if event_type == "DELETED":
                self._graders.pop(key, None)
            else:
                self._graders[key] = obj
            gone_or_changed = event_type == "DELETED" or old is None or generation(old) != generation(obj)
            parents = self._parents(key) if gone_or_changed else []
        if event_type != "DELETED" and needs_check(obj):
            self._enqueue(key, force=False)
        for parent in parents:
            self._enqueue(parent, force=True)

    def _parents(self, key: Key) -> list[Key]:
        """The weighted graders of the namespace that depend on `key`, directly or through other children."""
        namespace, name = key
        graders = {n: o for (ns, n), o in self._graders.items() if ns == namespace}
        found, frontier = set(), {name}
        while frontier:
            frontier = {p for p, o in graders.items() if set(children(o)) & frontier and p not in found}
            found |= frontier
        return [(namespace, p) for p in sorted(found)]

    def _enqueue(self, key: Key, force: bool) -> None:
        with self._lock:
            if key in self._queued:
                return
            self._queued.add(key)
            if not self._started:
                self._started = True
                for i in range(self.threads):
                    threading.Thread(target=self._work, name=f"grader-check-{i}", daemon=True).start()
        self._queue.put((key, force))

    # --- checking

    def _work(self) -> None:
        while True:
            key, force = self._queue.get()
            with self._lock:
                self._queued.discard(key)
            try:
                self.check_one(key, force)
            except Exception:
                LOG.exception("RewardGrader %s/%s: check failed; trying again in 10 s", *key)
                threading.Timer(10, self._enqueue, (key, force)).start()

    def check_one(self, key: Key, force: bool = False) -> Verdict | None:
        """Check one grader now (the worker threads call this); returns the verdict, or None if nothing
        needed checking."""
        with self._lock:
            obj = self._graders.get(key)
            namespace_graders = {n: o for (ns, n), o in self._graders.items() if ns == key[0]}
        if obj is None or not (force or needs_check(obj)) or not self.leading():
            return None
        v = self.check(obj, namespace_graders)
        with self._lock:
            latest = self._graders.get(key)
        if latest is None or generation(latest) != generation(obj):
            return None  # deleted or edited meanwhile: the newer spec has its own check queued
        old = obj.get("status") or {}
        status = status_of(v, generation(obj), old, datetime.now(UTC))
        if self._write_status(key, status) is None:
            return None
        with self._lock:  # our own write, so an event that still shows the old status re-checks nothing
            if key in self._graders:
                self._graders[key] = {**self._graders[key], "status": status}
        event = event_of(old, v)
        if event is not None:
            LOG.info(
                "RewardGrader %s/%s: %s -> %s (%s): %s", *key, old.get("phase"), v.phase, v.reason, v.message
            )
            self._post_event(obj, *event)
        return v

    # --- acting on the API server

    def api(self) -> Any:
        if self._api is None:
            self._api = self._api_factory()
        return self._api

    def _write_status(self, key: Key, status: Json) -> Json | None:
        import kubernetes

        custom = kubernetes.client.CustomObjectsApi(self.api())
        try:
            return custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, key[0], PLURAL, key[1], {"status": status}
            )
        except kubernetes.client.ApiException as e:
            if e.status == 404:
                return None
            raise

    def _post_event(self, obj: Json, event_type: str, reason: str, message: str) -> None:
        import kubernetes

        meta = obj["metadata"]
        now = rfc3339(datetime.now(UTC))
        body = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": "RewardGrader",
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "type": event_type,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": "whetstone-operator"},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            kubernetes.client.CoreV1Api(self.api()).create_namespaced_event(meta["namespace"], body)
        except kubernetes.client.ApiException as e:  # an Event is worth a log line, not a retry
            LOG.warning(
                "RewardGrader %s/%s: could not post an Event: %s", meta["namespace"], meta["name"], e.reason
            )


def register(registry: Any, checker: GraderChecker | None = None) -> GraderChecker:
    """Feed the watch of rewardgraders (kopf) to a GraderChecker; returns it."""
    import kopf

    checker = checker or GraderChecker()

    @kopf.on.event(API_GROUP, API_VERSION, PLURAL, id="rewardgrader_check", registry=registry)
    def grader_event(event: Json, **_: Any) -> None:
        checker.observe(event.get("type"), dict(event.get("object") or {}))

    return checker
