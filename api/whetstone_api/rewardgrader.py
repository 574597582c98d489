"""RewardGrader: a reusable grader for RFT, with its own test cases.

A grader maps one sampled answer and its dataset row to a score: `grade(sample, item) -> float`, usually in
[0, 1]. Exactly one grader type is set per RewardGrader. Templates in text fields read the answer and the row:
`{{ sample.output_text }}`, `{{ sample.output_json.<path> }}` (the answer parsed as JSON) and
`{{ item.<path> }}` (any field of the dataset row; dotted paths reach nested fields and list positions).

User code (python) and graders whose cost grows with the answer (regex, similarity) never run in the
operator's or the trainer's process: they run in limited worker processes (see `SandboxLimits`). Every
rule below that the API server checks (CEL) is written once, as a `Rule`, and the same rule is checked in
Python, so `whetstone validate` and `whetstone grader test` reject what the API server rejects.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from .base import GROUP_VERSION, ApiModel, Condition, ObjectMeta, cel
from .reasons import GraderPhase

KIND = "RewardGrader"

GRADER_TYPES = ("stringCheck", "regex", "similarity", "python", "http", "modelJudge", "weighted")
"""The grader types, by their field name; exactly one is set."""
SANDBOXED_TYPES = ("regex", "similarity", "python")
"""Types that run in sandbox worker processes (their cost depends on the answer, or they are user code)."""
REMOTE_TYPES = ("http", "modelJudge")
"""Types that call a service over the network (the operator does not call them when it checks a grader)."""

DEFAULT_TOLERANCE = 1e-6


@dataclass(frozen=True)
class Rule:
    """One validation rule, written once: the CEL expression the API server evaluates and the same rule as a
    Python predicate, with one message for both."""

    expression: str
    message: str
    holds: Callable[[Any], bool]
    field_path: str | None = None

    def cel(self) -> dict[str, str]:
        return cel(self.expression, self.message, field_path=self.field_path)


def _rules_schema(rules: list[Rule]) -> dict[str, Any]:
    return {"json_schema_extra": {"x-kubernetes-validations": [r.cel() for r in rules]}}


def _check(model: Any, rules: list[Rule]) -> None:
    for rule in rules:
        if not rule.holds(model):
            raise ValueError(rule.message)


class StringCheckGrader(ApiModel):
    """1 when the answer compares as asked with the reference, else 0 (OpenAI's string_check)."""

    input: str = Field(default="{{ sample.output_text }}", max_length=4096)
    """Template of the text to check."""
    reference: str = Field(max_length=4096)
    """Template of the reference, e.g. {{ item.answer }}."""
    operation: Literal["eq", "ne", "like", "ilike"] = "eq"
    """eq (equal), ne (not equal), like (the input contains the reference) or ilike (contains, ignoring
    case)."""


class SandboxLimits(ApiModel):
    """Limits of one grading call in the sandbox worker process. A call that breaks one is an error of the
    grader (counted by reason and scored per onError); the worker is replaced, the job goes on."""

    timeout_seconds: float = Field(default=10, gt=0, le=600)
    """Wall-clock limit per grading call; the worker is killed when a call runs longer."""
    cpu_seconds: float = Field(default=10, gt=0, le=600)
    """CPU-time limit per grading call."""
    memory_mb: int = Field(default=512, ge=64, le=65536)
    """Address-space limit of the worker process (RLIMIT_AS), in MiB."""
    disk_mb: int = Field(default=64, ge=1, le=65536)
    """Largest file the grader may write in its scratch folder (and the scratch folder's size where a
    private tmpfs is used), in MiB."""
    max_output_bytes: int = Field(default=65536, ge=1024, le=16777216)
    """Most bytes a call may print; more is an error (output_too_large)."""
    allow_network: bool = False
    """Let the grader open network connections. Off: no socket can be created."""


RegexFlag = Literal["ignoreCase", "multiline", "dotAll"]


class RegexGrader(ApiModel):
    """Scores whether the answer matches a Python regular expression. Runs in a sandbox worker, so a
    pattern that backtracks for ever on some answer costs one timed-out grade, never the job."""

    input: str = Field(default="{{ sample.output_text }}", max_length=4096)
    """Template of the text to match."""
    pattern: str = Field(min_length=1, max_length=4096)
    """Python regular expression (the `re` module's syntax). It must compile."""
    mode: Literal["search", "match", "fullmatch"] = "search"
    """search (anywhere in the text), match (at its start) or fullmatch (the whole text)."""
    flags: list[RegexFlag] = Field(default_factory=list, max_length=3)
    """ignoreCase, multiline (^ and $ at every line) and dotAll (. matches a newline too)."""
    score_on_match: float = 1.0
    """Score when the pattern matches."""
    score_on_no_match: float = 0.0
    """Score when it does not."""
    limits: SandboxLimits = Field(default_factory=SandboxLimits)
    """Time, CPU and memory limits of each match (allowNetwork is ignored)."""

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        # Python only: CEL cannot compile a Python pattern. The operator marks such a grader Failed.
        try:
            re.compile(pattern)
        except re.error as e:
            raise ValueError(f"the pattern does not compile: {e}") from None
        return pattern


SimilarityMetric = Literal[
    "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"
]


class SimilarityGrader(ApiModel):
    """A text-similarity metric between the answer and a reference, in [0, 1] (OpenAI's text_similarity).
    Runs in a sandbox worker (the metrics are quadratic in the length of the answer)."""

    input: str = Field(default="{{ sample.output_text }}", max_length=4096)
    """Template of the text to compare."""
    reference: str = Field(max_length=4096)
    """Template of the reference, e.g. {{ item.reference_answer }}."""
    metric: SimilarityMetric = "fuzzy_match"
    """fuzzy_match (normalised InDel similarity of the characters, as rapidfuzz's fuzz.ratio / 100), bleu
    (sentence BLEU-4, add-one smoothing for 2- to 4-grams), gleu (Google BLEU, 1- to 4-grams), meteor (METEOR
    with exact word matches only: no stemming, no synonyms), rouge_1 … rouge_5 (n-gram F1), rouge_l (longest
    common subsequence F1). Words are lowercased runs of letters and digits."""
    pass_threshold: float | None = Field(default=None, ge=0, le=1)
    """If set, the score is 1 at or above it and 0 below."""
    limits: SandboxLimits = Field(default_factory=SandboxLimits)
    """Time, CPU and memory limits of each comparison (allowNetwork is ignored)."""


class PythonGrader(ApiModel):
    """User code defining `grade(sample, item) -> float`, run in a sandbox worker (a separate process
    without network, credentials or a view of the trainer's files, with CPU, memory, time and output limits).
    `sample` is {"output_text": str, "output_json": parsed JSON or None}; `item` is the dataset row. Only the
    Python standard library is available. Module-level state persists between calls of one worker."""

    source: str = Field(min_length=1, max_length=262144)
    """Python source that defines grade(sample, item); at most 256 KiB."""
    limits: SandboxLimits = Field(default_factory=SandboxLimits)
    """Time, CPU, memory, disk, output and network limits of each call."""


class SecretKeyRef(ApiModel):
    """A key of a Secret in the job's namespace, mounted read-only into the trainer pods (never into the
    sandbox) and never logged."""

    name: str = Field(min_length=1, max_length=253)
    """Name of the Secret."""
    key: str = Field(default="token", min_length=1, max_length=253)
    """Key in the Secret whose value is sent as a bearer token."""


class HTTPGrader(ApiModel):
    """An HTTP service that scores answers: POST {"sample": {...}, "item": {...}} as JSON; it answers
    {"score": number} (optionally with "reason": text)."""

    url: str = Field(min_length=1, max_length=4096, pattern=r"^https?://")
    """Endpoint URL (http or https)."""
    timeout_seconds: float = Field(default=30, gt=0, le=600)
    """Timeout of one request."""
    max_concurrency: int = Field(default=16, ge=1, le=1024)
    """Requests in flight at once."""
    retries: int = Field(default=2, ge=0, le=10)
    """Further attempts after a connection error, a timeout, 429 or a 5xx answer."""
    secret: SecretKeyRef | None = None
    """A Secret key sent as `Authorization: Bearer <value>`."""


_JUDGE_RULES = [
    Rule(
        "self.range[0] < self.range[1]",
        "range must be [low, high] with low < high",
        lambda m: m.range[0] < m.range[1],
        field_path=".range",
    )
]


class ModelJudgeGrader(ApiModel):
    """An LLM that scores the answer, through an OpenAI-compatible chat-completions endpoint. The first
    number in its reply is the score, rescaled from `range` to [0, 1]."""

    model_config = ApiModel.model_config | _rules_schema(_JUDGE_RULES)

    endpoint: str = Field(min_length=1, max_length=4096, pattern=r"^https?://")
    """Base URL of the API, e.g. http://judge:8000/v1 (the grader POSTs to <endpoint>/chat/completions)."""
    model: str = Field(min_length=1, max_length=256)
    """Model name at that endpoint."""
    prompt: str = Field(min_length=1, max_length=65536)
    """Template of the user message, e.g. "Score 0-10 how well {{ sample.output_text }} answers
    {{ item.question }}. Reply with the number only."."""
    system: str | None = Field(default=None, max_length=65536)
    """Optional system message (a template too)."""
    range: list[float] = Field(default_factory=lambda: [0.0, 1.0], min_length=2, max_length=2)
    """[low, high] of the judge's score; it is rescaled to [0, 1], and a number outside is an error."""
    temperature: float = Field(default=0.0, ge=0, le=2)
    """Sampling temperature of the judge."""
    max_tokens: int = Field(default=16, ge=1, le=4096)
    """Most tokens of the judge's reply."""
    timeout_seconds: float = Field(default=60, gt=0, le=600)
    """Timeout of one request."""
    max_concurrency: int = Field(default=8, ge=1, le=1024)
    """Requests in flight at once."""
    retries: int = Field(default=2, ge=0, le=10)
    """Further attempts after a connection error, a timeout, 429 or a 5xx answer."""
    secret: SecretKeyRef | None = None
    """A Secret key sent as `Authorization: Bearer <value>` (the API key)."""

    @model_validator(mode="after")
    def _rules(self) -> ModelJudgeGrader:
        _check(self, _JUDGE_RULES)
        return self


_WEIGHTED_RULES = [
    Rule(
        "self.graders.exists(k, self.graders[k] > 0.0)",
        "at least one weight must be above 0",
        lambda m: any(w > 0 for w in m.graders.values()),
        field_path=".graders",
    )
]


class WeightedGrader(ApiModel):
    """A weighted combination of other RewardGraders (children, by name, in the same namespace). Each
    child is graded with its own settings; a child scored per its onError as skip makes this grader skip,
    as fail fails the job."""

    model_config = ApiModel.model_config | _rules_schema(_WEIGHTED_RULES)

    graders: dict[str, Annotated[float, Field(ge=0)]] = Field(min_length=1, max_length=32)
    """RewardGrader name → weight (≥ 0). Cycles and missing children are errors."""
    normalize: bool = True
    """true: the weighted mean (the weighted sum divided by the sum of the weights), so children in [0, 1]
    give a score in [0, 1]; false: the weighted sum."""

    @model_validator(mode="after")
    def _rules(self) -> WeightedGrader:
        _check(self, _WEIGHTED_RULES)
        return self


class GraderTestCase(ApiModel):
    """An example the grader must score as expected; every test case passes before the grader is Ready."""

    sample: str = Field(max_length=65536)
    """The model's answer (sample.output_text)."""
    item: dict[str, Any] = Field(default_factory=dict)
    """The dataset row's fields (item.*); nested objects and lists are allowed."""
    expected_score: float
    """The score the grader must give (after onError: a failing zero grader scores 0)."""
    tolerance: float = Field(default=DEFAULT_TOLERANCE, ge=0, le=1)
    """Largest accepted difference between the score and expectedScore."""


def _set_types(spec: Any) -> list[str]:
    return [t for t in GRADER_TYPES if getattr(spec, _snake(t)) is not None]


_SPEC_RULES = [
    Rule(
        " + ".join(f"(has(self.{t}) ? 1 : 0)" for t in GRADER_TYPES) + " == 1",
        "exactly one grader type must be set: " + ", ".join(GRADER_TYPES),
        lambda s: len(_set_types(s)) == 1,
    )
]


class RewardGraderSpec(ApiModel):
    """One grader: exactly one type is set, plus what happens when grading fails and the test cases."""

    model_config = ApiModel.model_config | _rules_schema(_SPEC_RULES)

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
    """When grading fails (an exception, a timeout, a limit, not a number, a template field missing, an HTTP
    error): zero scores it 0, skip leaves the sample out of the update, fail fails the job naming the grader.
    Errors are always counted, by grader and reason."""
    test_cases: list[GraderTestCase] = Field(default_factory=list, max_length=256)
    """Examples checked before the grader is marked Ready."""

    @model_validator(mode="after")
    def _rules(self) -> RewardGraderSpec:
        _check(self, _SPEC_RULES)
        return self

    @property
    def type(self) -> str:
        """The grader type that is set (its field name, e.g. stringCheck)."""
        return _set_types(self)[0]

    @property
    def settings(self) -> ApiModel:
        """The settings of the grader type that is set."""
        return getattr(self, _snake(self.type))


def _snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name)


class RewardGraderStatus(ApiModel):
    """Observed state: whether the grader is usable and its test cases pass."""

    phase: GraderPhase | None = None
    """Pending (not checked yet, or a child of a weighted grader is missing), Ready (usable: every test case
    passed) or Failed (invalid, or a test case scored otherwise; see message)."""
    conditions: list[Condition] = Field(default_factory=list, max_length=8)
    """The standard Kubernetes conditions (Ready)."""
    observed_generation: int | None = None
    """The metadata.generation this status describes."""
    test_cases_passed: int | None = None
    """Test cases that scored as expected."""
    test_cases_total: int | None = None
    """Test cases of the checked spec."""
    message: str | None = Field(default=None, max_length=4096)
    """Why the grader is not Ready (the first failing case, its expected score and the score it got)."""


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
