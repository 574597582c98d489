"""Running grader code out of the caller's process.

`Sandbox` is the interface (one grader's code, many calls); `LocalSandbox` (local.py) is the backend for
this machine: a pool of worker processes (worker.py) confined by confine.py. Another backend (a grader pod,
a remote executor) would implement the same three members.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class Outcome:
    """One call's result: a finite score, or an error reason (whetstone_graders.types) and a short message."""

    score: float | None
    error: str | None = None
    message: str | None = None
    seconds: float = 0.0


class Sandbox(Protocol):
    """Runs one grader's `grade(sample, item)` away from the caller, under the grader's limits."""

    def run(self, calls: Sequence[tuple[Mapping[str, Any], Mapping[str, Any]]]) -> list[Outcome]:
        """Grade every (sample, item) pair; never raises for anything the grader's code does."""
        ...

    def preload(self) -> Outcome | None:
        """Start a worker and load the code without grading anything: None, or why it does not load."""
        ...

    @property
    def layers(self) -> tuple[str, ...]:
        """The isolation layers in force (known after the first call)."""
        ...

    def close(self) -> None:
        """Stop every worker and remove their scratch folders."""
        ...


from .local import ALL_LAYERS, LocalSandbox  # noqa: E402

__all__ = ["ALL_LAYERS", "LocalSandbox", "Outcome", "Sandbox"]
