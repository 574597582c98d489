"""Gang admission through Kueue, as pure functions: the Workload a queued FineTuneJob is admitted as, what
Kueue's answer means for the job, and the status patches the operator writes back. No API calls here.

The design (README "Gang admission with Kueue"): a FineTuneJob labelled `kueue.x-k8s.io/queue-name:
<LocalQueue>` is ONE Kueue Workload that this operator creates and owns through the job (controller
ownerReference: deleting the job deletes it). The Workload has one pod set, `trainer`, with `count` =
spec.nodes and the trainer pod's scheduling fields as template (per-pod GPU, CPU and memory requests, node
selector, tolerations, affinity), so Kueue reserves quota for every pod at once or for none. No pod exists
until the Workload is Admitted; eviction or preemption deletes the pods (checkpoints stay) and gives the quota
back; the end of the job marks the Workload Finished, which frees the quota for the next one.

Why this way, checked in Kueue v0.17.0's source:
- Kueue's scheduler and its core workload controller (pkg/controller/core/workload_controller.go) act on any
  Workload whatever its owner: quota, admission, preemption and eviction are theirs. Owner kinds only matter
  to the job-framework reconcilers, each of which watches Workloads owned by its own kind; nothing garbage-
  collects a Workload owned by an unknown kind, and no finalizer is added to it.
- What Kueue's job framework does for the kinds it knows (pkg/controller/jobframework/reconciler.go) is this
  operator's part: start the pods once `Admitted` is True, stop them when `Evicted` is True and then clear
  the reservation (`QuotaReserved` False, `status.admission` unset, `Requeued` True after a preemption), set
  `Finished` when the job ends, and copy the assigned ResourceFlavors' node labels and tolerations into the
  pods (pkg/podset FromAssignment).
- Kueue's plain-pod groups would need its pod webhook and gate pods that already exist; a queued job here
  must have no pod at all until admitted. An emitted JobSet or TrainJob would need their controllers.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from whetstone_api import GROUP_VERSION
from whetstone_api import reasons as R

from .children import ATTEMPT_LABEL, JOB_LABEL, MANAGED_BY, MANAGED_BY_LABEL, RANK_LABEL, ROLE_LABEL

Json = dict[str, Any]

QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
"""Label naming a WorkloadPriorityClass, as on the jobs Kueue manages itself."""
JOB_UID_LABEL = "kueue.x-k8s.io/job-uid"

GROUP = "kueue.x-k8s.io"
VERSION = "v1beta2"
API_VERSION = f"{GROUP}/{VERSION}"
WORKLOADS = "workloads"
RESOURCE_FLAVORS = "resourceflavors"
WORKLOAD_PRIORITY_CLASSES = "workloadpriorityclasses"
POD_SET = "trainer"

# Workload condition types (Kueue's API, apis/kueue/v1beta2/workload_types.go).
QUOTA_RESERVED = "QuotaReserved"
ADMITTED = "Admitted"
EVICTED = "Evicted"
PREEMPTED = "Preempted"
REQUEUED = "Requeued"
FINISHED = "Finished"
# Evicted reasons after which Kueue's job framework marks the Workload Requeued=True (queued again at once).
_REQUEUE_AT_ONCE = {"Preempted", "NodeFailures"}

# Reasons of the job's Suspended condition while Kueue holds it (documented in whetstone_api.reasons).
REASON_QUEUED = R.REASON_QUEUED
REASON_ADMITTED = R.REASON_ADMITTED
REASON_PREEMPTED = R.REASON_PREEMPTED
REASON_EVICTED = R.REASON_EVICTED


def queue_name(job: Json) -> str | None:
    """The LocalQueue a job asks for, or None when Kueue is not involved."""
    return ((job.get("metadata") or {}).get("labels") or {}).get(QUEUE_LABEL) or None


def priority_class(job: Json) -> str | None:
    """The WorkloadPriorityClass a job names, or None."""
    return ((job.get("metadata") or {}).get("labels") or {}).get(PRIORITY_CLASS_LABEL) or None


def workload_name(job: Json) -> str:
    """Deterministic per job object: a job deleted and created again under the same name gets a new Workload
    (the old one may still wait for garbage collection)."""
    meta = job["metadata"]
    digest = hashlib.sha256(meta["uid"].encode()).hexdigest()[:5]
    return f"finetunejob-{meta['name'][:230]}-{digest}"


# Pod fields Kueue reads to size and place a pod set; the rest (env, volumes, command) would only bloat the
# Workload, whose pod sets are immutable anyway.
_CONTAINER_KEYS = ("name", "image", "resources")
_POD_SPEC_KEYS = (
    "nodeSelector",
    "tolerations",
    "affinity",
    "priorityClassName",
    "runtimeClassName",
    "overhead",
)


def pod_set_template(pod: Json) -> Json:
    """The part of a trainer pod that decides quota and placement."""
    spec = pod["spec"]
    template: Json = {
        "containers": [{k: c[k] for k in _CONTAINER_KEYS if k in c} for c in spec["containers"]],
        "restartPolicy": spec.get("restartPolicy", "Never"),
    }
    if spec.get("initContainers"):
        template["initContainers"] = [
            {k: c[k] for k in _CONTAINER_KEYS if k in c} for c in spec["initContainers"]
        ]
    for key in _POD_SPEC_KEYS:
        if spec.get(key):
            template[key] = copy.deepcopy(spec[key])
    # The job's labels only: rank, role and attempt differ between the pods of the one pod set.
    labels = {
        k: v
        for k, v in (pod["metadata"].get("labels") or {}).items()
        if not k.startswith(GROUP) and k not in (RANK_LABEL, ROLE_LABEL, ATTEMPT_LABEL)
    }
    return {"metadata": {"labels": labels}, "spec": template}


def workload_for(job: Json, pod: Json, priority: int | None = None) -> Json:
    """The Workload of a queued job. `pod` is a trainer pod of the job (all ranks ask for the same
    resources); `priority` is the value of the job's WorkloadPriorityClass (the caller reads it)."""
    meta = job["metadata"]
    queue = queue_name(job)
    if queue is None:
        raise ValueError(f"FineTuneJob {meta['name']} has no {QUEUE_LABEL} label")
    nodes = int(job["spec"].get("nodes", 1))
    spec: Json = {
        "queueName": queue,
        "podSets": [{"name": POD_SET, "count": nodes, "template": pod_set_template(pod)}],
        # Suspending the job gives its quota back: Kueue evicts an inactive Workload.
        "active": not job["spec"].get("suspend", False),
    }
    wpc = priority_class(job)
    if wpc is not None:
        if priority is None:
            raise ValueError(f"the priority of WorkloadPriorityClass {wpc} is needed to queue {meta['name']}")
        spec["priorityClassRef"] = {"group": GROUP, "kind": "WorkloadPriorityClass", "name": wpc}
    if priority is not None:
        spec["priority"] = int(priority)
    return {
        "apiVersion": API_VERSION,
        "kind": "Workload",
        "metadata": {
            "name": workload_name(job),
            "namespace": meta["namespace"],
            # Our child labels: the operator watches Workloads by them, as it watches pods.
            "labels": {JOB_LABEL: meta["name"], MANAGED_BY_LABEL: MANAGED_BY, JOB_UID_LABEL: meta["uid"]},
            "ownerReferences": [
                {
                    "apiVersion": GROUP_VERSION,
                    "kind": "FineTuneJob",
                    "name": meta["name"],
                    "uid": meta["uid"],
                    "controller": True,
                    "blockOwnerDeletion": True,
                }
            ],
        },
        "spec": spec,
    }


