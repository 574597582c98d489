"""Checkpoint: one saved state of a FineTuneJob or TrainingSession, recorded by the operator from what the
trainer reports. The trainer owns the bytes in storage; this resource is the index a user lists and reuses."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import Field

from .base import GROUP_VERSION, ApiModel, Condition, ObjectMeta

KIND = "Checkpoint"

CheckpointKind = Literal["resumable", "sampler", "export"]


class CheckpointSource(ApiModel):
    """The job or session that wrote the checkpoint."""

    kind: Literal["FineTuneJob", "TrainingSession"]
    """Kind of the owner."""
    name: str = Field(min_length=1, max_length=253)
    """Name of the owner in the same namespace."""


class CheckpointSpec(ApiModel):
    """What was saved, where, and at which step. Immutable once created."""

    source: CheckpointSource
    """The job or session that wrote it."""
    step: int = Field(ge=0)
    """Optimizer step at which it was saved."""
    uri: str = Field(min_length=1, max_length=4096)
    """Where the files are: a folder path, pvc://<claim>/<path> or s3://<bucket>/<prefix>."""
    kind: CheckpointKind = "resumable"
    """resumable: weights, optimizer, scheduler, RNG and data cursor; sampler: weights for sampling only;
    export: the final adapter or model."""
    base_model: str | None = Field(default=None, max_length=4096)
    """The base model URI the weights apply to."""
    lora: bool = False
    """True when the weights are a LoRA adapter rather than a whole model."""
    metrics: dict[str, float] = Field(default_factory=dict)
    """Metrics at that step, e.g. {loss: 1.73, evalLoss: 1.81}."""


class CheckpointStatus(ApiModel):
    """Observed state of the stored checkpoint."""

    phase: Literal["Available", "Pruned", "Missing"] | None = None
    """Available in storage, Pruned by retention, or Missing."""
    conditions: list[Condition] = Field(default_factory=list, max_length=8)
    """Standard conditions."""
    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    size_bytes: int | None = None
    """Total size of the files."""
    created_time: datetime | None = None
    """When the trainer finished writing it."""


class Checkpoint(ApiModel):
    """A saved state of a fine-tuning job or training session."""

    api_version: Literal["whetstone.dev/v1alpha1"] = GROUP_VERSION
    """whetstone.dev/v1alpha1"""
    kind: Literal["Checkpoint"] = KIND
    """Checkpoint"""
    metadata: ObjectMeta
    """Standard object metadata."""
    spec: CheckpointSpec
    """What was saved."""
    status: CheckpointStatus | None = None
    """The observed state."""
