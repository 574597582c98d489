"""Data-parallel training across processes (torchrun with gloo, standing in for NCCL across nodes) optimises
exactly what one process does: the same rows per step, the same global normaliser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, valid_job
from safetensors.torch import load_file
from whetstone_trainer.synthetic import make_rows, write_jsonl


def _train(job: Path, out: Path, procs: int) -> list[dict]:
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT / 'api'}:{ROOT / 'trainer-image'}",
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
