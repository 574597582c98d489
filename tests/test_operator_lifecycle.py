"""The life of a FineTuneJob (lifecycle.plan): every transition without a cluster."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

from whetstone_api import reasons as R
from whetstone_api.wire import termination_message
from whetstone_operator.lifecycle import CreateFailure, Observed, plan
from whetstone_operator.views import ChildView, GraderView, PodView

NOW = datetime(2026, 11, 28, 18, 0, tzinfo=UTC)
UID = "u"


def job(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "whetstone.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "j", "namespace": "ns", "uid": UID, "generation": 1, "resourceVersion": "7"},
        "spec": {"nodes": 2, "backoffLimit": 2, **spec},
        "status": status or {},
    }


def children(owner: str = UID, deleting: bool = False) -> dict[str, ChildView]:
    return {
        "ConfigMap": ChildView("ConfigMap", "j-config", owner, deleting),
        "Service": ChildView("Service", "j", owner, deleting),
        "NetworkPolicy": ChildView("NetworkPolicy", "j", owner, deleting),
    }


def pods(*phases: str, attempt: int = 0, owner: str = UID, **extra: Any) -> list[PodView]:
    return [
        PodView(
            name=f"j-node-{i}",
            rank=i,
            attempt=attempt,
            phase=p,
            uid=f"{owner}-{attempt}-{i}",
            ip=f"10.0.0.{i}",
            owner_uid=owner,
            created=NOW - timedelta(seconds=5),
            **extra,
        )
        for i, p in enumerate(phases)
    ]


def seen(pod_list: list[PodView] | None = None, **kw: Any) -> Observed:
    kw.setdefault("children", children())
    return Observed(pods=pod_list or [], **kw)


def conditions(p: Any) -> dict[str, str]:
    return {c["type"]: c["status"] for c in p.status["conditions"]}


def condition(p: Any, ctype: str) -> dict[str, Any]:
    return next(c for c in p.status["conditions"] if c["type"] == ctype)


def settle(j: dict[str, Any], p: Any) -> dict[str, Any]:
    """The job after the plan's status patch was written."""
    return {**j, "status": {**j["status"], **p.status}}


