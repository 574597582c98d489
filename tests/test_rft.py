"""RFT trains: from a warm start that answers "Is 37 even?" right about 70 % of the time, grpo, dapo and
gspo-token each raise the held-out mean reward of a python grader and a string check; zero-variance groups
are kept, dropped or refilled as configured; a run killed after a checkpoint resumes with the rewards of the
run that never stopped; every per-step metric has a name in whetstone_trainer.metrics and reaches /metrics
and /status; a grader the job names but the file lacks is refused before training."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EXAMPLES
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from whetstone_api import FineTuneJob
from whetstone_api.rewardgrader import RewardGraderSpec
from whetstone_trainer import metrics as names
from whetstone_trainer.entry import JobRefused, load_job_file, train_job
from whetstone_trainer.local_run import run_job
from whetstone_trainer.status_server import TrainerStatus
from whetstone_trainer.synthetic import write_jsonl


def _metrics(output: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (output / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def warm_start(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """rft-tiny-parity-warmup.yaml: SFT on yes/no parity answers, 30 % of them wrong (about 30 s)."""
    out = tmp_path_factory.mktemp("warm") / "out"
    train_job(load_job_file(EXAMPLES / "rft-tiny-parity-warmup.yaml").job, out, base_dir=EXAMPLES)
    return out / "final"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("algorithm", "settings"),
    [
        ("grpo", {"klBeta": 0.02}),  # full-parameter: the KL's reference is a frozen copy
        ("dapo", {"overlongBufferTokens": 1}),  # refill, token-mean, overlong filtering and shaping
        ("gspo-token", {"miniBatches": 2, "updateEpochs": 2}),  # off-policy updates: the sequence ratio moves
    ],
)
def test_rft_raises_the_held_out_reward(
    tmp_path: Path, warm_start: Path, algorithm: str, settings: dict[str, Any]
) -> None:
    job, *graders = yaml.safe_load_all((EXAMPLES / "rft-tiny-parity.yaml").read_text())
    spec = job["spec"]
    spec["baseModel"]["uri"] = str(warm_start)
    for key in ("dataset", "evalDataset"):
        spec[key]["uri"] = str(EXAMPLES / spec[key]["uri"])
    spec["rft"].update(algorithm=algorithm, rolloutLogSamples=3, **settings)
    spec["hyperparameters"].update(maxSteps=20, evalEverySteps=10)
    (tmp_path / "job.yaml").write_text(yaml.safe_dump_all([job, *graders]))
    out = tmp_path / "out"

    summary = run_job(tmp_path / "job.yaml", out, samples=0)

    # One answer per held-out question, sampled at temperature 1, graded: clearly better than the warm start.
    assert summary["eval_prompts"] == 100
    assert summary["eval_reward_after"] >= summary["eval_reward_before"] + 0.12, summary
    metrics = _metrics(out)
    assert [m["step"] for m in metrics] == list(range(1, 21))
    assert set(metrics[-1]["grader_reward_mean"]) == {"parity-word", "parity-exact"}
    assert set(metrics[-1]["grader_latency_seconds"]) == {"parity-word", "parity-exact"}
    assert all(m["samples"] >= 64 and 0 <= m["truncation_rate"] <= 1 for m in metrics)
    if algorithm == "grpo":
        assert all(m["kl"] >= 0 for m in metrics) and any(m["kl"] > 0 for m in metrics)
    if algorithm == "dapo":
        assert any(m["refill_rounds"] > 0 for m in metrics)  # zero-variance groups were replaced
    if algorithm == "gspo-token":
        assert any(
            m["clip_fraction"] > 0 for m in metrics
        )  # the second update's sequence ratio hits 1 ± 4e-4
    rollouts = [json.loads(ln) for ln in (out / "rollouts.jsonl").read_text().splitlines()]
    assert len(rollouts) == 3 * 20
    assert set(rollouts[0]["grades"]) == {"parity-word", "parity-exact"}
    assert {"prompt", "completion", "finish_reason", "reward", "advantage"} <= rollouts[0].keys()
    assert (out / "reward.png").stat().st_size > 1000


def _length_parity_job(
    tmp_path: Path, rft: dict[str, Any], tuning: dict[str, Any], **hyper: Any
) -> FineTuneJob:
    """The raw tiny model (random answers) on rows the grader scores by the answer's length: rows marked fixed
    score 1 whatever the answer (zero-variance groups), the others score the parity of the answer's length."""
    data = tmp_path / "data"
    rows = [
        {"messages": [{"role": "user", "content": f"Say something about {i}"}], "fixed": i % 2 == 0}
        for i in range(40)
    ]
    write_jsonl(rows, data / "train.jsonl")
    write_jsonl(rows[:6], data / "eval.jsonl")
    return FineTuneJob.model_validate(
        {
            "apiVersion": "whetstone.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "rft-test"},
            "spec": {
                "method": "rft",
                "baseModel": {"uri": "whetstone://tiny"},
                "dataset": {"uri": str(data / "train.jsonl")},
                "evalDataset": {"uri": str(data / "eval.jsonl")},
                "rft": {
                    "graders": [{"name": "length"}],
                    "samplesPerPrompt": 4,
                    "maxCompletionTokens": 3,
                    "rolloutLogSamples": 2,
                    **rft,
                },
                **tuning,
                "hyperparameters": {
                    "batchSize": 4,
                    "maxSeqLen": 64,
                    "seed": 3,
                    "learningRate": 1e-3,
                    **hyper,
                },
                "checkpointing": {"everySteps": 3, "keepLast": 5},
                "output": {"uri": str(tmp_path / "out")},
            },
        }
    )


