"""Without Kueue, pods that cannot be scheduled past a timeout are reported, with the scheduler's reason."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from whetstone_operator import gang

Json = dict[str, Any]


def test_pods_unschedulable_past_the_timeout_are_reported_with_the_schedulers_reason() -> None:
    def pod(name: str, phase: str, cond: Json | None) -> Json:
        return {"metadata": {"name": name}, "status": {"phase": phase, "conditions": [cond] if cond else []}}

    why = "0/6 nodes are available: 4 Insufficient nvidia.com/gpu, 2 node(s) had untolerated taint"
    stuck = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": why}
    pods = [
        pod("j-node-0", "Running", None),
        pod("j-node-1", "Pending", {**stuck, "lastTransitionTime": "2026-11-03T12:00:00Z"}),
        pod("j-node-2", "Pending", {**stuck, "lastTransitionTime": "2026-11-03T12:04:00Z"}),
        pod("j-node-3", "Pending", {"type": "PodScheduled", "status": "True"}),
    ]
    now = datetime(2026, 11, 3, 12, 5, tzinfo=UTC)
    assert gang.stuck_message(pods, now, timeout_seconds=600) is None  # not long enough yet
    message = gang.stuck_message(pods, now, timeout_seconds=120)
    assert message is not None and message.startswith(
        "1 of 4 trainer pod(s) cannot be scheduled for 300 s (j-node-1)"
    )
    assert "Insufficient nvidia.com/gpu" in message and "kueue.x-k8s.io/queue-name" in message
    assert "2 of 4" in gang.stuck_message(pods, now, timeout_seconds=60)
    gated = {"type": "PodScheduled", "status": "False", "reason": "SchedulingGated"}
    assert (
        gang.unschedulable(pod("x", "Pending", {**gated, "lastTransitionTime": "2026-11-03T12:00:00Z"}))
        is None
    )
