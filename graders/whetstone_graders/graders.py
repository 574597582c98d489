"""One class per RewardGrader type, each behind the same signature: `grade(sample, item) -> score`.

A grade that cannot be given raises GradingError(reason, message); `grade_many` grades a batch and returns
raw Grades (a score, or an error reason) for GraderSet to settle per onError. Types whose cost depends on the
answer or that run user code (regex, similarity, python) send the batch to a sandbox; stringCheck runs here
(linear time); http and modelJudge (remote.py) call their service from threads, bounded by maxConcurrency.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from whetstone_api.rewardgrader import (
    PythonGrader,
    RegexGrader,
    RewardGraderSpec,
    SandboxLimits,
    SimilarityGrader,
    StringCheckGrader,
    WeightedGrader,
)

from . import templates
from .sandbox import Outcome, Sandbox
from .types import CHILD, Grade, GradingError, Sample

Item = Mapping[str, Any]
SandboxFactory = Callable[[str, SandboxLimits, str], Sandbox]
"""(source, limits, grader name) -> a Sandbox; GraderSet passes one that builds LocalSandbox pools."""


class Grader:
    """Base of every grader type."""

    def __init__(self, name: str) -> None:
        self.name = name

    def grade(self, sample: Sample, item: Item) -> float:
        """The score of one answer; raises GradingError when it cannot be given."""
        raise NotImplementedError

    def grade_many(self, samples: Sequence[Sample], items: Sequence[Item]) -> list[Grade]:
        """Raw grades (a score, or an error with its reason) of a batch, in order."""
        out = []
        for sample, item in zip(samples, items, strict=True):
            started = time.perf_counter()
            try:
                score = self.grade(sample, item)
                out.append(Grade(score, seconds=time.perf_counter() - started))
            except GradingError as e:
                out.append(Grade(None, e.reason, e.message, time.perf_counter() - started))
        return out

    def preload(self) -> str | None:
        """Get ready to grade (start sandbox workers); None, or why this grader cannot grade at all."""
        return None

    def close(self) -> None:
        """Release processes, threads and connections."""


class StringCheck(Grader):
    def __init__(self, name: str, spec: StringCheckGrader) -> None:
        super().__init__(name)
        self.spec = spec
        templates.check(spec.input)
        templates.check(spec.reference)

    def grade(self, sample: Sample, item: Item) -> float:
        text = templates.render(self.spec.input, sample, item)
        reference = templates.render(self.spec.reference, sample, item)
        op = self.spec.operation
        if op == "eq":
            return float(text == reference)
        if op == "ne":
            return float(text != reference)
        if op == "like":
            return float(reference in text)
        return float(reference.lower() in text.lower())


class Sandboxed(Grader):
    """A grader whose code runs in a sandbox: the batch's inputs are prepared here (templates) and the
    sandbox's outcomes mapped to scores."""

    def __init__(self, name: str, source: str, limits: SandboxLimits, sandboxes: SandboxFactory) -> None:
        super().__init__(name)
        self.sandbox = sandboxes(source, limits, name)

    def prepare(self, sample: Sample, item: Item) -> tuple[dict[str, Any], Item]:
        """What the sandboxed code receives as (sample, item)."""
        raise NotImplementedError

    def score(self, value: float) -> float:
        return value

    def grade(self, sample: Sample, item: Item) -> float:
        grade = self.grade_many([sample], [item])[0]
        if grade.error:
            raise GradingError(grade.error, grade.message or grade.error)
        assert grade.score is not None
        return grade.score

    def grade_many(self, samples: Sequence[Sample], items: Sequence[Item]) -> list[Grade]:
        results: list[Grade | None] = []
        calls, positions = [], []
        for index, (sample, item) in enumerate(zip(samples, items, strict=True)):
            try:
                calls.append(self.prepare(sample, item))
                positions.append(index)
                results.append(None)
            except GradingError as e:
                results.append(Grade(None, e.reason, e.message, 0.0))
        outcomes: list[Outcome] = self.sandbox.run(calls) if calls else []
        for index, outcome in zip(positions, outcomes, strict=True):
            if outcome.error:
                results[index] = Grade(None, outcome.error, outcome.message, outcome.seconds)
            else:
                assert outcome.score is not None
                results[index] = Grade(self.score(outcome.score), seconds=outcome.seconds)
        return [g for g in results if g is not None]

    def preload(self) -> str | None:
        outcome = self.sandbox.preload()
        return None if outcome is None else f"{outcome.error}: {outcome.message}"

    def close(self) -> None:
        self.sandbox.close()


def python_source_problem(source: str) -> str | None:
    """Why the source of a python grader does not compile (its line and the compiler's message), or None.
    Compiling reads the source but never runs any of it, so this is done before the sandbox (and before a
    model is loaded): a typo is refused up front instead of failing every worker."""
    try:
        compile(source, "<grader>", "exec", dont_inherit=True)
    except SyntaxError as e:  # IndentationError and TabError included
        where = f"line {e.lineno}" + (f", column {e.offset}" if e.offset else "")
        return f"{where}: {e.msg}"
    except (ValueError, MemoryError, RecursionError) as e:  # a NUL byte; nesting beyond the parser's limits
        return f"{type(e).__name__}: {e}"
    return None


