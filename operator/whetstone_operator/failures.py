"""The failure policy, like a Job's podFailurePolicy: what a failed (or vanished) trainer pod means for the
job. Pure functions of the pod's view and the spec, so every rule is unit-tested.

- The user's rules (spec.podFailurePolicy.rules) are checked first, in order; the first match decides:
  FailJob, Ignore (restart without counting against backoffLimit) or Count.
- Without a matching rule: the trainer's own permanent error (exit code wire.EXIT_PERMANENT, or its
  termination message marked wire.PERMANENT_MARKER, which survives torchrun turning exit codes into 1) fails
  the job; a disruption by the cluster (DisruptionTarget, eviction, preemption, node loss) restarts the group
  without counting against backoffLimit; anything else counts.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from whetstone_api import reasons as R
from whetstone_api.wire import EXIT_PERMANENT, is_permanent

from .views import PodView

Json = dict[str, Any]


class Verdict(enum.IntEnum):
    """Ordered by severity: the worst verdict over the group's failed pods decides."""

    DISRUPTION = 1  # restart, counted against maxDisruptions
    COUNT = 2  # restart, counted against backoffLimit
    FAIL_JOB = 3  # fail at once


@dataclass(frozen=True)
class Judgement:
    verdict: Verdict
    reason: str  # the condition reason the job gets
    cause: str  # what happened, naming the pod


def _matches(rule: Json, pod: PodView) -> bool:
    codes = rule.get("onExitCodes")
    if codes:
        if pod.exit_code is None:
            return False
        inside = pod.exit_code in set(codes.get("values") or [])
        return inside if codes.get("operator") == "In" else not inside
    conditions = rule.get("onPodConditions")
    if conditions:
        return any((c.get("type"), c.get("status", "True")) in pod.conditions for c in conditions)
    reasons = set(rule.get("onReasons") or [])
    return bool(reasons & {pod.reason, pod.disruption_reason} - {None})


def judge(pod: PodView, spec: Json, vanished: bool = False) -> Judgement:
    """What the failure of `pod` means; `vanished`: it was deleted (or its node lost) before it ended."""
    cause = pod.describe_failure() if not vanished else _vanished(pod)
    for rule in (spec.get("podFailurePolicy") or {}).get("rules") or []:
        if _matches(rule, pod):
            action = rule.get("action")
            if action == "FailJob":
                return Judgement(Verdict.FAIL_JOB, R.REASON_POD_FAILURE_POLICY, cause)
            if action == "Ignore":
                return Judgement(Verdict.DISRUPTION, R.REASON_POD_DISRUPTED, cause)
            return Judgement(Verdict.COUNT, R.REASON_POD_FAILED, cause)
    if not vanished and (pod.exit_code == EXIT_PERMANENT or is_permanent(pod.termination_message)):
        return Judgement(Verdict.FAIL_JOB, R.REASON_PERMANENT_ERROR, cause)
    if pod.disrupted:
        return Judgement(Verdict.DISRUPTION, R.REASON_POD_DISRUPTED, cause)
    return Judgement(Verdict.COUNT, R.REASON_POD_FAILED, cause)


def _vanished(pod: PodView) -> str:
    if pod.disruption_reason:
        return f"pod {pod.name} was disrupted ({pod.disruption_reason})"
    if pod.reason:
        return f"pod {pod.name} was deleted ({pod.reason})"
    return f"pod {pod.name} was deleted while it ran"


def worst(judgements: Iterable[Judgement]) -> Judgement | None:
    """The judgement that decides for the group; ties keep the first (lowest rank)."""
    best: Judgement | None = None
    for j in judgements:
        if best is None or j.verdict > best.verdict:
            best = j
    return best
