"""The life of a FineTuneJob as a pure function: from the job and its pods, what the status becomes and what
must be done. The kopf handlers (handlers.py) only observe, call `plan`, and carry the plan out, so every
transition is unit-tested without a cluster (tests/test_operator_lifecycle.py).

Phases: Pending → (Suspended) → Running → Succeeded | Failed, with Restarting between attempts. The status
is the operator's memory: the phase, the restart count (the attempt number that labels the pods) and the
start time survive an operator restart because they live on the object, never only in this process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from whetstone_api import reasons as R
from whetstone_api.wire import TrainerReport

from .children import ATTEMPT_LABEL, RANK_LABEL

Json = dict[str, Any]


@dataclass(frozen=True)
class PodView:
    """What the lifecycle needs to know about one trainer pod."""

    name: str
    rank: int
    attempt: int
    phase: str
    deleting: bool = False
    ip: str | None = None
    exit_code: int | None = None
    reason: str | None = None

    @classmethod
    def of(cls, pod: Json) -> PodView:
        meta, status = pod.get("metadata", {}), pod.get("status") or {}
        labels = meta.get("labels") or {}
        exit_code = reason = None
        for cs in status.get("containerStatuses") or []:
            term = (cs.get("state") or {}).get("terminated")
            if term and term.get("exitCode", 0) != 0:
                exit_code, reason = term.get("exitCode"), term.get("reason")
        return cls(
            name=meta.get("name", ""),
            rank=int(labels.get(RANK_LABEL, "-1")),
            attempt=int(labels.get(ATTEMPT_LABEL, "-1")),
            phase=status.get("phase") or "Pending",
            deleting=bool(meta.get("deletionTimestamp")),
            ip=status.get("podIP"),
            exit_code=exit_code,
            reason=reason or status.get("reason"),
        )

    def describe_failure(self) -> str:
        parts = [f"pod {self.name} failed"]
        if self.exit_code is not None:
            parts.append(f"exit code {self.exit_code}")
        if self.reason:
            parts.append(f"reason {self.reason}")
        return ", ".join(parts)


@dataclass
class Plan:
    """What `plan` decided. `status` is a merge patch of .status (empty: nothing to write)."""

    status: Json = field(default_factory=dict)
    create_pods: bool = False
    delete_pods: bool = False
    # Only the pods that are still pending or running (a finished job keeps its failed pods for their logs).
    delete_active_pods_only: bool = False
    delete_job: bool = False
    event: tuple[str, str, str] | None = None  # (type, reason, message)
    restarted: bool = False
    requeue_after: float | None = None

    @property
    def phase(self) -> str | None:
        return self.status.get("phase")

    @property
    def acts(self) -> bool:
        """True when the plan changes the world beyond status (decide these on a fresh read)."""
        return self.create_pods or self.delete_pods or self.delete_job or bool(self.status.get("phase"))


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def conditions_for(
    previous: list[Json], true_type: set[str], reason: str, message: str, generation: int, now: datetime
) -> list[Json]:
    """All six conditions with explicit True/False; lastTransitionTime moves only when the status does."""
    old = {c["type"]: c for c in previous or []}
    out = []
    for t in R.JOB_CONDITION_TYPES:
        status = "True" if t in true_type else "False"
        prev = old.get(t)
        if prev and prev.get("status") == status:
            cond = dict(prev)
            if status == "True":
                cond.update(reason=reason, message=message)
            cond["observedGeneration"] = generation
        else:
            cond = {
                "type": t,
                "status": status,
                "reason": reason if status == "True" else _false_reason(t, reason),
                "message": message if status == "True" else "",
                "lastTransitionTime": rfc3339(now),
                "observedGeneration": generation,
            }
        out.append(cond)
    return out


def _false_reason(condition: str, reason: str) -> str:
    if condition == "Suspended" and reason == "Resumed":
        return "Resumed"
    return reason


# Which conditions hold in each phase. Created stays True once the children exist.
_TRUE_IN = {
    "Pending": {"Created"},
    "Running": {"Created", "Running"},
    "Restarting": {"Created", "Restarting"},
    "Suspended": {"Suspended"},
    "Succeeded": {"Created", "Succeeded"},
    "Failed": {"Created", "Failed"},
}


def transition(
    plan: Plan, job: Json, phase: str, reason: str, message: str, now: datetime, warning: bool = False
) -> None:
    status = job.get("status") or {}
    generation = job["metadata"].get("generation", 1)
    true_types = set(_TRUE_IN[phase])
    if phase == "Suspended" and status.get("phase") not in (None, "Pending", "Suspended"):
        true_types.add("Created")
    plan.status.update(
        phase=phase,
        message=message,
        observedGeneration=generation,
        conditions=conditions_for(
            status.get("conditions") or [], true_types, reason, message, generation, now
        ),
    )
    if status.get("phase") != phase:
        plan.event = ("Warning" if warning else "Normal", reason, message)


def plan(job: Json, pods: list[PodView], now: datetime | None = None) -> Plan:
    """The next step of the job's life, given its pods (those labelled with its name)."""
    now = now or datetime.now(UTC)
    meta, spec, status = job["metadata"], job["spec"], job.get("status") or {}
    phase = status.get("phase")
    nodes = int(spec.get("nodes", 1))
    restarts = int(status.get("restartCount", 0))
    backoff_limit = int(spec.get("backoffLimit", 3))
    out = Plan()
    generation = meta.get("generation", 1)
    if status.get("observedGeneration") != generation and phase:
        out.status["observedGeneration"] = generation

    # Terminal is terminal: never new children; stop what still runs; honour the TTL.
    if phase in R.TERMINAL_PHASES:
        if any(not p.deleting and p.phase in ("Pending", "Running") for p in pods):
            out.delete_pods = out.delete_active_pods_only = True
        ttl = spec.get("ttlSecondsAfterFinished")
        done = parse_time(status.get("completionTime"))
        if ttl is not None and done is not None:
            left = (done + timedelta(seconds=int(ttl)) - now).total_seconds()
            if left <= 0:
                out.delete_job = True
            else:
                out.requeue_after = left
        return out

    if spec.get("suspend"):
        if phase != "Suspended":
            transition(out, job, "Suspended", "Suspended", "spec.suspend is true: pods deleted", now)
            out.status["startTime"] = None
        if any(not p.deleting for p in pods):
            out.delete_pods = True
        return out

    if phase == "Suspended":
        # Resume: a fresh start time (the deadline counts from here); pods again once the old are gone.
        transition(
            out, job, "Pending", "Resumed", "spec.suspend is false: resuming from the latest checkpoint", now
        )
        out.status["startTime"] = rfc3339(now)
        out.create_pods = not pods
        return out

    deadline = spec.get("activeDeadlineSeconds")
    started = parse_time(status.get("startTime"))
    if deadline and started and (now - started).total_seconds() > int(deadline):
        message = f"activeDeadlineSeconds ({deadline}) exceeded: the job ran since {rfc3339(started)}"
        transition(out, job, "Failed", "DeadlineExceeded", message, now, warning=True)
        out.status["completionTime"] = rfc3339(now)
        out.delete_pods = out.delete_active_pods_only = True
        return out

    if phase == "Restarting" and any(p.attempt != restarts for p in pods):
        # The previous attempt's pods must be gone before the new ones (same names) are created.
        out.delete_pods = any(not p.deleting for p in pods if p.attempt != restarts)
        return out

    current = [p for p in pods if p.attempt == restarts]
    stale = [p for p in pods if p.attempt != restarts]
    if stale:
        # Pods of an older attempt, left by an operator that stopped mid-restart.
        out.delete_pods = True
        return out

    failed = [p for p in current if p.phase == "Failed"]
    vanished = phase == "Running" and (
        len(current) < nodes or any(p.deleting and p.phase not in ("Succeeded", "Failed") for p in current)
    )
    if failed or vanished:
        if failed:
            cause = "; ".join(p.describe_failure() for p in sorted(failed, key=lambda p: p.rank))
        else:
            cause = "a trainer pod disappeared while running"
        if restarts >= backoff_limit:
            message = f"backoffLimit ({backoff_limit}) exceeded after {restarts} restart(s): {cause}"
            transition(out, job, "Failed", "BackoffLimitExceeded", message, now, warning=True)
            out.status["completionTime"] = rfc3339(now)
            out.delete_pods = out.delete_active_pods_only = True
        else:
            message = f"restart {restarts + 1} of at most {backoff_limit}: {cause}"
            transition(out, job, "Restarting", "PodFailed", message, now, warning=True)
            out.status["restartCount"] = restarts + 1
            out.delete_pods = True
            out.restarted = True
        return out

    counts = {
        "active": sum(p.phase in ("Pending", "Running") for p in current),
        "succeeded": sum(p.phase == "Succeeded" for p in current),
        "failed": len(failed),
    }
    if (status.get("nodes") or {}) != counts:
        out.status["nodes"] = counts

    if len(current) == nodes and all(p.phase == "Succeeded" for p in current):
        transition(out, job, "Succeeded", "Succeeded", f"all {nodes} trainer pod(s) finished", now)
        out.status["completionTime"] = rfc3339(now)
        return out

    if len(current) < nodes:
        out.create_pods = True
        if phase is None:
            transition(out, job, "Pending", "Created", f"creating {nodes} trainer pod(s)", now)
            out.status.setdefault("startTime", rfc3339(now))
            out.status.setdefault("restartCount", restarts)
        return out

    if all(p.phase == "Running" for p in current):
        if phase != "Running":
            attempt = f" (attempt {restarts + 1})" if restarts else ""
            transition(out, job, "Running", "Running", f"all {nodes} trainer pod(s) running{attempt}", now)
        return out

    if phase not in ("Pending", "Restarting"):
        transition(out, job, "Pending", "PodsPending", "waiting for trainer pods to start", now)
    return out


