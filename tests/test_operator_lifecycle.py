"""The life of a FineTuneJob (lifecycle.plan): every transition without a cluster."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from whetstone_api.reasons import JOB_CONDITION_TYPES as CONDITION_TYPES
from whetstone_api.uris import uri_of_pod_path
from whetstone_api.wire import TrainerReport
from whetstone_operator.lifecycle import (
    PodView,
    checkpoints_kept_at_end,
    plan,
    progress_due,
    progress_from,
)

NOW = datetime(2026, 11, 28, 18, 0, tzinfo=UTC)


def job(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "whetstone.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": "u", "generation": 1},
        "spec": {"nodes": 2, "backoffLimit": 2, **spec},
        "status": status or {},
    }


def pods(*phases: str, attempt: int = 0, deleting: bool = False) -> list[PodView]:
    return [
        PodView(name=f"j-node-{i}", rank=i, attempt=attempt, phase=p, deleting=deleting, ip=f"10.0.0.{i}")
        for i, p in enumerate(phases)
    ]


def conditions(p: Any) -> dict[str, str]:
    return {c["type"]: c["status"] for c in p.status["conditions"]}


def test_a_new_job_creates_its_pods_and_is_pending() -> None:
    p = plan(job(), [], NOW)
    assert p.create_pods and p.phase == "Pending"
    assert conditions(p) == {t: "True" if t == "Created" else "False" for t in CONDITION_TYPES}
    assert p.status["observedGeneration"] == 1 and p.status["startTime"] == "2026-11-28T18:00:00Z"
    assert p.event and p.event[1] == "Created"


def test_pending_until_every_pod_runs_then_running_once() -> None:
    pending = {"phase": "Pending", "restartCount": 0}
    p = plan(job(pending), pods("Running", "Pending"), NOW)
    assert not p.create_pods and p.phase is None
    p = plan(job(pending), pods("Running", "Running"), NOW)
    assert p.phase == "Running" and conditions(p)["Running"] == "True"
    running = {"phase": "Running", "restartCount": 0, "conditions": p.status["conditions"]}
    again = plan(job(running), pods("Running", "Running"), NOW + timedelta(seconds=5))
    assert again.phase is None and again.event is None


def test_missing_pods_of_a_pending_job_are_created_again() -> None:
    p = plan(job({"phase": "Pending", "restartCount": 0}), pods("Running"), NOW)
    assert p.create_pods and p.phase is None


def test_a_failed_pod_restarts_the_whole_group() -> None:
    failed = pods("Running", "Failed")
    failed[1] = PodView("j-node-1", 1, 0, "Failed", exit_code=137, reason="Error")
    p = plan(job({"phase": "Running", "restartCount": 0}), failed, NOW)
    assert p.phase == "Restarting" and p.status["restartCount"] == 1 and p.delete_pods and p.restarted
    assert "pod j-node-1 failed, exit code 137" in p.status["message"]
    assert conditions(p)["Restarting"] == "True" and p.event and p.event[0] == "Warning"


def test_restarting_waits_for_the_old_pods_then_creates_the_next_attempt() -> None:
    restarting = {"phase": "Restarting", "restartCount": 1}
    p = plan(job(restarting), pods("Running", "Failed", attempt=0), NOW)
    assert p.delete_pods and not p.create_pods
    p = plan(job(restarting), pods("Running", "Failed", attempt=0, deleting=True), NOW)
    assert not p.delete_pods and not p.create_pods
    p = plan(job(restarting), [], NOW)
    assert p.create_pods and p.phase is None
    p = plan(job(restarting), pods("Running", "Running", attempt=1), NOW)
    assert p.phase == "Running" and "attempt 2" in p.status["message"]


def test_backoff_limit_exhausted_fails_naming_the_cause() -> None:
    failed = [PodView("j-node-0", 0, 2, "Failed", exit_code=1, reason="Error"), *pods("Running")[1:]]
    failed[1:] = [PodView("j-node-1", 1, 2, "Running")]
    p = plan(job({"phase": "Running", "restartCount": 2}), failed, NOW)
    assert p.phase == "Failed" and p.status["conditions"][-1]["reason"] == "BackoffLimitExceeded"
    assert (
        "backoffLimit (2) exceeded after 2 restart(s): pod j-node-0 failed, exit code 1"
        in p.status["message"]
    )
    assert p.delete_pods and p.delete_active_pods_only and "completionTime" in p.status


def test_a_vanished_pod_of_a_running_job_counts_as_a_failure() -> None:
    p = plan(job({"phase": "Running", "restartCount": 0}), pods("Running"), NOW)
    assert p.phase == "Restarting" and "disappeared" in p.status["message"]


def test_stale_pods_of_an_older_attempt_are_deleted_first() -> None:
    p = plan(job({"phase": "Running", "restartCount": 1}), pods("Running", "Running", attempt=0), NOW)
    assert p.delete_pods and p.phase is None


def test_succeeded_when_every_pod_exits_zero() -> None:
    p = plan(job({"phase": "Running", "restartCount": 0}), pods("Succeeded", "Succeeded"), NOW)
    assert (
        p.phase == "Succeeded"
        and conditions(p)["Succeeded"] == "True"
        and conditions(p)["Running"] == "False"
    )
    assert p.status["completionTime"] == "2026-11-28T18:00:00Z"


def test_terminal_is_terminal() -> None:
    for phase in ("Succeeded", "Failed"):
        p = plan(job({"phase": phase, "restartCount": 0}), [], NOW)
        assert not p.create_pods and p.phase is None
        p = plan(job({"phase": phase}), pods("Running", "Failed"), NOW)
        assert p.delete_pods and p.delete_active_pods_only and not p.create_pods


def test_ttl_after_finished_deletes_the_job() -> None:
    done = {"phase": "Succeeded", "completionTime": "2026-11-28T17:59:00Z"}
    assert plan(job(done, ttlSecondsAfterFinished=120), [], NOW).requeue_after == 60
    assert plan(job(done, ttlSecondsAfterFinished=30), [], NOW).delete_job


def test_suspend_deletes_pods_and_resume_starts_again() -> None:
    p = plan(job({"phase": "Running", "restartCount": 0}, suspend=True), pods("Running", "Running"), NOW)
    assert p.phase == "Suspended" and p.delete_pods and conditions(p)["Suspended"] == "True"
    assert p.status["startTime"] is None
    suspended = {"phase": "Suspended", "restartCount": 0, "conditions": p.status["conditions"]}
    p = plan(job(suspended), [], NOW)
    assert p.phase == "Pending" and p.create_pods and p.status["startTime"] == "2026-11-28T18:00:00Z"
    suspended_condition = next(c for c in p.status["conditions"] if c["type"] == "Suspended")
    assert suspended_condition == {**suspended_condition, "status": "False", "reason": "Resumed"}


def test_a_job_created_suspended_creates_no_pods() -> None:
    p = plan(job(suspend=True), [], NOW)
    assert p.phase == "Suspended" and not p.create_pods and conditions(p)["Created"] == "False"


def test_active_deadline_fails_the_job() -> None:
    running = {"phase": "Running", "restartCount": 0, "startTime": "2026-11-28T17:58:00Z"}
    p = plan(job(running, activeDeadlineSeconds=60), pods("Running", "Running"), NOW)
    assert p.phase == "Failed" and "activeDeadlineSeconds (60) exceeded" in p.status["message"]
    assert p.status["conditions"][-1]["reason"] == "DeadlineExceeded" and p.delete_pods
    assert plan(job(running, activeDeadlineSeconds=600), pods("Running", "Running"), NOW).phase is None


def test_transition_time_moves_only_when_a_condition_changes() -> None:
    p = plan(job(), [], NOW)
    later = plan(
        job({"phase": "Pending", "conditions": p.status["conditions"]}),
        pods("Running", "Running"),
        NOW + timedelta(60),
    )
    times = {c["type"]: c["lastTransitionTime"] for c in later.status["conditions"]}
    assert times["Created"] == "2026-11-28T18:00:00Z" and times["Running"] != times["Created"]


def test_progress_from_the_trainer_report_and_throttle() -> None:
    report = TrainerReport.parse(
        b'{"job": "j", "phase": "Training", "step": 12, "totalSteps": 60, "loss": 1.5, "etaSeconds": 30,'
        b' "evalLoss": null}'
    )
    progress = progress_from(report, NOW)
    assert progress == {
        "step": 12,
        "totalSteps": 60,
        "steps": "12/60",
        "loss": 1.5,
        "etaSeconds": 30,
        "lastUpdateTime": "2026-11-28T18:00:00Z",
    }
    status = {"progress": progress}
    assert not progress_due(status, NOW + timedelta(seconds=5), 15, report)
    assert progress_due(status, NOW + timedelta(seconds=15), 15, report)
    finished = report.model_copy(update={"phase": "Finished"})
    assert progress_due(status, NOW + timedelta(seconds=1), 15, finished)


def test_pod_paths_map_back_to_pvc_uris() -> None:
    assert (
        uri_of_pod_path("/mnt/pvc/work/out/checkpoints/step-00000010")
        == "pvc://work/out/checkpoints/step-00000010"
    )
    assert uri_of_pod_path("/data/x") == "/data/x"


def test_checkpoints_kept_when_the_trainer_finishes() -> None:
    spec = {"checkpointing": {"everySteps": 10, "keepLast": 2}}
    assert checkpoints_kept_at_end(spec, 60) == {40, 50}
    assert checkpoints_kept_at_end(spec, 65) == {50, 60}
    assert checkpoints_kept_at_end({"checkpointing": {"keepLast": 2}}, 60) == set()
