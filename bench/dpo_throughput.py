"""DPO throughput of the Whetstone trainer against TRL's DPOTrainer, side by side in one run.

Same model, same preference pairs, same batch (pairs per step), same maximum length, sigmoid loss, beta 0.1,
fp32 on the CPU; TRL with bf16 and gradient checkpointing pinned off. Full-parameter: TRL keeps a frozen copy
of the model as its reference (its default), Whetstone computes the reference log-probs once before training;
LoRA (`--lora`): both use the model with its adapters disabled. The figure is *data tokens per second*: the
tokens of every pair's prompt + chosen and prompt + rejected sequences, divided by the wall time of one epoch
(model loading and tokenisation excluded; Whetstone's reference pass included). Best of `--repeats`,
interleaved.

    python bench/dpo_throughput.py [--model whetstone://tiny] [--pairs 512] [--batch 16] [--lora]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("api", "graders", "trainer-image")]
MAX_LEN = 128


def whetstone(args: argparse.Namespace, data: Path, out: Path) -> float:
    from whetstone_api import FineTuneJob
    from whetstone_trainer.entry import train_job

    tuning = {"lora": {"rank": 16, "alpha": 32}} if args.lora else {"fullParameter": {}}
    job = FineTuneJob.model_validate(
        {
            "apiVersion": "whetstone.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "bench"},
            "spec": {
                "method": "dpo",
                "baseModel": {"uri": args.model},
                "dataset": {"uri": str(data)},
                "dpo": {"beta": 0.1},
                **tuning,
                "hyperparameters": {
                    "epochs": 1,
                    "batchSize": args.batch,
                    "learningRate": 1e-5,
                    "maxSeqLen": MAX_LEN,
                    "scheduler": "constant",
                    "evalFraction": 0,
                },
                "output": {"uri": str(out)},
            },
        }
    )
    summary = train_job(job, out)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    # The loop's clock starts after the reference pass of a full-parameter job: count that pass too.
    return rows[-1]["elapsed_seconds"] + summary["reference_seconds"]


def trl(args: argparse.Namespace, data: Path, out: Path) -> float:
    from datasets import load_dataset
    from trl import DPOConfig, DPOTrainer
    from whetstone_trainer.models.sources import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    peft_config = None
    if args.lora:
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    config = DPOConfig(
        output_dir=str(out),
        num_train_epochs=1,
        per_device_train_batch_size=args.batch,
        max_length=MAX_LEN,
        beta=0.1,
        learning_rate=1e-5,
        lr_scheduler_type="constant",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=not __import__("torch").cuda.is_available(),
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        seed=0,
    )
    trainer = DPOTrainer(
        model=model,
        args=config,
        train_dataset=load_dataset("json", data_files=str(data))["train"],
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    return trainer.train().metrics["train_runtime"]


def data_tokens(data: Path) -> int:
    from whetstone_trainer.data.formats import read_jsonl
    from whetstone_trainer.data.tokenize import tokenize_preference
    from whetstone_trainer.models.sources import load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer("whetstone://tiny")
    pairs = [tokenize_preference(tokenizer, row) for _, row in read_jsonl(data, "preference").rows]
    return sum(len(p.chosen) + len(p.rejected) for p in pairs)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="whetstone://tiny")
    parser.add_argument("--pairs", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lora", action="store_true")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    from whetstone_trainer.synthetic import make_preference_rows, write_jsonl

    tmp = Path(tempfile.mkdtemp(prefix="whetstone-bench-dpo-"))
    data = write_jsonl(make_preference_rows("reverse", args.pairs, seed=11, shape="trl"), tmp / "pairs.jsonl")
    tokens = data_tokens(data)
    runs: dict[str, list[float]] = {"whetstone": [], "trl": []}
    for r in range(args.repeats):
        runs["whetstone"].append(whetstone(args, data, tmp / f"w{r}"))
        runs["trl"].append(trl(args, data, tmp / f"t{r}"))
    best = {k: min(v) for k, v in runs.items()}
    print(
        f"DPO, {args.model}, {'LoRA' if args.lora else 'full-parameter'}, {args.pairs} pairs "
        f"({tokens} tokens), batch {args.batch}, max length {MAX_LEN}, fp32, {os.cpu_count()} CPUs, "
        f"best of {args.repeats}"
    )
    for name, seconds in best.items():
        runs_text = ", ".join(f"{s:.2f}" for s in runs[name])
        print(
            f"  {name:10s} {seconds:7.2f} s/epoch  {tokens / seconds:9.0f} data tokens/s  (runs: {runs_text})"
        )
    print(f"ratio whetstone / trl: {best['trl'] / best['whetstone']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