def progress_from(report: TrainerReport, now: datetime) -> Json:
    """status.progress from the trainer's report."""
    step, total = report.step, report.total_steps
    progress: Json = {
        "step": step,
        "totalSteps": total,
        "steps": f"{step}/{total}" if total is not None else str(step),
        "epoch": report.epoch,
        "loss": report.loss,
        "evalLoss": report.eval_loss,
        "reward": report.reward,
        "tokensPerSecond": report.tokens_per_second,
        "etaSeconds": report.eta_seconds,
        "lastUpdateTime": rfc3339(now),
    }
    return {k: v for k, v in progress.items() if v is not None}


def progress_due(status: Json, now: datetime, interval: float, report: TrainerReport) -> bool:
    """Throttle progress writes; a finished trainer is written at once (it is about to exit)."""
    last = parse_time((status.get("progress") or {}).get("lastUpdateTime"))
    if last is None or report.phase == "Finished":
        return True
    return (now - last).total_seconds() >= interval


def checkpoints_kept_at_end(spec: Json, total_steps: int) -> set[int]:
    """The resumable checkpoints the trainer keeps when it finishes: it saves every `everySteps` before the
    last step and keeps the newest `keepLast`. What it pruned after the operator's last read of /status is
    pruned here too, since the finished trainer can no longer say so."""
    ckpt = spec.get("checkpointing") or {}
    every, keep = ckpt.get("everySteps"), int(ckpt.get("keepLast", 3))
    if not every:
        return set()
    saved = list(range(int(every), int(total_steps), int(every)))
    return set(saved[-keep:])
