"""RFT steps per second of the Whetstone trainer against TRL's GRPOTrainer, side by side in one run.

Same model (full-parameter), same prompts, same group size, same number of prompts per step, same maximum
completion length, temperature 1, one optimizer step per rollout batch, no KL term, fp32 on the CPU; TRL with
bf16 and gradient checkpointing pinned off (its defaults turn both on, even on a CPU) and generation through
transformers (no vLLM). The reward is the same rule on both sides: 1 when the answer contains an "e" (TRL: a
Python function in the process; Whetstone: a stringCheck RewardGrader, and, as a second figure, the same rule
as a python RewardGrader in its sandbox worker processes). A step = sample, reward, update. Each
configuration runs `--repeats` times, interleaved, each run in a fresh process of its own (a trainer sets
process-wide state, such as Whetstone's malloc settings under `hostMemory: trim`, that must not carry over to
the other); the best time counts, and the median is printed too. Model loading and set-up are excluded on both
sides. `--threads N` sets torch's intra-op threads for both trainers alike: on a shared machine whose cores
are busy, 1 thread avoids the stalls of a parallel region waiting for a core.

    python bench/rft_steps.py [--model whetstone://tiny] [--steps 8] [--prompts 8] [--group 8] [--max-new 32]
                              [--repeats 2] [--threads N] [--system-words N]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("api", "graders", "trainer-image")]

GRADERS = {
    "string": {"stringCheck": {"reference": "e", "operation": "like"}},
    "python": {
        "python": {"source": "def grade(sample, item):\n    return float('e' in sample['output_text'])\n"}
    },
}


def whetstone(args: argparse.Namespace, data: Path, out: Path, grader: str) -> float:
    from whetstone_api import FineTuneJob
    from whetstone_api.rewardgrader import RewardGraderSpec
    from whetstone_trainer.entry import train_job

    job = FineTuneJob.model_validate(
        {
            "apiVersion": "whetstone.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "bench"},
            "spec": {
                "method": "rft",
                "baseModel": {"uri": args.model},
                "dataset": {"uri": str(data)},
                "rft": {
                    "graders": [{"name": "e"}],
                    "samplesPerPrompt": args.group,
                    "maxCompletionTokens": args.max_new,
                    "zeroVarianceGroups": "keep",
                    "rolloutLogSamples": 0,
                },
                "fullParameter": {},
                "hyperparameters": {
                    "maxSteps": args.steps,
                    "batchSize": args.prompts,
                    "learningRate": 1e-5,
                    "maxSeqLen": 256 + 8 * args.system_words,  # the tiny tokenizer: ~4 tokens a word
                    "scheduler": "constant",
                    "evalFraction": 0,
                },
                "output": {"uri": str(out)},
            },
        }
    )
    train_job(job, out, graders={"e": RewardGraderSpec.model_validate(GRADERS[grader])})
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return rows[-1]["elapsed_seconds"]


def trl(args: argparse.Namespace, data: Path, out: Path) -> float:
    from datasets import load_dataset
    from trl import GRPOConfig, GRPOTrainer
    from whetstone_trainer.models.sources import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)

    def contains_e(completions: list, **_: object) -> list[float]:
        return [float("e" in (c[0]["content"] if isinstance(c, list) else c)) for c in completions]

    config = GRPOConfig(
        output_dir=str(out),
        max_steps=args.steps,
        per_device_train_batch_size=args.prompts * args.group,  # TRL counts completions
        num_generations=args.group,
        steps_per_generation=1,
        max_completion_length=args.max_new,
        temperature=1.0,
        top_k=0,
        beta=0.0,
        loss_type="grpo",
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
    dataset = load_dataset("json", data_files=str(data))["train"].map(
        lambda row: {"prompt": row["messages"]}, remove_columns=["messages", "answer"]
    )
    trainer = GRPOTrainer(
        model=model, args=config, reward_funcs=contains_e, train_dataset=dataset, processing_class=tokenizer
    )
    return trainer.train().metrics["train_runtime"]


RUNS = {
    "whetstone (stringCheck)": ("whetstone", "string"),
    "whetstone (python grader)": ("whetstone", "python"),
    "trl": ("trl", ""),
}


def child(args: argparse.Namespace, name: str, data: Path, out: Path) -> float:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    trainer, grader = RUNS[name]
    return whetstone(args, data, out, grader) if trainer == "whetstone" else trl(args, data, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="whetstone://tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument(
        "--system-words",
        type=int,
        default=0,
        help="a system message of this many words before every prompt, the same on both sides (long prompts)",
    )
    parser.add_argument("--child", nargs=3, metavar=("RUN", "DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        name, data, out = args.child
        print(json.dumps({"seconds": child(args, name, Path(data), Path(out))}))
        return 0
    from whetstone_trainer.synthetic import make_prompt_rows, write_jsonl

    tmp = Path(tempfile.mkdtemp(prefix="whetstone-bench-rft-"))
    rows = make_prompt_rows("reverse", args.prompts * args.steps * 2, seed=5)
    if args.system_words:
        words = " ".join(f"rule{i % 50}" for i in range(args.system_words))
        rows = [{**r, "messages": [{"role": "system", "content": words}, *r["messages"]]} for r in rows]
    data = write_jsonl(rows, tmp / "prompts.jsonl")
    options = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k not in ("child", "repeats")]
    runs: dict[str, list[float]] = {name: [] for name in RUNS}
    for r in range(args.repeats):
        for i, name in enumerate(RUNS):
            cmd = [sys.executable, __file__, *options, "--child", name, str(data), str(tmp / f"{i}-{r}")]
            run = subprocess.run(cmd, capture_output=True, text=True)
            lines = run.stdout.strip().splitlines()
            if run.returncode or not lines:
                print(f"{name}: failed (exit {run.returncode})\n{run.stderr[-3000:]}", file=sys.stderr)
                return 1
            runs[name].append(json.loads(lines[-1])["seconds"])
    best = {k: min(v) for k, v in runs.items()}
    median = {k: statistics.median(v) for k, v in runs.items()}
    threads = args.threads or "torch's default"
    print(
        f"RFT steps/s, {args.model}, {args.steps} steps of {args.prompts} prompts x {args.group} samples, "
        f"max {args.max_new} new tokens, full-parameter, {os.cpu_count()} CPUs, {threads} torch threads, "
        f"best of {args.repeats}, each run a fresh process"
        + (f", a system message of {args.system_words} words" if args.system_words else "")
    )
    for name, seconds in best.items():
        runs_text = ", ".join(f"{s:.2f}" for s in runs[name])
        print(f"  {name:26s} {seconds:7.2f} s  {args.steps / seconds:6.3f} steps/s  (runs: {runs_text})")
    for name in ("whetstone (stringCheck)", "whetstone (python grader)"):
        print(
            f"ratio {name} / trl: {best['trl'] / best[name]:.2f}x best, "
            f"{median['trl'] / median[name]:.2f}x median"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
