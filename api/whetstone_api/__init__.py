"""The Whetstone API (whetstone.dev/v1alpha1) as pydantic models: the one source of truth for the CRDs,
manifest validation and the trainer's configuration.

The resource models are imported on first use (PEP 562): building a pydantic model costs import time, and
the operator's start-up, which needs only the FineTuneJob's, should not pay for the others.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import API_GROUP, API_VERSION, GROUP_VERSION, Condition

if TYPE_CHECKING:
    from .checkpoint import Checkpoint
    from .finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
    from .rewardgrader import RewardGrader
    from .trainingsession import TrainingSession

# name -> the module that defines it
_MODELS = {
    "Checkpoint": "checkpoint",
    "FineTuneJob": "finetunejob",
    "FineTuneJobSpec": "finetunejob",
    "FineTuneJobStatus": "finetunejob",
    "RewardGrader": "rewardgrader",
    "TrainingSession": "trainingsession",
}
_KINDS = ("FineTuneJob", "RewardGrader", "Checkpoint", "TrainingSession")
PLURALS = {
    "FineTuneJob": "finetunejobs",
    "RewardGrader": "rewardgraders",
    "Checkpoint": "checkpoints",
    "TrainingSession": "trainingsessions",
}
"""The REST resource name of each kind (crd.py's KINDS use them; the operator's start-up reads them here,
without building the models)."""


def __getattr__(name: str) -> Any:
    if name == "RESOURCE_KINDS":
        return {kind: __getattr__(kind) for kind in _KINDS}
    if name in _MODELS:
        return getattr(importlib.import_module(f".{_MODELS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "API_GROUP",
    "API_VERSION",
    "GROUP_VERSION",
    "PLURALS",
    "RESOURCE_KINDS",
    "Checkpoint",
    "Condition",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "RewardGrader",
    "TrainingSession",
]
