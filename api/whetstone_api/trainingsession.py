"""TrainingSession: a long-lived training service for one base model, reached with the official `tinker`
client. This is the schema; the service lands with its own issue."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from .base import GROUP_VERSION, ApiModel, Condition, ObjectMeta, ResourceRequirements, Toleration
from .finetunejob import LoRASpec, ModelSpec

KIND = "TrainingSession"


class TrainingSessionSpec(ApiModel):
    """The base model and the machine a session serves it on."""

    base_model: ModelSpec
    """The model clients train and sample."""
    lora: LoRASpec | None = None
    """Default LoRA settings of training clients that do not name their own; unset: full-parameter allowed."""
    max_training_clients: int = Field(default=4, ge=1, le=256)
    """Training clients (adapters or full copies) the session holds at once."""
    gpus: int = Field(default=0, ge=0, le=16)
    """GPUs (nvidia.com/gpu) of the session pod; 0 serves on the CPU."""
    resources: ResourceRequirements = Field(default_factory=ResourceRequirements)
    """CPU and memory of the session pod."""
    image: str | None = Field(default=None, max_length=1024)
    """Service image; unset: the operator's default."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Labels a node must have."""
    tolerations: list[Toleration] = Field(default_factory=list, max_length=64)
    """Taints the session pod tolerates."""
    checkpoint_uri: str | None = Field(default=None, max_length=4096)
    """Where saved states go (pvc:// or a path)."""
    api_key_secret: str | None = Field(default=None, max_length=253)
    """Secret whose `apiKey` key clients must present; unset: no authentication."""
    idle_timeout_seconds: int | None = Field(default=None, ge=60)
    """Scale the session to zero after this long without requests."""
    suspend: bool = False
    """True: stop the service pod, keep saved states."""


class TrainingSessionStatus(ApiModel):
    """Observed state of the service."""

    phase: Literal["Pending", "Ready", "Suspended", "Failed"] | None = None
    """Pending, Ready, Suspended or Failed."""
    conditions: list[Condition] = Field(default_factory=list, max_length=8)
    """Standard conditions (Ready)."""
    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    endpoint: str | None = None
    """Base URL to pass to tinker.ServiceClient(base_url=...)."""
    training_clients: int | None = None
    """Training clients currently held."""
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
