"""The life of a FineTuneJob as a pure function: from the job and what the operator observes of its children,
what the status becomes and what must be done. The reconciler (handlers.py) only observes, calls `plan`, and
carries the plan out, so every transition is unit-tested without a cluster (tests/test_operator_lifecycle.py).

Phases: Pending → (Suspended) → Running → Succeeded | Failed, with Restarting between attempts. The status
is the operator's memory: the phase, the attempt (which labels the pods), the restart and disruption counts
and the start time survive an operator restart because they live on the object, never only in this process.

Only objects this job controls count: a pod, ConfigMap, Service or NetworkPolicy with one of our names but
another controller (an earlier job of the same name, or anything else) is waited for while it is being
deleted and reported (Stalled, NameConflict) otherwise, never adopted. Every group restart and every resume
starts a new attempt, so pods of an earlier attempt never count.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from whetstone_api import reasons as R

from . import gang, kueue
from .failures import Judgement, Verdict, judge, worst
from .views import ChildView, GraderView, PodView, parse_time, rfc3339

Json = dict[str, Any]

# A pod still there this long after its grace period ended sits on a node that no longer answers.
STUCK_TERMINATING_MARGIN = timedelta(seconds=30)
# Kinds of the job's children besides pods, in the order they are created (pods mount the ConfigMap).
CHILD_KINDS = ("ConfigMap", "Service", "NetworkPolicy")
# Most pods named in one message.
MAX_NAMED = 4


@dataclass(frozen=True)
class CreateFailure:
    """The API server refused to create a child; retried at `retry_at`."""

    message: str
    since: datetime
    retry_at: datetime


@dataclass(frozen=True)
class Observed:
    """What the operator sees of one job: every pod labelled with its name (ours or not, live or just gone),
    the other children by kind, the namespace's RewardGraders the job names (RFT), and the last refusal of a
    create."""

    pods: list[PodView] = field(default_factory=list)
    children: dict[str, ChildView] = field(default_factory=dict)
    graders: dict[str, GraderView] = field(default_factory=dict)
    create_failure: CreateFailure | None = None
    child_kinds: tuple[str, ...] = CHILD_KINDS
    # Kueue: the job's Workload (controlled by this job), for a job labelled kueue.x-k8s.io/queue-name; and
    # whether the cluster serves Kueue's Workload API at all.
    workload: Json | None = None
    kueue_served: bool = True


@dataclass
class Plan:
    """What `plan` decided. `status` is a merge patch of .status (empty: nothing to write)."""

    status: Json = field(default_factory=dict)
    create_children: list[str] = field(default_factory=list)
    create_pods: bool = False
    delete_pods: list[str] = field(default_factory=list)
    # Pods stuck terminating past their grace period: force-deleted if their node is gone or not ready.
    force_delete: list[PodView] = field(default_factory=list)
    delete_job: bool = False
    # RFT: the graders to snapshot into the ConfigMap (and status) as the job starts.
    snapshot_graders: list[GraderView] = field(default_factory=list)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    restarted: bool = False
    disrupted: bool = False
    requeue_after: float | None = None
    # A new job's first pass only creates; its status (and Events) is written by the pass that the watch
    # events of its pods bring. When many jobs start at once (an operator's start, a burst of submissions),
    # every job's pods are then created before any status write, and a job whose pods already run by then
    # gets one write instead of two. A status write costs the API server about what a pod create costs
    # (the CRD's validation rules run on every write), so this is a quarter of a start's work moved off the
    # path to the pods. Not for RFT jobs: their grader snapshot is recorded as they start.
    write_later: bool = False
    # Kueue (queued jobs only): create the job's Workload; set its spec.active; give its quota back after an
    # eviction, once no pod is left; mark it Finished (succeeded, message) when the job ended.
    create_workload: bool = False
    workload_active: bool | None = None
    release_workload: bool = False
    finish_workload: tuple[bool, str] | None = None

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")

    @property
    def destructive(self) -> bool:
        """Deletes pods or ends the job: decided again on a fresh read before it is carried out."""
        return bool(self.delete_pods) or self.restarted or self.phase == R.FAILED or self.delete_job

    def requeue(self, seconds: float) -> None:
        seconds = max(seconds, 1.0)
        self.requeue_after = seconds if self.requeue_after is None else min(self.requeue_after, seconds)


def current_attempt(status: Json) -> int:
    # Jobs written before status.attempt existed labelled their pods with the restart count.
    value = status.get("attempt")
    return int(value if value is not None else status.get("restartCount", 0))


# Which phase conditions hold in each phase. Created stays True once the children exist.
_TRUE_IN = {
    R.PENDING: {R.CREATED},
    R.RUNNING: {R.CREATED, R.COND_RUNNING},
    R.RESTARTING: {R.CREATED, R.COND_RESTARTING},
    R.SUSPENDED: {R.COND_SUSPENDED},
    R.SUCCEEDED: {R.CREATED, R.COND_SUCCEEDED},
    R.FAILED: {R.CREATED, R.COND_FAILED},
}


@dataclass
class _Desired:
    """The status the plan wants; turned into a patch of what differs from the current status."""

    phase: str
    reason: str
    message: str
    created: tuple[bool, str, str] | None = None  # (status, reason, message) overriding the phase's
    stalled: tuple[str, str] | None = None  # (reason, message)
    graders: tuple[bool, str, str] | None = None  # GradersReady (RFT jobs)
    fields: Json = field(default_factory=dict)


def _condition(
    previous: Json | None, ctype: str, status: bool, reason: str, message: str, keep_text: bool, gen: int, now
) -> Json:
    text = "True" if status else "False"
    if previous and previous.get("status") == text:
        cond = dict(previous)
        if not keep_text:
            cond.update(reason=reason, message=message)
        cond["observedGeneration"] = gen
        return cond
    return {
        "type": ctype,
        "status": text,
        "reason": reason,
        "message": message,
        "lastTransitionTime": rfc3339(now),
        "observedGeneration": gen,
    }


def conditions_for(job: Json, d: _Desired, now: datetime) -> list[Json]:
    """Every condition with an explicit True/False; lastTransitionTime moves only when the status does."""
    status = job.get("status") or {}
    gen = job["metadata"].get("generation", 1)
    old = {c.get("type"): c for c in status.get("conditions") or []}
    true_types = set(_TRUE_IN[d.phase])
    if d.phase == R.SUSPENDED and status.get("phase") not in (None, R.PENDING, R.SUSPENDED):
        true_types.add(R.CREATED)
    out = []
    for t in R.JOB_CONDITION_TYPES:
        if t == R.CREATED and d.created is not None:
            value, reason, message = d.created
            out.append(_condition(old.get(t), t, value, reason, message, False, gen, now))
        elif t in true_types:
            out.append(_condition(old.get(t), t, True, d.reason, d.message, False, gen, now))
        else:
            reason = R.REASON_RESUMED if t == R.COND_SUSPENDED and d.reason == R.REASON_RESUMED else d.reason
            out.append(_condition(old.get(t), t, False, reason, "", True, gen, now))
    if d.stalled:
        out.append(_condition(old.get(R.STALLED), R.STALLED, True, *d.stalled, False, gen, now))
    else:
        out.append(
            _condition(old.get(R.STALLED), R.STALLED, False, R.REASON_NOT_STALLED, "", False, gen, now)
        )
    if d.graders is not None:
        value, reason, message = d.graders
        out.append(
            _condition(old.get(R.GRADERS_READY), R.GRADERS_READY, value, reason, message, False, gen, now)
        )
    return out


def _apply(out: Plan, job: Json, d: _Desired, now: datetime, warning: bool = False) -> None:
    """Write the desired status into the plan as a patch of what changed, with its Events."""
    status = job.get("status") or {}
    gen = job["metadata"].get("generation", 1)
    message = d.stalled[1] if d.stalled and d.phase not in R.TERMINAL_PHASES else d.message
    wanted: Json = {
        "phase": d.phase,
        "message": message,
        "observedGeneration": gen,
        "conditions": conditions_for(job, d, now),
        **d.fields,
    }
    for key, value in wanted.items():
        if status.get(key) != value:
            out.status[key] = value
    if status.get("phase") != d.phase:
        out.events.append(("Warning" if warning else "Normal", d.reason, d.message))
    old_stalled = next(
        (
            c
            for c in status.get("conditions") or []
            if c.get("type") == R.STALLED and c.get("status") == "True"
        ),
        None,
    )
    if d.stalled and (old_stalled is None or old_stalled.get("reason") != d.stalled[0]):
        out.events.append(("Warning", *d.stalled))


def _names(pods: list[PodView]) -> str:
    names = sorted(p.name for p in pods)
    shown = ", ".join(names[:MAX_NAMED])
    return shown + (f" and {len(names) - MAX_NAMED} more" if len(names) > MAX_NAMED else "")


def _stuck(pods: list[PodView], now: datetime) -> list[PodView]:
    return [
        p
        for p in pods
        if p.deleting
        and not p.gone
        and p.deletion_deadline
        and now > p.deletion_deadline + STUCK_TERMINATING_MARGIN
    ]


def _graders(job: Json, seen: Observed) -> tuple[list[GraderView], tuple[str, str] | None]:
    """The graders an RFT job needs (weighted graders' children too), and what is wrong if any is missing
    or not Ready: (reason, message)."""
    names = [g.get("name") for g in ((job["spec"].get("rft") or {}).get("graders") or [])]
    wanted: list[str] = []
    todo = [n for n in names if n]
    while todo:
        name = todo.pop(0)
        if name in wanted:
            continue
        wanted.append(name)
        view = seen.graders.get(name)
        if view is not None:
            todo += view.children
    missing = [n for n in wanted if n not in seen.graders]
    if missing:
        return [], (R.REASON_GRADER_MISSING, f"RewardGrader {', '.join(missing)} does not exist")
    waiting = [seen.graders[n] for n in wanted if not seen.graders[n].ready]
    if waiting:
        g = waiting[0]
        detail = f": {g.message}" if g.message else ""
        return [], (R.REASON_GRADER_NOT_READY, f"RewardGrader {g.name} is not Ready{detail}")
    return [seen.graders[n] for n in sorted(wanted)], None


def plan(job: Json, seen: Observed, now: datetime | None = None) -> Plan:
    """The next step of the job's life, given what the operator observes of it."""
    now = now or datetime.now(UTC)
    out = _plan(job, seen, now)
    uid, status = job["metadata"]["uid"], job.get("status") or {}
    moved_on = status.get("phase") is None and out.phase not in (None, R.PENDING)
    if moved_on and any(p.owner_uid == uid for p in seen.pods):
        # Its first pass created the pods without a write (write_later), and they have moved on since
        # (running, failed, gone, finished): this first write records the start as that pass would have.
        nodes = int(job["spec"].get("nodes", 1))
        out.events.insert(0, ("Normal", R.REASON_CREATED, f"created {nodes} trainer pod(s)"))
        if out.phase != R.SUSPENDED:
            for field_name, value in (("startTime", rfc3339(now)), ("restartCount", 0), ("attempt", 0)):
                out.status.setdefault(field_name, value)
    return out


def _plan(job: Json, seen: Observed, now: datetime) -> Plan:
    meta, spec, status = job["metadata"], job["spec"], job.get("status") or {}
    uid = meta["uid"]
    phase = status.get("phase")
    nodes = int(spec.get("nodes", 1))
    attempt = current_attempt(status)
    out = Plan()
    ours = [p for p in seen.pods if p.owner_uid == uid]
    live_ours = [p for p in ours if not p.gone]
    out.force_delete = _stuck(live_ours, now)

    # Terminal is terminal: never new children; stop what still runs; honour the TTL.
    if phase in R.TERMINAL_PHASES:
        gen = meta.get("generation", 1)
        if status.get("observedGeneration") != gen:
            out.status["observedGeneration"] = gen
        out.delete_pods = [p.name for p in live_ours if p.live and p.active]
        if seen.workload is not None and not kueue.WorkloadView.of(seen.workload).finished:
            out.finish_workload = (phase == R.SUCCEEDED, status.get("message") or str(phase))
        ttl = spec.get("ttlSecondsAfterFinished")
        done = parse_time(status.get("completionTime"))
        if ttl is not None and done is not None:
            left = (done + timedelta(seconds=int(ttl)) - now).total_seconds()
            if left <= 0:
                out.delete_job = True
            else:
                out.requeue(left)
        return out

    admitted: kueue.Gate | None = None
    if kueue.queue_name(job) is not None:
        held, admitted = _kueue(out, job, seen, live_ours, now)
        if held:
            return out

    if spec.get("suspend"):
        d = _Desired(R.SUSPENDED, R.REASON_SUSPENDED, "spec.suspend is true: pods deleted")
        if phase != R.SUSPENDED:
            d.fields["startTime"] = None
        _apply(out, job, d, now)
        out.delete_pods = [p.name for p in live_ours if p.live]
        return out

    if phase == R.SUSPENDED:
        # Resume: a new attempt (pods of before the suspension never count) and a fresh start time (the
        # deadline counts from here). The pods follow in the next pass, once the status says so.
        reason, message = R.REASON_RESUMED, "spec.suspend is false: resuming from the latest checkpoint"
        if admitted is not None:
            # Kueue let the whole group in: all pods are created together, from the latest checkpoint if any.
            reason, message = R.REASON_ADMITTED, f"{admitted.message}: creating {nodes} trainer pod(s)"
        fields = {"startTime": rfc3339(now), "attempt": attempt + 1}
        _apply(out, job, _Desired(R.PENDING, reason, message, fields=fields), now)
        return out

    deadline = spec.get("activeDeadlineSeconds")
    started = parse_time(status.get("startTime"))
    if deadline and started:
        left = (started + timedelta(seconds=int(deadline)) - now).total_seconds()
        if left < 0:
            message = f"activeDeadlineSeconds ({deadline}) exceeded: the job ran since {rfc3339(started)}"
            return _fail(out, job, R.REASON_DEADLINE_EXCEEDED, message, live_ours, now)
        out.requeue(left)

    fresh = phase is None
    if fresh:
        d = _Desired(R.PENDING, R.REASON_CREATED, f"creating {nodes} trainer pod(s)")
        d.fields.update(startTime=rfc3339(now), restartCount=0, attempt=0)
    else:
        reason, message = _phase_condition(status, phase)
        d = _Desired(phase, reason, message)

    # RFT: the graders must exist and be Ready before anything is created; their specs are taken then.
    if spec.get("method") == "rft":
        if status.get("graders"):
            d.graders = (True, R.REASON_GRADERS_READY, "the graders were snapshotted when the job started")
        else:
            ready, problem = _graders(job, seen)
            if problem:
                d.graders = (False, *problem)
                d.stalled = problem
                d.created = (False, problem[0], "waiting for the job's RewardGraders")
                _apply(out, job, d, now)
                return out
            d.graders = (True, R.REASON_GRADERS_READY, f"{len(ready)} RewardGrader(s) Ready")
            out.snapshot_graders = ready

    # The other children: ours, someone else's (waited for while it goes, else reported), or missing.
    waiting_for: list[str] = []
    conflicts: list[str] = []
    for kind in seen.child_kinds:
        child = seen.children.get(kind)
        if child is None:
            out.create_children.append(kind)
        elif child.owner_uid != uid:
            (waiting_for if child.deleting else conflicts).append(f"{kind} {child.name}")
    foreign = [p for p in seen.pods if p.owner_uid != uid and not p.gone]
    waiting_for += [f"pod {p.name}" for p in foreign if p.deleting]
    conflicts += [f"pod {p.name}" for p in foreign if not p.deleting]
    if conflicts:
        d.stalled = (
            R.REASON_NAME_CONFLICT,
            f"{', '.join(conflicts[:MAX_NAMED])}: not controlled by this FineTuneJob (never adopted); delete "
            "it or rename the job",
        )

    # The trainer ConfigMap of a started RFT job can only be rebuilt from graders that did not change.
    if "ConfigMap" in out.create_children and spec.get("method") == "rft" and status.get("graders"):
        changed = [
            g["name"]
            for g in status["graders"]
            if (v := seen.graders.get(g["name"])) is None or v.resource_version != g.get("resourceVersion")
        ]
        if changed:
            out.create_children.remove("ConfigMap")
            d.stalled = d.stalled or (
                R.REASON_SNAPSHOT_LOST,
                f"the trainer ConfigMap was deleted and RewardGrader {', '.join(changed)} changed since the "
                "job started; running pods keep their copy, new ones cannot start",
            )
        else:
            out.snapshot_graders = [seen.graders[g["name"]] for g in status["graders"]]

    # A refused create: say so (the server's message), and retry only after the back-off.
    blocked = False
    if seen.create_failure:
        failure = seen.create_failure
        d.created = (False, R.REASON_FAILED_CREATE, failure.message)
        d.stalled = d.stalled or (R.REASON_FAILED_CREATE, failure.message)
        if now < failure.retry_at:
            blocked = True
            out.create_children = []
            out.requeue((failure.retry_at - now).total_seconds())

    # Pods of an earlier attempt (before a restart or a suspension) go before the new ones (same names).
    stale = [p for p in live_ours if p.attempt != attempt]
    out.delete_pods = [p.name for p in stale if not p.deleting]
    waiting_for += [f"pod {p.name}" for p in stale]
    current = [p for p in ours if p.attempt == attempt]
    live_current = [p for p in current if not p.gone]

    # A failed or vanished pod of the current attempt: fail the job, or restart the whole group.
    failed = [p for p in current if p.phase == "Failed"]
    vanished = [p for p in current if (p.gone or p.deleting) and p.phase not in ("Succeeded", "Failed")]
    judgements = [judge(p, spec) for p in failed] + [judge(p, spec, vanished=True) for p in vanished]
    known = {p.rank for p in current}
    if phase == R.RUNNING and len(known) < nodes:
        # A pod of a running job that is not even a tombstone (the operator was down when it went).
        missing = ", ".join(str(r) for r in range(nodes) if r not in known)
        judgements.append(_unknown_disappearance(missing))
    if judgements:
        return _restart_or_fail(out, job, d, sorted(judgements, key=lambda j: j.cause), live_ours, now)

    counts = {
        "active": sum(p.active for p in live_current),
        "succeeded": sum(p.phase == "Succeeded" for p in current),
        "failed": 0,
    }
    if len(current) == nodes and all(p.phase == "Succeeded" for p in current):
        done = _Desired(R.SUCCEEDED, R.REASON_SUCCEEDED, f"all {nodes} trainer pod(s) finished")
        done.fields.update(completionTime=rfc3339(now), nodes=counts)
        done.graders = d.graders
        _apply(out, job, done, now)
        out.create_children = []
        return out

    if waiting_for and d.phase == R.PENDING:
        d.reason = R.REASON_PREVIOUS_PODS_TERMINATING
        d.message = f"waiting for {', '.join(waiting_for[:MAX_NAMED])} to terminate"
        if not live_current and d.created is None:
            d.created = (False, d.reason, d.message)
    config_ours = "ConfigMap" not in seen.child_kinds or (
        (cm := seen.children.get("ConfigMap")) is not None and cm.owner_uid == uid
    )
    config_coming = "ConfigMap" in out.create_children
    if (
        len(live_current) < nodes
        and not stale
        and not foreign
        and not conflicts
        and not blocked
        and (config_ours or config_coming)
    ):
        out.create_pods = True
        # Counted as the Job controller counts them (active += the pods it is about to create): the pods this
        # pass creates are active in the status it writes before creating them (a restart's, a resume's), so
        # the watch delivering them costs no second write; a refused create is corrected by the next pass
        # (Created=False). A new job writes after its pods exist (write_later).
        counts["active"] += nodes - len({p.rank for p in live_current})
    if (status.get("nodes") or {}) != counts:
        d.fields["nodes"] = counts

    # Pods that do not start: say why; image and configuration errors fail after the start-up deadline.
    startup = int(spec.get("startupDeadlineSeconds", 600))
    unplaced: list[gang.Unschedulable] = []
    for p in sorted(live_current, key=lambda p: p.rank):
        if p.phase != "Pending":
            continue
        if p.waiting_reason in R.STARTUP_ERROR_REASONS:
            detail = f"pod {p.name}: {p.waiting_reason}: {p.waiting_message or ''}".rstrip(": ")
            waited = (now - (p.created or now)).total_seconds()
            if waited > startup:
                message = f"startupDeadlineSeconds ({startup}) exceeded: {detail}"
                return _fail(out, job, R.REASON_STARTUP_DEADLINE_EXCEEDED, message, live_ours, now)
            out.requeue(startup - waited)
            d.stalled = d.stalled or (p.waiting_reason, detail)
        elif p.unschedulable:
            since = p.unschedulable_since or p.created or now
            unplaced.append(gang.Unschedulable(p.name, since, p.unschedulable))
    # Pods the scheduler cannot place: said at once (Unschedulable), and for the whole group once it lasts
    # longer than startupDeadlineSeconds (UnschedulableTooLong); the job keeps waiting (the cluster may grow).
    too_long = gang.late_message(unplaced, nodes, now, startup)
    if too_long:
        d.stalled = d.stalled or (R.REASON_UNSCHEDULABLE_TOO_LONG, too_long)
    elif unplaced:
        first = unplaced[0]
        d.stalled = d.stalled or (
            R.REASON_UNSCHEDULABLE,
            f"pod {first.pod} cannot be scheduled: {first.message}",
        )
        out.requeue(startup - max((now - u.since).total_seconds() for u in unplaced))

    running = [p for p in live_current if p.phase == "Running" and not p.deleting]
    if (
        len(live_current) == nodes
        and running
        and all(p.phase in ("Running", "Succeeded") for p in live_current)
    ):
        if d.phase != R.RUNNING:
            suffix = f" (attempt {attempt + 1})" if attempt else ""
            d.phase, d.reason, d.message = (
                R.RUNNING,
                R.REASON_RUNNING,
                f"all {nodes} trainer pod(s) running{suffix}",
            )
    elif d.phase == R.RUNNING:
        d.phase, d.reason, d.message = R.PENDING, R.REASON_PODS_PENDING, "waiting for trainer pods to start"
    out.write_later = (
        fresh
        and out.create_pods
        and not live_current
        and not out.snapshot_graders
        and not out.delete_pods
        and seen.create_failure is None
        and not d.stalled
        and kueue.queue_name(job) is None
    )
    _apply(out, job, d, now)
    return out


def _kueue(
    out: Plan, job: Json, seen: Observed, live_ours: list[PodView], now: datetime
) -> tuple[bool, kueue.Gate | None]:
    """A job queued with Kueue: its Workload kept in step with the job, and no pod until Kueue admits the
    whole group (README "Gang admission with Kueue"). Returns (held, gate): held means the plan is complete
    (the job waits suspended, without pods); otherwise `gate` is Kueue's admission (None when spec.suspend
    decides)."""
    spec = job["spec"]
    if not seen.kueue_served:
        message = (
            f"labelled {kueue.QUEUE_LABEL}={kueue.queue_name(job)}, but the operator found no Kueue Workload "
            f"API ({kueue.API_VERSION}) when it started: install Kueue and restart the operator, or remove "
            "the label"
        )
        reason = R.REASON_KUEUE_UNAVAILABLE
        _hold(out, job, _Desired(R.SUSPENDED, reason, message, stalled=(reason, message)), live_ours, now)
        return True, None
    failure = seen.create_failure if seen.workload is None else None
    if seen.workload is None:
        # A refused create (a missing WorkloadPriorityClass, Kueue's webhook) is retried after its back-off.
        if failure is None or now >= failure.retry_at:
            out.create_workload = True
        else:
            out.requeue((failure.retry_at - now).total_seconds())
    elif (patch := kueue.active_patch(job, seen.workload)) is not None:
        out.workload_active = patch["spec"]["active"]
    if spec.get("suspend"):
        # Kueue evicts the inactive Workload; once the pods are gone its quota is given back.
        if seen.workload is not None:
            out.release_workload = kueue.gate(job, seen.workload, len(live_ours)).release_quota
        return False, None
    gate = kueue.gate(job, seen.workload, pods_left=len(live_ours))
    if gate.may_run:
        return False, gate
    out.release_workload = gate.release_quota
    stopped = gate.reason in (R.REASON_PREEMPTED, R.REASON_EVICTED)
    d = _Desired(R.SUSPENDED, gate.reason, gate.message)
    if failure is not None:
        d.stalled = (R.REASON_FAILED_CREATE, failure.message)
    _hold(out, job, d, live_ours, now, warning=stopped)
    return True, None


def _hold(
    out: Plan, job: Json, d: _Desired, live_ours: list[PodView], now: datetime, warning: bool = False
) -> None:
    """The job waits suspended for Kueue: no pods (checkpoints stay), the cause in the status and an Event."""
    status = job.get("status") or {}
    phase = status.get("phase")
    if phase is None:
        d.fields.update(restartCount=0, attempt=0)
    elif phase != R.SUSPENDED:
        d.fields["startTime"] = None
    before = next(
        (
            c
            for c in status.get("conditions") or []
            if c.get("type") == R.COND_SUSPENDED and c.get("status") == "True"
        ),
        None,
    )
    _apply(out, job, d, now, warning=warning)
    if phase == R.SUSPENDED and before is not None and before.get("reason") != d.reason:
        # Still suspended, for another cause (queued, preempted, queued again): said with an Event too.
        out.events.append(("Warning" if warning else "Normal", d.reason, d.message))
    out.delete_pods = [p.name for p in live_ours if p.live]


def _unknown_disappearance(ranks: str) -> Judgement:
    return Judgement(Verdict.COUNT, R.REASON_POD_FAILED, f"the trainer pod(s) of rank {ranks} disappeared")


def _restart_or_fail(
    out: Plan, job: Json, d: _Desired, judgements: list[Judgement], live_ours: list[PodView], now: datetime
) -> Plan:
    """A failed or vanished pod: the worst judgement decides (fail; restart counted against backoffLimit;
    restart counted against maxDisruptions)."""
    spec, status = job["spec"], job.get("status") or {}
    decisive = worst(judgements)
    assert decisive is not None
    cause = "; ".join(j.cause for j in judgements[:MAX_NAMED])
    restarts = int(status.get("restartCount", 0))
    disruptions = int(status.get("disruptionCount", 0))
    if decisive.verdict == Verdict.FAIL_JOB:
        return _fail(out, job, decisive.reason, cause, live_ours, now)
    if decisive.verdict == Verdict.COUNT:
        limit = int(spec.get("backoffLimit", 3))
        if restarts >= limit:
            message = f"backoffLimit ({limit}) exceeded after {restarts} restart(s): {cause}"
            return _fail(out, job, R.REASON_BACKOFF_LIMIT_EXCEEDED, message, live_ours, now)
        message = f"restart {restarts + 1} of at most {limit}: {cause}"
        counts, reason = {"restartCount": restarts + 1}, R.REASON_POD_FAILED
    else:
        limit = int(spec.get("maxDisruptions", 10))
        if disruptions >= limit:
            message = f"maxDisruptions ({limit}) exceeded after {disruptions} disruption(s): {cause}"
            return _fail(out, job, R.REASON_MAX_DISRUPTIONS_EXCEEDED, message, live_ours, now)
        message = (
            f"restart after disruption {disruptions + 1} of at most {limit} (not counted against "
            f"backoffLimit): {cause}"
        )
        counts, reason = {"disruptionCount": disruptions + 1}, R.REASON_POD_DISRUPTED
        out.disrupted = True
    restart = _Desired(
        R.RESTARTING, reason, message, fields={**counts, "attempt": current_attempt(status) + 1}
    )
    restart.graders = d.graders
    _apply(out, job, restart, now, warning=True)
    out.delete_pods = [p.name for p in live_ours if not p.deleting]
    out.restarted = True
    out.create_children, out.create_pods = [], False
    return out


def _phase_condition(status: Json, phase: str | None) -> tuple[str, str]:
    """The reason and message of the phase's own condition, kept while the phase stays."""
    target = {R.PENDING: R.CREATED, R.RUNNING: R.COND_RUNNING, R.RESTARTING: R.COND_RESTARTING}.get(
        phase or ""
    )
    for c in status.get("conditions") or []:
        if (
            c.get("type") == target
            and c.get("status") == "True"
            and c.get("reason") != R.REASON_FAILED_CREATE
        ):
            return c.get("reason") or R.REASON_PODS_PENDING, c.get("message") or ""
    return R.REASON_PODS_PENDING, "waiting for trainer pods to start"


def _fail(out: Plan, job: Json, reason: str, message: str, live_ours: list[PodView], now: datetime) -> Plan:
    status = job.get("status") or {}
    d = _Desired(R.FAILED, reason, message, fields={"completionTime": rfc3339(now)})
    if (job["spec"].get("method") == "rft") and status.get("graders"):
        d.graders = (True, R.REASON_GRADERS_READY, "the graders were snapshotted when the job started")
    _apply(out, job, d, now, warning=True)
    out.create_pods, out.create_children, out.snapshot_graders = False, [], []
    out.delete_pods = [p.name for p in live_ours if p.live and p.active]
    return out