def running_job(j: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """A job as the operator left it once all its pods ran (status fully written)."""
    j = j or job()
    j = settle(j, plan(j, Observed(**kw), NOW))
    return settle(j, plan(j, seen(pods("Running", "Running"), **kw), NOW))


# --- creation and the happy path


def test_a_new_job_creates_its_children_and_pods_and_is_pending() -> None:
    p = plan(job(), Observed(), NOW)
    assert p.create_pods and p.phase == "Pending"
    assert p.create_children == ["ConfigMap", "Service", "NetworkPolicy"]
    expected = {t: "True" if t == "Created" else "False" for t in R.JOB_CONDITION_TYPES} | {
        "Stalled": "False"
    }
    assert conditions(p) == expected
    assert p.status["observedGeneration"] == 1 and p.status["startTime"] == "2026-11-28T18:00:00Z"
    assert p.status["attempt"] == 0 and p.status["restartCount"] == 0
    assert p.events == [("Normal", "Created", "creating 2 trainer pod(s)")]


def test_a_new_jobs_status_is_written_after_its_pods_exist() -> None:
    """Plan.write_later: the first pass only creates; the pass after it writes what it finds, once."""
    first = plan(job(), Observed(), NOW)
    assert first.write_later and first.create_pods
    # Before the watch delivered the pods: the same plan again (the reconciler's expectations create nothing).
    assert plan(job(), seen(), NOW).write_later
    # Delivered and still starting: Pending, written, as the first pass would have written it.
    p = plan(job(), seen(pods("Pending", "Pending")), NOW)
    assert not p.write_later and not p.create_pods and p.phase == "Pending"
    assert p.status["nodes"]["active"] == 2 and p.status["startTime"] == "2026-11-28T18:00:00Z"
    assert p.events == [("Normal", "Created", "creating 2 trainer pod(s)")]
    # Already running: one write, both Events.
    p = plan(job(), seen(pods("Running", "Running")), NOW)
    assert not p.write_later and p.phase == "Running" and p.status["attempt"] == 0
    assert [e[1] for e in p.events] == ["Created", "Running"]
    # The pods moved on before the first write: it still records the start (deadlines count from it).
    p = plan(job(), seen(pods("Failed", "Running", exit_code=1)), NOW)
    assert p.phase == "Restarting" and p.status["attempt"] == 1 and p.status["restartCount"] == 1
    assert p.status["startTime"] == "2026-11-28T18:00:00Z" and p.events[0][1] == "Created"
    p = plan(job(), seen(pods("Succeeded", "Succeeded")), NOW)
    assert p.phase == "Succeeded" and p.status["startTime"] and p.status["attempt"] == 0
    assert [e[1] for e in p.events] == ["Created", "Succeeded"]
    # Written at once: a job that waits, an RFT job's grader snapshot, a refused create, a queued job.
    assert not plan(job(suspend=True), Observed(), NOW).write_later
    graders = {"g": GraderView("g", 1, "3", True, None)}
    rft = job(method="rft", rft={"graders": [{"name": "g"}]})
    assert plan(rft, Observed(graders=graders), NOW).snapshot_graders
    assert not plan(rft, Observed(graders=graders), NOW).write_later
    refused = CreateFailure("quota", NOW, NOW + timedelta(seconds=5))
    assert not plan(job(), seen(create_failure=refused), NOW).write_later
    queued = job()
    queued["metadata"]["labels"] = {"kueue.x-k8s.io/queue-name": "q"}
    assert not plan(queued, Observed(), NOW).write_later


def test_pending_until_every_pod_runs_then_running_once_and_then_nothing_to_write() -> None:
    pending = settle(job(), plan(job(), Observed(), NOW))
    p = plan(pending, seen(pods("Running", "Pending")), NOW)
    assert not p.create_pods and p.phase is None and not p.events
    p = plan(pending, seen(pods("Running", "Running")), NOW)
    assert p.phase == "Running" and conditions(p)["Running"] == "True"
    running = settle(pending, p)
    again = plan(running, seen(pods("Running", "Running")), NOW + timedelta(seconds=5))
    # A steady job costs no status write (at 500 jobs every needless PATCH counts).
    assert again.status == {} and again.events == [] and not again.create_pods and not again.create_children


def test_missing_pods_of_a_pending_job_are_created_again() -> None:
    pending = settle(job(), plan(job(), Observed(), NOW))
    p = plan(pending, seen(pods("Running")), NOW)
    assert p.create_pods and p.phase is None


def test_a_running_job_with_a_finished_rank_stays_running() -> None:
    running = settle(job(), plan(job(), Observed(), NOW))
    running = settle(running, plan(running, seen(pods("Running", "Running")), NOW))
    p = plan(running, seen(pods("Running", "Succeeded")), NOW)
    assert p.phase is None and not p.delete_pods


def test_succeeded_when_every_pod_exits_zero() -> None:
    p = plan(job({"phase": "Running", "attempt": 0}), seen(pods("Succeeded", "Succeeded")), NOW)
    assert (
        p.phase == "Succeeded"
        and conditions(p)["Succeeded"] == "True"
        and conditions(p)["Running"] == "False"
    )
    assert p.status["completionTime"] == "2026-11-28T18:00:00Z"


def test_terminal_is_terminal() -> None:
    for phase in ("Succeeded", "Failed"):
        p = plan(job({"phase": phase, "observedGeneration": 1}), Observed(), NOW)
        assert not p.create_pods and not p.create_children and p.phase is None and p.status == {}
        p = plan(job({"phase": phase}), seen(pods("Running", "Failed")), NOW)
        assert p.delete_pods == ["j-node-0"] and not p.create_pods
        # Someone else's pods with our names are never ours to delete.
        p = plan(job({"phase": phase}), seen(pods("Running", owner="other")), NOW)
        assert p.delete_pods == []


def test_ttl_after_finished_deletes_the_job() -> None:
    done = {"phase": "Succeeded", "completionTime": "2026-11-28T17:59:00Z"}
    assert plan(job(done, ttlSecondsAfterFinished=120), Observed(), NOW).requeue_after == 60
    assert plan(job(done, ttlSecondsAfterFinished=30), Observed(), NOW).delete_job


def test_transition_time_moves_only_when_a_condition_changes() -> None:
    first = plan(job(), Observed(), NOW)
    later = plan(settle(job(), first), seen(pods("Running", "Running")), NOW + timedelta(60))
    times = {c["type"]: c["lastTransitionTime"] for c in later.status["conditions"]}
    assert times["Created"] == "2026-11-28T18:00:00Z" and times["Running"] != times["Created"]


def test_a_job_written_before_status_attempt_existed_uses_its_restart_count() -> None:
    p = plan(job({"phase": "Running", "restartCount": 1}), seen(pods("Running", "Running", attempt=1)), NOW)
    assert p.phase is None and not p.delete_pods


# --- failures: the failure policy


TRACEBACK = """Traceback (most recent call last):
  File "/app/train.py", line 3, in <module>
    step()
RuntimeError: CUDA error: out of memory
"""


def test_a_failed_pod_restarts_the_whole_group_naming_the_trainers_error() -> None:
    failed = pods("Running", "Failed")
    failed[1] = replace(failed[1], exit_code=1, reason="Error", termination_message=TRACEBACK)
    p = plan(job({"phase": "Running", "attempt": 0, "restartCount": 0}), seen(failed), NOW)
    assert p.phase == "Restarting" and p.restarted and not p.disrupted
    assert p.status["restartCount"] == 1 and p.status["attempt"] == 1
    assert p.delete_pods == ["j-node-0", "j-node-1"]
    # The end of the log (FallbackToLogsOnError) is a traceback: its last line is the error.
    expected = "pod j-node-1 failed, exit code 1, reason Error: RuntimeError: CUDA error: out of memory"
    assert p.status["message"].endswith(expected)
    assert conditions(p)["Restarting"] == "True" and p.events[0][0] == "Warning" and p.destructive


def test_restarting_waits_for_the_old_pods_then_creates_the_next_attempt() -> None:
    restarting = job({"phase": "Restarting", "attempt": 1, "restartCount": 1})
    p = plan(restarting, seen(pods("Running", "Failed", attempt=0)), NOW)
    assert p.delete_pods == ["j-node-0", "j-node-1"] and not p.create_pods
    terminating = pods("Running", "Failed", attempt=0, deleting=True)
    p = plan(restarting, seen(terminating), NOW)
    assert not p.delete_pods and not p.create_pods
    p = plan(restarting, seen(), NOW)
    assert p.create_pods and p.phase is None
    p = plan(restarting, seen(pods("Running", "Running", attempt=1)), NOW)
    assert p.phase == "Running" and "attempt 2" in p.status["message"]


def test_backoff_limit_exhausted_fails_naming_the_cause() -> None:
    failed = [
        replace(pods("Failed")[0], attempt=2, exit_code=1, reason="Error"),
        *pods("Running", attempt=2)[1:],
    ]
    failed.append(replace(pods("Running", "Running", attempt=2)[1]))
    p = plan(job({"phase": "Running", "attempt": 2, "restartCount": 2}), seen(failed), NOW)
    assert p.phase == "Failed" and condition(p, "Failed")["reason"] == "BackoffLimitExceeded"
    assert (
        "backoffLimit (2) exceeded after 2 restart(s): pod j-node-0 failed, exit code 1"
        in p.status["message"]
    )
    assert p.delete_pods == ["j-node-1"] and "completionTime" in p.status


def test_a_vanished_pod_of_a_running_job_counts_as_a_failure() -> None:
    gone = pods("Running", "Running")
    gone[1] = replace(gone[1], gone=True)
    p = plan(job({"phase": "Running", "attempt": 0}), seen(gone), NOW)
    assert (
        p.phase == "Restarting"
        and p.status["restartCount"] == 1
        and "j-node-1 was deleted" in p.status["message"]
    )
    # Gone without a trace (the operator was down when it went): still a failure, naming the rank.
    p = plan(job({"phase": "Running", "attempt": 0}), seen(pods("Running")), NOW)
    assert p.phase == "Restarting" and "rank 1 disappeared" in p.status["message"]


def test_a_disruption_restarts_without_counting_against_backoff_limit() -> None:
    evicted = pods("Running", "Running")
    evicted[1] = replace(evicted[1], deleting=True, disruption_reason="EvictionByEvictionAPI")
    running = job({"phase": "Running", "attempt": 0, "restartCount": 0}, backoffLimit=0)
    p = plan(running, seen(evicted), NOW)
    assert p.phase == "Restarting" and p.disrupted and p.restarted
    assert p.status["disruptionCount"] == 1 and "restartCount" not in p.status and p.status["attempt"] == 1
    assert condition(p, "Restarting")["reason"] == "PodDisrupted"
    assert (
        "not counted against backoffLimit" in p.status["message"]
        and "EvictionByEvictionAPI" in p.status["message"]
    )
    # A pod the node took away (Evicted, reason on a failed pod) and a lost node's pod (a tombstone) alike.
    for view in (
        replace(pods("Failed")[0], reason="Evicted", exit_code=None),
        replace(pods("Running")[0], gone=True, disruption_reason="DeletionByTaintManager"),
    ):
        p = plan(running, seen([view, pods("Running", "Running")[1]]), NOW)
        assert p.phase == "Restarting" and p.status["disruptionCount"] == 1, view


def test_max_disruptions_bounds_the_restarts_after_disruptions() -> None:
    evicted = [replace(pods("Running")[0], gone=True, disruption_reason="PreemptionByScheduler")]
    p = plan(
        job({"phase": "Running", "attempt": 3, "disruptionCount": 3}, nodes=1, maxDisruptions=3),
        seen([replace(evicted[0], attempt=3)]),
        NOW,
    )
    assert p.phase == "Failed" and condition(p, "Failed")["reason"] == "MaxDisruptionsExceeded"
    assert "maxDisruptions (3) exceeded after 3 disruption(s)" in p.status["message"]


def test_the_trainers_permanent_error_fails_at_once_also_through_torchrun() -> None:
    line = "data/train.jsonl:3: 'messages' must be a list"
    running = job({"phase": "Running", "attempt": 0, "restartCount": 0}, backoffLimit=3)
    direct = replace(pods("Failed")[0], exit_code=2, reason="Error")
    # torchrun exits 1 whatever its worker said; the marked termination message still tells.
    through_torchrun = replace(
        pods("Failed")[0], exit_code=1, reason="Error", termination_message=termination_message(line, True)
    )
    for failed in (direct, through_torchrun):
        p = plan(running, seen([failed, pods("Running", "Running")[1]]), NOW)
        assert p.phase == "Failed" and condition(p, "Failed")["reason"] == "PermanentError", failed
        assert p.delete_pods == ["j-node-1"] and "restartCount" not in p.status
    assert line in p.status["message"] and "permanent error" not in p.status["message"]


def test_pod_failure_policy_rules_come_first() -> None:
    running = {"phase": "Running", "attempt": 0, "restartCount": 0}
    oom = replace(pods("Failed")[0], exit_code=137, reason="OOMKilled")
    rest = pods("Running", "Running")[1]
    rules = {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "In", "values": [137]}}]}
    p = plan(job(running, podFailurePolicy=rules), seen([oom, rest]), NOW)
    assert p.phase == "Failed" and condition(p, "Failed")["reason"] == "PodFailurePolicy"
    rules = {"rules": [{"action": "Ignore", "onReasons": ["OOMKilled"]}]}
    p = plan(job(running, backoffLimit=0, podFailurePolicy=rules), seen([oom, rest]), NOW)
    assert p.phase == "Restarting" and p.status["disruptionCount"] == 1
    # Count overrides the default for disruptions; NotIn matches codes outside the list.
    evicted = replace(pods("Running")[0], deleting=True, disruption_reason="EvictionByEvictionAPI")
    evicted = replace(evicted, conditions=frozenset({("DisruptionTarget", "True")}))
    rules = {"rules": [{"action": "Count", "onPodConditions": [{"type": "DisruptionTarget"}]}]}
    p = plan(job(running, podFailurePolicy=rules), seen([evicted, rest]), NOW)
    assert p.phase == "Restarting" and p.status["restartCount"] == 1
    rules = {"rules": [{"action": "FailJob", "onExitCodes": {"operator": "NotIn", "values": [0, 137]}}]}
    p = plan(job(running, podFailurePolicy=rules), seen([oom, rest]), NOW)
    assert p.phase == "Restarting"


