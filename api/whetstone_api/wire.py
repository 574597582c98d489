"""What passes between the operator and a trainer pod: the environment the operator sets, the folders it
mounts, the ports the trainer serves, how checkpoints are named, and the report the trainer serves on
`/status` for the operator to read.

The trainer serialises `TrainerReport`; the operator parses it strictly with `TrainerReport.parse`. Neither
side writes these names as literals of its own.
"""

from __future__ import annotations

import math
import re
from datetime import datetime
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

# --- environment of a trainer pod ------------------------------------------------------------------------

ENV_STATUS_PORT: Final = "WHETSTONE_STATUS_PORT"
"""Port of the trainer's /healthz, /metrics and /status."""
ENV_POD_IP: Final = "WHETSTONE_POD_IP"
"""The pod's own IP (downward API status.podIP): the status server binds it, not every address of the host,
so pods that share a network (hostNetwork, the e2e pod runner) do not take each other's port. Unset (outside a
pod): every address."""
ENV_PVC_ROOT: Final = "WHETSTONE_PVC_ROOT"
"""Folder under which each claim named by a pvc:// URI is mounted, as <root>/<claim>."""
ENV_CACHE: Final = "WHETSTONE_CACHE"
"""Folder of built and dequantised models."""
ENV_MODEL_MIRROR: Final = "WHETSTONE_MODEL_MIRROR"
"""Folder of pre-downloaded hf:// and s3:// models (<mirror>/hf/org/name, <mirror>/s3/bucket/key)."""
ENV_GRADER_SECRETS: Final = "WHETSTONE_GRADER_SECRETS"
"""Folder holding the Secrets RewardGraders name, one sub-folder per Secret (<dir>/<secret>/<key>)."""
ENV_TERMINATION_LOG: Final = "WHETSTONE_TERMINATION_LOG"
"""File the trainer writes its last error to (the container's terminationMessagePath); unset outside a pod."""

# --- folders and ports -------------------------------------------------------------------------------------

PVC_ROOT: Final = "/mnt/pvc"
"""Default of ENV_PVC_ROOT, and where the operator mounts claims."""
CONFIG_DIR: Final = "/etc/whetstone"
"""Where the operator mounts the job's ConfigMap."""
CONFIG_KEY: Final = "job.yaml"
"""The key (file) of the job in that ConfigMap."""
SCRATCH_DIR: Final = "/var/cache/whetstone"
"""The one writable folder of a trainer pod (HOME, TMPDIR, the model cache)."""
GRADER_SECRETS_DIR: Final = "/var/run/whetstone/grader-secrets"
"""Default of ENV_GRADER_SECRETS, where the operator mounts the Secrets of a job's graders (read-only)."""
STATUS_PORT: Final = 8080
"""Default port of the trainer's status server."""
MASTER_PORT: Final = 29500
"""Default rendezvous port of rank 0."""

TERMINATION_LOG: Final = "/dev/termination-log"
"""The trainer container's terminationMessagePath (Kubernetes' default): the kubelet copies what the trainer
wrote there into the pod's status, where the operator reads it."""

# --- exit codes and the termination message -----------------------------------------------------------------

EXIT_PERMANENT: Final = 2
"""The trainer's exit code for an error retrying cannot fix (bad data, bad spec). torchrun turns any failing
worker into exit code 1, so the termination message carries PERMANENT_MARKER as well."""
PERMANENT_MARKER: Final = "whetstone: permanent error: "
"""First bytes of the termination message of an error retrying cannot fix; the error follows."""
MAX_TERMINATION_MESSAGE: Final = 4096
"""The kubelet keeps at most this many bytes of a termination message."""


def termination_message(error: str, permanent: bool) -> str:
    """What the trainer writes to its termination log: the error, marked when it is permanent, bounded."""
    text = (PERMANENT_MARKER if permanent else "") + error.strip()
    data = text.encode()[:MAX_TERMINATION_MESSAGE]
    return data.decode(errors="ignore")


FINAL_MARKER: Final = "whetstone: final report: "
"""First bytes of the termination message of a rank 0 that finished training; its last report follows."""


def final_report_message(report: TrainerReport) -> str:
    """What rank 0 writes to its termination log when training succeeded: its last report, without the
    checkpoints, output and message (the kubelet keeps 4 KiB), so the operator learns the final progress even
    when the job ends between two reads of /status."""
    slim = report.model_copy(update={"checkpoints": [], "output": None, "message": None})
    return termination_message(FINAL_MARKER + slim.to_json(), permanent=False)


def final_report_of(message: str | None) -> TrainerReport | None:
    """The final report in a termination message, parsed as strictly as /status (it comes from the user's
    image); None when there is none or it is malformed."""
    text = (message or "").strip()
    if not text.startswith(FINAL_MARKER):
        return None
    try:
        return TrainerReport.parse(text[len(FINAL_MARKER) :].encode())
    except ReportError:
        return None


