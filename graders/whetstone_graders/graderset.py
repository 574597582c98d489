"""GraderSet: the graders of one job, built once, graded in batches, closed at the end.

It resolves the job's grader references and every weighted grader's children (a missing child or a cycle is
a GraderConfigError naming it), builds each grader once (a child shared by two parents has one sandbox), and
settles every raw grade per its grader's onError, counting errors by (grader, reason). The caller gets Rewards
and, for onError: fail, a GraderFailed; never an exception from what a grader's code did.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from whetstone_api.rewardgrader import RewardGraderSpec, SandboxLimits
from whetstone_api.wire import ENV_GRADER_SECRETS, GRADER_SECRETS_DIR

from . import graders as g
from . import remote, templates
from .sandbox import ALL_LAYERS, LocalSandbox, Sandbox
from .types import (
    CHILD,
    Grade,
    GraderConfigError,
    GraderCycle,
    GraderFailed,
    GraderStats,
    MissingGrader,
    Reward,
    Sample,
)

Item = Mapping[str, Any]


def grader_order(names: Sequence[str], specs: Mapping[str, RewardGraderSpec]) -> list[str]:
    """Every grader the names need, children before parents; GraderConfigError on a missing grader or a
    cycle, naming it (and the path that leads to it)."""
    order: list[str] = []
    state: dict[str, str] = {}

    def visit(name: str, path: tuple[str, ...]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join((*path[path.index(name) :], name))
            raise GraderCycle(f"RewardGrader {path[-1]}: weighted graders form a cycle: {cycle}")
        if name not in specs:
            where = f"RewardGrader {path[-1]} (weighted) names child {name!r}" if path else f"{name!r}"
            raise MissingGrader(f"{where}, which does not exist")
        state[name] = "visiting"
        weighted = specs[name].weighted
        for child in weighted.graders if weighted else ():
            visit(child, (*path, name))
        state[name] = "done"
        order.append(name)

    for name in names:
        visit(name, ())
    return order


class GraderSet:
    """The graders of one job: `grade(samples, items)` gives one Reward per sample."""

    def __init__(
        self,
        refs: Sequence[tuple[str, float]],
        specs: Mapping[str, RewardGraderSpec],
        secrets_dir: Path | None = None,
        workers: int = 2,
        sandbox_layers: Sequence[str] = ALL_LAYERS,
    ) -> None:
        if not refs:
            raise GraderConfigError("no graders: an RFT job names at least one RewardGrader")
        self.refs = [(name, float(weight)) for name, weight in refs]
        self.specs = dict(specs)
        if secrets_dir is None:
            secrets_dir = Path(os.environ.get(ENV_GRADER_SECRETS, GRADER_SECRETS_DIR))
        self.secrets_dir = secrets_dir
        self.workers = workers
        self.sandbox_layers = tuple(sandbox_layers)
        self._sandboxes: list[LocalSandbox] = []
        self._graders: dict[str, g.Grader] = {}
        self._lock = threading.Lock()
        self._calls: Counter[str] = Counter()
        self._errors: Counter[tuple[str, str]] = Counter()
        self._seconds: Counter[str] = Counter()
        self._memos: dict[int, dict[str, Future[list[Grade]]]] = {}  # per batch being graded, by grader
        self._pool = ThreadPoolExecutor(min(32, max(1, len(self.refs))), thread_name_prefix="graders")
        try:
            for name in grader_order([n for n, _ in self.refs], self.specs):
                self._graders[name] = self._build(name, self.specs[name])
        except BaseException:
            self.close()
            raise

    def _sandbox(self, source: str, limits: SandboxLimits, name: str) -> Sandbox:
        sandbox = LocalSandbox(source, limits, self.workers, self.sandbox_layers, name)
        self._sandboxes.append(sandbox)
        return sandbox

    def _build(self, name: str, spec: RewardGraderSpec) -> g.Grader:
        try:
            if spec.string_check:
                return g.StringCheck(name, spec.string_check)
            if spec.regex:
                return g.Regex(name, spec.regex, self._sandbox)
            if spec.similarity:
                return g.Similarity(name, spec.similarity, self._sandbox)
            if spec.python:
                return g.Python(name, spec.python, self._sandbox)
            if spec.http:
                return remote.HTTP(name, spec.http, self.secrets_dir)
            if spec.model_judge:
                return remote.ModelJudge(name, spec.model_judge, self.secrets_dir)
            assert spec.weighted is not None
            return g.Weighted(name, spec.weighted, self._settled)
        except templates.TemplateSyntaxError as e:
            raise GraderConfigError(f"RewardGrader {name}: {e}") from None

    # --- grading

    def grade(self, samples: Sequence[Sample], items: Sequence[Item]) -> list[Reward]:
        """One Reward per sample: each grader's settled Grade and their weighted sum (None if any skipped).
        The job's graders run at the same time (each sandboxed one has processes of its own). Raises
        GraderFailed when a grader with onError: fail fails."""
        if len(samples) != len(items):
            raise ValueError(f"{len(samples)} samples but {len(items)} items")
        samples = list(samples)  # the batch's identity keys its memo of settled grades
        with self._lock:
            self._memos[id(samples)] = {}
        try:
            if len(self.refs) == 1:
                by_grader = {self.refs[0][0]: self._settled(self.refs[0][0], samples, items)}
            else:
                futures = {
                    name: self._pool.submit(self._settled, name, samples, items) for name, _ in self.refs
                }
                by_grader = {name: future.result() for name, future in futures.items()}
        finally:
            with self._lock:
                del self._memos[id(samples)]
        rewards = []
        for i in range(len(samples)):
            grades = {name: by_grader[name][i] for name, _ in self.refs}
            scores = [(grades[name].score, weight) for name, weight in self.refs]
            total = None if any(s is None for s, _ in scores) else sum(s * w for s, w in scores)  # type: ignore[operator]
            rewards.append(Reward(total, grades))
        return rewards

    def _settled(self, name: str, samples: Sequence[Sample], items: Sequence[Item]) -> list[Grade]:
        """The grader's grades with its onError applied, counted; once per batch even when it is both a job's
        grader and a weighted grader's child (the second asker waits for the first)."""
        with self._lock:
            memo = self._memos.get(id(samples))
            mine = memo is not None and name not in memo
            if mine:
                memo[name] = Future()  # type: ignore[index]
        if memo is not None and not mine:
            return memo[name].result()
        try:
            settled = self._settle(name, samples, items)
        except BaseException as e:
            if mine:
                memo[name].set_exception(e)  # type: ignore[index]
            raise
        if mine:
            memo[name].set_result(settled)  # type: ignore[index]
        return settled

    def _settle(self, name: str, samples: Sequence[Sample], items: Sequence[Item]) -> list[Grade]:
        on_error = self.specs[name].on_error
        raw = self._graders[name].grade_many(samples, items)
        settled = []
        for grade in raw:
            if grade.error is None:
                settled.append(grade)
            elif grade.error == CHILD and grade.score is None:
                settled.append(grade)  # a child skipped: so does its parent, whatever the parent's onError
            elif on_error == "zero":
                settled.append(Grade(0.0, grade.error, grade.message, grade.seconds))
            else:
                settled.append(Grade(None, grade.error, grade.message, grade.seconds))
        with self._lock:
            self._calls[name] += len(raw)
            for grade in raw:
                self._seconds[name] += grade.seconds or 0.0
                if grade.error:
                    self._errors[(name, grade.error)] += 1
        if on_error == "fail":
            failed = next((x for x in raw if x.error and x.error != CHILD), None)
            if failed is not None:
                raise GraderFailed(name, failed.error or "", failed.message)
        return settled

    def preload(self) -> dict[str, str]:
        """Start every sandboxed grader's workers and load its code, so the first step does not wait and a
        grader whose code does not load is known before training: {grader: why} for those that do not."""
        problems = {name: grader.preload() for name, grader in self._graders.items()}
        return {name: why for name, why in problems.items() if why}

    def grade_one(self, name: str, sample: Sample, item: Item) -> Grade:
        """One grader's settled grade of one answer (the test-case runner uses it)."""
        return self._settled(name, [sample], [item])[0]

    # --- reporting and closing

    def stats(self) -> GraderStats:
        layers = next((s.layers for s in self._sandboxes if s.layers), ())
        with self._lock:
            return GraderStats(dict(self._calls), dict(self._errors), dict(self._seconds), layers)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        for grader in self._graders.values():
            grader.close()
        for sandbox in self._sandboxes:
            sandbox.close()

    def __enter__(self) -> GraderSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
