"""Building blocks shared by every Whetstone resource: the model base class, conditions, CEL rules and the
Kubernetes types the specs embed (resources, tolerations).

Every field is documented with an attribute docstring; the CRD generator turns those docstrings into the
`description` that `kubectl explain` prints, so a field without one is a bug.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

API_GROUP = "whetstone.dev"
API_VERSION = "v1alpha1"
GROUP_VERSION = f"{API_GROUP}/{API_VERSION}"

# Kubernetes quantities ("500m", "16Gi", 8) are either integers or strings.
Quantity = int | str


class ApiModel(BaseModel):
    """Base of every resource model: camelCase on the wire, unknown fields rejected, docstrings as
    descriptions."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        use_attribute_docstrings=True,
        validate_default=False,
    )

    def to_wire(self) -> dict[str, Any]:
        """The object as the API server stores it: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def cel(
    rule: str, message: str, *, field_path: str | None = None, reason: str | None = None
) -> dict[str, str]:
    """One `x-kubernetes-validations` entry. The same rule is also checked in Python by the model that
    declares it (see the model validators), so `whetstone validate` and the API server agree."""
    entry = {"rule": rule, "message": message}
    if field_path:
        entry["fieldPath"] = field_path
    if reason:
        entry["reason"] = reason
    return entry


class Condition(ApiModel):
    """The standard Kubernetes condition (metav1.Condition)."""

    type: str = Field(max_length=316)
    """Kind of condition, e.g. Succeeded, Failed, Running, Suspended."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str = Field(default="", max_length=1024)
    """Machine-readable CamelCase reason of the last transition."""
    message: str = Field(default="", max_length=32768)
    """Human-readable explanation of the last transition."""
    last_transition_time: datetime | None = None
    """When the condition last changed status."""
    observed_generation: int | None = Field(default=None, ge=0)
    """The metadata.generation the condition was computed from."""


class ResourceRequirements(ApiModel):
    """Compute resources of one trainer pod, as in a container's `resources`."""

    requests: dict[str, Quantity] = Field(default_factory=dict)
    """Minimum resources, e.g. {cpu: "8", memory: 64Gi}. GPUs come from gpusPerNode."""
    limits: dict[str, Quantity] = Field(default_factory=dict)
    """Maximum resources, e.g. {memory: 80Gi}."""


class Toleration(ApiModel):
    """A pod toleration, as in `spec.tolerations` of a pod."""

    key: str | None = None
    """Taint key the toleration applies to; empty with operator Exists matches every taint."""
    operator: Literal["Exists", "Equal"] | None = None
    """Exists or Equal (the default)."""
    value: str | None = None
    """Taint value to match with operator Equal."""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    """Taint effect to match; empty matches all effects."""
    toleration_seconds: int | None = None
    """For NoExecute: how long the pod stays bound after the taint appears."""


class LocalObjectReference(ApiModel):
    """A reference to an object in the same namespace, by name."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the referenced object."""


class ObjectMeta(ApiModel):
    """The subset of metadata Whetstone reads; the API server owns the rest."""

    model_config = ApiModel.model_config | {"extra": "allow"}

    name: str = Field(min_length=1, max_length=63, pattern=r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
    """Job name: a DNS label (it names the pods and the headless Service)."""
    namespace: str | None = None
    """Namespace of the job."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Labels; kueue.x-k8s.io/queue-name sends the job through a Kueue queue."""
    annotations: dict[str, str] = Field(default_factory=dict)
    """Annotations."""