def is_permanent(message: str | None) -> bool:
    """Whether a termination message says retrying cannot help."""
    return bool(message) and message.lstrip().startswith(PERMANENT_MARKER)


def error_of(message: str | None, limit: int = 1024) -> str:
    """The trainer's error from a termination message, on one bounded line: a marked (permanent) message
    whole, without the marker; anything else (the end of a log, a traceback) by its last line, the error."""
    text = (message or "").strip()
    if text.startswith(PERMANENT_MARKER):
        text = text[len(PERMANENT_MARKER) :]
    else:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        text = lines[-1] if lines else ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --- checkpoint naming -------------------------------------------------------------------------------------

CHECKPOINTS_DIR: Final = "checkpoints"
"""Folder of resumable checkpoints under a job's output."""
FINAL_DIR: Final = "final"
"""Folder of the exported adapter or model under a job's output."""
_STEP_DIR = re.compile(r"^step-(\d{8,})$")


def checkpoint_folder(step: int) -> str:
    """The folder name of the resumable checkpoint at `step`, under CHECKPOINTS_DIR."""
    return f"step-{step:08d}"


def step_of_folder(name: str) -> int | None:
    """The step of a checkpoint folder name, or None when it is not one."""
    match = _STEP_DIR.match(name)
    return int(match.group(1)) if match else None


def checkpoint_resource_name(job: str, step: int, kind: str = "resumable") -> str:
    """The Checkpoint resource of a job's checkpoint: <job>-step-<8 digits>, or <job>-final for the export."""
    return f"{job}-final" if kind == "export" else f"{job}-{checkpoint_folder(step)}"


# --- the trainer's report -----------------------------------------------------------------------------------

TrainerPhase = Literal["Starting", "Training", "Finished", "Failed"]
MAX_REPORT_BYTES: Final = 1 << 20
"""The operator reads at most this much of /status; a larger answer is refused."""
MAX_REPORTED_CHECKPOINTS: Final = 1000


class _Wire(BaseModel):
    # Strict: a string where a number belongs, NaN or infinity, is a broken (or hostile) trainer.
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, populate_by_name=True)


class ReportedCheckpoint(_Wire):
    """A checkpoint the trainer finished writing and still keeps."""

    step: int = Field(ge=0)
    uri: str = Field(min_length=1, max_length=4096)
    kind: Literal["resumable", "sampler", "export"] = "resumable"
    metrics: dict[str, float] = Field(default_factory=dict, max_length=64)

    @field_validator("metrics", mode="before")
    @classmethod
    def _finite_metrics_only(cls, value: Any) -> Any:
        # A diverged metric is left out rather than refusing the whole report.
        if isinstance(value, dict):
            return {k: v for k, v in value.items() if not (isinstance(v, float) and not math.isfinite(v))}
        return value


class TrainerReport(_Wire):
    """The JSON of rank 0's /status."""

    job: str = Field(max_length=253)
    rank: int = Field(default=0, ge=0)
    world_size: int = Field(default=1, ge=1, alias="worldSize")
    phase: TrainerPhase
    step: int = Field(default=0, ge=0)
    total_steps: int | None = Field(default=None, ge=0, alias="totalSteps")
    epoch: float | None = Field(default=None, ge=0)
    loss: float | None = None
    eval_loss: float | None = Field(default=None, alias="evalLoss")
    reward: float | None = None
    tokens_per_second: float | None = Field(default=None, ge=0, alias="tokensPerSecond")
    eta_seconds: int | None = Field(default=None, ge=0, alias="etaSeconds")
    started_at: datetime | None = Field(default=None, alias="startedAt")
    checkpoints: list[ReportedCheckpoint] = Field(default_factory=list, max_length=MAX_REPORTED_CHECKPOINTS)
    output: str | None = Field(default=None, max_length=4096)
    message: str | None = Field(default=None, max_length=32768)

    @field_validator("loss", "eval_loss", "reward", "epoch", "tokens_per_second", mode="before")
    @classmethod
    def _not_a_number_is_missing(cls, value: Any) -> Any:
        # A diverged loss (NaN, infinity) is reported as missing: never written to status, where it would
        # make the patch invalid JSON; the rest of the report stays usable.
        if isinstance(value, float) and not math.isfinite(value):
            return None
        return value

    def to_json(self) -> str:
        return self.model_dump_json(by_alias=True)

    @classmethod
    def parse(cls, body: bytes) -> TrainerReport:
        """Parse a /status body; raises ReportError with a short reason on anything malformed."""
        if len(body) > MAX_REPORT_BYTES:
            raise ReportError(f"/status answered {len(body)} bytes, more than {MAX_REPORT_BYTES}")
        try:
            return cls.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "body"
            raise ReportError(f"/status is malformed at {where}: {first['msg']}") from None


class ReportError(ValueError):
    """A /status answer the operator will not use."""
