"""The Whetstone API (whetstone.dev/v1alpha1) as pydantic models: the one source of truth for the CRDs,
manifest validation and the trainer's configuration."""

from .base import API_GROUP, API_VERSION, GROUP_VERSION, Condition
from .checkpoint import Checkpoint
from .finetunejob import FineTuneJob, FineTuneJobSpec, FineTuneJobStatus
from .rewardgrader import RewardGrader
from .trainingsession import TrainingSession

RESOURCE_KINDS = {
    "FineTuneJob": FineTuneJob,
    "RewardGrader": RewardGrader,
    "Checkpoint": Checkpoint,
    "TrainingSession": TrainingSession,
}

__all__ = [
    "API_GROUP",
    "API_VERSION",
    "GROUP_VERSION",
    "RESOURCE_KINDS",
    "Checkpoint",
    "Condition",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "RewardGrader",
    "TrainingSession",
]
