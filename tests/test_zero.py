"""Full-parameter training under DeepSpeed ZeRO across processes (gloo on the CPU, standing in for NCCL):
2 processes x per-rank batch b follow 1 plain process x batch 2b under ZeRO-2 and ZeRO-3; a ZeRO-3 run
stopped after a checkpoint resumes exactly; its export is an ordinary folder transformers loads and gives the
trained engine's logits. The loop is tests/zero_run.py (the tiny model, packed synthetic chats)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import torchrun, valid_job
from whetstone_trainer.synthetic import make_rows, write_jsonl

WORKER = Path(__file__).resolve().parent / "zero_run.py"
STEPS = 6


def job_file(folder: Path, strategy: str) -> Path:
    write_jsonl(make_rows("reverse", 96, seed=3), folder / "train.jsonl")
    doc = valid_job()
    doc["spec"]["dataset"] = {"uri": "train.jsonl"}
    doc["spec"].pop("evalDataset", None)
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
        "seed": 11,
    }
    doc["spec"]["checkpointing"] = {"everySteps": 3}
    path = folder / f"job-{strategy}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def run(job: Path, out: Path, procs: int, *extra: str) -> list[dict]:
    torchrun(WORKER, procs, str(job), str(out), *extra)
    return [json.loads(line) for line in (out / "losses.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_zero2_and_zero3_follow_one_process_and_zero3_resumes_and_exports(tmp_path: Path) -> None:
    reference = run(job_file(tmp_path, "ddp"), tmp_path / "plain", 1, "--plain")
    assert [m["step"] for m in reference] == list(range(1, STEPS + 1))
    assert reference[-1]["loss"] < reference[0]["loss"]  # it learns; the comparison below is not vacuous

    zero2 = run(job_file(tmp_path, "zero2"), tmp_path / "zero2", 2)
    for a, b in zip(reference, zero2, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), ("zero2", a, b)
        assert b["lr"] == pytest.approx(a["lr"], rel=1e-9)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)

    # ZeRO-3: stopped after step 4 (its latest checkpoint is step 3), then started again: it resumes at 3,
    # repeats step 4 exactly and goes on to the end, then exports.
    job3, out3 = job_file(tmp_path, "zero3"), tmp_path / "zero3"
    first = run(job3, out3, 2, "--stop-after", "4")
    assert [m["step"] for m in first] == [1, 2, 3, 4]
    (out3 / "losses.jsonl").rename(out3 / "first.jsonl")
    assert sorted(p.name for p in (out3 / "checkpoints" / "step-00000003").glob("rng-*")) == [
        "rng-rank0.pt",
        "rng-rank1.pt",
    ]
    resumed = run(job3, out3, 2, "--export")
    assert [m["step"] for m in resumed] == [4, 5, 6]
    assert resumed[0] == first[3]  # the repeated step: same data, weights, optimizer, schedule, RNG
    for a, b in zip(reference, first[:3] + resumed, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), ("zero3", a, b)

    # The export is a plain Hugging Face folder: no DeepSpeed needed to load it, same logits as the engine.
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = out3 / "final"
    assert (folder / "model.safetensors").is_file() and (folder / "config.json").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    from zero_run import PROBE

    with torch.no_grad():
        logits = model(input_ids=tokenizer(PROBE, return_tensors="pt").input_ids, use_cache=False).logits
    torch.testing.assert_close(logits, torch.load(out3 / "engine-logits.pt"), atol=1e-5, rtol=1e-5)


def test_a_zero_checkpoint_refuses_another_world_size(tmp_path: Path) -> None:
    from whetstone_trainer.distributed import World
    from whetstone_trainer.zero import DEEPSPEED_DIR, LAYOUT_FILE, ZeroModel

    folder = tmp_path / "step-00000003" / DEEPSPEED_DIR
    folder.mkdir(parents=True)
    (folder / LAYOUT_FILE).write_text(json.dumps({"world_size": 16, "stage": 3}))
    zm = ZeroModel(engine=None, world=World(rank=0, size=8), stage=3)
    with pytest.raises(RuntimeError, match="written by 16 processes under ZeRO-3; this run has 8"):
        zm.load_checkpoint(tmp_path / "step-00000003")
    (folder / LAYOUT_FILE).unlink()
    with pytest.raises(RuntimeError, match="not a DeepSpeed checkpoint"):
        zm.load_checkpoint(tmp_path / "step-00000003")


def test_even_micro_batches_give_every_rank_the_same_count() -> None:
    from whetstone_trainer.distributed import World
    from whetstone_trainer.zero import even_micro_batches

    rows = list(range(5))  # the short last batch of an epoch
    parts = [even_micro_batches(rows, World(rank=r, size=2), micro=2) for r in range(2)]
    assert parts == [[[0, 2], [4]], [[1, 3], []]]  # rank 1 runs an empty (weight-0) micro-batch
    assert even_micro_batches(rows[:1], World(rank=1, size=2), micro=2) == [[]]
    assert sorted(x for p in parts for mb in p for x in mb) == rows


def test_the_deepspeed_config_follows_the_spec() -> None:
    from whetstone_api.finetunejob import FineTuneJobSpec
    from whetstone_trainer.zero import deepspeed_config

    doc = valid_job()["spec"]
    doc["distributed"] = {"strategy": "zero3", "offloadOptimizer": True, "offloadParams": True}
    doc["hyperparameters"]["maxGradNorm"] = 0.5
    config = deepspeed_config(
        FineTuneJobSpec.model_validate(doc), world_size=16, micro_batch=2, micro_steps=4, bf16=True
    )
    assert config["zero_optimization"]["stage"] == 3
    assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert config["zero_optimization"]["offload_param"]["device"] == "cpu"
    assert config["train_batch_size"] == 2 * 4 * 16 and config["gradient_clipping"] == 0.5
    assert config["bf16"] == {"enabled": True} and config["managed_gradient_accumulation"] is False
    doc["distributed"] = {"strategy": "ddp"}
    with pytest.raises(ValueError, match="only used for zero2 and zero3"):
        deepspeed_config(FineTuneJobSpec.model_validate(doc), 2, 1, 1, False)
