"""The FineTuneJob operator: observe (the watch cache), plan (lifecycle.py), act, report.

The story of a job, as the operator sees it:

- list-then-watch threads (informers.py) fill the cache (store.py) with the jobs, their pods, ConfigMaps,
  Services, NetworkPolicies and Checkpoints (server-side selected by label) and the RewardGraders; every
  change of one of them queues its job (workqueue.py), so Running, a failure, a disruption, success, a
  deleted child or a grader turning Ready are noticed when they happen;
- a resync thread (not a kopf timer, so jobs carry no finalizer and `kubectl delete` never waits for the
  operator) queues every job every `resync` seconds anyway, because watch streams can miss events;
- a worker takes a job, plans from the cache, re-plans on a fresh read of the job and its pods when the
  plan would delete or end something, writes the status (only what changed, only onto the resourceVersion it
  planned from), then acts: creates what is missing, deletes what must go, mirrors the trainer's report into
  Checkpoints;
- rank 0's /status is read by a separate poll pool (poller.py) for Running jobs only; the result waits for
  the job's next pass.

Children have deterministic names and a controller ownerReference; AlreadyExists counts as done, and an object
of ours by name but not by owner is never adopted. A create the API server refuses is retried with back-off
and reported (Created=False, Stalled, a Warning Event).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import Executor, wait
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.rest import ApiException
from whetstone_api import API_GROUP, API_VERSION
from whetstone_api import reasons as R
from whetstone_api.wire import final_report_of

from . import children, kueue, lifecycle, reports
from .children import JOB_LABEL, MANAGED_BY, MANAGED_BY_LABEL
from .config import OperatorConfig
from .events import EventRecorder
from .informers import Informer
from .kube import Kube, api_path
from .lifecycle import CreateFailure, Observed
from .metrics import OperatorMetrics
from .poller import StatusPoller
from .rendezvous import pod_name
from .store import Key, Store
from .views import ChildView, PodView, parse_time
from .workqueue import WorkQueue

Json = dict[str, Any]
LOG = logging.getLogger("whetstone.operator")

# Finalizers earlier versions of the operator put on jobs (kopf's, for the resync timer): removed on sight.
LEGACY_FINALIZERS = ("whetstone.dev/finalizer", "kopf.zalando.org/KopfFinalizerMarker")
# Back-off of a refused create: 5 s doubling to 5 minutes.
CREATE_BACKOFF = (5.0, 300.0)
CHILD_SELECTOR = f"{MANAGED_BY_LABEL}={MANAGED_BY},{JOB_LABEL}"


@dataclass(frozen=True)
class Watched:
    """A resource the operator watches (list + watch in RBAC), with its server-side label selector."""

    group: str
    version: str
    plural: str
    selector: str | None = None


WATCHED = (
    Watched(API_GROUP, API_VERSION, "finetunejobs"),
    Watched(API_GROUP, API_VERSION, "rewardgraders"),
    Watched(API_GROUP, API_VERSION, "checkpoints", CHILD_SELECTOR),
    Watched("", "v1", "pods", CHILD_SELECTOR),
    Watched("", "v1", "configmaps", CHILD_SELECTOR),
    Watched("", "v1", "services", CHILD_SELECTOR),
    Watched("networking.k8s.io", "v1", "networkpolicies", CHILD_SELECTOR),
    # Only where Kueue is installed (register's `kueue`): its answer to a queued job is noticed at once.
    Watched(kueue.GROUP, kueue.VERSION, kueue.WORKLOADS, CHILD_SELECTOR),
)
CHILD_KINDS = {"configmaps": "ConfigMap", "services": "Service", "networkpolicies": "NetworkPolicy"}


def server_message(e: Exception) -> str:
    """The API server's own message of a refusal (or the client's, for a body it would not send)."""
    if isinstance(e, ApiException):
        try:
            return str(json.loads(e.body or "{}").get("message") or e.reason)
        except ValueError:
            return f"{e.status} {e.reason}"
    return " ".join(str(e).split())[:1024]


def _last_writer(obj: Json | None) -> str:
    """The field manager of the latest write of `obj` (who changed it), for the log."""
    fields = (obj or {}).get("metadata", {}).get("managedFields") or []
    latest = max(fields, key=lambda f: f.get("time") or "", default={})
    return (
        f"{latest.get('manager', '?')} {latest.get('operation', '')} {latest.get('subresource', '')}".strip()
    )


class Reconciler:
    """Carries out the lifecycle's plans against the API server."""

    def __init__(
        self,
        config: OperatorConfig,
        kube: Kube,
        store: Store,
        metrics: OperatorMetrics,
        poller: StatusPoller | None = None,
        leading: Callable[[], bool] = lambda: True,
        identity: str = "whetstone-operator",
        pool: Executor | None = None,
        events: EventRecorder | None = None,
    ) -> None:
        self.config, self.kube, self.store, self.metrics = config, kube, store, metrics
        # Threads for a pass's independent calls (a job's children); None: one after another.
        self.pool = pool
        # Events go out in the background (events.py); None: posted by the pass itself.
        self.events = events
        self.poller = poller
        self.leading = leading
        self.identity = identity
        self._failures: dict[str, tuple[CreateFailure, int]] = {}
        self._refusals_told: dict[str, set[str]] = {}
        self._seen_running: set[str] = set()
        # A finished job's end-of-job Checkpoints (export, kept-at-end) whose creation failed: planned only on
        # the pass that ended the job, so kept here until a later pass created them (lost on a restart).
        self._finals_due: dict[str, reports.FinalPlan] = {}
        # New jobs whose first pass created without writing (Plan.write_later).
        self._started: set[str] = set()
        self._lock = threading.Lock()

    # --- the pass

    def reconcile(self, key: Hashable) -> float | None:
        """One pass over the job `key` = (namespace, name); returns when to come back (seconds), if ever."""
        started = time.monotonic()
        try:
            again = self._reconcile(key)  # type: ignore[arg-type]
            self.metrics.reconciles.labels("FineTuneJob", "ok").inc()
            return again
        except Exception:
            self.metrics.reconciles.labels("FineTuneJob", "error").inc()
            raise
        finally:
            self.metrics.reconcile_duration.labels("FineTuneJob").observe(time.monotonic() - started)

    def observe(self, job: Json, key: Key) -> Observed:
        spec = job["spec"]
        kinds = lifecycle.CHILD_KINDS if self.config.children.network_policy else ("ConfigMap", "Service")
        graders = self.store.graders(key[0]) if spec.get("method") == "rft" else {}
        failure = self._failures.get(job["metadata"]["uid"])
        queued = kueue.queue_name(job) is not None
        children = self.store.children(key)
        for e in self.store.expected(key, job["metadata"]["uid"]):
            # Created by an earlier pass, not yet delivered by the watch: there, and ours.
            if e.kind in lifecycle.CHILD_KINDS and e.kind not in children:
                children[e.kind] = ChildView(e.kind, e.name, e.owner_uid)
        return Observed(
            pods=self.store.pods(key),
            children=children,
            graders=graders,
            create_failure=failure[0] if failure else None,
            child_kinds=kinds,
            workload=self.store.workload(key, job["metadata"]["uid"]) if queued else None,
            kueue_served=self.config.kueue,
        )

    def _reconcile(self, key: Key) -> float | None:
        job = self.store.job(key)
        if job is None or not self.leading():
            return None
        meta = job["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        self._drop_legacy_finalizers(job)
        if meta.get("deletionTimestamp"):
            return None
        now = datetime.now(UTC)
        seen = self.observe(job, key)
        plan = lifecycle.plan(job, seen, now)
        if plan.write_later:
            # A new job: create now, write the status when the watch brings its pods (Plan.write_later). Only
            # while they are on their way: pods the watch never shows (a create answered AlreadyExists by an
            # object without our labels) must not leave the job without any status.
            coming = any(e.kind == "Pod" for e in self.store.expected(key, uid))
            if uid not in self._started or coming:
                self._started.add(uid)
                return self._act(job, key, plan, seen)
        if plan.destructive:
            # Deleting pods or ending the job: decide again on a fresh read of the job and its pods.
            fresh = self.kube.get_job(namespace, name)
            if (
                fresh is None
                or fresh["metadata"].get("uid") != uid
                or fresh["metadata"].get("deletionTimestamp")
            ):
                return None
            self.store.put_job(fresh)
            job = self.store.job(key) or fresh
            listed = self.kube.list_pods(namespace, f"{JOB_LABEL}={name}")
            seen = replace(seen, pods=self.store.replace_pods(key, listed))
            plan = lifecycle.plan(job, seen, now)
        status = job.get("status") or {}
        old_phase = status.get("phase")
        patch: Json = dict(plan.status)
        phase = plan.phase or old_phase
        checkpoints = self.store.checkpoints(key)

        report_plan = None
        if phase == R.RUNNING and not plan.delete_pods and not plan.restarted:
            report_plan = self._use_report(job, seen, status, patch, now)
        final = None
        if plan.phase == R.SUCCEEDED:
            final = self._finish(job, status, patch, checkpoints, seen, now)
        if plan.snapshot_graders and not status.get("graders"):
            patch["graders"] = [
                {
                    "name": g.name,
                    "resourceVersion": g.resource_version,
                    "generation": g.generation,
                    **({"secretName": g.secrets[0]} if g.secrets else {}),
                }
                for g in plan.snapshot_graders
            ]

        if patch:
            if not self.leading():
                return None
            try:
                job = self.kube.patch_job_status(namespace, name, patch, meta["resourceVersion"])
            except ApiException as e:
                if e.status == 404:
                    return None
                if e.status == 409:
                    # Someone (another replica, a user) wrote since: plan again on the newer object.
                    fresh = self.kube.get_job(namespace, name)
                    LOG.info(
                        "FineTuneJob %s/%s: changed since resourceVersion %s (now %s, by %s); planning again",
                        namespace,
                        name,
                        meta["resourceVersion"],
                        (fresh or {}).get("metadata", {}).get("resourceVersion"),
                        _last_writer(fresh),
                    )
                    if fresh is not None:
                        self.store.put_job(fresh)
                    return 0.0
                raise
            self.store.put_job(job)
        if plan.phase and plan.phase != old_phase:
            self._announce(job, old_phase, plan)
        for event in plan.events:
            self._event(job, *event)
        if "progress" in patch:
            self.metrics.set_progress(namespace, name, patch["progress"])

        again = self._act(job, key, plan, seen)
        if phase:
            self.metrics.jobs.set(namespace, name, phase)
        self._sync_checkpoints(job, report_plan, checkpoints)
        if final is not None:
            self._finals_due[uid] = final
        if phase == R.SUCCEEDED and uid in self._finals_due:
            self._sync_final(job, self._finals_due[uid])
            self._finals_due.pop(uid, None)
        return again if again is not None else plan.requeue_after

    # --- the trainer's report

    def _use_report(self, job: Json, seen: Observed, status: Json, patch: Json, now: datetime):
        """Start a /status read of rank 0 when one is due; use the last finished one."""
        if self.poller is None:
            return None
        meta = job["metadata"]
        pkey = (meta["namespace"], meta["name"], meta["uid"])
        attempt = lifecycle.current_attempt(status)
        master = next(
            (
                p
                for p in seen.pods
                if p.owner_uid == meta["uid"]
                and p.rank == 0
                and p.attempt == attempt
                and p.live
                and p.phase == "Running"
            ),
            None,
        )
        if master is not None and master.ip and self.poller.due(pkey, self.config.progress_seconds):
            self.poller.request(pkey, master.ip, self.config.children.status_port)
        result = self.poller.take(pkey)
        if result is None:
            return None
        report = result.report
        if report is None:
            LOG.debug(
                "FineTuneJob %s/%s: /status unusable: %s", meta["namespace"], meta["name"], result.error
            )
            return None
        # A trainer that is still starting reports step 0; only a training one has progress to tell.
        if report.job != meta["name"] or report.phase not in ("Training", "Finished"):
            return None
        progress = reports.progress_from(report, now)
        if reports.progress_due(
            status, now, self.config.progress_seconds, progress, report.phase == "Finished"
        ):
            patch["progress"] = progress
        plan = reports.checkpoints_from_report(
            job, report, self.store.checkpoints((meta["namespace"], meta["name"]))
        )
        if plan.latest and status.get("latestCheckpoint") != plan.latest:
            patch["latestCheckpoint"] = plan.latest
        return plan

    def _finish(
        self, job: Json, status: Json, patch: Json, checkpoints: list, seen: Observed, now: datetime
    ) -> reports.FinalPlan:
        """On success: status.outputUri and the final progress (rank 0's final report from its termination
        message, when the job ended between two reads of /status); the export Checkpoint follows after the
        write."""
        progress = dict(status.get("progress") or {})
        attempt = patch.get("attempt") or status.get("attempt")
        for pod in seen.pods:
            report = final_report_of(pod.termination_message) if pod.rank == 0 else None
            if report is not None and (attempt is None or pod.attempt == attempt):
                progress = {**progress, **reports.progress_from(report, now)}
                break
        total = progress.get("totalSteps")
        if total is not None:
            progress.update(step=total, steps=f"{total}/{total}", etaSeconds=0)
        if progress != (status.get("progress") or {}):
            patch["progress"] = progress
        final = reports.final_from({**job, "status": {**status, **patch}}, checkpoints)
        patch["outputUri"] = final.output
        return final

    # --- acting

    def _act(self, job: Json, key: Key, plan: lifecycle.Plan, seen: Observed) -> float | None:
        meta = job["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        views = {p.name: p for p in seen.pods}
        for pod in plan.delete_pods:
            view = views.get(pod)
            self.kube.delete_pod(namespace, pod, view.uid if view else "")
        for view in plan.force_delete:
            self._force_delete(job, view)
        again = self._sync_workload(job, key, plan)
        if plan.create_children or plan.create_pods:
            again = self._create_children(job, key, plan, seen)
        if plan.delete_job:
            LOG.info("FineTuneJob %s/%s: ttlSecondsAfterFinished reached, deleting the job", namespace, name)
            self.kube.delete_job(namespace, name, uid)
        return again

    # --- Kueue

    def _sync_workload(self, job: Json, key: Key, plan: lifecycle.Plan) -> float | None:
        """The plan's Kueue part: the job's Workload created, (de)activated with spec.suspend, its quota given
        back after an eviction once the pods are gone, marked Finished when the job ended."""
        meta = job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if plan.create_workload:
            workload = ("Workload", self.kube.create_workload, lambda: self._workload_body(job), 0)
            if self._create_all(job, [workload]):
                with self._lock:
                    self._failures.pop(meta["uid"], None)
                LOG.info("FineTuneJob %s/%s: queued in LocalQueue %s", namespace, name, kueue.queue_name(job))
            return None
        workload = self.store.workload(key, meta["uid"])
        if workload is None:
            return None
        wname = workload["metadata"]["name"]
        if plan.workload_active is not None:
            self.kube.patch_workload(namespace, wname, {"spec": {"active": plan.workload_active}})
        now = datetime.now(UTC)
        if plan.release_workload:
            patch, what = kueue.release_patch(workload, now), "gave its quota back"
        elif plan.finish_workload is not None:
            succeeded, message = plan.finish_workload
            patch, what = kueue.finished_patch(workload, succeeded, message, now), "is Finished"
        else:
            return None
        try:
            self.kube.patch_workload_status(namespace, wname, patch)
        except ApiException as e:
            if e.status == 409:
                return 1.0  # Kueue wrote in between: decide again on its newer Workload (the watch brings it)
            if e.status != 404:
                raise
            return None
        LOG.info("FineTuneJob %s/%s: Workload %s %s", namespace, name, wname, what)
        return None

    def _workload_body(self, job: Json) -> Json:
        """The Workload of a queued job: its pods' scheduling fields, and the priority of the
        WorkloadPriorityClass it names (a missing one is refused like any create, and reported)."""
        attempt = lifecycle.current_attempt(job.get("status") or {})
        pod = children.trainer_pod(job, 0, attempt, self.config.children)
        priority = None
        wpc = kueue.priority_class(job)
        if wpc is not None:
            found = self.kube.get_workload_priority_class(wpc)
            if found is None:
                raise ValueError(
                    f"WorkloadPriorityClass {wpc} (label {kueue.PRIORITY_CLASS_LABEL}) does not exist"
                )
            priority = kueue.priority_of(found)
        return kueue.workload_for(job, pod, priority)

    def _placement(self, job: Json, key: Key) -> kueue.Placement:
        """Where Kueue reserved the quota: the node labels and tolerations of the assigned ResourceFlavors."""
        workload = self.store.workload(key, job["metadata"]["uid"])
        if workload is None:
            raise ValueError("its Kueue Workload is gone")
        view = kueue.WorkloadView.of(workload)
        flavors = {}
        for name in view.flavors:
            found = self.kube.get_resource_flavor(name)
            if found is not None:
                flavors[name] = found
        try:
            return kueue.placement(view, flavors)
        except KeyError as e:
            raise ValueError(str(e.args[0])) from e

    def _force_delete(self, job: Json, pod: PodView) -> None:
        """A pod still there past its grace period (plus a margin): force-delete it only when its node is
        gone or not Ready (a live kubelet is still stopping it, and two copies of one rank must never run)."""
        try:
            ready = self.kube.node_ready(pod.node) if pod.node else None
        except ApiException as e:
            LOG.warning("node %s of pod %s: %s %s", pod.node, pod.name, e.status, e.reason)
            return
        if ready:
            return
        self.kube.delete_pod(job["metadata"]["namespace"], pod.name, pod.uid, grace_seconds=0)
        state = "gone" if ready is None else "not ready"
        message = f"pod {pod.name} was stuck terminating on node {pod.node or '?'} ({state}): force-deleted"
        LOG.warning("FineTuneJob %s/%s: %s", job["metadata"]["namespace"], job["metadata"]["name"], message)
        self._event(job, "Warning", R.EVENT_FORCE_DELETED, message)

    def _create_children(self, job: Json, key: Key, plan: lifecycle.Plan, seen: Observed) -> float | None:
        meta, status = job["metadata"], job.get("status") or {}
        namespace, uid = meta["namespace"], meta["uid"]
        settings = self.config.children
        graders = []
        for g in plan.snapshot_graders:
            body = self.store.grader_body(namespace, g.name)
            if body is None:
                return 1.0
            graders.append(body)
        builders = {
            "ConfigMap": (self.kube.create_config_map, lambda: children.config_map(job, graders)),
            "Service": (self.kube.create_service, lambda: children.headless_service(job, settings)),
            "NetworkPolicy": (
                self.kube.create_network_policy,
                lambda: children.network_policy(job, settings),
            ),
        }
        # The ConfigMap, Service and NetworkPolicy at once, then the pods (they mount the ConfigMap) at once.
        if not self._create_all(job, [(kind, *builders[kind], 0) for kind in plan.create_children]):
            return 0.0
        if plan.create_pods:
            attempt = lifecycle.current_attempt(status)
            secrets = [g["secretName"] for g in status.get("graders") or [] if g.get("secretName")]
            present = {
                p.name for p in seen.pods if not p.gone and p.owner_uid == uid and p.attempt == attempt
            }
            present |= {
                e.name for e in self.store.expected(key, uid) if e.kind == "Pod" and e.attempt == attempt
            }
            # A queued job's pods go where Kueue reserved its quota (a problem is refused like a create).
            where: kueue.Placement | None = None
            problem = ""
            if kueue.queue_name(job) is not None:
                try:
                    where = self._placement(job, key)
                except ValueError as e:
                    problem = str(e)

            def build(rank: int) -> Json:
                if problem:
                    raise ValueError(problem)
                pod = children.trainer_pod(job, rank, attempt, settings, secrets)
                return kueue.apply_placement(pod, where) if where is not None else pod

            ranks = [
                r for r in range(int(job["spec"].get("nodes", 1))) if pod_name(meta["name"], r) not in present
            ]
            pods = [("Pod", self.kube.create_pod, lambda rank=rank: build(rank), attempt) for rank in ranks]
            if not self._create_all(job, pods):
                return 0.0
        with self._lock:
            had = self._failures.pop(uid, None)
        if had is not None:
            LOG.info("FineTuneJob %s/%s: created what the API server refused before", namespace, meta["name"])
            return 0.0  # write Created=True at once
        return None

    def _create_all(
        self, job: Json, creates: list[tuple[str, Callable[[str, Json], Any], Callable[[], Json], int]]
    ) -> bool:
        """Create several children at once (in the create pool, when there is one): a job's start costs one
        round trip per wave instead of one per child. One refusal is remembered per pass (the first in the
        given order), so the back-off grows by one step per pass as with one create at a time."""
        refusals = self._concurrently([lambda c=c: self._try_create(job, *c) for c in creates])
        refused = [r for r in refusals if r is not None]
        if refused:
            self._refused(job, refused[0])
        return not refused

    def _concurrently(self, calls: list[Callable[[], Any]]) -> list[Any]:
        """The calls' results in order; run in the create pool (all finished before this returns)."""
        if self.pool is None or len(calls) < 2:
            return [call() for call in calls]
        futures = [self.pool.submit(call) for call in calls]
        wait(futures)
        return [f.result() for f in futures]

    def _try_create(
        self,
        job: Json,
        kind: str,
        create: Callable[[str, Json], Any],
        build: Callable[[], Json],
        attempt: int = 0,
    ) -> str | None:
        """None when the child was created (then expected until the watch delivers it, store.py) or exists;
        else the refusal, naming the child."""
        meta = job["metadata"]
        body: Json | None = None
        try:
            body = build()
            create(meta["namespace"], body)
            if kind == "Pod" or kind in lifecycle.CHILD_KINDS:
                key = (meta["namespace"], meta["name"])
                self.store.expect(key, kind, body["metadata"]["name"], meta["uid"], attempt)
            return None
        except ApiException as e:
            if e.status == 409:
                return None
            refusal = server_message(e)
        except (ValueError, TypeError) as e:  # a body the client will not send (pydantic's ValidationError)
            refusal = server_message(e)
        child = ((body or {}).get("metadata") or {}).get("name") or meta["name"]
        return f"{kind} {child}: {refusal}"

    def _refused(self, job: Json, message: str) -> None:
        meta = job["metadata"]
        now = datetime.now(UTC)
        with self._lock:
            previous = self._failures.get(meta["uid"])
            n = previous[1] + 1 if previous else 0
            delay = min(CREATE_BACKOFF[0] * 2**n, CREATE_BACKOFF[1])
            since = previous[0].since if previous else now
            self._failures[meta["uid"]] = (CreateFailure(message, since, now + timedelta(seconds=delay)), n)
        LOG.warning(
            "FineTuneJob %s/%s: create refused (retry in %.0f s): %s",
            meta["namespace"],
            meta["name"],
            delay,
            message,
        )

    def _drop_legacy_finalizers(self, job: Json) -> None:
        meta = job["metadata"]
        finalizers = meta.get("finalizers") or []
        kept = [f for f in finalizers if f not in LEGACY_FINALIZERS]
        if kept == finalizers or not self.leading():
            return
        try:
            self.kube.remove_finalizer(meta["namespace"], meta["name"], kept, meta["resourceVersion"])
            LOG.info(
                "FineTuneJob %s/%s: removed the finalizer of an earlier operator version",
                meta["namespace"],
                meta["name"],
            )
        except ApiException as e:
            if e.status not in (404, 409):
                raise

    # --- Checkpoints

    def _sync_checkpoints(self, job: Json, plan: reports.CheckpointPlan | None, existing: list) -> None:
        meta = job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        orphan = set(reports.keep_annotated(job, existing))
        if plan is not None:
            for c in plan.create:
                self._create_reported(job, c.step, c.uri, c.kind, c.metrics)
            orphan |= set(plan.orphan)
        for cname in sorted(orphan):
            self.kube.orphan_checkpoint(namespace, cname)
            LOG.info(
                "FineTuneJob %s/%s: Checkpoint %s kept (no longer owned by the job)", namespace, name, cname
            )
        if plan is not None:
            for cname in plan.delete:
                self.kube.delete_checkpoint(namespace, cname)
            for cname in plan.mark_pruned:
                self._mark_pruned(namespace, cname)
            self._tell_refused(job, plan.refused)

    def _sync_final(self, job: Json, final: reports.FinalPlan) -> None:
        """The end-of-job Checkpoints: the export, those kept or pruned after the last report. Each item
        leaves `final` once carried out, so a pass that failed half-way is resumed by the next one without
        redoing (or undoing what the user did since) the part that was done. A request the API server refuses
        for good (4xx) is told as a Warning Event and dropped; other errors raise (a later pass retries)."""
        namespace = job["metadata"]["namespace"]
        if final.refused:
            self._tell_refused(job, [final.refused])
            final.refused = None
        try:
            if final.create_final:
                body = children.checkpoint_resource(job, final.step, final.output, "export")
                self._create_checkpoint(namespace, body)
                final.create_final = False
            while final.create:
                step, uri = final.create[0]
                self._create_reported(job, step, uri, "resumable", None)
                final.create.pop(0)
            while final.delete:
                self.kube.delete_checkpoint(namespace, final.delete[0])
                final.delete.pop(0)
            while final.mark_pruned:
                self._mark_pruned(namespace, final.mark_pruned[0])
                final.mark_pruned.pop(0)
        except ApiException as e:
            if e.status is None or e.status >= 500 or e.status == 429:
                raise
            self._tell_refused(job, [f"end-of-job Checkpoints not recorded: {server_message(e)}"])

    def _create_reported(
        self, job: Json, step: int, uri: str, kind: str, metrics: dict[str, float] | None
    ) -> None:
        meta = job["metadata"]
        body = children.checkpoint_resource(job, step, uri, kind, metrics)
        if self._create_checkpoint(meta["namespace"], body):
            LOG.info(
                "FineTuneJob %s/%s: checkpoint %s at step %s",
                meta["namespace"],
                meta["name"],
                body["metadata"]["name"],
                step,
            )

    def _mark_pruned(self, namespace: str, cname: str) -> None:
        try:
            self.kube.patch_checkpoint_status(namespace, cname, {"phase": R.CHECKPOINT_PRUNED})
        except ApiException as e:
            if e.status != 404:  # deleted meanwhile: nothing left to mark
                raise

    def _tell_refused(self, job: Json, messages: list[str]) -> None:
        told = self._refusals_told.setdefault(job["metadata"]["uid"], set())
        for message in messages:
            if message not in told:
                told.add(message)
                self._event(job, "Warning", R.EVENT_CHECKPOINT_REFUSED, message)

    def _create_checkpoint(self, namespace: str, body: Json) -> bool:
        try:
            created = self.kube.create_checkpoint(namespace, body)
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        # The trainer reports only what it finished writing: the checkpoint is in storage now.
        status = {
            "phase": R.CHECKPOINT_AVAILABLE,
            "createdTime": lifecycle.rfc3339(datetime.now(UTC)),
            "observedGeneration": created["metadata"].get("generation", 1),
        }
        self.kube.patch_checkpoint_status(namespace, body["metadata"]["name"], status)
        self.metrics.checkpoints.labels(namespace).inc()
        return True

    # --- telling

    def _announce(self, job: Json, old: str | None, plan: lifecycle.Plan) -> None:
        meta = job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        events = plan.events
        if plan.phase != R.PENDING and len(events) > 1 and events[0][1] == R.REASON_CREATED:
            events = events[1:]  # a first write after the pods moved on (lifecycle.plan): log the phase's
        _, reason, message = events[0] if events else ("Normal", plan.phase or "", "")
        LOG.info("FineTuneJob %s/%s: %s -> %s (%s): %s", namespace, name, old, plan.phase, reason, message)
        self.metrics.transitions.labels(namespace, plan.phase).inc()
        if plan.restarted:
            (self.metrics.disruptions if plan.disrupted else self.metrics.restarts).labels(namespace).inc()
        if plan.phase == R.RUNNING and meta["uid"] not in self._seen_running:
            self._seen_running.add(meta["uid"])
            created = parse_time(meta.get("creationTimestamp"))
            if created and not int((job.get("status") or {}).get("restartCount", 0)):
                self.metrics.time_to_running.labels(namespace).observe(
                    (datetime.now(UTC) - created).total_seconds()
                )

    def _event(self, job: Json, etype: str, reason: str, message: str) -> None:
        if self.events is not None:
            self.events.record(job, "FineTuneJob", etype, reason, message, datetime.now(UTC))
            return
        try:
            self.kube.create_event(job, "FineTuneJob", etype, reason, message, self.identity)
        except (ApiException, OSError, ValueError) as e:
            LOG.warning(
                "FineTuneJob %s/%s: event %s not posted: %s",
                job["metadata"]["namespace"],
                job["metadata"]["name"],
                reason,
                e,
            )

    def forget(self, namespace: str, name: str, uid: str) -> None:
        self.metrics.forget_job(namespace, name)
        with self._lock:
            self._failures.pop(uid, None)
        self._refusals_told.pop(uid, None)
        self._seen_running.discard(uid)
        self._finals_due.pop(uid, None)
        self._started.discard(uid)
        if self.poller is not None:
            self.poller.forget((namespace, name, uid))


class Resync(threading.Thread):
    """Queues every known job every `seconds`: the level-based safety net (watch streams can miss events)."""

    def __init__(self, store: Store, queue: WorkQueue, seconds: float) -> None:
        super().__init__(name="resync", daemon=True)
        self.store, self.queue, self.seconds = store, queue, seconds
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.is_set():
            for key in self.store.job_keys():
                self.queue.add(key)
            self.stopping.wait(self.seconds)


def start_watches(
    kube: Kube,
    namespaces: list[str],
    store: Store,
    queue: WorkQueue,
    metrics: OperatorMetrics,
    forget: Callable[[str, str, str], None],
    stopping: threading.Event,
    kueue_served: bool = False,
) -> list[Informer]:
    """Start a list-then-watch (informers.py) of every watched resource, in each namespace (or all): they fill
    the cache and queue the jobs that changed. Kueue's Workloads are watched only where Kueue is installed.
    Wait for each informer's `listed` before working on jobs: a pass needs the whole cache."""
    watches = []
    for w in WATCHED:
        if w.plural == kueue.WORKLOADS and not kueue_served:
            continue
        deliver = _delivery(w, store, queue, metrics, forget)
        for namespace in namespaces or [None]:
            path = api_path(w.group, w.version, w.plural, namespace)
            informer = Informer(
                f"{w.plural} in {namespace}" if namespace else w.plural,
                lambda path=path, w=w: kube.list_objects(path, w.selector),
                lambda version, seconds, path=path, w=w: kube.watch_objects(
                    path, w.selector, version, seconds
                ),
                deliver,
                stopping,
            )
            informer.start()
            watches.append(informer)
    return watches


def _delivery(
    w: Watched,
    store: Store,
    queue: WorkQueue,
    metrics: OperatorMetrics,
    forget: Callable[[str, str, str], None],
) -> Callable[[str, Json], None]:
    """What one watch event of `w` does: update the cache, queue the job it concerns."""

    def put(obj: Json) -> Key | None:
        if w.plural == "finetunejobs":
            return store.put_job(obj)
        if w.plural == "rewardgraders":
            store.put_grader(obj)
            return None
        if w.plural == "pods":
            return store.put_pod(obj)
        if w.plural == "checkpoints":
            return store.put_checkpoint(obj)
        if w.plural == kueue.WORKLOADS:
            return store.put_workload(obj)
        return store.put_child(CHILD_KINDS[w.plural], obj)

    def remove(obj: Json) -> Key | None:
        if w.plural == "finetunejobs":
            meta = obj["metadata"]
            forget(meta["namespace"], meta["name"], meta["uid"])
            store.remove_job(obj)
            return None
        if w.plural == "rewardgraders":
            store.remove_grader(obj)
            return None
        if w.plural == "pods":
            return store.remove_pod(obj)
        if w.plural == "checkpoints":
            return store.remove_checkpoint(obj)
        if w.plural == kueue.WORKLOADS:
            return store.remove_workload(obj)
        return store.remove_child(CHILD_KINDS[w.plural], obj)

    def changed(kind: str, obj: Json) -> None:
        metrics.watch_events.labels(w.plural).inc()
        metrics.last_watch_event.labels(w.plural).set_to_current_time()
        key = remove(obj) if kind == "DELETED" else put(obj)
        if key is not None:
            queue.add(key)
        if w.plural == "rewardgraders":
            # A grader changed: the RFT jobs of its namespace still waiting for their graders look again.
            namespace = (obj.get("metadata") or {}).get("namespace", "")
            for job in store.jobs_in(namespace):
                if job["spec"].get("method") == "rft" and not (job.get("status") or {}).get("graders"):
                    queue.add((namespace, job["metadata"]["name"]))

    return changed
