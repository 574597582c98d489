"""RewardGrader: a reusable grader for RFT, with its own test cases.

Exactly one grader type is set. User code (python) never runs in the operator; in the trainer it runs in a
separate, limited process. This is the schema; the graders themselves land with RFT.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .base import GROUP_VERSION, ApiModel, Condition, ObjectMeta, cel

KIND = "RewardGrader"

_TYPES = ("stringCheck", "regex", "similarity", "python", "http", "modelJudge", "weighted")


class StringCheckGrader(ApiModel):
    """1 when the answer compares as asked with the reference, else 0."""

    input: str = Field(default="{{ sample.output_text }}", max_length=4096)
    """Template of the text to check."""
    reference: str = Field(max_length=4096)
    """Template of the reference, e.g. {{ item.answer }}."""
    operation: Literal["eq", "ne", "like", "ilike"] = "eq"
    """eq, ne, like (contains) or ilike (contains, ignoring case)."""


class RegexGrader(ApiModel):
    """Scores whether the answer matches a regular expression."""

    pattern: str = Field(min_length=1, max_length=4096)
    """Python regular expression."""
    mode: Literal["search", "match", "fullmatch"] = "search"
    """search (anywhere), match (at the start) or fullmatch (the whole answer)."""
    ignore_case: bool = False
    """Match without regard to case."""
    score_on_match: float = 1.0
    """Score when it matches."""
    score_on_no_match: float = 0.0
    """Score when it does not."""


class SimilarityGrader(ApiModel):
    """A text-similarity metric between answer and reference, in [0, 1]."""

    reference: str = Field(max_length=4096)
    """Template of the reference."""
    metric: Literal["fuzzy_match", "bleu", "rouge_1", "rouge_2", "rouge_l"] = "fuzzy_match"
    """The similarity metric."""
    pass_threshold: float | None = Field(default=None, ge=0, le=1)
    """If set, the score is 1 at or above it and 0 below."""


class SandboxLimits(ApiModel):
    """Limits of the grader process."""

    timeout_seconds: float = Field(default=10, gt=0, le=600)
    """Wall-clock limit per grading call."""
    memory_mb: int = Field(default=512, ge=16, le=65536)
    """Address-space limit."""
    allow_network: bool = False
    """Let the grader open network connections."""


class PythonGrader(ApiModel):
    """User code defining grade(sample, item) -> float, run sandboxed in the trainer."""

    source: str = Field(min_length=1, max_length=262144)
    """Python source that defines grade(sample, item)."""
    limits: SandboxLimits = Field(default_factory=SandboxLimits)
    """CPU, memory, time and network limits."""


class HTTPGrader(ApiModel):
    """An HTTP service that scores answers: POST {sample, item} → {score}."""

    url: str = Field(min_length=1, max_length=4096)
    """Endpoint URL."""
    timeout_seconds: float = Field(default=30, gt=0, le=600)
    """Request timeout."""
    max_concurrency: int = Field(default=16, ge=1, le=1024)
    """Requests in flight at once."""
    secret_name: str | None = None
    """Secret whose `token` key is sent as a bearer token."""


class ModelJudgeGrader(ApiModel):
    """An LLM that scores the answer (OpenAI-compatible chat endpoint)."""

    endpoint: str = Field(min_length=1, max_length=4096)
    """Base URL of the chat-completions endpoint."""
    model: str = Field(min_length=1, max_length=256)
    """Model name at that endpoint."""
    prompt: str = Field(min_length=1, max_length=65536)
    """Prompt template; the judge answers with a number in range."""
    range: list[float] = Field(default_factory=lambda: [0.0, 1.0], min_length=2, max_length=2)
    """[low, high] of the judge's score, rescaled to [0, 1]."""


class WeightedGrader(ApiModel):
    """A weighted combination of other RewardGraders."""

    graders: dict[str, float] = Field(min_length=1)
    """RewardGrader name → weight."""


class GraderTestCase(ApiModel):
    """An example the grader must score as expected; checked before the grader is Ready."""

    sample: str
    """The model's answer."""
    item: dict[str, str] = Field(default_factory=dict)
    """The dataset row's fields."""
    expected_score: float
    """The score the grader must give (within 1e-6)."""


class RewardGraderSpec(ApiModel):
    """One grader: exactly one type is set."""

    model_config = ApiModel.model_config | {
        "json_schema_extra": {
            "x-kubernetes-validations": [
                cel(
                    " + ".join(f"(has(self.{t}) ? 1 : 0)" for t in _TYPES) + " == 1",
                    "exactly one grader type must be set: " + ", ".join(_TYPES),
                )
            ]
        }
    }

    string_check: StringCheckGrader | None = None
    """Compare with a reference string."""
    regex: RegexGrader | None = None
    """Match a regular expression."""
    similarity: SimilarityGrader | None = None
    """Text similarity to a reference."""
    python: PythonGrader | None = None
    """Sandboxed user code."""
    http: HTTPGrader | None = None
    """A remote scoring service."""
    model_judge: ModelJudgeGrader | None = None
    """An LLM judge."""
    weighted: WeightedGrader | None = None
    """A weighted combination of other graders."""
    on_error: Literal["zero", "skip", "fail"] = "zero"
    """When grading raises or times out: score 0, drop the sample, or fail the job. Errors are always
    counted."""
    test_cases: list[GraderTestCase] = Field(default_factory=list, max_length=256)
    """Examples checked before the grader is marked Ready."""

    @model_validator(mode="after")
    def _exactly_one_type(self) -> RewardGraderSpec:
        set_types = [t for t in _TYPES if getattr(self, _snake(t)) is not None]
        if len(set_types) != 1:
            raise ValueError("exactly one grader type must be set: " + ", ".join(_TYPES))
        return self


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


class RewardGraderStatus(ApiModel):
    """Observed state: whether the test cases pass."""

    phase: Literal["Pending", "Ready", "Failed"] | None = None
    """Ready once every test case scored as expected."""
    conditions: list[Condition] = Field(default_factory=list, max_length=8)
    """Standard conditions (Ready)."""
    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    test_cases_passed: int | None = None
    """Test cases that scored as expected."""
    message: str | None = None
    """Why the grader is not Ready."""


class RewardGrader(ApiModel):
    """A reusable reward function for reinforcement fine-tuning."""

    api_version: Literal["whetstone.dev/v1alpha1"] = GROUP_VERSION
    """whetstone.dev/v1alpha1"""
    kind: Literal["RewardGrader"] = KIND
    """RewardGrader"""
    metadata: ObjectMeta
    """Standard object metadata."""
    spec: RewardGraderSpec
    """The grader."""
    status: RewardGraderStatus | None = None
    """The observed state."""