# --- suspend and resume


def test_suspend_deletes_pods_and_resume_starts_a_new_attempt() -> None:
    running = job({"phase": "Running", "attempt": 0, "startTime": "2026-11-28T17:00:00Z"}, suspend=True)
    p = plan(running, seen(pods("Running", "Running")), NOW)
    assert (
        p.phase == "Suspended"
        and p.delete_pods == ["j-node-0", "j-node-1"]
        and conditions(p)["Suspended"] == "True"
    )
    assert p.status["startTime"] is None
    suspended = settle(job({"phase": "Running", "attempt": 0}), p)
    p = plan(suspended, seen(), NOW)
    assert (
        p.phase == "Pending" and p.status["startTime"] == "2026-11-28T18:00:00Z" and p.status["attempt"] == 1
    )
    assert condition(p, "Suspended")["status"] == "False" and condition(p, "Suspended")["reason"] == "Resumed"


def test_resume_within_the_grace_period_never_counts_the_pods_of_before() -> None:
    resumed = job(
        {"phase": "Pending", "attempt": 1, "restartCount": 0, "startTime": "2026-11-28T17:59:59Z"},
        backoffLimit=0,
    )
    before = pods("Running", "Running", attempt=0, deleting=True)
    p = plan(resumed, seen(before), NOW)
    assert p.phase is None and not p.create_pods and not p.restarted
    assert "waiting for pod j-node-0, pod j-node-1 to terminate" in p.status["message"]
    gone = [replace(x, gone=True) for x in before]
    p = plan(resumed, seen(gone), NOW)
    assert p.create_pods and p.phase is None


