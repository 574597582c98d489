"""The primitives of grading: what a grader sees (Sample), what it gives back (Grade, Reward), how it fails
(GradingError with a reason code) and the counters a job reports (GraderStats)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Final

# --- reason codes of a failed grade (Grade.error, the `reason` label of grader_errors_total) ---------------

EXCEPTION: Final = "exception"
"""The grader's code raised."""
TIMEOUT: Final = "timeout"
"""The call ran past its wall-clock limit (the worker was killed), or an HTTP request timed out."""
CPU_TIME: Final = "cpu_time"
"""The call used more CPU time than its limit (the worker was killed)."""
MEMORY: Final = "memory"
"""The call ran out of its memory limit (MemoryError)."""
OUTPUT_TOO_LARGE: Final = "output_too_large"
"""The call printed more than its output limit, or its answer was larger than allowed."""
CRASHED: Final = "crashed"
"""The worker process died (a segfault, os._exit, a signal) during the call."""
NOT_A_NUMBER: Final = "not_a_number"
"""The grader returned something that is not a number (a string, None, a list, a number too large for a
float)."""
NAN: Final = "nan"
"""The grader returned NaN."""
INFINITE: Final = "infinite"
"""The grader returned an infinity."""
FORBIDDEN: Final = "forbidden"
"""The grader tried something the sandbox refuses (reading outside its folder, starting a process,
signalling another process, loading native code)."""
NETWORK: Final = "network"
"""The grader tried to use the network without allowNetwork, or a remote grader could not be reached."""
INVALID_SOURCE: Final = "invalid_source"
"""The python grader's source does not compile or defines no grade(sample, item)."""
TEMPLATE: Final = "template"
"""A template names a field the sample or the dataset row does not have."""
HTTP_STATUS: Final = "http_status"
"""A remote grader answered with an HTTP error status."""
BAD_RESPONSE: Final = "bad_response"
"""A remote grader's answer is not what the protocol says (not JSON, no score, no number in the reply)."""
OUT_OF_RANGE: Final = "out_of_range"
"""A model judge's number lies outside its range."""
CHILD: Final = "child"
"""A child of a weighted grader failed (the child's own error is counted under its name)."""

REASONS: Final = (
    EXCEPTION,
    TIMEOUT,
    CPU_TIME,
    MEMORY,
    OUTPUT_TOO_LARGE,
    CRASHED,
    NOT_A_NUMBER,
    NAN,
    INFINITE,
    FORBIDDEN,
    NETWORK,
    INVALID_SOURCE,
    TEMPLATE,
    HTTP_STATUS,
    BAD_RESPONSE,
    OUT_OF_RANGE,
    CHILD,
)

MAX_MESSAGE: Final = 300
"""Grade.message is cut to this many characters."""


def short(text: str, limit: int = MAX_MESSAGE) -> str:
    """First line of `text`, at most `limit` characters: messages end up in logs and rollout files."""
    line = text.strip().splitlines()[0] if text.strip() else ""
    return line if len(line) <= limit else line[: limit - 1] + "…"


class GradingError(Exception):
    """One grade failed, for a reason from REASONS."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = short(message)


class GraderFailed(RuntimeError):
    """A grader with onError: fail failed: the job must fail, naming the grader and the reason."""

    def __init__(self, grader: str, reason: str, message: str | None) -> None:
        super().__init__(f"RewardGrader {grader} failed ({reason}): {message or ''}".rstrip(": "))
        self.grader = grader
        self.reason = reason
        self.message = message


class GraderConfigError(ValueError):
    """The graders of a job cannot be built: a missing child, a cycle, an unreadable Secret."""


class MissingGrader(GraderConfigError):
    """A job or a weighted grader names a RewardGrader that does not exist."""


class GraderCycle(GraderConfigError):
    """Weighted graders that contain themselves."""


@dataclass(frozen=True)
class Sample:
    """What a grader sees as {{ sample.* }}: the model's answer."""

    output_text: str

    @cached_property
    def output_json(self) -> Any:
        """The answer parsed as JSON, or None when it is not JSON."""
        try:
            return json.loads(self.output_text)
        except (ValueError, RecursionError):
            return None

    def as_dict(self) -> dict[str, Any]:
        """The sample as python graders and HTTP services receive it."""
        return {"output_text": self.output_text, "output_json": self.output_json}


@dataclass(frozen=True)
class Grade:
    """One grader's verdict on one sample."""

    score: float | None
    """The score; None: the sample is skipped (onError: skip)."""
    error: str | None = None
    """Reason code when grading failed (see REASONS); the score is then per onError."""
    message: str | None = None
    """Short human text: the first line of the exception, the HTTP status, ..."""
    seconds: float | None = None
    """Time this grade took (for the grader latency histogram)."""


@dataclass(frozen=True)
class Reward:
    """All graders' verdicts on one sample."""

    total: float | None
    """Weighted sum of the job's graders' scores; None when any grader skipped the sample."""
    grades: dict[str, Grade]
    """By grader name."""


@dataclass(frozen=True)
class GraderStats:
    """Counters since the GraderSet was built."""

    calls: dict[str, int] = field(default_factory=dict)
    """Grades given, by grader."""
    errors: dict[tuple[str, str], int] = field(default_factory=dict)
    """Failed grades by (grader, reason)."""
    seconds: dict[str, float] = field(default_factory=dict)
    """Total grading time, by grader."""
    sandbox: tuple[str, ...] = ()
    """The sandbox layers in force for this job's sandboxed graders (see whetstone_graders.sandbox)."""

    def mean_seconds(self, grader: str) -> float | None:
        n = self.calls.get(grader, 0)
        return self.seconds.get(grader, 0.0) / n if n else None
