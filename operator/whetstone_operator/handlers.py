"""The kopf handlers of FineTuneJob: observe, plan (lifecycle.py), act, report.

The story of a job, as the handlers see it:

- it is created (or found at operator start): reconcile at once, which creates its ConfigMap, headless
  Service and pods and marks it Pending;
- its pods change (a watch on pods labelled whetstone.dev/job): reconcile, so Running, a failure (whole-group
  restart or Failed) and success are noticed when they happen;
- `spec.suspend` flips: reconcile (pods deleted, or recreated to resume from the latest checkpoint);
- every `resync` seconds a timer reconciles anyway, because watch streams can miss events; this is also when
  rank 0's /status is read into status.progress and Checkpoint resources.

Every reconcile of one job holds that job's lock, decides from a fresh read of the job before it changes
anything, writes the status first and then acts, so a restart of the operator at any point re-decides the
same thing: children have deterministic names and AlreadyExists counts as done.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import urllib.request
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

import kopf
import kubernetes
from kubernetes.client.rest import ApiException
from whetstone_api import API_GROUP, API_VERSION
from whetstone_api.uris import uri_of_pod_path
from whetstone_api.wire import MAX_REPORT_BYTES, ReportError, TrainerReport, checkpoint_resource_name

from . import children, lifecycle
from .children import JOB_LABEL
from .config import OperatorConfig
from .lifecycle import PodView
from .metrics import OperatorMetrics
from .rendezvous import pod_name

Json = dict[str, Any]
LOG = logging.getLogger("whetstone.operator")
FTJ = "finetunejobs"
CKPT = "checkpoints"


class Reconciler:
    """Carries out the lifecycle's plans against the API server."""

    def __init__(self, config: OperatorConfig, api: kubernetes.client.ApiClient, metrics: OperatorMetrics):
        self.config = config
        self.core = kubernetes.client.CoreV1Api(api)
        self.custom = kubernetes.client.CustomObjectsApi(api)
        self.metrics = metrics
        self._locks: dict[str, threading.Lock] = {}
        self._locks_guard = threading.Lock()
        self._seen_running: set[str] = set()
        self._unreachable_until: dict[str, float] = {}

    def _lock(self, uid: str) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(uid, threading.Lock())

    def forget(self, namespace: str, name: str, uid: str) -> None:
        self.metrics.jobs.forget(namespace, name)
        with self._locks_guard:
            self._locks.pop(uid, None)
        self._seen_running.discard(uid)
        self._unreachable_until.pop(uid, None)

    # --- reading

    def read_job(self, namespace: str, name: str) -> Json | None:
        try:
            return self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, FTJ, name)
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def _poll_due(self, uid: str, cause: str) -> bool:
        """Rank 0 is read by the resync timer only (pod events would multiply the reads), and not again for
        a while after it did not answer, so an unreachable pod never ties up the handler threads."""
        return cause == "resync" and time.monotonic() >= self._unreachable_until.get(uid, 0.0)

    def trainer_report(self, pods: list[PodView]) -> TrainerReport | None:
        """Rank 0's /status, or None while it cannot answer (starting, restarting, finished)."""
        master = next((p for p in pods if p.rank == 0 and p.phase == "Running" and not p.deleting), None)
        if master is None or not master.ip:
            return None
        url = f"http://{master.ip}:{self.config.children.status_port}/status"
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                return TrainerReport.parse(resp.read(MAX_REPORT_BYTES + 1))
        except (OSError, ReportError) as e:
            LOG.debug("trainer report from %s unusable: %s", url, e)
            return None

    # --- the reconcile

    def reconcile(self, job: Json, pods: Iterable[PodView], cause: str) -> None:
        meta = job["metadata"]
        namespace, name, uid = meta["namespace"], meta["name"], meta["uid"]
        started = time.monotonic()
        try:
            with self._lock(uid):
                self._reconcile(job, list(pods), cause)
            self.metrics.reconciles.labels("FineTuneJob", "ok").inc()
        except Exception:
            self.metrics.reconciles.labels("FineTuneJob", "error").inc()
            LOG.exception("FineTuneJob %s/%s: reconcile (%s) failed", namespace, name, cause)
            raise
        finally:
            self.metrics.reconcile_duration.labels("FineTuneJob").observe(time.monotonic() - started)

    def _reconcile(self, job: Json, pods: list[PodView], cause: str) -> None:
        meta = job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if meta.get("deletionTimestamp"):
            return
        now = datetime.now(UTC)
        plan = lifecycle.plan(job, pods, now)
        if plan.acts:
            # The body kopf handed us may predate our own last status write: decide on a fresh read.
            fresh = self.read_job(namespace, name)
            if fresh is None or fresh["metadata"].get("deletionTimestamp"):
                return
            job = fresh
            plan = lifecycle.plan(job, pods, now)
        status = job.get("status") or {}
        patch: Json = dict(plan.status)
        new_phase = plan.phase or status.get("phase")

        report = None
        if (
            new_phase in ("Pending", "Running")
            and not plan.delete_pods
            and self._poll_due(meta["uid"], cause)
        ):
            report = self.trainer_report(pods)
            if report is None:
                self._unreachable_until[meta["uid"]] = time.monotonic() + self.config.progress_seconds
            # A trainer that is still starting reports step 0; only a training one has progress to tell.
            if report and report.phase in ("Training", "Finished"):
                self._sync_checkpoints(job, report, patch)
                if lifecycle.progress_due(status, now, self.config.progress_seconds, report):
                    patch["progress"] = lifecycle.progress_from(report, now)
        if plan.phase == "Succeeded":
            self._finish(job, status, patch)

        if patch:
            self.custom.patch_namespaced_custom_object_status(
                API_GROUP, API_VERSION, namespace, FTJ, name, {"status": patch}
            )
        if plan.phase and plan.phase != status.get("phase"):
            self._announce(job, status.get("phase"), plan, cause)

        attempt = int(patch.get("restartCount", status.get("restartCount", 0)))
        if plan.delete_pods:
            self._delete_pods(namespace, pods, active_only=plan.delete_active_pods_only)
        if plan.create_pods:
            self._create_children(job, attempt, pods)
        if plan.delete_job:
            LOG.info("FineTuneJob %s/%s: ttlSecondsAfterFinished reached, deleting the job", namespace, name)
            self._ignore_404(
                self.custom.delete_namespaced_custom_object, API_GROUP, API_VERSION, namespace, FTJ, name
            )
        if new_phase:
            self.metrics.jobs.set(namespace, name, new_phase)

    def _announce(self, job: Json, old: str | None, plan: lifecycle.Plan, cause: str) -> None:
        meta = job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        etype, reason, message = plan.event or ("Normal", plan.phase or "", "")
        LOG.info("FineTuneJob %s/%s: %s -> %s (%s): %s", namespace, name, old, plan.phase, reason, message)
        kopf.event(job, type=etype, reason=reason, message=message)
        self.metrics.transitions.labels(namespace, plan.phase).inc()
        if plan.restarted:
            self.metrics.restarts.labels(namespace).inc()
        if plan.phase == "Running" and meta["uid"] not in self._seen_running:
            self._seen_running.add(meta["uid"])
            created = lifecycle.parse_time(meta.get("creationTimestamp"))
            if created and not int((job.get("status") or {}).get("restartCount", 0)):
                self.metrics.time_to_running.labels(namespace).observe(
                    (datetime.now(UTC) - created).total_seconds()
                )

    # --- acting

    @staticmethod
    def _ignore_404(fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except ApiException as e:
            if e.status != 404:
                raise

    def _create(self, fn: Any, namespace: str, body: Json) -> bool:
        """Create; AlreadyExists means an earlier reconcile (maybe of another operator process) did it."""
        try:
            fn(namespace, body)
            return True
        except ApiException as e:
            if e.status == 409:
                return False
            raise

    def _create_children(self, job: Json, attempt: int, pods: list[PodView]) -> None:
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
        self._create(self.core.create_namespaced_config_map, namespace, children.config_map(job))
        self._create(
            self.core.create_namespaced_service,
            namespace,
            children.headless_service(job, self.config.children),
        )
        present = {p.name for p in pods}
        for rank in range(int(job["spec"].get("nodes", 1))):
            if pod_name(name, rank) in present:
                continue
            body = children.trainer_pod(job, rank, attempt, self.config.children)
            if self._create(self.core.create_namespaced_pod, namespace, body):
                LOG.debug("FineTuneJob %s/%s: created pod %s", namespace, name, body["metadata"]["name"])

    def _delete_pods(self, namespace: str, pods: list[PodView], active_only: bool) -> None:
        for p in pods:
            if p.deleting or (active_only and p.phase not in ("Pending", "Running")):
                continue
            self._ignore_404(self.core.delete_namespaced_pod, p.name, namespace)

    # --- progress and checkpoints

    def _existing_checkpoints(self, namespace: str, name: str) -> dict[str, Json]:
        listed = self.custom.list_namespaced_custom_object(
            API_GROUP, API_VERSION, namespace, CKPT, label_selector=f"{JOB_LABEL}={name}"
        )
        return {c["metadata"]["name"]: c for c in listed.get("items", [])}

    def _sync_checkpoints(self, job: Json, report: TrainerReport, patch: Json) -> None:
        namespace, name = job["metadata"]["namespace"], job["metadata"]["name"]
        kept = report.checkpoints
        existing = self._existing_checkpoints(namespace, name)
        wanted = {checkpoint_resource_name(name, c.step): c for c in kept}
        for cname, c in wanted.items():
            if cname in existing:
                continue
            body = children.checkpoint_resource(job, c.step, uri_of_pod_path(c.uri), c.kind, c.metrics)
            if self._create(self._create_checkpoint, namespace, body):
                self.metrics.checkpoints.labels(namespace).inc()
                LOG.info("FineTuneJob %s/%s: checkpoint %s at step %s", namespace, name, cname, c.step)
        # The trainer's list of kept checkpoints is authoritative: what it pruned goes.
        for cname, c in existing.items():
            if c["spec"].get("kind") == "resumable" and cname not in wanted:
                self._delete_checkpoint(namespace, cname)
        if kept:
            latest = max(kept, key=lambda c: c.step)
            ref = {
                "name": checkpoint_resource_name(name, latest.step),
                "step": latest.step,
                "uri": uri_of_pod_path(latest.uri),
            }
            if (job.get("status") or {}).get("latestCheckpoint") != ref:
                patch["latestCheckpoint"] = ref

    def _delete_checkpoint(self, namespace: str, name: str) -> None:
        self._ignore_404(
            self.custom.delete_namespaced_custom_object, API_GROUP, API_VERSION, namespace, CKPT, name
        )

    def _create_checkpoint(self, namespace: str, body: Json) -> None:
        created = self.custom.create_namespaced_custom_object(API_GROUP, API_VERSION, namespace, CKPT, body)
        # The trainer reports only what it finished writing: the checkpoint is in storage now.
        status = {
            "phase": "Available",
            "createdTime": lifecycle.rfc3339(datetime.now(UTC)),
            "observedGeneration": created["metadata"].get("generation", 1),
        }
        self.custom.patch_namespaced_custom_object_status(
            API_GROUP, API_VERSION, namespace, CKPT, body["metadata"]["name"], {"status": status}
        )

    def _finish(self, job: Json, status: Json, patch: Json) -> None:
        """On success: the final adapter or model as an export Checkpoint, and status.outputUri."""
        namespace = job["metadata"]["namespace"]
        output = job["spec"]["output"]["uri"].rstrip("/") + "/final"
        patch["outputUri"] = output
        progress = dict(status.get("progress") or {})
        step = progress.get("totalSteps") or progress.get("step") or 0
        if progress and progress.get("totalSteps") is not None:
            progress.update(step=step, steps=f"{step}/{step}", etaSeconds=0)
            patch["progress"] = progress
        body = children.checkpoint_resource(job, int(step), output, "export")
        if self._create(self._create_checkpoint, namespace, body):
            self.metrics.checkpoints.labels(namespace).inc()
        total = progress.get("totalSteps") or (job["spec"].get("hyperparameters") or {}).get("maxSteps")
        if total:
            kept = lifecycle.checkpoints_kept_at_end(job["spec"], int(total))
            for cname, c in self._existing_checkpoints(namespace, job["metadata"]["name"]).items():
                if c["spec"].get("kind") == "resumable" and int(c["spec"]["step"]) not in kept:
                    self._delete_checkpoint(namespace, cname)


def register(registry: kopf.OperatorRegistry, config: OperatorConfig, state: dict[str, Any]) -> None:
    """Register the handlers; `state["reconciler"]` is filled in at startup (it needs the API client)."""

    def reconciler() -> Reconciler:
        return state["reconciler"]

    def job_pods(index: kopf.Index, namespace: str, name: str) -> list[PodView]:
        return list(index.get((namespace, name), []))

    @kopf.index("pods", id="pods_by_job", labels={JOB_LABEL: kopf.PRESENT}, registry=registry)
    def pods_by_job(namespace: str, labels: Json, body: kopf.Body, **_: Any) -> Json:
        return {(namespace, labels[JOB_LABEL]): PodView.of(_plain(body))}

    @kopf.on.create(API_GROUP, API_VERSION, FTJ, id="job", backoff=5, registry=registry)
    @kopf.on.resume(API_GROUP, API_VERSION, FTJ, id="job", backoff=5, registry=registry)
    def job_appeared(
        body: kopf.Body, namespace: str, name: str, pods_by_job: kopf.Index, reason: str, **_: Any
    ):
        reconciler().reconcile(_plain(body), job_pods(pods_by_job, namespace, name), str(reason))

    @kopf.on.field(
        API_GROUP, API_VERSION, FTJ, id="suspend", field="spec.suspend", backoff=5, registry=registry
    )
    def suspend_changed(
        body: kopf.Body, namespace: str, name: str, pods_by_job: kopf.Index, **_: Any
    ) -> None:
        reconciler().reconcile(_plain(body), job_pods(pods_by_job, namespace, name), "suspend")

    @kopf.timer(API_GROUP, API_VERSION, FTJ, id="resync", interval=config.resync_seconds, registry=registry)
    def resync(body: kopf.Body, namespace: str, name: str, pods_by_job: kopf.Index, **_: Any) -> None:
        reconciler().reconcile(_plain(body), job_pods(pods_by_job, namespace, name), "resync")

    @kopf.on.event(API_GROUP, API_VERSION, FTJ, id="job_event", registry=registry)
    def job_event(type: str | None, namespace: str, name: str, uid: str, **_: Any) -> None:
        state["metrics"].watch_events.labels(FTJ).inc()
        state["metrics"].last_watch_event.labels(FTJ).set_to_current_time()
        if type == "DELETED":
            reconciler().forget(namespace, name, uid)

    @kopf.on.event("pods", id="pod_event", labels={JOB_LABEL: kopf.PRESENT}, registry=registry)
    def pod_event(
        type: str | None, body: kopf.Body, namespace: str, labels: Json, pods_by_job: kopf.Index, **_: Any
    ) -> None:
        state["metrics"].watch_events.labels("pods").inc()
        state["metrics"].last_watch_event.labels("pods").set_to_current_time()
        if type is None:  # the initial listing; the resume handlers cover it
            return
        # React to a pod's change now instead of at the next resync; only phase-relevant changes matter.
        view = PodView.of(_plain(body))
        if type != "DELETED" and view.phase == "Pending" and not view.deleting:
            return
        job_name = labels[JOB_LABEL]
        job = reconciler().read_job(namespace, job_name)
        if job is not None:
            reconciler().reconcile(job, job_pods(pods_by_job, namespace, job_name), f"pod {type}")


def _plain(body: kopf.Body | Json) -> Json:
    # kopf's Body is a read-only live view; the lifecycle works on plain dicts.
    return json.loads(json.dumps(dict(body)))