def test_a_job_created_suspended_creates_nothing() -> None:
    p = plan(job(suspend=True), Observed(), NOW)
    assert p.phase == "Suspended" and not p.create_pods and not p.create_children
    assert conditions(p)["Created"] == "False"


def test_active_deadline_fails_the_job() -> None:
    running = {"phase": "Running", "attempt": 0, "startTime": "2026-11-28T17:58:00Z"}
    p = plan(job(running, activeDeadlineSeconds=60), seen(pods("Running", "Running")), NOW)
    assert p.phase == "Failed" and "activeDeadlineSeconds (60) exceeded" in p.status["message"]
    assert condition(p, "Failed")["reason"] == "DeadlineExceeded" and p.delete_pods
    p = plan(job(running, activeDeadlineSeconds=600), seen(pods("Running", "Running")), NOW)
    assert p.phase is None and p.requeue_after == 480


# --- children matched by owner


def test_pods_of_an_earlier_job_with_the_same_name_are_waited_for_never_adopted() -> None:
    old = pods("Succeeded", "Succeeded", owner="old-uid")
    old_terminating = [
        replace(x, deleting=True, phase="Running") for x in pods("Running", "Running", owner="old-uid")
    ]
    new = plan(job(), Observed(pods=old_terminating), NOW)
    assert new.phase == "Pending" and not new.create_pods
    assert condition(new, "Created")["status"] == "False"
    assert condition(new, "Created")["reason"] == "PreviousPodsTerminating"
    # The old job's finished pods never make the new job Succeeded: they are someone else's.
    pending = settle(job(), new)
    p = plan(pending, seen(old), NOW)
    assert p.phase is None and not p.create_pods and condition(p, "Stalled")["reason"] == "NameConflict"
    assert "pod j-node-0" in p.status["message"] and "never adopted" in p.status["message"]
    p = plan(pending, seen(), NOW)
    assert p.create_pods