def priority_of(priority_class_object: Json) -> int:
    """The value of a WorkloadPriorityClass object."""
    return int(priority_class_object["value"])


# --- reading Kueue's answer ---------------------------------------------------------------------------------


def _condition(workload: Json, kind: str) -> Json | None:
    for c in (workload.get("status") or {}).get("conditions") or []:
        if c.get("type") == kind:
            return c
    return None


def _is_true(workload: Json, kind: str) -> bool:
    c = _condition(workload, kind)
    return c is not None and c.get("status") == "True"


@dataclass(frozen=True)
class WorkloadView:
    """What the operator needs to know about a job's Workload."""

    name: str
    active: bool
    quota_reserved: bool
    admitted: bool
    finished: bool
    evicted: bool
    evicted_reason: str | None = None
    evicted_message: str | None = None
    preempted_reason: str | None = None
    cluster_queue: str | None = None
    flavors: tuple[str, ...] = ()
    """Distinct ResourceFlavors assigned to the trainer pod set, in resource-name order."""
    pending_message: str | None = None
    """Why the Workload has no quota yet (Kueue's QuotaReserved=False message)."""

    @classmethod
    def of(cls, workload: Json) -> WorkloadView:
        status = workload.get("status") or {}
        admission = status.get("admission") or {}
        flavors: list[str] = []
        for assignment in admission.get("podSetAssignments") or []:
            if assignment.get("name") == POD_SET:
                for _resource, flavor in sorted((assignment.get("flavors") or {}).items()):
                    if flavor not in flavors:
                        flavors.append(flavor)
        evicted = _condition(workload, EVICTED)
        preempted = _condition(workload, PREEMPTED)
        reserved = _condition(workload, QUOTA_RESERVED)
        is_evicted = evicted is not None and evicted.get("status") == "True"
        return cls(
            name=workload["metadata"]["name"],
            active=(workload.get("spec") or {}).get("active", True) is not False,
            quota_reserved=_is_true(workload, QUOTA_RESERVED),
            admitted=_is_true(workload, ADMITTED),
            finished=_is_true(workload, FINISHED),
            evicted=is_evicted,
            evicted_reason=evicted.get("reason") if is_evicted and evicted else None,
            evicted_message=evicted.get("message") if is_evicted and evicted else None,
            preempted_reason=(
                preempted.get("reason")
                if preempted is not None and preempted.get("status") == "True"
                else None
            ),
            cluster_queue=admission.get("clusterQueue"),
            flavors=tuple(flavors),
            pending_message=(
                reserved.get("message")
                if reserved is not None and reserved.get("status") == "False"
                else None
            ),
        )


