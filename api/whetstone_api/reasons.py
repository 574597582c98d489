"""Phases, condition types and condition reasons of every Whetstone resource, named once.

The operator writes them, the CRD printer columns describe them, the metrics label by them, and users match
them in `kubectl wait --for=condition=...` and Argo CD health checks, so they are part of the API: a value
here never changes meaning.
"""

from __future__ import annotations

from typing import Final, Literal

# --- FineTuneJob phases ---------------------------------------------------------------------------------

PENDING: Final = "Pending"
"""Accepted; its pods are being created, scheduled or pulled."""
SUSPENDED: Final = "Suspended"
"""spec.suspend is true (by the user or a queue such as Kueue): no pods, checkpoints kept."""
RUNNING: Final = "Running"
"""Every trainer pod of the current attempt is running."""
RESTARTING: Final = "Restarting"
"""A pod failed or was disrupted; the whole group is being recreated to resume from the latest checkpoint."""
SUCCEEDED: Final = "Succeeded"
"""Every trainer pod finished; the output is written. Terminal."""
FAILED: Final = "Failed"
"""The job gave up (deadline, backoff limit, a permanent error). Terminal."""

JobPhase = Literal["Pending", "Suspended", "Running", "Restarting", "Succeeded", "Failed"]
JOB_PHASES: Final = (PENDING, SUSPENDED, RUNNING, RESTARTING, SUCCEEDED, FAILED)
TERMINAL_PHASES: Final = (SUCCEEDED, FAILED)

# --- FineTuneJob condition types (always all present, True or False) --------------------------------------

CREATED: Final = "Created"
"""The job's children (ConfigMap, Service, pods of the current attempt) were created."""
COND_RUNNING: Final = RUNNING
COND_RESTARTING: Final = RESTARTING
COND_SUSPENDED: Final = SUSPENDED
COND_SUCCEEDED: Final = SUCCEEDED
COND_FAILED: Final = FAILED
JOB_CONDITION_TYPES: Final = (
    CREATED,
    COND_RUNNING,
    COND_RESTARTING,
    COND_SUSPENDED,
    COND_SUCCEEDED,
    COND_FAILED,
)

# --- FineTuneJob condition reasons --------------------------------------------------------------------------

REASON_CREATED: Final = "Created"
"""The children were created for a new job."""
REASON_PODS_PENDING: Final = "PodsPending"
"""Some trainer pods are not running yet."""
REASON_RUNNING: Final = "Running"
"""All trainer pods run."""
REASON_SUSPENDED: Final = "Suspended"
"""spec.suspend became true."""
REASON_RESUMED: Final = "Resumed"
"""spec.suspend became false again; a new attempt starts from the latest checkpoint."""
REASON_POD_FAILED: Final = "PodFailed"
"""A trainer pod failed; the group restarts (counted against backoffLimit)."""
REASON_SUCCEEDED: Final = "Succeeded"
"""Every trainer pod exited 0."""
REASON_DEADLINE_EXCEEDED: Final = "DeadlineExceeded"
"""activeDeadlineSeconds passed since the last start."""
REASON_BACKOFF_LIMIT_EXCEEDED: Final = "BackoffLimitExceeded"
"""More failures than backoffLimit allows."""

# --- Checkpoint phases -----------------------------------------------------------------------------------

CHECKPOINT_AVAILABLE: Final = "Available"
"""The trainer reported the checkpoint complete in storage."""
CHECKPOINT_PRUNED: Final = "Pruned"
"""Removed from storage by retention (keepLast)."""
CHECKPOINT_MISSING: Final = "Missing"
"""Expected in storage but not found."""
CheckpointPhase = Literal["Available", "Pruned", "Missing"]

# --- RewardGrader and TrainingSession phases ----------------------------------------------------------------

READY: Final = "Ready"
"""RewardGrader: every test case scored as expected. TrainingSession: the service answers."""
GraderPhase = Literal["Pending", "Ready", "Failed"]
SessionPhase = Literal["Pending", "Ready", "Suspended", "Failed"]

# --- RewardGrader condition (graders helper's section) ---------------------------------------------------
# One condition, Ready, True or False; its reason says why. The phase follows: Ready, Failed, or Pending.

COND_GRADER_READY: Final = READY
"""RewardGrader condition type: the grader may be used by a job (status.observedGeneration tells for which
spec)."""
REASON_TEST_CASES_PASSED: Final = "TestCasesPassed"
"""Ready: every test case scored as expected (status.testCasesPassed of status.testCasesTotal)."""
REASON_NO_TEST_CASES: Final = "NoTestCases"
"""Ready: the grader is valid and loads, and has no test cases to run."""
REASON_REMOTE_UNTESTED: Final = "RemoteGraderUntested"
"""Ready: an http or modelJudge grader (or a weighted grader using one): valid, but its test cases are not run
by the operator, which neither calls user-given URLs nor reads Secrets; `whetstone grader test` runs them."""
REASON_TEST_CASE_FAILED: Final = "TestCaseFailed"
"""Failed: a test case scored otherwise; the message names the first such case, its expected and its score."""
REASON_INVALID_SPEC: Final = "InvalidSpec"
"""Failed: the spec cannot grade: it does not validate, a template is malformed, the code does not load, or
weighted graders form a cycle."""
REASON_CHILD_MISSING: Final = "ChildMissing"
"""Pending: a weighted grader names a RewardGrader that does not exist (yet); checked again when it
appears."""
