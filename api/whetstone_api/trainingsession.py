"""TrainingSession: a long-lived training service for one base model, reached with the official `tinker`
client (`whetstone serve` in a pod). The operator runs it as a Deployment and a Service, reads the service's
/whetstone/status into this status, and records its saved checkpoints as Checkpoint resources."""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .base import GROUP_VERSION, ApiModel, Condition, ObjectMeta, ResourceRequirements, Toleration
from .finetunejob import ModelSpec

KIND = "TrainingSession"
SERVICE_PORT: Final = 8000
"""Default port of the training service."""
API_KEYS_KEY: Final = "apiKeys"
"""The key of the API-key Secret: one key per line, each starting with tml-."""
API_KEYS_DIR: Final = "/etc/whetstone/api-keys"
"""Where the operator mounts that Secret in the service pod."""
SESSION_STATUS_PATH: Final = "/whetstone/status"
"""The service's own status endpoint, read by the operator."""
MAX_STATUS_BYTES: Final = 1 << 20


class TrainingSessionSpec(ApiModel):
    """The base model and the machine a session serves it on."""

    base_model: ModelSpec
    """The model clients train and sample (one per session)."""
    model_name: str | None = Field(default=None, max_length=256)
    """The name clients pass as base_model (default: baseModel.uri); e.g. Qwen/Qwen3-30B-A3B for cookbook
    recipes served by whetstone://tiny-qwen3-moe."""
    max_training_clients: int = Field(default=4, ge=1, le=256)
    """Training clients (LoRA adapters, or full copies with lora_config.rank 0) one client session holds at
    once."""
    max_sampler_snapshots: int = Field(default=16, ge=1, le=1024)
    """Ephemeral sampler snapshots kept per API key (the oldest is dropped first)."""
    gpus: int = Field(default=0, ge=0, le=16)
    """GPUs (nvidia.com/gpu) of the session pod; 0 serves on the CPU."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """CPU and memory of the session pod."""
    image: str | None = Field(default=None, max_length=1024)
    """Service image; unset: the operator's default trainer image."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Labels a node must have."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    """Taints the session pod tolerates."""
    checkpoint_uri: str | None = Field(default=None, max_length=4096)
    """Where saved states go: pvc://<claim>/<path> (kept across restarts and after deletion); unset: the
    pod's scratch folder (lost with the pod)."""
    api_key_secret: str | None = Field(default=None, max_length=253)
    """Secret whose `apiKeys` key lists the accepted API keys, one per line, each starting with tml-; unset:
    any key is accepted and each key is its own tenant."""
    idle_timeout_seconds: int = Field(default=1800, ge=60)
    """Release a client session's training clients and samplers after this long without requests (its
    checkpoints stay)."""
    port: int = Field(default=SERVICE_PORT, ge=1, le=65535)
    """Port of the service (and of its Service)."""
    suspend: bool = False
    """True: stop the service pod, keep saved states."""


class SessionModel(ApiModel):
    """A training client the service holds."""

    model_id: str = Field(max_length=256)
    """The client's model id (session:train:N)."""
    lora: bool = True
    """False for a full-parameter client."""
    rank: int = Field(default=0, ge=0)
    """LoRA rank (0: full-parameter)."""
    step: int = Field(default=0, ge=0)
    """Optimizer steps taken."""


class TrainingSessionStatus(ApiModel):
    """Observed state of the service."""

    phase: Literal["Pending", "Ready", "Suspended", "Failed"] | None = None
    """Pending, Ready, Suspended or Failed."""
    conditions: list[Condition] = Field(default_factory=list, max_length=8)
    """Standard conditions (Ready)."""
    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    endpoint: str | None = None
    """Base URL to pass to tinker.ServiceClient(base_url=...), the Service's cluster address."""
    training_clients: int | None = None
    """Training clients currently held."""
    models: list[SessionModel] = Field(default_factory=list, max_length=256)
    """The training clients currently held."""
    checkpoints: int | None = None
    """Saved states and sampler weights on disk."""
    last_request_time: datetime | None = None
    """When the last client request arrived."""
    message: str | None = None
    """Human-readable state."""


class TrainingSession(ApiModel):
    """A Tinker-compatible training service for one base model."""

    api_version: Literal["whetstone.dev/v1alpha1"] = GROUP_VERSION
    """whetstone.dev/v1alpha1"""
    kind: Literal["TrainingSession"] = KIND
    """TrainingSession"""
    metadata: ObjectMeta
    """Standard object metadata."""
    spec: TrainingSessionSpec
    """The session."""
    status: TrainingSessionStatus | None = None
    """The observed state."""


# --- the service's /whetstone/status, as the operator reads it (untrusted: strict, bounded) ---------------


class _Wire(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, populate_by_name=True)


class ReportedModel(_Wire):
    model_id: str = Field(alias="modelId", max_length=256)
    lora: bool = True
    rank: int = Field(default=0, ge=0, le=1 << 20)
    step: int = Field(default=0, ge=0)


class ReportedSessionCheckpoint(_Wire):
    tinker_path: str = Field(alias="tinkerPath", min_length=1, max_length=1024)
    kind: Literal["training", "sampler"]
    step: int = Field(default=0, ge=0)
    folder: str = Field(min_length=1, max_length=4096)
    time: str | None = Field(default=None, max_length=64)


class SessionReport(_Wire):
    """The JSON of the service's /whetstone/status."""

    base_model: str = Field(alias="baseModel", max_length=4096)
    model_name: str = Field(alias="modelName", max_length=4096)
    sessions: int = Field(default=0, ge=0)
    training_clients: int = Field(default=0, ge=0, alias="trainingClients")
    samplers: int = Field(default=0, ge=0)
    models: list[ReportedModel] = Field(default_factory=list, max_length=256)
    last_request_time: str | None = Field(default=None, alias="lastRequestTime", max_length=64)
    checkpoints: list[ReportedSessionCheckpoint] = Field(default_factory=list, max_length=1000)

    @classmethod
    def parse(cls, body: bytes) -> SessionReport:
        if len(body) > MAX_STATUS_BYTES:
            raise ValueError(f"status answered {len(body)} bytes, more than {MAX_STATUS_BYTES}")
        try:
            return cls.model_validate_json(body)
        except ValidationError as e:
            first = e.errors()[0]
            raise ValueError(
                f"status is malformed at {'.'.join(map(str, first['loc']))}: {first['msg']}"
            ) from None
