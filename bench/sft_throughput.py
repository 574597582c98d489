"""SFT throughput of the Whetstone trainer against TRL's SFTTrainer, side by side in one run.

Same tiny model (whetstone://tiny), same chat data, same batch size (sequences per step), same maximum
sequence length, fp32 on the CPU, no gradient checkpointing. The figure is *data tokens per second*: the
tokens of the dataset's examples divided by the wall time of one epoch (model loading and tokenisation
excluded on both sides). TRL is measured with its defaults (padding, no packing) and with packing on.
Each configuration runs `--repeats` times, interleaved; the best time counts (first-touch memory and a
shared machine only ever slow a run down).

    python bench/sft_throughput.py [--examples 4000] [--repeats 2]
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
SEQ_LEN, BATCH, LR = 128, 16, 1e-3


def whetstone_epoch(data: Path, out: Path) -> float:
    from whetstone_api import FineTuneJob
    from whetstone_trainer.entry import train_job

    job = FineTuneJob.model_validate(
        {
            "apiVersion": "whetstone.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "bench"},
            "spec": {
                "method": "sft",
                "baseModel": {"uri": "whetstone://tiny"},
                "dataset": {"uri": str(data)},
                "fullParameter": {},
                "output": {"uri": str(out)},
                "hyperparameters": {
                    "epochs": 1,
                    "batchSize": BATCH,
                    "maxSeqLen": SEQ_LEN,
                    "learningRate": LR,
                    "evalFraction": 0,
                    "scheduler": "constant",
                },
            },
        }
    )
    train_job(job, out)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["elapsed_seconds"]


def trl_epoch(data: Path, out: Path, packing: bool) -> float:
    from datasets import load_dataset
    from trl import SFTConfig, SFTTrainer
    from whetstone_trainer.models.sources import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer("whetstone://tiny")
    config = SFTConfig(
        output_dir=str(out),
        num_train_epochs=1,
        per_device_train_batch_size=BATCH,
        max_length=SEQ_LEN,
        learning_rate=LR,
        lr_scheduler_type="constant",
        packing=packing,
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        dataloader_num_workers=0,
        use_cpu=True,
        seed=0,
    )
    trainer = SFTTrainer(
        model=model,
        args=config,
        train_dataset=load_dataset("json", data_files=str(data))["train"],
        processing_class=tokenizer,
    )
    return trainer.train().metrics["train_runtime"]


def data_tokens(data: Path) -> int:
    from whetstone_trainer.data.formats import read_jsonl, tokenize_chat
    from whetstone_trainer.models.sources import load_model_and_tokenizer

    _, tokenizer = load_model_and_tokenizer("whetstone://tiny")
    return sum(len(tokenize_chat(tokenizer, row)) for _, row in read_jsonl(data, "chat").rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--examples", type=int, default=4000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    sys.path[:0] = [str(ROOT / "operator"), str(ROOT / "trainer-image")]
    from whetstone_trainer.synthetic import make_rows, write_jsonl

    tmp = Path(tempfile.mkdtemp(prefix="whetstone-bench-"))
    data = write_jsonl(make_rows("reverse", args.examples, seed=11), tmp / "train.jsonl")
    tokens = data_tokens(data)
    runs: dict[str, list[float]] = {"whetstone": [], "trl": [], "trl-packing": []}
    for r in range(args.repeats):
        runs["whetstone"].append(whetstone_epoch(data, tmp / f"w{r}"))
        runs["trl"].append(trl_epoch(data, tmp / f"t{r}", packing=False))
        runs["trl-packing"].append(trl_epoch(data, tmp / f"p{r}", packing=True))
    best = {k: min(v) for k, v in runs.items()}
    print(
        f"SFT, whetstone://tiny, {args.examples} examples ({tokens} tokens), batch {BATCH}, "
        f"max length {SEQ_LEN}, fp32, {os.cpu_count()} CPUs, best of {args.repeats}"
    )
    for name, seconds in best.items():
        print(
            f"  {name:12s} {seconds:7.2f} s/epoch  {tokens / seconds:9.0f} data tokens/s  (runs: "
            + ", ".join(f"{s:.2f}" for s in runs[name])
            + ")"
        )
    print(f"ratio whetstone / trl (defaults):     {best['trl'] / best['whetstone']:.2f}x")
    print(f"ratio whetstone / trl (packing=True): {best['trl-packing'] / best['whetstone']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