def test_a_configmap_or_service_of_someone_else_is_reported_not_used() -> None:
    foreign = children()
    foreign["ConfigMap"] = ChildView("ConfigMap", "j-config", "old-uid")
    p = plan(job(), Observed(children=foreign), NOW)
    assert not p.create_pods and "ConfigMap" not in p.create_children
    assert condition(p, "Stalled")["status"] == "True" and condition(p, "Stalled")["reason"] == "NameConflict"
    assert p.events[-1] == ("Warning", "NameConflict", condition(p, "Stalled")["message"])
    foreign["ConfigMap"] = ChildView("ConfigMap", "j-config", "old-uid", deleting=True)
    p = plan(job(), Observed(children=foreign), NOW)
    assert not p.create_pods and condition(p, "Stalled")["status"] == "False"


def test_missing_children_of_a_live_job_are_recreated_never_of_a_finished_one() -> None:
    partial = children()
    del partial["Service"]
    running = running_job()
    p = plan(running, seen(pods("Running", "Running"), children=partial), NOW)
    assert p.create_children == ["Service"] and not p.create_pods and p.status == {}
    p = plan(job({"phase": "Succeeded"}), Observed(children=partial), NOW)
    assert p.create_children == []


def test_without_network_policies_only_configmap_and_service() -> None:
    p = plan(job(), Observed(child_kinds=("ConfigMap", "Service")), NOW)
    assert p.create_children == ["ConfigMap", "Service"]


# --- creates the API server refuses