@dataclass(frozen=True)
class Gate:
    """What Kueue allows the job right now."""

    may_run: bool
    """Pods may exist (and be created)."""
    reason: str
    """REASON_QUEUED, REASON_ADMITTED, REASON_PREEMPTED or REASON_EVICTED."""
    message: str
    """For the job's status and its Event: which queue, and why it waits or stopped."""
    release_quota: bool = False
    """Evicted and no pod is left: write `release_patch` so Kueue can hand the quota to someone else."""


def gate(job: Json, workload: Json | None, pods_left: int) -> Gate:
    """Kueue's answer for a queued job. `workload` None: not created yet (create it, wait). `pods_left`:
    the job's pods that still exist, terminating ones included."""
    queue = queue_name(job) or "?"
    if workload is None:
        return Gate(False, REASON_QUEUED, f"waiting for Kueue: creating its Workload in LocalQueue {queue}")
    view = WorkloadView.of(workload)
    if view.evicted:
        preempted = view.evicted_reason == "Preempted"
        what = "preempted" if preempted else f"evicted ({view.evicted_reason})"
        detail = f": {view.evicted_message}" if view.evicted_message else ""
        message = f"Kueue {what} Workload {view.name}{detail}; pods deleted, checkpoints kept"
        if pods_left == 0 and not view.quota_reserved:
            # The quota was given back: the job waits in its queue again.
            message += f"; queued again in LocalQueue {queue}: {view.pending_message or 'waiting for quota'}"
        return Gate(
            False,
            REASON_PREEMPTED if preempted else REASON_EVICTED,
            message,
            release_quota=pods_left == 0 and view.quota_reserved,
        )
    if view.admitted:
        where = f" to ClusterQueue {view.cluster_queue}" if view.cluster_queue else ""
        return Gate(
            True, REASON_ADMITTED, f"Kueue admitted Workload {view.name}{where} from LocalQueue {queue}"
        )
    return Gate(False, REASON_QUEUED, queue_message(job, view))


def queue_message(job: Json, view: WorkloadView) -> str:
    """Which queue the job waits in, and why (Kueue's own words)."""
    queue = queue_name(job) or "?"
    if not view.active:
        return f"Workload {view.name} is inactive (spec.suspend is true): no quota held in LocalQueue {queue}"
    if view.quota_reserved:
        cq = view.cluster_queue
        return f"Workload {view.name} reserved quota in ClusterQueue {cq}; waiting for its admission checks"
    why = view.pending_message or "not yet considered by Kueue"
    return f"queued in LocalQueue {queue} (Workload {view.name}): {why}"


# --- placement from the assigned flavors -------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    node_selector: dict[str, str] = field(default_factory=dict)
    tolerations: list[Json] = field(default_factory=list)


class PlacementConflict(ValueError):
    """The job's own nodeSelector contradicts the node labels of the flavor Kueue assigned."""


