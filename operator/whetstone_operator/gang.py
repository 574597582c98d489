"""Gang start without Kueue, as a pure function: when some of a job's pods cannot be scheduled for longer than
a timeout, say so (which pods, since when, the scheduler's own reason) instead of waiting silently. The pods
that did start keep waiting for the rendezvous; the user decides (more nodes, a smaller job, or Kueue)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

Json = dict[str, Any]

REASON_UNSCHEDULABLE = "Unschedulable"
"""Some trainer pods could not be placed on any node for longer than the scheduling timeout."""


@dataclass(frozen=True)
class Unschedulable:
    pod: str
    since: datetime
    message: str


def unschedulable(pod: Json) -> Unschedulable | None:
    """The scheduler's verdict on a pending pod: PodScheduled=False with reason Unschedulable, or None."""
    if (pod.get("status") or {}).get("phase") not in (None, "Pending"):
        return None
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            if cond.get("reason") != "Unschedulable":
                return None
            since = datetime.fromisoformat(str(cond.get("lastTransitionTime")).replace("Z", "+00:00"))
            return Unschedulable(pod["metadata"]["name"], since, cond.get("message") or "no reason given")
    return None


def stuck_message(pods: list[Json], now: datetime, timeout_seconds: float) -> str | None:
    """A message for the job's condition and Event when pods have been unschedulable for longer than
    `timeout_seconds`; None while none have (or not yet for that long)."""
    stuck = [u for p in pods if (u := unschedulable(p)) is not None]
    return late_message(stuck, len(pods), now, timeout_seconds)


def late_message(stuck: list[Unschedulable], total: int, now: datetime, timeout_seconds: float) -> str | None:
    """The same from the scheduler's verdicts (the operator's lifecycle has them from its pod views); `total`
    is the number of trainer pods of the job."""
    late = sorted(
        (u for u in stuck if (now - u.since).total_seconds() >= timeout_seconds), key=lambda u: u.pod
    )
    if not late:
        return None
    first = late[0]
    waited = int((now - min(u.since for u in late)).total_seconds())
    names = ", ".join(u.pod for u in late[:8]) + (f" and {len(late) - 8} more" if len(late) > 8 else "")
    return (
        f"{len(late)} of {total} trainer pod(s) cannot be scheduled for {waited} s ({names}): "
        f"{first.message}. The job cannot start until all of them run; free capacity, lower nodes or "
        "gpusPerNode, or queue it with Kueue (label kueue.x-k8s.io/queue-name)"
    )