def test_a_refused_create_is_reported_and_retried_after_its_backoff() -> None:
    pending = settle(job(), plan(job(), Observed(), NOW))
    failure = CreateFailure(
        'Pod "j-node-0" is invalid: spec.hostname: Invalid value', NOW, NOW + timedelta(seconds=20)
    )
    p = plan(pending, seen(create_failure=failure), NOW)
    assert not p.create_pods and p.requeue_after == 20
    assert condition(p, "Created") | {"status": "False", "reason": "FailedCreate"} == condition(p, "Created")
    assert condition(p, "Created")["message"] == failure.message and p.status["message"] == failure.message
    assert condition(p, "Stalled")["reason"] == "FailedCreate"
    assert p.events == [("Warning", "FailedCreate", failure.message)]
    later = plan(settle(pending, p), seen(create_failure=failure), NOW + timedelta(seconds=30))
    assert later.create_pods and later.events == []


# --- pending tells the truth


def test_an_image_that_does_not_pull_is_reported_then_fails_after_the_startup_deadline() -> None:
    pending = settle(job(), plan(job(), Observed(), NOW))
    waiting = pods(
        "Pending", "Running", waiting_reason="ImagePullBackOff", waiting_message='Back-off pulling image "x"'
    )
    p = plan(pending, seen(waiting), NOW)
    assert p.phase is None and condition(p, "Stalled")["reason"] == "ImagePullBackOff"
    assert p.status["message"] == 'pod j-node-0: ImagePullBackOff: Back-off pulling image "x"'
    assert ("Warning", "ImagePullBackOff", p.status["message"]) in p.events
    assert p.requeue_after == 595
    later = plan(settle(pending, p), seen(waiting), NOW + timedelta(seconds=600))
    assert later.phase == "Failed" and condition(later, "Failed")["reason"] == "StartupDeadlineExceeded"
    assert "startupDeadlineSeconds (600) exceeded: pod j-node-0: ImagePullBackOff" in later.status["message"]
    short = plan(job(pending["status"], startupDeadlineSeconds=2), seen(waiting), NOW)
    assert short.phase == "Failed"


def test_a_missing_configmap_key_is_a_startup_error_too() -> None:
    pending = settle(job(), plan(job(), Observed(), NOW))
    waiting = pods(
        "Pending",
        "Pending",
        waiting_reason="CreateContainerConfigError",
        waiting_message='couldn\'t find key "k"',
    )
    p = plan(pending, seen(waiting), NOW + timedelta(seconds=700))
    assert p.phase == "Failed" and "CreateContainerConfigError" in p.status["message"]


def test_unschedulable_pods_are_reported_and_flagged_when_it_lasts() -> None:
    pending = settle(job(), plan(job(), Observed(), NOW))
    why = "Unschedulable: 0/6 nodes are available: 6 Insufficient nvidia.com/gpu."
    stuck = pods("Pending", "Pending", unschedulable=why, unschedulable_since=NOW)
    p = plan(pending, seen(stuck), NOW + timedelta(seconds=10))
    assert (
        condition(p, "Stalled")["reason"] == "Unschedulable"
        and "Insufficient nvidia.com/gpu" in p.status["message"]
    )
    later = plan(settle(pending, p), seen(stuck), NOW + timedelta(seconds=700))
    assert later.phase is None and condition(later, "Stalled")["reason"] == "UnschedulableTooLong"
    assert later.events and later.events[0][:2] == ("Warning", "UnschedulableTooLong")
    # The whole group is named: how many of the job's pods, which, since when, and what would help.
    assert later.status["message"].startswith("2 of 2 trainer pod(s) cannot be scheduled for 700 s")
    assert (
        "j-node-0, j-node-1" in later.status["message"]
        and "kueue.x-k8s.io/queue-name" in later.status["message"]
    )


def test_pods_stuck_terminating_past_their_grace_period_are_candidates_for_force_deletion() -> None:
    restarting = job({"phase": "Restarting", "attempt": 1})
    old = pods("Running", "Running", attempt=0, deleting=True, deletion_deadline=NOW - timedelta(seconds=60))
    old[1] = replace(old[1], deletion_deadline=NOW - timedelta(seconds=5))
    p = plan(restarting, seen(old, children=children()), NOW)
    assert [v.name for v in p.force_delete] == ["j-node-0"] and not p.create_pods


# --- RFT jobs wait for their graders


def grader(name: str, ready: bool = True, rv: str = "1", spec: dict[str, Any] | None = None) -> GraderView:
    return GraderView(name, 1, rv, ready, None if ready else "test case 2 failed", spec or {})


def rft(status: dict[str, Any] | None = None) -> dict[str, Any]:
    return job(status, method="rft", rft={"graders": [{"name": "exact"}, {"name": "mix", "weight": 2}]})