def placement(view: WorkloadView, flavors: Mapping[str, Json]) -> Placement:
    """Node labels and tolerations of the ResourceFlavors assigned to the trainer pod set, merged in order
    (Kueue's podset.FromAssignment). `flavors`: ResourceFlavor objects by name; a missing one is an error."""
    selector: dict[str, str] = {}
    tolerations: list[Json] = []
    for name in view.flavors:
        if name not in flavors:
            raise KeyError(f"ResourceFlavor {name} assigned to Workload {view.name} was not found")
        spec = flavors[name].get("spec") or {}
        selector.update(spec.get("nodeLabels") or {})
        tolerations.extend(copy.deepcopy(spec.get("tolerations") or []))
    return Placement(selector, tolerations)


def apply_placement(pod: Json, where: Placement) -> Json:
    """A copy of `pod` that runs where Kueue reserved the quota."""
    out = copy.deepcopy(pod)
    spec = out["spec"]
    own = spec.get("nodeSelector") or {}
    clash = sorted(k for k, v in where.node_selector.items() if k in own and own[k] != v)
    if clash:
        key = clash[0]
        raise PlacementConflict(
            f"spec.nodeSelector {key}={own[key]} contradicts the assigned ResourceFlavor's {key}="
            f"{where.node_selector[key]}"
        )
    if where.node_selector:
        spec["nodeSelector"] = {**own, **where.node_selector}
    existing = spec.get("tolerations") or []
    added = [t for t in where.tolerations if t not in existing]
    if added:
        spec["tolerations"] = existing + added
    return out


# --- what the operator writes back -------------------------------------------------------------------------


def _rfc3339(t: datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def set_condition(conditions: list[Json], new: Json, now: datetime, generation: int | None) -> list[Json]:
    """`conditions` with `new` set as Kubernetes' meta.SetStatusCondition does: the transition time moves
    only when the status changes."""
    out = [dict(c) for c in conditions]
    cond = {**new, "observedGeneration": generation} if generation is not None else dict(new)
    for i, old in enumerate(out):
        if old.get("type") == new["type"]:
            changed = old.get("status") != new["status"]
            cond["lastTransitionTime"] = (
                _rfc3339(now) if changed else old.get("lastTransitionTime", _rfc3339(now))
            )
            out[i] = cond
            return out
    cond["lastTransitionTime"] = _rfc3339(now)
    out.append(cond)
    return out


def _status_patch(workload: Json, status: Json) -> Json:
    # The resourceVersion makes the merge patch conditional: a 409 means Kueue wrote in between; re-read.
    patch: Json = {"status": status}
    rv = workload.get("metadata", {}).get("resourceVersion")
    if rv:
        patch["metadata"] = {"resourceVersion": rv}
    return patch


def release_patch(workload: Json, now: datetime) -> Json:
    """After an eviction, once the job's pods are gone: give the quota back (the job framework's step for
    the kinds Kueue knows). A preempted Workload is queued again at once (Requeued True)."""
    view = WorkloadView.of(workload)
    generation = workload["metadata"].get("generation")
    reason = view.evicted_reason or "Evicted"
    message = view.evicted_message or "evicted"
    conditions = (workload.get("status") or {}).get("conditions") or []
    conditions = set_condition(
        conditions,
        {
            "type": REQUEUED,
            "status": "True" if reason in _REQUEUE_AT_ONCE else "False",
            "reason": reason,
            "message": message,
        },
        now,
        generation,
    )
    conditions = set_condition(
        conditions,
        {"type": QUOTA_RESERVED, "status": "False", "reason": "Pending", "message": message},
        now,
        generation,
    )
    if _is_true(workload, ADMITTED):
        conditions = set_condition(
            conditions,
            {
                "type": ADMITTED,
                "status": "False",
                "reason": "NoReservation",
                "message": "The workload has no reservation",
            },
            now,
            generation,
        )
    return _status_patch(workload, {"conditions": conditions, "admission": None})


def finished_patch(workload: Json, succeeded: bool, message: str, now: datetime) -> Json:
    """The job ended: Kueue frees the Workload's quota for the next one in the queue."""
    conditions = set_condition(
        (workload.get("status") or {}).get("conditions") or [],
        {
            "type": FINISHED,
            "status": "True",
            "reason": "Succeeded" if succeeded else "Failed",
            "message": message[:32768],
        },
        now,
        workload["metadata"].get("generation"),
    )
    return _status_patch(workload, {"conditions": conditions})


def active_patch(job: Json, workload: Json) -> Json | None:
    """spec.active follows the job's spec.suspend (an inactive Workload is evicted and holds no quota);
    None when nothing changes."""
    want = not job["spec"].get("suspend", False)
    if WorkloadView.of(workload).active == want:
        return None
    return {"spec": {"active": want}}
