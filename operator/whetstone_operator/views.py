"""What the operator knows about the objects it watches, as small immutable views parsed once from the API
objects: pods, the job's other children, Checkpoints and RewardGraders. Pure parsing, no API calls; the
lifecycle (lifecycle.py) decides from these views only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from whetstone_api import reasons as R
from whetstone_api.wire import error_of

from .children import ATTEMPT_LABEL, JOB_UID_LABEL, KEEP_ANNOTATION, RANK_LABEL, TRAINER_CONTAINER

Json = dict[str, Any]


def parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def rfc3339(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def controller_uid(meta: Json) -> str | None:
    """The uid of the object's controller (the ownerReference with controller: true), if any."""
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller"):
            return ref.get("uid")
    return None


@dataclass(frozen=True)
class PodView:
    """What the lifecycle needs to know about one trainer pod."""

    name: str
    rank: int
    attempt: int
    phase: str
    uid: str = ""
    deleting: bool = False
    ip: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    owner_uid: str | None = None
    # The trainer container's termination message (its last error), when it ended.
    termination_message: str | None = None
    # The container's waiting reason and message while it has not started (ImagePullBackOff, ...).
    waiting_reason: str | None = None
    waiting_message: str | None = None
    # PodScheduled=False: the scheduler's reason and message, and since when.
    unschedulable: str | None = None
    unschedulable_since: datetime | None = None
    # Pod conditions as (type, status) (DisruptionTarget, ...), with the DisruptionTarget's reason.
    conditions: frozenset[tuple[str, str]] = frozenset()
    disruption_reason: str | None = None
    created: datetime | None = None
    deletion_deadline: datetime | None = None  # metadata.deletionTimestamp: when the grace period ends
    node: str | None = None
    # The pod object is gone (a tombstone kept by the store so a vanished pod's last state is known).
    gone: bool = False

    @classmethod
    def of(cls, pod: Json) -> PodView:
        meta, status = pod.get("metadata") or {}, pod.get("status") or {}
        labels = meta.get("labels") or {}
        exit_code = reason = message = None
        waiting_reason = waiting_message = None
        for cs in status.get("containerStatuses") or []:
            state = cs.get("state") or {}
            term, waiting = state.get("terminated"), state.get("waiting")
            trainer = cs.get("name") == TRAINER_CONTAINER
            if term and (trainer or (term.get("exitCode", 0) != 0 and exit_code is None)):
                exit_code, reason = term.get("exitCode"), term.get("reason")
                message = term.get("message")
            if waiting and waiting.get("reason") and (trainer or waiting_reason is None):
                waiting_reason, waiting_message = waiting.get("reason"), waiting.get("message")
        conditions = status.get("conditions") or []
        condition_set = frozenset((str(c.get("type", "")), str(c.get("status", ""))) for c in conditions)
        unschedulable = since = disruption_reason = None
        for c in conditions:
            if c.get("type") == "PodScheduled" and c.get("status") == "False":
                unschedulable = f"{c.get('reason') or 'Unschedulable'}: {c.get('message') or ''}".strip(": ")
                since = parse_time(c.get("lastTransitionTime"))
            if c.get("type") == R.DISRUPTION_TARGET and c.get("status") == "True":
                disruption_reason = c.get("reason") or R.DISRUPTION_TARGET
        try:
            rank, attempt = int(labels.get(RANK_LABEL, "-1")), int(labels.get(ATTEMPT_LABEL, "-1"))
        except ValueError:
            rank, attempt = -1, -1
        return cls(
            name=meta.get("name", ""),
            rank=rank,
            attempt=attempt,
            phase=status.get("phase") or "Pending",
            uid=meta.get("uid", ""),
            deleting=bool(meta.get("deletionTimestamp")),
            ip=status.get("podIP"),
            exit_code=exit_code,
            reason=reason or status.get("reason"),
            owner_uid=controller_uid(meta),
            termination_message=message,
            waiting_reason=waiting_reason,
            waiting_message=waiting_message,
            unschedulable=unschedulable,
            unschedulable_since=since,
            conditions=condition_set,
            disruption_reason=disruption_reason,
            created=parse_time(meta.get("creationTimestamp")),
            deletion_deadline=parse_time(meta.get("deletionTimestamp")),
            node=(pod.get("spec") or {}).get("nodeName"),
        )

    @property
    def disrupted(self) -> bool:
        """The cluster took the pod away (eviction, preemption, a drained or lost node), not the trainer."""
        return self.disruption_reason is not None or (
            self.reason in R.DISRUPTION_POD_REASONS and self.exit_code in (None, 137, 143)
        )

    @property
    def live(self) -> bool:
        return not self.gone and not self.deleting

    @property
    def active(self) -> bool:
        return self.phase in ("Pending", "Running")

    def describe_failure(self) -> str:
        parts = [f"pod {self.name} failed"]
        if self.exit_code is not None:
            parts.append(f"exit code {self.exit_code}")
        if self.reason:
            parts.append(f"reason {self.reason}")
        text = ", ".join(parts)
        error = error_of(self.termination_message, 600)
        return f"{text}: {error}" if error else text