def test_an_rft_job_waits_in_pending_until_its_graders_are_ready() -> None:
    p = plan(rft(), Observed(graders={"exact": grader("exact")}), NOW)
    assert p.phase == "Pending" and not p.create_pods and not p.create_children
    assert condition(p, "GradersReady") | {"status": "False", "reason": "GraderMissing"} == condition(
        p, "GradersReady"
    )
    assert (
        "RewardGrader mix does not exist" in p.status["message"]
        and condition(p, "Created")["status"] == "False"
    )
    assert ("Warning", "GraderMissing", "RewardGrader mix does not exist") in p.events
    mix = grader("mix", spec={"weighted": {"graders": {"exact": 1, "length": 1}}})
    p = plan(rft(), Observed(graders={"exact": grader("exact"), "mix": mix}), NOW)
    assert "RewardGrader length does not exist" in p.status["message"]
    graders = {"exact": grader("exact"), "mix": mix, "length": grader("length", ready=False)}
    p = plan(rft(), Observed(graders=graders), NOW)
    assert (
        condition(p, "GradersReady")["reason"] == "GraderNotReady"
        and "test case 2 failed" in p.status["message"]
    )
    graders["length"] = grader("length")
    p = plan(rft(), Observed(graders=graders), NOW)
    assert p.create_pods and [g.name for g in p.snapshot_graders] == ["exact", "length", "mix"]
    assert condition(p, "GradersReady")["status"] == "True"


def test_a_started_rft_job_ignores_later_grader_edits_and_cannot_rebuild_a_lost_snapshot() -> None:
    snap = [{"name": "exact", "resourceVersion": "1"}, {"name": "mix", "resourceVersion": "1"}]
    running = running_job(rft({"graders": snap}), graders={"exact": grader("exact"), "mix": grader("mix")})
    edited = {"exact": grader("exact", ready=False, rv="9"), "mix": grader("mix")}
    p = plan(running, seen(pods("Running", "Running"), graders=edited), NOW)
    assert p.status == {} and not p.snapshot_graders
    lost = children()
    del lost["ConfigMap"]
    p = plan(running, seen(pods("Running", "Running"), graders=edited, children=lost), NOW)
    assert p.create_children == [] and condition(p, "Stalled")["reason"] == "SnapshotLost"
    unchanged = {"exact": grader("exact"), "mix": grader("mix")}
    p = plan(running, seen(pods("Running", "Running"), graders=unchanged, children=lost), NOW)
    assert p.create_children == ["ConfigMap"] and [g.name for g in p.snapshot_graders] == ["exact", "mix"]


# --- gang admission with Kueue (label kueue.x-k8s.io/queue-name)

QUEUE = {"kueue.x-k8s.io/queue-name": "gpus"}


def queued_job(status: dict[str, Any] | None = None, **spec: Any) -> dict[str, Any]:
    j = job(status, **spec)
    j["metadata"]["labels"] = dict(QUEUE)
    return j


