"""DPO trains: the tiny model comes to prefer correct answers on held-out pairs; both preference row shapes
give the same tokens; the reference is the frozen base (adapters disabled, or log-probs precomputed); RPO adds
the chosen answer's NLL; a run stopped at a checkpoint and resumed follows the uninterrupted one; a pair
longer than maxSeqLen is refused before training, naming its line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import EXAMPLES
from whetstone_api import FineTuneJob
from whetstone_trainer.data.formats import read_jsonl
from whetstone_trainer.data.tokenize import tokenize_preference
from whetstone_trainer.entry import JobRefused, train_job
from whetstone_trainer.local_run import run_job
from whetstone_trainer.methods.dpo import answer_logps
from whetstone_trainer.models.sources import load_model_and_tokenizer
from whetstone_trainer.synthetic import make_preference_rows, write_jsonl


def _metrics(output: Path) -> list[dict[str, Any]]:
    return [json.loads(ln) for ln in (output / "metrics.jsonl").read_text().splitlines()]


def _job(
    tmp_path: Path, tuning: dict[str, Any], dpo: dict[str, Any] | None = None, **hyper: Any
) -> FineTuneJob:
    data = tmp_path / "data"
    if not (data / "train.jsonl").exists():
        write_jsonl(make_preference_rows("add", 64, seed=1, shape="trl"), data / "train.jsonl")
        write_jsonl(make_preference_rows("add", 16, seed=2), data / "eval.jsonl")
    return FineTuneJob.model_validate(
        {
            "apiVersion": "whetstone.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "dpo-test"},
            "spec": {
                "method": "dpo",
                "baseModel": {"uri": "whetstone://tiny"},
                "dataset": {"uri": str(data / "train.jsonl")},
                "evalDataset": {"uri": str(data / "eval.jsonl")},
                "dpo": {"beta": 0.5, **(dpo or {})},
                **tuning,
                "hyperparameters": {
                    "batchSize": 8,
                    "maxSeqLen": 64,
                    "seed": 3,
                    "learningRate": 3e-3,
                    **hyper,
                },
                "checkpointing": {"everySteps": 4, "keepLast": 5},
                "output": {"uri": str(tmp_path / "out")},
            },
        }
    )


@pytest.mark.slow
def test_whetstone_run_dpo_tiny_learns_the_preference(tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_job(EXAMPLES / "dpo-tiny-add.yaml", out, samples=0)
    metrics = _metrics(out)
    # The first step's policy is the reference: every margin 0, accuracy exactly chance.
    assert metrics[0]["dpo_reward_margin"] == 0 and metrics[0]["preference_accuracy"] == 0.5
    assert summary["eval_pairs"] == 100 and summary["reference"] == "precomputed"
    # Held-out pairs (new wrong answers): from chance to clearly preferring the correct sum.
    assert summary["final_eval_preference_accuracy"] >= 0.8, summary
    assert summary["eval_choice_accuracy_before"] <= 0.6 <= 0.8 <= summary["eval_choice_accuracy_after"], (
        summary
    )
    margins = [m["eval_dpo_reward_margin"] for m in metrics if "eval_dpo_reward_margin" in m]
    assert margins[-1] > margins[0] > 0
    assert (out / "accuracy.png").stat().st_size > 1000 and (out / "final" / "model.safetensors").is_file()


def test_both_preference_shapes_give_the_same_tokens() -> None:
    _model, tokenizer = load_model_and_tokenizer("whetstone://tiny")
    prompt = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+3="}]
    good, bad = [{"role": "assistant", "content": "5"}], [{"role": "assistant", "content": "6"}]
    openai = {"input": {"messages": prompt}, "preferred_output": good, "non_preferred_output": bad}
    trl = {"prompt": prompt, "chosen": good, "rejected": bad}
    implicit = {"chosen": prompt + good, "rejected": prompt + bad}
    pairs = [tokenize_preference(tokenizer, row) for row in (openai, trl, implicit)]
    assert pairs[0] == pairs[1] == pairs[2]
    chosen = pairs[0].chosen
    answer = [t for t, w in zip(chosen.input_ids, chosen.weights, strict=True) if w]
    assert tokenizer.decode(answer) == "5<|im_end|>\n"  # the answer and the end of its turn, nothing else
    # Text rows: the prompt as is, the answer followed by the end-of-text token.
    text = tokenize_preference(tokenizer, {"prompt": "2+3=", "chosen": "5", "rejected": "6"})
    answer = [t for t, w in zip(text.chosen.input_ids, text.chosen.weights, strict=True) if w]
    assert answer == [*tokenizer("5", add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]


def test_malformed_preference_rows_are_named(tmp_path: Path) -> None:
    rows = [
        {"prompt": "2+3=", "chosen": "5", "rejected": "5"},
        {"prompt": "2+3=", "chosen": "5"},
        {"chosen": "5", "rejected": "6"},
        {
            "prompt": [{"role": "user", "content": "x"}],
            "chosen": [{"role": "user", "content": "5"}],
            "rejected": [],
        },
        {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "b"}]},
    ]
    path = write_jsonl(rows, tmp_path / "bad.jsonl")
    report = read_jsonl(path, "preference")
    reasons = [e.reason for e in report.errors]
    assert [e.line for e in report.errors] == [1, 2, 3, 4, 5], reasons
    assert "identical" in reasons[0] and "'rejected'" in reasons[1] and "missing 'prompt'" in reasons[2]
    assert "chosen[0].role must be assistant" in reasons[3] and "same prompt messages" in reasons[4]


def test_a_pair_longer_than_max_seq_len_is_refused_naming_its_line(tmp_path: Path) -> None:
    job = _job(tmp_path, {"fullParameter": {}}, maxSteps=2, maxSeqLen=32)
    rows = make_preference_rows("add", 3, seed=1, shape="trl")
    rows[1]["rejected"] = [{"role": "assistant", "content": "7" * 40}]
    write_jsonl(rows, tmp_path / "data" / "train.jsonl")
    with pytest.raises(
        JobRefused, match=r"train.jsonl:line 2: prompt \+ longer answer: \d+ tokens, more than"
    ) as e:
        train_job(job, tmp_path / "out")
    assert "line 1" not in str(e.value) and not (tmp_path / "out").exists()


def test_lora_reference_is_the_base_with_adapters_disabled(tmp_path: Path) -> None:
    job = _job(tmp_path, {"lora": {"rank": 4}}, maxSteps=4, learningRate=3e-2)
    out = tmp_path / "out"
    summary = train_job(job, out)
    assert summary["reference"] == "adapters disabled"
    first = _metrics(out)[0]
    assert first["dpo_reward_chosen"] == 0 and first["dpo_reward_rejected"] == 0  # B = 0: policy = base
    # The trained adapter moved the policy; with it disabled the model is the base again.
    from peft import PeftModel

    base, tokenizer = load_model_and_tokenizer("whetstone://tiny")
    fresh, _ = load_model_and_tokenizer("whetstone://tiny")
    tuned = PeftModel.from_pretrained(base, out / "final")
    rows = read_jsonl(Path(job.spec.dataset.uri), "preference").rows[:4]
    pairs = [tokenize_preference(tokenizer, row) for _line, row in rows]
    with torch.no_grad():
        policy = answer_logps(tuned, pairs, tokenizer.pad_token_id, torch.device("cpu"))[0]
        with tuned.disable_adapter():
            reference = answer_logps(tuned, pairs, tokenizer.pad_token_id, torch.device("cpu"))[0]
        base_again = answer_logps(fresh, pairs, tokenizer.pad_token_id, torch.device("cpu"))[0]
    torch.testing.assert_close(reference, base_again)
    assert not torch.allclose(policy, reference)


def test_rpo_adds_the_chosen_answers_mean_nll(tmp_path: Path) -> None:
    plain = train_job(_job(tmp_path, {"fullParameter": {}}, maxSteps=1), tmp_path / "plain")
    rpo = train_job(_job(tmp_path, {"fullParameter": {}}, {"rpoAlpha": 0.5}, maxSteps=1), tmp_path / "rpo")
    del plain, rpo
    # Step 1 runs on the base weights in both: the losses differ by exactly 0.5 × the mean chosen NLL.
    model, tokenizer = load_model_and_tokenizer("whetstone://tiny")
    rows = read_jsonl(tmp_path / "data" / "train.jsonl", "preference").rows
    from whetstone_trainer.data.packing import epoch_order

    first = [rows[i] for i in epoch_order(len(rows), 3, 0)[:8]]
    pairs = [tokenize_preference(tokenizer, row) for _line, row in first]
    with torch.no_grad():
        nll = answer_logps(model, pairs, tokenizer.pad_token_id, torch.device("cpu"))[2]
    difference = _metrics(tmp_path / "rpo")[0]["loss"] - _metrics(tmp_path / "plain")[0]["loss"]
    assert difference == pytest.approx(0.5 * float(nll.mean()), rel=1e-4)


@pytest.mark.parametrize(
    "tuning", [{"fullParameter": {}}, {"lora": {"rank": 4, "dropout": 0.1}}], ids=["full-parameter", "lora"]
)
def test_dpo_resume_continues_exactly(tmp_path: Path, tuning: dict[str, Any]) -> None:
    job = _job(tmp_path, tuning, {"lossType": "robust", "labelSmoothing": 0.1}, maxSteps=8, evalEverySteps=4)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train_job(job, straight)
    assert train_job(job, interrupted, stop_after_step=4) == {"stopped_at_step": 4}
    assert train_job(job, interrupted)["resumed_from_step"] == 4
    a, b = _metrics(straight), _metrics(interrupted)
    assert [m["step"] for m in b] == list(range(1, 9))
    for x, y in zip(a, b, strict=True):
        for key in ("loss", "dpo_reward_margin", "preference_accuracy"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-6), (x["step"], key)
    assert a[-1]["eval_preference_accuracy"] == pytest.approx(b[-1]["eval_preference_accuracy"])