def spec_problems(spec: RewardGraderSpec) -> list[str]:
    """What in a RewardGrader's spec cannot work, found without running any of it, each naming its field."""
    why = python_source_problem(spec.python.source) if spec.python is not None else None
    return [f"spec.python.source does not compile: {why}"] if why else []


class Python(Sandboxed):
    def __init__(self, name: str, spec: PythonGrader, sandboxes: SandboxFactory) -> None:
        super().__init__(name, spec.source, spec.limits, sandboxes)

    def prepare(self, sample: Sample, item: Item) -> tuple[dict[str, Any], Item]:
        return sample.as_dict(), item


_REGEX_SOURCE = """
import re
_PATTERN = re.compile({pattern!r}, {flags})
_MATCH = getattr(_PATTERN, {mode!r})

def grade(sample, item):
    return 1.0 if _MATCH(sample["text"]) else 0.0
"""
_REGEX_FLAGS = {"ignoreCase": "re.IGNORECASE", "multiline": "re.MULTILINE", "dotAll": "re.DOTALL"}


class Regex(Sandboxed):
    """Python's `re` backtracks: some patterns take exponential time on some answers, so matching runs in
    the sandbox, where that is a timed-out grade instead of a frozen trainer."""

    def __init__(self, name: str, spec: RegexGrader, sandboxes: SandboxFactory) -> None:
        templates.check(spec.input)
        flags = " | ".join(_REGEX_FLAGS[f] for f in spec.flags) or "0"
        source = _REGEX_SOURCE.format(pattern=spec.pattern, flags=flags, mode=spec.mode)
        super().__init__(name, source, spec.limits.model_copy(update={"allow_network": False}), sandboxes)
        self.spec = spec

    def prepare(self, sample: Sample, item: Item) -> tuple[dict[str, Any], Item]:
        return {"text": templates.render(self.spec.input, sample, item)}, {}

    def score(self, value: float) -> float:
        return self.spec.score_on_match if value else self.spec.score_on_no_match


_SIMILARITY_SOURCE = Path(__file__).with_name("similarity.py").read_text()
_SIMILARITY_GRADE = """

def grade(sample, item):
    return METRICS[{metric!r}](sample["text"], sample["reference"])
"""


class Similarity(Sandboxed):
    def __init__(self, name: str, spec: SimilarityGrader, sandboxes: SandboxFactory) -> None:
        templates.check(spec.input)
        templates.check(spec.reference)
        super().__init__(
            name,
            _SIMILARITY_SOURCE + _SIMILARITY_GRADE.format(metric=spec.metric),
            spec.limits.model_copy(update={"allow_network": False}),
            sandboxes,
        )
        self.spec = spec

    def prepare(self, sample: Sample, item: Item) -> tuple[dict[str, Any], Item]:
        text = templates.render(self.spec.input, sample, item)
        return {"text": text, "reference": templates.render(self.spec.reference, sample, item)}, {}

    def score(self, value: float) -> float:
        threshold = self.spec.pass_threshold
        return value if threshold is None else float(value >= threshold)


ChildGrades = Callable[[str, Sequence[Sample], Sequence[Item]], list[Grade]]
"""(child name, samples, items) -> the child's grades, already settled per the child's onError."""


class Weighted(Grader):
    """Children graded with their own settings; a child that skipped a sample makes this grade a skip (raw
    error CHILD with no score), a child that failed with onError zero counts 0."""

    def __init__(self, name: str, spec: WeightedGrader, child_grades: ChildGrades) -> None:
        super().__init__(name)
        self.spec = spec
        self.child_grades = child_grades

    def grade(self, sample: Sample, item: Item) -> float:
        grade = self.grade_many([sample], [item])[0]
        if grade.score is None:
            raise GradingError(grade.error or CHILD, grade.message or "a child skipped the sample")
        return grade.score

    def grade_many(self, samples: Sequence[Sample], items: Sequence[Item]) -> list[Grade]:
        started = time.perf_counter()
        by_child = {child: self.child_grades(child, samples, items) for child in self.spec.graders}
        seconds = (time.perf_counter() - started) / max(1, len(samples))
        total_weight = sum(self.spec.graders.values())
        out = []
        for i in range(len(samples)):
            skipped = [c for c, grades in by_child.items() if grades[i].score is None]
            if skipped:
                out.append(Grade(None, CHILD, f"child {skipped[0]} skipped the sample", seconds))
                continue
            total = sum(w * by_child[c][i].score for c, w in self.spec.graders.items())  # type: ignore[operator]
            out.append(Grade(total / total_weight if self.spec.normalize else total, seconds=seconds))
        return out