def workload(*conds: tuple[str, str, str, str], admitted_to: str | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {
        "conditions": [
            {"type": t, "status": s, "reason": r, "message": m, "lastTransitionTime": "2026-11-28T17:00:00Z"}
            for t, s, r, m in conds
        ]
    }
    if admitted_to:
        status["admission"] = {
            "clusterQueue": admitted_to,
            "podSetAssignments": [{"name": "trainer", "count": 2, "flavors": {"nvidia.com/gpu": "h100"}}],
        }
    return {
        "metadata": {"name": "finetunejob-j-1a2b3", "generation": 1, "resourceVersion": "9"},
        "spec": {"active": True},
        "status": status,
    }


PENDING_WL = workload(("QuotaReserved", "False", "Pending", "couldn't assign flavors: insufficient quota"))
ADMITTED_WL = workload(
    ("QuotaReserved", "True", "QuotaReserved", ""), ("Admitted", "True", "Admitted", ""), admitted_to="cq"
)
PREEMPTED_WL = workload(
    ("QuotaReserved", "True", "QuotaReserved", ""),
    ("Admitted", "True", "Admitted", ""),
    ("Evicted", "True", "Preempted", "Preempted to accommodate a workload due to prioritization"),
    admitted_to="cq",
)


def test_a_queued_job_has_a_workload_and_no_pod_until_kueue_admits_it() -> None:
    p = plan(queued_job(), Observed(), NOW)
    assert p.create_workload and not p.create_pods and not p.create_children
    assert p.phase == "Suspended" and conditions(p)["Suspended"] == "True"
    assert condition(p, "Suspended")["reason"] == "Queued" and "LocalQueue gpus" in p.status["message"]
    assert p.events == [("Normal", "Queued", p.status["message"])]
    waiting = settle(queued_job(), p)
    # Kueue judged it: the status says which queue and Kueue's own reason; still no pod, no new Event.
    p = plan(waiting, Observed(workload=PENDING_WL), NOW)
    assert not p.create_workload and not p.create_pods and p.phase is None and p.events == []
    assert "queued in LocalQueue gpus" in p.status["message"] and "insufficient quota" in p.status["message"]


def test_admission_creates_the_whole_group_as_a_new_attempt() -> None:
    waiting = settle(queued_job(), plan(queued_job(), Observed(), NOW))
    p = plan(waiting, Observed(workload=ADMITTED_WL), NOW)
    assert p.phase == "Pending" and condition(p, "Created")["reason"] == "Admitted"
    assert "ClusterQueue cq" in p.status["message"] and p.status["attempt"] == 1
    assert p.events[0][:2] == ("Normal", "Admitted") and not p.create_pods
    admitted = settle(waiting, p)
    p = plan(admitted, Observed(workload=ADMITTED_WL), NOW)
    assert p.create_pods and p.create_children == ["ConfigMap", "Service", "NetworkPolicy"]


def test_preemption_suspends_the_job_then_gives_the_quota_back_and_it_resumes_when_admitted_again() -> None:
    j = running_job(queued_job(), workload=ADMITTED_WL)
    assert j["status"]["phase"] == "Running"
    attempt = j["status"]["attempt"]
    p = plan(j, seen(pods("Running", "Running", attempt=attempt), workload=PREEMPTED_WL), NOW)
    assert p.phase == "Suspended" and condition(p, "Suspended")["reason"] == "Preempted"
    assert sorted(p.delete_pods) == ["j-node-0", "j-node-1"] and not p.release_workload
    assert p.events[0][:2] == ("Warning", "Preempted") and "checkpoints kept" in p.events[0][2]
    assert "restartCount" not in p.status and "disruptionCount" not in p.status  # nothing counted
    suspended = settle(j, p)
    gone = [replace(v, gone=True) for v in pods("Running", "Running", attempt=attempt)]
    p = plan(suspended, seen(gone, workload=PREEMPTED_WL), NOW)
    assert p.release_workload and not p.delete_pods and not p.create_pods
    released = workload(
        ("QuotaReserved", "False", "Pending", "insufficient quota"),
        ("Evicted", "True", "Preempted", "Preempted to accommodate a workload due to prioritization"),
        ("Requeued", "True", "Preempted", ""),
    )
    p = plan(suspended, seen(gone, workload=released), NOW)
    assert not p.release_workload and "queued again in LocalQueue gpus" in p.status["message"]
    p = plan(suspended, seen(gone, workload=ADMITTED_WL), NOW)
    assert p.phase == "Pending" and p.status["attempt"] == attempt + 1  # resumes from its checkpoint


def test_the_end_of_a_queued_job_marks_its_workload_finished_once() -> None:
    done = queued_job({"phase": "Succeeded", "message": "all 2 trainer pod(s) finished"})
    assert plan(done, Observed(workload=ADMITTED_WL), NOW).finish_workload == (
        True,
        "all 2 trainer pod(s) finished",
    )
    finished = workload(("Finished", "True", "Succeeded", "done"))
    assert plan(done, Observed(workload=finished), NOW).finish_workload is None
    failed = plan(queued_job({"phase": "Failed"}), Observed(workload=ADMITTED_WL), NOW)
    assert failed.finish_workload is not None and failed.finish_workload[0] is False


def test_suspending_a_queued_job_deactivates_its_workload() -> None:
    j = running_job(queued_job(), workload=ADMITTED_WL)
    j["spec"]["suspend"] = True
    p = plan(j, seen(pods("Running", "Running", attempt=j["status"]["attempt"]), workload=ADMITTED_WL), NOW)
    assert p.workload_active is False and p.phase == "Suspended" and len(p.delete_pods) == 2


def test_a_queue_label_without_kueue_is_reported_and_runs_nothing() -> None:
    p = plan(queued_job(), Observed(kueue_served=False), NOW)
    assert not p.create_workload and not p.create_pods and p.phase == "Suspended"
    assert condition(p, "Stalled")["reason"] == "KueueUnavailable" and "install Kueue" in p.status["message"]