@dataclass(frozen=True)
class ChildView:
    """One of the job's other children (ConfigMap, Service, NetworkPolicy) as the watch last saw it."""

    kind: str
    name: str
    owner_uid: str | None
    deleting: bool = False

    @classmethod
    def of(cls, kind: str, obj: Json) -> ChildView:
        meta = obj.get("metadata") or {}
        return cls(kind, meta.get("name", ""), controller_uid(meta), bool(meta.get("deletionTimestamp")))


@dataclass(frozen=True)
class CheckpointView:
    """A Checkpoint resource labelled with a job's name."""

    name: str
    step: int
    kind: str
    job_uid: str | None  # the whetstone.dev/job-uid label: which job (of that name) recorded it
    owner_uid: str | None  # its controller; None once orphaned (kept) or for <job>-final
    keep: bool = False
    phase: str | None = None
    uri: str | None = None

    @classmethod
    def of(cls, obj: Json) -> CheckpointView:
        meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
        try:
            step = int(spec.get("step", 0))
        except (TypeError, ValueError):
            step = 0
        return cls(
            name=meta.get("name", ""),
            step=step,
            kind=str(spec.get("kind", "resumable")),
            job_uid=(meta.get("labels") or {}).get(JOB_UID_LABEL),
            owner_uid=controller_uid(meta),
            keep=(meta.get("annotations") or {}).get(KEEP_ANNOTATION) == "true",
            phase=(obj.get("status") or {}).get("phase"),
            uri=spec.get("uri"),
        )


@dataclass(frozen=True)
class GraderView:
    """A RewardGrader: whether it is Ready for its current generation, what it depends on, its spec."""

    name: str
    generation: int
    resource_version: str
    ready: bool
    message: str | None
    spec: Json = field(default_factory=dict)

    @classmethod
    def of(cls, obj: Json) -> GraderView:
        meta, status = obj.get("metadata") or {}, obj.get("status") or {}
        generation = int(meta.get("generation") or 1)
        ready = status.get("phase") == R.READY and status.get("observedGeneration") == generation
        return cls(
            name=meta.get("name", ""),
            generation=generation,
            resource_version=str(meta.get("resourceVersion", "")),
            ready=ready,
            message=status.get("message"),
            spec=obj.get("spec") or {},
        )

    @property
    def children(self) -> list[str]:
        """The graders a weighted grader combines."""
        weighted = self.spec.get("weighted") or {}
        return sorted((weighted.get("graders") or {}).keys())

    @property
    def secrets(self) -> list[str]:
        """The Secrets an http grader reads."""
        secret = (self.spec.get("http") or {}).get("secretName")
        return [secret] if secret else []
