"""Every metric the trainer reports, named once: the key in metrics.jsonl and the series on the trainer's
/metrics (`whetstone_trainer_<name>`, label `job`) are the same name.

Gauges carry the latest step's value. A counter's per-step increment is written to metrics.jsonl under its
name without `_total` (`tokens` there, `whetstone_trainer_tokens_total` on /metrics). Labelled values are
objects in metrics.jsonl: `"grader_reward_mean": {"exact": 0.75}`,
`"grader_errors": {"exact": {"timeout": 1}}`;
`grader_latency_seconds` holds each grader's mean latency of the step there, and on /metrics is a histogram
observing every grade.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "whetstone_trainer_"


@dataclass(frozen=True)
class Metric:
    name: str
    help: str
    kind: Literal["gauge", "counter", "histogram"] = "gauge"
    labels: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """The key in metrics.jsonl."""
        return self.name.removesuffix("_total") if self.kind == "counter" else self.name


# --- every method
STEP = Metric("step", "Optimizer steps done (RFT: rollout steps)")
TOTAL_STEPS = Metric("total_steps", "Steps planned")
LOSS = Metric("loss", "Training loss of the latest step")
EVAL_LOSS = Metric("eval_loss", "Latest loss on the held-out set")
LEARNING_RATE = Metric("lr", "Learning rate of the latest step")
GRAD_NORM = Metric("grad_norm", "Gradient norm before clipping, latest step")
TOKENS_PER_SECOND = Metric("tokens_per_second", "Training throughput of the latest step (tokens forwarded)")
TOKENS = Metric("tokens_total", "Tokens trained on", "counter")
CHECKPOINTS_SAVED = Metric("checkpoints_saved_total", "Checkpoints saved", "counter")
CHECKPOINTS_PRUNED = Metric("checkpoints_pruned_total", "Checkpoints pruned", "counter")

# --- DPO
DPO_REWARD_CHOSEN = Metric(
    "dpo_reward_chosen", "Mean implicit reward beta*(log pi - log pi_ref) of chosen answers"
)
DPO_REWARD_REJECTED = Metric("dpo_reward_rejected", "Mean implicit reward of rejected answers")
DPO_REWARD_MARGIN = Metric("dpo_reward_margin", "Mean chosen minus rejected implicit reward")
PREFERENCE_ACCURACY = Metric(
    "preference_accuracy",
    "Share of the step's pairs whose chosen reward exceeds the rejected (ties count half)",
)
EVAL_PREFERENCE_ACCURACY = Metric("eval_preference_accuracy", "Preference accuracy on held-out pairs")
EVAL_CHOICE_ACCURACY = Metric(
    "eval_choice_accuracy",
    "Share of held-out pairs where the policy gives the chosen answer more log-probability",
)

# --- RFT
REWARD_MEAN = Metric("reward_mean", "Mean total reward of the step's samples")
REWARD_STD = Metric("reward_std", "Standard deviation of the step's rewards")
REWARD_MIN = Metric("reward_min", "Lowest reward of the step")
REWARD_MAX = Metric("reward_max", "Highest reward of the step")
GRADER_REWARD_MEAN = Metric("grader_reward_mean", "Mean score of each grader in the step", labels=("grader",))
PASS_RATE = Metric("pass_rate", "Share of the step's samples whose reward reaches rft.passThreshold")
ADVANTAGE_MEAN = Metric("advantage_mean", "Mean advantage of the trained samples")
ADVANTAGE_STD = Metric("advantage_std", "Standard deviation of the advantages")
KL = Metric("kl", "Mean k3 estimate of KL(policy || reference) per completion token (when klBeta > 0)")
CLIP_FRACTION = Metric("clip_fraction", "Share of completion tokens where the ratio clip binds")
ENTROPY = Metric("entropy", "Mean entropy of the policy at completion tokens (nats)")
FILTERED_GROUP_RATE = Metric("filtered_group_rate", "Share of sampled groups with zero reward variance")
GROUPS_TRAINED = Metric("groups_trained", "Prompt groups trained on in the step (the effective batch)")
RESPONSE_LENGTH_MEAN = Metric("response_length_mean", "Mean completion length in tokens")
RESPONSE_LENGTH_MAX = Metric("response_length_max", "Longest completion of the step in tokens")
TRUNCATION_RATE = Metric("truncation_rate", "Share of completions cut at maxCompletionTokens")
ROLLOUT_TOKENS_PER_SECOND = Metric("rollout_tokens_per_second", "Sampled completion tokens per second")
SAMPLER_LOGPROB_DIFF = Metric(
    "sampler_logprob_diff",
    "Mean |sampler log-prob - trainer log-prob| of sampled tokens (inference mismatch)",
)
GRADER_LATENCY = Metric("grader_latency_seconds", "Time of one grade", "histogram", ("grader",))
GRADER_ERRORS = Metric("grader_errors_total", "Failed grades", "counter", ("grader", "reason"))
EVAL_REWARD_MEAN = Metric("eval_reward_mean", "Mean reward on held-out prompts (rft.evalTemperature)")
EVAL_PASS_RATE = Metric("eval_pass_rate", "Pass rate on held-out prompts")

ALL: tuple[Metric, ...] = tuple(v for v in list(globals().values()) if isinstance(v, Metric))
LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class TrainerMetrics:
    """The Prometheus series of one job, fed from the per-step metrics dict."""

    def __init__(self, job: str) -> None:
        self.job = job
        self.registry = CollectorRegistry()
        self.series: dict[str, Any] = {}
        for m in ALL:
            kind = {"gauge": Gauge, "counter": Counter, "histogram": Histogram}[m.kind]
            extra = {"buckets": LATENCY_BUCKETS} if m.kind == "histogram" else {}
            # prometheus_client appends _total to counters itself.
            name = PREFIX + m.name.removesuffix("_total")
            self.series[m.name] = kind(name, m.help, ["job", *m.labels], registry=self.registry, **extra)

    def _one(self, m: Metric, *labels: str) -> Any:
        return self.series[m.name].labels(self.job, *labels)

    def set_progress(self, step: int, total_steps: int) -> None:
        self._one(STEP).set(step)
        self._one(TOTAL_STEPS).set(total_steps)

    def record_step(self, values: dict[str, Any]) -> None:
        """Gauges from a step's metrics (numbers and per-label objects); the tokens counter."""
        for m in ALL:
            value = values.get(m.key)
            if value is None or m.kind == "histogram":
                continue
            if m.kind == "counter":
                if not m.labels and isinstance(value, int | float):
                    self._one(m).inc(value)
            elif m.labels and isinstance(value, dict):
                for label, v in value.items():
                    if isinstance(v, int | float):
                        self._one(m, str(label)).set(v)
            elif isinstance(value, int | float):
                self._one(m).set(value)

    def record_grades(self, latencies: dict[str, list[float]], errors: dict[tuple[str, str], int]) -> None:
        for grader, seconds in latencies.items():
            for s in seconds:
                self._one(GRADER_LATENCY, grader).observe(s)
        for (grader, reason), n in errors.items():
            self._one(GRADER_ERRORS, grader, reason).inc(n)

    def record_checkpoint(self, pruned: int) -> None:
        self._one(CHECKPOINTS_SAVED).inc()
        self._one(CHECKPOINTS_PRUNED).inc(pruned)
