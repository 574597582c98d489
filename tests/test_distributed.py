"""Data-parallel training across processes (torchrun with gloo, standing in for NCCL across nodes) optimises
exactly what one process does: the same rows (pairs, prompt groups) per step, the same global normaliser, for
SFT, DPO and RFT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import SOURCE_DIRS, valid_job
from safetensors.torch import load_file
from whetstone_trainer.synthetic import make_preference_rows, make_rows, write_jsonl


def _train(job: Path, out: Path, procs: int) -> list[dict]:
    """Train the job with `procs` processes on this machine; its metrics.jsonl."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(map(str, SOURCE_DIRS)),
        "OMP_NUM_THREADS": "1",
    }
    # --standalone: a local rendezvous on a free port; --status-port 0: any free port for /status.
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={procs}"]
    trainer = ["-m", "whetstone_trainer", "train", str(job), "--output", str(out), "--status-port", "0"]
    result = subprocess.run(torchrun + trainer, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_processes_follow_the_single_process_run(tmp_path: Path) -> None:
    write_jsonl(make_rows("add", 200, seed=1), tmp_path / "train.jsonl")
    doc = valid_job()
    doc["spec"]["dataset"]["uri"] = "train.jsonl"
    doc["spec"].pop("evalDataset")
    doc["spec"]["hyperparameters"] = {
        "maxSteps": 6,
        "batchSize": 8,
        "gradientAccumulationSteps": 2,
        "maxSeqLen": 64,
        "learningRate": 3e-3,
        "evalFraction": 0.1,
        "seed": 5,
    }
    doc["spec"]["checkpointing"] = {"everySteps": 3}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))

    one = _train(job, tmp_path / "one", 1)
    two = _train(job, tmp_path / "two", 2)
    assert [m["step"] for m in two] == list(range(1, 7))
    for a, b in zip(one, two, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4), (a["step"], a["loss"], b["loss"])
        assert a["tokens"] == b["tokens"]
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-4)
    wa = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    wb = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=1e-5, rtol=1e-4)
    # Every rank saved its RNG state into the shared checkpoint.
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints" / "step-00000003").glob("rng-*")) == [
        "rng-rank0.pt",
        "rng-rank1.pt",
    ]


def _same_run(one: Path, two: Path, keys: tuple[str, ...], atol: float = 1e-5) -> None:
    a, b = (_metrics_of(one), _metrics_of(two))
    assert [m["step"] for m in a] == [m["step"] for m in b]
    for x, y in zip(a, b, strict=True):
        for key in keys:
            assert x[key] == pytest.approx(y[key], rel=1e-4, abs=1e-6), (x["step"], key, x[key], y[key])
    wa = load_file(str(one / "final" / "model.safetensors"))
    wb = load_file(str(two / "final" / "model.safetensors"))
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], atol=atol, rtol=1e-4)


def _metrics_of(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_dpo_two_processes_with_one_pair_each_follow_one_process_with_two(tmp_path: Path) -> None:
    write_jsonl(make_preference_rows("add", 32, seed=1), tmp_path / "train.jsonl")
    write_jsonl(make_preference_rows("add", 6, seed=2), tmp_path / "eval.jsonl")
    doc = valid_job()
    doc["spec"].update(method="dpo", dpo={"beta": 0.5, "rpoAlpha": 0.2})
    doc["spec"]["dataset"]["uri"] = "train.jsonl"
    doc["spec"]["evalDataset"]["uri"] = "eval.jsonl"
    # 4 pairs a step in 2 micro-batches: one process takes 2 pairs a micro-batch, two take 1 each.
    doc["spec"]["hyperparameters"] = {
        "maxSteps": 4,
        "batchSize": 4,
        "gradientAccumulationSteps": 2,
        "maxSeqLen": 64,
        "learningRate": 3e-3,
        "seed": 5,
        "evalEverySteps": 2,
    }
    doc["spec"]["checkpointing"] = {"everySteps": 2}
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    _train(job, tmp_path / "one", 1)
    _train(job, tmp_path / "two", 2)
    _same_run(
        tmp_path / "one",
        tmp_path / "two",
        ("loss", "dpo_reward_margin", "preference_accuracy", "tokens"),
        atol=1e-4,  # reductions in another order, through a sigmoid: a few 1e-5 after 4 steps
    )
    assert _metrics_of(tmp_path / "two")[-1]["eval_preference_accuracy"] == pytest.approx(
        _metrics_of(tmp_path / "one")[-1]["eval_preference_accuracy"]
    )


@pytest.mark.slow
def test_rft_two_processes_sample_grade_and_update_as_one(tmp_path: Path) -> None:
    # Each prompt's answers come from a generator seeded by its place in the prompt stream, so the rank that
    # samples it does not matter; the groups are gathered, and the loss is normalised over the whole batch.
    rows = [{"messages": [{"role": "user", "content": f"Say something about {i}"}]} for i in range(16)]
    write_jsonl(rows, tmp_path / "train.jsonl")
    doc = valid_job()
    doc["spec"].update(
        method="rft",
        rft={
            "graders": [{"name": "length"}],
            "samplesPerPrompt": 4,
            "maxCompletionTokens": 3,
            "klBeta": 0.05,
            "miniBatches": 2,
            "zeroVarianceGroups": "refill",
        },
    )
    doc["spec"]["dataset"]["uri"] = "train.jsonl"
    doc["spec"].pop("evalDataset")
    doc["spec"]["hyperparameters"] = {
        "maxSteps": 3,
        "batchSize": 4,
        "maxSeqLen": 64,
        "learningRate": 1e-3,
        "seed": 5,
        "evalFraction": 0,
    }
    doc["spec"]["checkpointing"] = {"everySteps": 2}
    grader = {
        "apiVersion": "whetstone.dev/v1alpha1",
        "kind": "RewardGrader",
        "metadata": {"name": "length"},
        "spec": {
            "python": {"source": "def grade(sample, item):\n    return len(sample['output_text']) % 2\n"}
        },
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump_all([doc, grader]))
    _train(job, tmp_path / "one", 1)
    _train(job, tmp_path / "two", 2)
    a, b = _metrics_of(tmp_path / "one"), _metrics_of(tmp_path / "two")
    assert [m["reward_mean"] for m in a] == [m["reward_mean"] for m in b]
    assert [m["groups_sampled"] for m in a] == [m["groups_sampled"] for m in b]
    _same_run(tmp_path / "one", tmp_path / "two", ("loss", "kl", "entropy", "advantage_std"), atol=1e-4)
