"""Running a RewardGrader's testCases: the one code path behind the operator's Ready check and
`whetstone grader test`. The cases are graded through a GraderSet, exactly as a job grades (onError
applied), so a case passes here exactly when the trainer would give that score."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from whetstone_api.rewardgrader import RewardGraderSpec

from .graderset import GraderSet, grader_order
from .sandbox import ALL_LAYERS
from .types import GraderConfigError, GraderFailed, Sample


@dataclass(frozen=True)
class CaseResult:
    index: int
    expected: float
    got: float | None
    """The settled score; None when the grader skipped the sample or failed."""
    passed: bool
    error: str | None = None
    """The grading error's reason, if any (the score is then per onError)."""
    message: str | None = None


@dataclass(frozen=True)
class TestReport:
    __test__ = False  # not a pytest class

    name: str
    cases: list[CaseResult] = field(default_factory=list)
    problem: str | None = None
    """Why the cases could not run at all (a missing child, a cycle, an unreadable Secret)."""

    @property
    def passed(self) -> int:
        return sum(c.passed for c in self.cases)

    @property
    def total(self) -> int:
        return len(self.cases)

    @property
    def ok(self) -> bool:
        return self.problem is None and all(c.passed for c in self.cases)

    @property
    def first_failure(self) -> CaseResult | None:
        return next((c for c in self.cases if not c.passed), None)

    def summary(self) -> str:
        """One line: what passed, or the first failure with its expected and actual score."""
        if self.problem:
            return self.problem
        failure = self.first_failure
        if failure is None:
            return f"{self.passed}/{self.total} test cases passed"
        got = "no score" if failure.got is None else f"{failure.got:g}"
        why = f" ({failure.error}: {failure.message})" if failure.error else ""
        return f"test case {failure.index} expected {failure.expected:g}, got {got}{why}"


def run_test_cases(
    name: str,
    spec: RewardGraderSpec,
    specs: Mapping[str, RewardGraderSpec] | None = None,
    secrets_dir: Path | None = None,
    sandbox_layers: Sequence[str] = ALL_LAYERS,
) -> TestReport:
    """Grade every test case of `spec` (named `name`); weighted graders find their children in `specs`."""
    every = {**(specs or {}), name: spec}
    try:
        grader_order([name], every)
        graders = GraderSet([(name, 1.0)], every, secrets_dir, workers=1, sandbox_layers=sandbox_layers)
    except GraderConfigError as e:
        return TestReport(name, problem=str(e))
    results = []
    with graders:
        unloadable = graders.preload()
        if unloadable:
            which, why = next(iter(unloadable.items()))
            return TestReport(name, problem=f"RewardGrader {which} does not load: {why}")
        for index, case in enumerate(spec.test_cases):
            try:
                grade = graders.grade_one(name, Sample(case.sample), case.item)
            except GraderFailed as e:
                results.append(CaseResult(index, case.expected_score, None, False, e.reason, e.message))
                continue
            passed = grade.score is not None and abs(grade.score - case.expected_score) <= case.tolerance
            results.append(
                CaseResult(index, case.expected_score, grade.score, passed, grade.error, grade.message)
            )
    return TestReport(name, results)
