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

STALLED: Final = "Stalled"
"""True while something the operator cannot fix blocks the job (an image that does not pull, a pod that cannot
be scheduled, a create the API server refuses, a name taken by another object, a grader that is not Ready);
the reason says what, the message names the object. Always present: False (reason NotStalled) otherwise."""
GRADERS_READY: Final = "GradersReady"
"""RFT jobs only: every RewardGrader the job names (and the children of weighted graders) exists and is
Ready for its current generation."""
EXTRA_CONDITION_TYPES: Final = (STALLED, GRADERS_READY)

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
REASON_POD_DISRUPTED: Final = "PodDisrupted"
"""A trainer pod was disrupted (eviction, preemption, a drained or lost node) or a podFailurePolicy rule said
Ignore: the group restarts without counting against backoffLimit (counted against maxDisruptions)."""
REASON_MAX_DISRUPTIONS_EXCEEDED: Final = "MaxDisruptionsExceeded"
"""More disruptions than spec.maxDisruptions allows."""
REASON_PERMANENT_ERROR: Final = "PermanentError"
"""The trainer stopped with an error retrying cannot fix (bad data, a bad spec): the job fails at once and its
message carries the trainer's own error."""
REASON_POD_FAILURE_POLICY: Final = "PodFailurePolicy"
"""A spec.podFailurePolicy rule with action FailJob matched a failed pod."""
REASON_STARTUP_DEADLINE_EXCEEDED: Final = "StartupDeadlineExceeded"
"""A trainer pod could not start (image pull or container configuration error) for longer than
spec.startupDeadlineSeconds."""
REASON_PREVIOUS_PODS_TERMINATING: Final = "PreviousPodsTerminating"
"""Pods of an earlier attempt, or of an earlier job of the same name, are still terminating; the new pods
(same names) are created once they are gone."""

# Reasons of the Stalled and Created conditions.
REASON_NOT_STALLED: Final = "NotStalled"
"""Nothing blocks the job."""
REASON_FAILED_CREATE: Final = "FailedCreate"
"""The API server refused to create a child (invalid object, quota, admission): retried with back-off; the
message is the server's."""
REASON_NAME_CONFLICT: Final = "NameConflict"
"""An object with a child's name exists and is not controlled by this job: it is never adopted."""
REASON_UNSCHEDULABLE: Final = "Unschedulable"
"""The scheduler cannot place a trainer pod (its message says why)."""
REASON_UNSCHEDULABLE_TOO_LONG: Final = "UnschedulableTooLong"
"""A trainer pod has been unschedulable for longer than spec.startupDeadlineSeconds; the job keeps waiting
(the cluster may grow, a queue may admit it) but says so with a Warning Event."""
REASON_SNAPSHOT_LOST: Final = "SnapshotLost"
"""The trainer ConfigMap of a started RFT job was deleted and a grader changed since the job started, so the
snapshot cannot be restored."""
# Reasons of a job queued with Kueue (label kueue.x-k8s.io/queue-name): the Suspended condition while Kueue
# holds it, Created when it lets it start. The message names the LocalQueue (and ClusterQueue) and says
# why, in Kueue's words.
REASON_QUEUED: Final = "Queued"
"""Waiting in a LocalQueue for Kueue to admit all of the job's pods at once: no pod exists."""
REASON_ADMITTED: Final = "Admitted"
"""Kueue admitted the job's Workload: all its pods are created together, on the assigned ResourceFlavor."""
REASON_PREEMPTED: Final = "Preempted"
"""Kueue preempted the job for a higher-priority one: pods deleted, checkpoints kept, queued again; it resumes
from its latest checkpoint when admitted again."""
REASON_EVICTED: Final = "Evicted"
"""Kueue evicted the job for another cause (its ClusterQueue stopped, the Workload deactivated, ...): pods
deleted, checkpoints kept."""
REASON_KUEUE_UNAVAILABLE: Final = "KueueUnavailable"
"""The job is labelled for a Kueue queue but the operator found no Kueue Workload API when it started."""
# Container waiting reasons of the kubelet that do not resolve by waiting; surfaced as the Stalled reason and,
# after spec.startupDeadlineSeconds, fatal.
STARTUP_ERROR_REASONS: Final = frozenset(
    {
        "ErrImagePull",
        "ImagePullBackOff",
        "InvalidImageName",
        "ErrImageNeverPull",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
    }
)

# Reasons of the GradersReady condition.
REASON_GRADERS_READY: Final = "GradersReady"
"""Every grader exists and is Ready."""
REASON_GRADER_MISSING: Final = "GraderMissing"
"""A RewardGrader the job names does not exist (yet)."""
REASON_GRADER_NOT_READY: Final = "GraderNotReady"
"""A RewardGrader exists but is not Ready for its current generation (test cases pending or failing)."""

# --- Event reasons (besides the condition reasons above) ----------------------------------------------------

EVENT_FORCE_DELETED: Final = "ForceDeletedPod"
"""A trainer pod stuck terminating on a node that is gone or not ready was force-deleted."""
EVENT_CHECKPOINT_REFUSED: Final = "CheckpointRefused"
"""The trainer reported a checkpoint outside the job's output, or a Checkpoint name is taken by another
job."""

# --- Checkpoint phases -----------------------------------------------------------------------------------

CHECKPOINT_AVAILABLE: Final = "Available"
"""The trainer reported the checkpoint complete in storage."""
CHECKPOINT_PRUNED: Final = "Pruned"
"""Removed from storage by retention (keepLast)."""
CHECKPOINT_MISSING: Final = "Missing"
"""Expected in storage but not found."""
CheckpointPhase = Literal["Available", "Pruned", "Missing"]

# --- Pod-level facts the failure policy reads -------------------------------------------------------------

DISRUPTION_TARGET: Final = "DisruptionTarget"
"""The pod condition Kubernetes sets before an eviction, preemption, taint-manager or PodGC deletion."""
DISRUPTION_POD_REASONS: Final = frozenset({"Evicted", "Preempting", "NodeLost", "Terminated", "Shutdown"})
"""Pod status reasons that mean the node or the cluster took the pod away, not the trainer."""

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
