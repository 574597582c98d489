"""SFT and DPO under DeepSpeed ZeRO, through the trainer's own entry and loops (methods/sft.py, dpo.py):
spec.distributed.strategy zero2 and zero3 with 2 processes (gloo on the CPU, standing in for NCCL) follow the
1-process DDP run step by step; an SFT zero3 run stopped after step 4 resumes from its step-3 checkpoint and
ends where the uninterrupted run ends; the final folder is an ordinary Hugging Face model. RFT
(methods/rft.py) likewise: rollouts sampled on every rank from the whole model (ZeRO-3 gathers it for the
sampler), the same rewards, loss and weights as one DDP process, and a ZeRO-3 run resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import torchrun, valid_job
from safetensors.torch import load_file
from whetstone_trainer.synthetic import make_preference_rows, make_rows, write_jsonl

WORKER = Path(__file__).resolve().parent / "train_run.py"
STEPS = 6


def job_file(folder: Path, strategy: str) -> Path:
    if not (folder / "train.jsonl").is_file():
        write_jsonl(make_rows("reverse", 96, seed=3), folder / "train.jsonl")
        write_jsonl(make_rows("reverse", 5, seed=4), folder / "eval.jsonl")  # 5 rows: ranks get 3 and 2
    doc = valid_job()
    doc["spec"]["dataset"] = {"uri": "train.jsonl"}
    doc["spec"]["evalDataset"] = {"uri": "eval.jsonl"}
    doc["spec"]["distributed"] = {"strategy": strategy}
    doc["spec"]["hyperparameters"] = {
        "maxSteps": STEPS,
        "batchSize": 8,
        "gradientAccumulationSteps": 2,  # 2 micro-batches per step: accumulation is exercised too
        "maxSeqLen": 64,
        "learningRate": 3e-3,
        "warmupSteps": 1,
        "weightDecay": 0.01,
        "maxGradNorm": 1.0,
        "evalEverySteps": 3,
        "seed": 11,
    }
    doc["spec"]["checkpointing"] = {"everySteps": 3}
    path = folder / f"job-{strategy}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run(job: Path, out: Path, procs: int, *extra: str) -> list[dict]:
    """Train with `procs` processes; the run's metrics.jsonl."""
    torchrun(WORKER, procs, str(job), str(out), *extra)
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(reference: list[dict], other: list[dict], what: str) -> None:
    assert [m["step"] for m in other] == list(range(1, STEPS + 1)), what
    for a, b in zip(reference, other, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (what, a, b)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9), (what, a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (what, a, b)
        assert b["tokens"] == a["tokens"], (what, a, b)
        if "eval_loss" in a:
            assert b["eval_loss"] == pytest.approx(a["eval_loss"], rel=1e-4), (what, a, b)


def assert_same_weights(one: Path, two: Path) -> None:
    wa = load_file(str(one / "final" / "model.safetensors"))
    wb = load_file(str(two / "final" / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    for key in wa:
        torch.testing.assert_close(wb[key], wa[key], atol=1e-4, rtol=1e-3)


@pytest.mark.slow
def test_sft_under_zero2_and_zero3_follows_one_ddp_process_and_zero3_resumes(tmp_path: Path) -> None:
    reference = run(job_file(tmp_path, "ddp"), tmp_path / "ddp", 1)
    assert reference[-1]["loss"] < reference[0]["loss"]  # it learns; the comparisons are not vacuous
    assert [m["step"] for m in reference if "eval_loss" in m] == [3, 6]

    zero2 = run(job_file(tmp_path, "zero2"), tmp_path / "zero2", 2)
    assert_same_run(reference, zero2, "zero2")
    assert_same_weights(tmp_path / "ddp", tmp_path / "zero2")
    assert (tmp_path / "zero2" / "checkpoints" / "step-00000003" / "deepspeed" / "layout.json").is_file()

    # ZeRO-3, stopped right after step 4 (as if killed; its latest checkpoint is step 3), then started again.
    job3, out3 = job_file(tmp_path, "zero3"), tmp_path / "zero3"
    first = run(job3, out3, 2, "--stop-after", "4")
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    step3 = out3 / "checkpoints" / "step-00000003"
    assert sorted(p.name for p in step3.glob("rng-*")) == ["rng-rank0.pt", "rng-rank1.pt"]
    assert (step3 / "deepspeed" / "layout.json").is_file()
    resumed = run(job3, out3, 2)
    assert json.loads((out3 / "summary.json").read_text())["resumed_from_step"] == 3
    assert resumed[3]["loss"] == pytest.approx(first[3]["loss"], rel=1e-6)  # step 4 again, exactly
    assert_same_run(reference, resumed, "zero3 resumed")

    # The export is a plain Hugging Face folder: transformers loads it without DeepSpeed.
    from transformers import AutoModelForCausalLM

    assert_same_weights(tmp_path / "ddp", out3)
    model = AutoModelForCausalLM.from_pretrained(out3 / "final", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 0


def test_a_ddp_run_refuses_a_zero_checkpoint(tmp_path: Path) -> None:
    from whetstone_trainer import loop
    from whetstone_trainer.checkpoints import STATE_FILE, CheckpointMismatch
    from whetstone_trainer.distributed import World
    from whetstone_trainer.entry import permanent_errors

    folder = tmp_path / "checkpoints" / "step-00000003"
    (folder / "deepspeed").mkdir(parents=True)
    (folder / STATE_FILE).write_text("{}")
    rt = loop.Runtime(World(), torch.device("cpu"), None)
    checkpoints = loop.Checkpoints(tmp_path, rt, None, None, None, "f", 2, loop.SilentObserver())
    with pytest.raises(CheckpointMismatch, match="under DeepSpeed ZeRO; this run has spec.distributed"):
        checkpoints.resume()
    assert issubclass(CheckpointMismatch, permanent_errors())  # the pod fails at once, no restart loop


@pytest.mark.slow
def test_dpo_under_zero2_and_zero3_follows_one_ddp_process(tmp_path: Path) -> None:
    # Full-parameter DPO: the reference log-probs are computed once by the policy itself, before training.
    write_jsonl(make_preference_rows("add", 32, seed=1), tmp_path / "train.jsonl")
    write_jsonl(make_preference_rows("add", 5, seed=2), tmp_path / "eval.jsonl")  # ranks get 3 and 2
    doc = valid_job()
    doc["spec"].update(method="dpo", dpo={"beta": 0.5, "rpoAlpha": 0.2})
    doc["spec"]["dataset"] = {"uri": "train.jsonl"}
    doc["spec"]["evalDataset"] = {"uri": "eval.jsonl"}
    doc["spec"]["hyperparameters"] = {
        "maxSteps": 4,
        "batchSize": 4,
        "gradientAccumulationSteps": 2,
        "maxSeqLen": 64,
        "learningRate": 3e-3,
        "maxGradNorm": 1.0,
        "seed": 5,
        "evalEverySteps": 2,
    }
    doc["spec"]["checkpointing"] = {"everySteps": 2}
    runs = {}
    for strategy, procs in (("ddp", 1), ("zero2", 2), ("zero3", 2)):
        doc["spec"]["distributed"] = {"strategy": strategy}
        job = tmp_path / f"job-{strategy}.yaml"
        job.write_text(yaml.safe_dump(doc))
        runs[strategy] = run(job, tmp_path / strategy, procs)
    reference = runs["ddp"]
    assert reference[-1]["loss"] < reference[0]["loss"]
    for strategy in ("zero2", "zero3"):
        assert [m["step"] for m in runs[strategy]] == [1, 2, 3, 4]
        for a, b in zip(reference, runs[strategy], strict=True):
            for key in ("loss", "dpo_reward_margin", "preference_accuracy", "tokens", "lr"):
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (strategy, key, a, b)
            assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3), (strategy, a, b)
            for key in ("eval_loss", "eval_preference_accuracy", "eval_choice_accuracy"):
                if key in a:
                    assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (strategy, key, a, b)
        assert (tmp_path / strategy / "checkpoints" / "step-00000002" / "deepspeed" / "layout.json").is_file()
        assert_same_weights(tmp_path / "ddp", tmp_path / strategy)


def rft_job(folder: Path, strategy: str) -> Path:
    """Full-parameter GRPO with a KL to the frozen base on the tiny model, graded by a stringCheck: 8 prompts
    a step, 2 answers each (16 answers) in 3 mini-batches of 6, 5 and 5. On 2 ranks, rank 0 takes 3, 3, 3 of
    them and rank 1 3, 2, 2, in micro-batches of 2: rank 1 pads its last two mini-batches with a weight-0
    micro-batch, so the even-count path (and its stand-in's old and reference log-probs) runs."""
    if not (folder / "prompts.jsonl").is_file():
        rows = [
            {"messages": [{"role": "user", "content": f"Say a word with {c}"}], "answer": c}
            for c in "aeiouaeiourstlnm"
        ]
        write_jsonl(rows, folder / "prompts.jsonl")
        write_jsonl(rows[:3], folder / "eval.jsonl")  # 3 prompts: ranks get 2 and 1
    doc = valid_job()
    doc["spec"].update(
        method="rft",
        rft={
            "graders": [{"name": "has-letter"}],
            "samplesPerPrompt": 2,
            "maxCompletionTokens": 4,
            "klBeta": 0.05,
            "miniBatches": 3,
            "evalTemperature": 0,
        },
    )
    doc["spec"]["dataset"] = {"uri": "prompts.jsonl"}
    doc["spec"]["evalDataset"] = {"uri": "eval.jsonl"}
    doc["spec"]["distributed"] = {"strategy": strategy}
    doc["spec"]["hyperparameters"] = {
        "maxSteps": 4,
        "batchSize": 8,
        "gradientAccumulationSteps": 4,  # 2 prompts (4 answers) per micro-batch: 2 answers on each of 2 ranks
        "maxSeqLen": 64,
        "learningRate": 3e-3,
        "maxGradNorm": 1.0,
        "seed": 3,
    }
    doc["spec"]["checkpointing"] = {"everySteps": 2}
    grader = {
        "apiVersion": "whetstone.dev/v1alpha1",
        "kind": "RewardGrader",
        "metadata": {"name": "has-letter"},
        "spec": {"stringCheck": {"reference": "{{ item.answer }}", "operation": "like"}},
    }
    path = folder / f"rft-{strategy}.yaml"
    path.write_text(yaml.safe_dump_all([doc, grader]))
    return path


RFT_KEYS = (
    "reward_mean",
    "loss",
    "kl",
    "entropy",
    "advantage_std",
    "clip_fraction",
    "lr",
    "eval_reward_mean",
)


def assert_same_rft_steps(reference: list[dict], other: list[dict], what: str) -> None:
    assert [m["step"] for m in other] == [1, 2, 3, 4], what
    for a, b in zip(reference, other, strict=True):
        # The same prompts give the same answers on any number of ranks: the rewards are equal, not close.
        assert b["reward_mean"] == a["reward_mean"] and b["groups_trained"] == a["groups_trained"], (
            what,
            a,
            b,
        )
        for key in RFT_KEYS:
            if a.get(key) is not None:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (what, key, a, b)


@pytest.mark.slow
def test_rft_under_zero2_and_zero3_follows_one_ddp_process_and_zero3_resumes(tmp_path: Path) -> None:
    reference = run(rft_job(tmp_path, "ddp"), tmp_path / "ddp", 1)
    # Not vacuous: some groups have answers with different rewards (non-zero advantages), the weights move
    # away from the frozen base (KL), and there are evals (at the checkpoint and at the end).
    assert any(m["advantage_std"] for m in reference)
    assert all(m["kl"] > 0 for m in reference)
    assert [m["step"] for m in reference if "eval_reward_mean" in m] == [2, 4]

    zero2 = run(rft_job(tmp_path, "zero2"), tmp_path / "zero2", 2)
    assert_same_rft_steps(reference, zero2, "zero2")
    assert_same_weights(tmp_path / "ddp", tmp_path / "zero2")

    # ZeRO-3, stopped right after step 3 (its latest checkpoint is step 2), then started again: step 3 again.
    job3, out3 = rft_job(tmp_path, "zero3"), tmp_path / "zero3"
    first = run(job3, out3, 2, "--stop-after", "3")
    assert [m["step"] for m in first] == [1, 2, 3]
    assert (out3 / "checkpoints" / "step-00000002" / "deepspeed" / "layout.json").is_file()
    assert not (out3 / "final").exists()
    resumed = run(job3, out3, 2)
    assert json.loads((out3 / "summary.json").read_text())["resumed_from_step"] == 2
    for key in ("reward_mean", "loss", "kl", "entropy"):
        assert resumed[2][key] == pytest.approx(first[2][key], rel=1e-6), key  # step 3 again, exactly
    assert_same_rft_steps(reference, resumed, "zero3 resumed")
    assert_same_weights(tmp_path / "ddp", out3)

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out3 / "final", dtype=torch.float32)
    assert sum(p.numel() for p in model.parameters()) > 0
