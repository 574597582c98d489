"""What the trainer's report becomes (reports.py): progress without NaN, written only when it changed, and
Checkpoints mirrored without trusting the report (inside the output, at most keepLast per pass, names of
another job never touched, kept ones never deleted)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from whetstone_api.wire import TrainerReport
from whetstone_operator.reports import (
    checkpoints_from_report,
    checkpoints_kept_at_end,
    final_from,
    keep_annotated,
    progress_due,
    progress_from,
)
from whetstone_operator.views import CheckpointView

NOW = datetime(2026, 11, 28, 18, 0, tzinfo=UTC)


def job(**spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "j", "namespace": "ns", "uid": "u"},
        "spec": {
            "output": {"uri": "pvc://work/out/j"},
            "checkpointing": {"everySteps": 10, "keepLast": 2},
            **spec,
        },
        "status": {},
    }


def report(
    *steps: int, uri: str = "/mnt/pvc/work/out/j/checkpoints/step-{:08d}", **extra: Any
) -> TrainerReport:
    body = {
        "job": "j",
        "phase": "Training",
        "step": max(steps, default=0),
        "checkpoints": [{"step": s, "uri": uri.format(s)} for s in steps],
        **extra,
    }
    return TrainerReport.parse(json.dumps(body).encode())


def ckpt(
    step: int, uid: str = "u", keep: bool = False, owner: str | None = "u", kind: str = "resumable"
) -> CheckpointView:
    return CheckpointView(f"j-step-{step:08d}", step, kind, uid, owner, keep)


def test_progress_from_the_report_and_no_write_when_nothing_changed() -> None:
    r = TrainerReport.parse(
        b'{"job": "j", "phase": "Training", "step": 12, "totalSteps": 60, "loss": 1.5, "etaSeconds": 30,'
        b' "evalLoss": NaN, "reward": 0.25}'
    )
    progress = progress_from(r, NOW)
    assert progress == {
        "step": 12,
        "totalSteps": 60,
        "steps": "12/60",
        "loss": 1.5,
        "reward": 0.25,
        "etaSeconds": 30,
        "lastUpdateTime": "2026-11-28T18:00:00Z",
    }
    status = {"progress": progress}
    later = progress_from(r, NOW + timedelta(seconds=60))
    assert not progress_due(status, NOW + timedelta(seconds=60), 15, later, False), "unchanged: no PATCH"
    moved = {**later, "step": 13}
    assert not progress_due(status, NOW + timedelta(seconds=5), 15, moved, False)
    assert progress_due(status, NOW + timedelta(seconds=15), 15, moved, False)
    assert progress_due(status, NOW + timedelta(seconds=1), 15, moved, True)


def test_new_checkpoints_are_recorded_and_pruned_ones_deleted() -> None:
    plan = checkpoints_from_report(job(), report(20, 30), [ckpt(10), ckpt(20)])
    assert [c.step for c in plan.create] == [30] and plan.create[
        0
    ].uri == "pvc://work/out/j/checkpoints/step-00000030"
    assert plan.delete == ["j-step-00000010"]
    assert plan.latest == {
        "name": "j-step-00000030",
        "step": 30,
        "uri": "pvc://work/out/j/checkpoints/step-00000030",
    }


def test_checkpoints_outside_the_output_are_refused() -> None:
    plan = checkpoints_from_report(job(), report(10, uri="/mnt/pvc/other/secret/step-{:08d}"), [])
    assert plan.create == [] and plan.latest is None
    assert (
        "'pvc://other/secret/step-00000010' is not inside spec.output.uri 'pvc://work/out/j'"
        in plan.refused[0]
    )
    escape = checkpoints_from_report(job(), report(10, uri="/mnt/pvc/work/out/j/../../etc/{}"), [])
    assert escape.create == [] and escape.refused


def test_at_most_keep_last_new_checkpoints_per_pass() -> None:
    flood = checkpoints_from_report(job(), report(*range(1, 1001)), [])
    assert [c.step for c in flood.create] == [1000, 999]


def test_checkpoint_names_of_another_job_are_never_touched() -> None:
    theirs = ckpt(10, uid="old")
    plan = checkpoints_from_report(job(), report(10, 20), [theirs, ckpt(30, uid="old")])
    assert [c.step for c in plan.create] == [20] and plan.delete == []
    assert plan.refused == ["Checkpoint j-step-00000010 exists and belongs to another job of this name"]


def test_kept_checkpoints_are_orphaned_and_marked_pruned_never_deleted() -> None:
    kept = ckpt(10, keep=True)
    assert keep_annotated(job(), [kept, ckpt(20)]) == ["j-step-00000010"]
    assert keep_annotated(job(), [ckpt(10, keep=True, owner=None)]) == []
    plan = checkpoints_from_report(job(), report(20, 30), [kept, ckpt(20)])
    assert (
        plan.delete == [] and plan.mark_pruned == ["j-step-00000010"] and plan.orphan == ["j-step-00000010"]
    )


def test_on_success_the_final_checkpoint_and_what_the_trainer_pruned_last() -> None:
    j = job(hyperparameters={"maxSteps": 60})
    j["status"] = {"progress": {"step": 55, "totalSteps": 60}}
    plan = final_from(j, [ckpt(30), ckpt(40), ckpt(50), ckpt(20, keep=True)])
    assert plan.output == "pvc://work/out/j/final" and plan.step == 60 and plan.create_final
    assert plan.delete == ["j-step-00000030"] and plan.mark_pruned == ["j-step-00000020"]
    assert plan.create == []  # 40 and 50, the two kept at the end, are recorded already
    # The job finished between two reads of /status: the last read saw only step 30's checkpoint. The two
    # the trainer kept (40, 50; 60 is the export) get their Checkpoints, named and placed as it writes them.
    fast = final_from(j, [ckpt(10), ckpt(30)])
    assert fast.delete == ["j-step-00000010", "j-step-00000030"]
    assert fast.create == [
        (40, "pvc://work/out/j/checkpoints/step-00000040"),
        (50, "pvc://work/out/j/checkpoints/step-00000050"),
    ]
    assert final_from(j, [ckpt(40, uid="old")]).create == [
        (50, "pvc://work/out/j/checkpoints/step-00000050")
    ]  # a name another job holds is left to it
    taken = final_from(j, [CheckpointView("j-final", 60, "export", "old", None)])
    assert not taken.create_final and "j-final exists and belongs to another job" in (taken.refused or "")


def test_checkpoints_kept_when_the_trainer_finishes() -> None:
    spec = {"checkpointing": {"everySteps": 10, "keepLast": 2}}
    assert checkpoints_kept_at_end(spec, 60) == {40, 50}
    assert checkpoints_kept_at_end(spec, 65) == {50, 60}
    assert checkpoints_kept_at_end({"checkpointing": {"keepLast": 2}}, 60) == set()