LENGTH_GRADER = {
    "length": RewardGraderSpec.model_validate(
        {
            "python": {
                "source": "def grade(sample, item):\n"
                "    return 1.0 if item['fixed'] else float(len(sample['output_text']) % 2)\n"
            }
        }
    )
}


@pytest.mark.parametrize("mode", ["keep", "drop", "refill"])
def test_zero_variance_groups_are_kept_dropped_or_refilled(tmp_path: Path, mode: str) -> None:
    rft = {"zeroVarianceGroups": mode, "rolloutLogSamples": 64}
    job = _length_parity_job(tmp_path, rft, {"fullParameter": {}}, maxSteps=3)
    out = tmp_path / "out"
    train_job(job, out, graders=LENGTH_GRADER)
    metrics = _metrics(out)
    rollouts = [json.loads(ln) for ln in (out / "rollouts.jsonl").read_text().splitlines()]
    for m in metrics:
        assert m["filtered_group_rate"] > 0  # the fixed rows' groups at least
        if mode == "keep":
            assert m["groups_sampled"] == m["groups_trained"] == 4 and m["refill_rounds"] == 0
        elif mode == "drop":
            zero = round(m["filtered_group_rate"] * m["groups_sampled"])
            assert m["groups_sampled"] == 4 and m["groups_trained"] == 4 - zero and m["refill_rounds"] == 0
        else:
            assert m["groups_trained"] == 4 and m["groups_sampled"] > 4 and m["refill_rounds"] >= 1
    fixed = [r for r in rollouts if int(r["prompt"][0]["content"].split()[-1]) % 2 == 0]
    assert fixed and all(r["trained"] is (mode == "keep") for r in fixed)


@pytest.mark.parametrize(
    "tuning", [{"fullParameter": {}}, {"lora": {"rank": 4, "dropout": 0.1}}], ids=["full-parameter", "lora"]
)
def test_rft_resume_continues_with_the_same_rewards(tmp_path: Path, tuning: dict[str, Any]) -> None:
    # KL to the reference (a frozen copy / adapters disabled), refill, and two passes of two mini-batches:
    # every piece of state a step touches.
    rft = {"klBeta": 0.05, "zeroVarianceGroups": "refill", "miniBatches": 2, "updateEpochs": 2}
    job = _length_parity_job(tmp_path, rft, tuning, maxSteps=6, evalEverySteps=3)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train_job(job, straight, graders=LENGTH_GRADER)
    assert train_job(job, interrupted, graders=LENGTH_GRADER, stop_after_step=3) == {"stopped_at_step": 3}
    assert train_job(job, interrupted, graders=LENGTH_GRADER)["resumed_from_step"] == 3
    a, b = _metrics(straight), _metrics(interrupted)
    assert [m["step"] for m in b] == list(range(1, 7))
    for x, y in zip(a, b, strict=True):
        assert x["reward_mean"] == y["reward_mean"] and x["groups_sampled"] == y["groups_sampled"], x["step"]
        for key in ("loss", "kl", "entropy", "advantage_std"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-7), (x["step"], key)
    ra = (straight / "rollouts.jsonl").read_text().splitlines()
    rb = (interrupted / "rollouts.jsonl").read_text().splitlines()
    assert [json.loads(ln)["completion"] for ln in ra] == [json.loads(ln)["completion"] for ln in rb]


def test_every_metric_is_named_once_and_reaches_metrics_and_status(tmp_path: Path) -> None:
    job = _length_parity_job(tmp_path, {"klBeta": 0.05}, {"fullParameter": {}}, maxSteps=2)
    status = TrainerStatus("rft-test", tmp_path / "out")
    train_job(job, tmp_path / "out", graders=LENGTH_GRADER, observer=status)
    last = _metrics(tmp_path / "out")[-1]
    known = {m.key for m in names.ALL}
    assert set(last) - {"total_steps"} <= known, set(last) - known
    for key in (
        "reward_mean",
        "pass_rate",
        "kl",
        "entropy",
        "filtered_group_rate",
        "rollout_tokens_per_second",
    ):
        assert isinstance(last[key], float), key

    assert status.report().reward == pytest.approx(last["reward_mean"])
    text = generate_latest(status.metrics.registry).decode()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    job_label = ("job", "rft-test")
    assert samples[("whetstone_trainer_reward_mean", (job_label,))] == pytest.approx(last["reward_mean"])
    assert samples[
        ("whetstone_trainer_grader_reward_mean", (("grader", "length"), job_label))
    ] == pytest.approx(last["grader_reward_mean"]["length"])
    graded = sum(m["samples"] for m in _metrics(tmp_path / "out"))
    assert (
        samples[("whetstone_trainer_grader_latency_seconds_count", (("grader", "length"), job_label))]
        == graded
    )
    assert samples[("whetstone_trainer_filtered_group_rate", (job_label,))] == last["filtered_group_rate"]


def test_a_grader_missing_from_the_file_is_refused_naming_it(tmp_path: Path) -> None:
    job = _length_parity_job(tmp_path, {}, {"fullParameter": {}}, maxSteps=1)
    with pytest.raises(JobRefused, match=r"spec.rft.graders: RewardGrader 'length'.*does not exist"):
        train_job(job, tmp_path / "out", graders={})
    assert not (tmp_path / "out").exists()
