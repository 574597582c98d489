"""Reward graders for RFT, torch-free: every RewardGrader type behind one signature, `grade(sample, item) ->
score`, user code in a sandbox (whetstone_graders.sandbox), and the test-case runner the operator and
`whetstone grader test` share. Imports only whetstone_api and the standard library.

    with GraderSet([("exact", 1.0)], {"exact": spec}) as graders:
        rewards = graders.grade([Sample("42")], [{"answer": "42"}])   # [Reward(total=1.0, grades={...})]
"""

from .graderset import GraderSet, grader_order
from .testcases import CaseResult, TestReport, run_test_cases
from .types import (
    Grade,
    GraderConfigError,
    GraderCycle,
    GraderFailed,
    GraderStats,
    GradingError,
    MissingGrader,
    Reward,
    Sample,
)

__all__ = [
    "CaseResult",
    "Grade",
    "GraderConfigError",
    "GraderCycle",
    "GraderFailed",
    "GraderSet",
    "GraderStats",
    "GradingError",
    "MissingGrader",
    "Reward",
    "Sample",
    "TestReport",
    "grader_order",
    "run_test_cases",
]
