"""What an RFT step samples and grades: prompt groups, the zero-variance test, the statistics a step reports
and the lines of rollouts.jsonl. The loop itself is rft.py."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from whetstone_graders import Reward

from ..sampling import Completion


@dataclass(frozen=True)
class Prompt:
    """One RFT prompt row: its tokens and the row the graders read as item.*."""

    tokens: list[int]
    row: dict[str, Any]
    line: int


@dataclass
class Group:
    """The samples of one prompt: completions from the current policy, their text and their rewards."""

    position: int  # in the prompt stream (the data cursor)
    prompt: int  # index into the prompts
    completions: list[Completion]
    texts: list[str]
    rewards: list[Reward]

    @property
    def totals(self) -> list[float | None]:
        return [r.total for r in self.rewards]

    @property
    def zero_variance(self) -> bool:
        """All graded samples scored the same (or fewer than two were graded): every advantage is 0."""
        valid = [t for t in self.totals if t is not None]
        return len(valid) < 2 or max(valid) == min(valid)


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def rollout_metrics(groups: list[Group], pass_threshold: float, graders: list[str]) -> dict[str, Any]:
    """Reward, length and truncation statistics over every sample of the step (filtered groups too: they show
    how the policy does), per grader too."""
    totals = [t for g in groups for t in g.totals if t is not None]
    lengths = [len(c.tokens) for g in groups for c in g.completions]
    finishes = [c.finish_reason for g in groups for c in g.completions]
    per_grader: dict[str, float] = {}
    for name in graders:
        scores = [r.grades[name].score for g in groups for r in g.rewards if r.grades[name].score is not None]
        if scores:
            per_grader[name] = sum(scores) / len(scores)  # type: ignore[arg-type]
    return {
        "reward_mean": _mean(totals),
        "reward_std": statistics.pstdev(totals) if len(totals) > 1 else (0.0 if totals else None),
        "reward_min": min(totals) if totals else None,
        "reward_max": max(totals) if totals else None,
        "grader_reward_mean": per_grader,
        "pass_rate": _mean([float(t >= pass_threshold) for t in totals]),
        "samples": len(lengths),
        "skipped_samples": sum(t is None for g in groups for t in g.totals),
        "response_length_mean": _mean([float(n) for n in lengths]),
        "response_length_max": max(lengths) if lengths else None,
        "truncation_rate": _mean([float(f == "length") for f in finishes]),
    }


def grade_observations(groups: list[Group]) -> tuple[dict[str, list[float]], dict[tuple[str, str], int]]:
    """Every grade's latency by grader, and failed grades by (grader, reason)."""
    latencies: dict[str, list[float]] = {}
    errors: dict[tuple[str, str], int] = {}
    for g in groups:
        for r in g.rewards:
            for name, grade in r.grades.items():
                if grade.seconds is not None and math.isfinite(grade.seconds):
                    latencies.setdefault(name, []).append(grade.seconds)
                if grade.error:
                    errors[(name, grade.error)] = errors.get((name, grade.error), 0) + 1
    return latencies, errors


def rollout_lines(
    step: int,
    groups: list[Group],
    prompts: list[Prompt],
    kept: set[int],
    advantages: dict[tuple[int, int], float],
    limit: int,
) -> list[dict[str, Any]]:
    """Up to `limit` samples of the step for rollouts.jsonl, one per group first: the prompt, the answer, why
    it ended, its reward and every grader's score, error and message."""
    lines: list[dict[str, Any]] = []
    k = 0
    while len(lines) < limit and any(k < len(g.completions) for g in groups):
        for g in groups:
            if len(lines) >= limit or k >= len(g.completions):
                continue
            reward = g.rewards[k]
            lines.append(
                {
                    "step": step,
                    "line": prompts[g.prompt].line,
                    "prompt": prompts[g.prompt].row["messages"],
                    "completion": g.texts[k],
                    "finish_reason": g.completions[k].finish_reason,
                    "tokens": len(g.completions[k].tokens),
                    "reward": reward.total,
                    "advantage": advantages.get((g.position, k)),
                    "trained": g.position in kept,
                    "grades": {
                        name: {"score": gr.score, "error": gr.error, "message": gr.message}
                        for name, gr in reward.grades.items()
                    },
                }
            )
        k += 1
    return lines
