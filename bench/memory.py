"""Peak memory of SFT, DPO and RFT in Whetstone against TRL's SFTTrainer, DPOTrainer and GRPOTrainer at the
same settings, each run in a fresh process.

A long-context LoRA job: SmolLM2-135M-Instruct (vocabulary 49 152), prompts of about `--prompt-tokens` tokens
and short answers, batch `--batch`, rank 16 on every linear layer, fp32 on the CPU (TRL's bf16 pinned off),
`--steps` optimizer steps. Gradient (activation) checkpointing is the same on both sides, once per value of
`--checkpointing`: `on` is both trainers' default for this job (TRL 1.16's SFTConfig, DPOConfig and GRPOConfig
default gradient_checkpointing=True; Whetstone's hyperparameters.gradientCheckpointing defaults to on with
LoRA), `off` pins it off on both. SFT trains on the answers only on both sides (TRL: prompt/completion rows,
its completion-only loss); DPO uses the adapters-disabled model as reference on both sides; RFT samples
`--group` answers of at most `--completion-tokens` tokens per prompt, no KL. The figure is the process's peak
resident memory (VmHWM) and, to show what training itself adds, that peak minus the resident memory
after the model was loaded. On a GPU the peak of torch.cuda.max_memory_allocated is reported instead.
`--host-memory` sets Whetstone's hyperparameters.hostMemory (models/host_memory.py): trim, its default (the
heap's free pages go back to the kernel whenever resident memory has grown by a budget), reuse (glibc left as
it is) or release (glibc returns every large freed tensor to the kernel; steps get slower); TRL always runs
with the C library's defaults.

    python bench/memory.py [--prompt-tokens 900] [--batch 2] [--steps 2] [--group 4] [--completion-tokens 32]
                           [--methods sft,dpo,rft] [--checkpointing on,off] [--host-memory trim|reuse|release]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
SOURCES = [str(ROOT / d) for d in ("api", "graders", "trainer-image")]
MODEL = "whetstone://smollm2"


def rss_mib(field: str = "VmRSS") -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak(cuda: bool) -> float:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if cuda else rss_mib("VmHWM")


def write_data(folder: Path, prompt_tokens: int, rows: int) -> dict[str, Path]:
    """Long prompts (a story of sentences, then a question) with short answers, in every shape needed."""
    import random

    sys.path[:0] = SOURCES
    from whetstone_trainer.synthetic import json_extract, write_jsonl

    rng = random.Random(0)
    out: dict[str, list[dict]] = {"sft": [], "dpo": [], "rft": [], "trl-sft": []}
    for _ in range(rows):
        story = " ".join(json_extract(rng)[0].split("\n")[0] for _ in range(prompt_tokens // 18))
        question, answer = json_extract(rng)
        prompt = [{"role": "user", "content": story + "\n" + question}]
        reply = [{"role": "assistant", "content": answer}]
        out["sft"].append({"messages": prompt + reply})
        out["trl-sft"].append({"prompt": prompt, "completion": reply})
        out["dpo"].append(
            {"prompt": prompt, "chosen": reply, "rejected": [{"role": "assistant", "content": "{}"}]}
        )
        out["rft"].append({"messages": prompt, "answer": answer})
    return {k: write_jsonl(v, folder / f"{k}.jsonl") for k, v in out.items()}


def child(
    method: str, trainer: str, checkpointing: bool, args: argparse.Namespace, data: dict[str, Path], out: Path
) -> None:
    sys.path[:0] = SOURCES
    import torch
    from whetstone_trainer.models.sources import load_model_and_tokenizer

    cuda = torch.cuda.is_available()
    load_model_and_tokenizer(MODEL)  # materialise once so both sides load a ready folder
    if trainer == "whetstone":
        from whetstone_api import FineTuneJob
        from whetstone_api.rewardgrader import RewardGraderSpec
        from whetstone_trainer.entry import train_job

        spec = {
            "method": method,
            "baseModel": {"uri": MODEL},
            "dataset": {"uri": str(data[method])},
            "lora": {"rank": 16, "alpha": 32},
            "hyperparameters": {
                "maxSteps": args.steps,
                "batchSize": args.batch,
                "maxSeqLen": args.prompt_tokens + 300,
                "learningRate": 1e-4,
                "evalFraction": 0,
                "gradientCheckpointing": checkpointing,
                "hostMemory": args.host_memory,
            },
            "output": {"uri": str(out)},
        }
        if method == "sft":
            spec["sft"] = {"packing": False}
        if method == "dpo":
            spec["dpo"] = {"beta": 0.1}
        graders = {}
        if method == "rft":
            spec["rft"] = {
                "graders": [{"name": "has-name"}],
                "samplesPerPrompt": args.group,
                "maxCompletionTokens": args.completion_tokens,
                "zeroVarianceGroups": "keep",
            }
            spec["hyperparameters"]["batchSize"] = max(1, args.batch // args.group) or 1
            graders = {
                "has-name": RewardGraderSpec.model_validate(
                    {"stringCheck": {"reference": "name", "operation": "like"}}
                )
            }
        job = FineTuneJob.model_validate(
            {
                "apiVersion": "whetstone.dev/v1alpha1",
                "kind": "FineTuneJob",
                "metadata": {"name": "m"},
                "spec": spec,
            }
        )
        baseline = rss_mib()
        train_job(job, out, graders=graders)
    else:
        from datasets import load_dataset
        from peft import LoraConfig

        model, tokenizer = load_model_and_tokenizer(MODEL)
        baseline = rss_mib()
        common = {
            "output_dir": str(out),
            "max_steps": args.steps,
            "learning_rate": 1e-4,
            "bf16": False,
            "fp16": False,
            "gradient_checkpointing": checkpointing,
            "use_cpu": not cuda,
            "report_to": "none",
            "save_strategy": "no",
            "logging_strategy": "no",
            "dataloader_num_workers": 0,
        }
        lora = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
        if method == "sft":
            from trl import SFTConfig, SFTTrainer

            config = SFTConfig(
                per_device_train_batch_size=args.batch, max_length=args.prompt_tokens + 300, **common
            )
            dataset = load_dataset("json", data_files=str(data["trl-sft"]))["train"]
            trainer_ = SFTTrainer(
                model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
            )
        elif method == "dpo":
            from trl import DPOConfig, DPOTrainer

            config = DPOConfig(
                per_device_train_batch_size=args.batch, max_length=args.prompt_tokens + 300, **common
            )
            dataset = load_dataset("json", data_files=str(data["dpo"]))["train"]
            trainer_ = DPOTrainer(
                model=model, args=config, train_dataset=dataset, processing_class=tokenizer, peft_config=lora
            )
        else:
            from trl import GRPOConfig, GRPOTrainer

            config = GRPOConfig(
                per_device_train_batch_size=max(1, args.batch // args.group) * args.group,
                num_generations=args.group,
                steps_per_generation=1,
                max_completion_length=args.completion_tokens,
                beta=0.0,
                **common,
            )
            dataset = load_dataset("json", data_files=str(data["rft"]))["train"].map(
                lambda r: {"prompt": r["messages"]}, remove_columns=["messages"]
            )

            def has_name(completions: list, **_: object) -> list[float]:
                return [float("name" in c[0]["content"]) for c in completions]

            trainer_ = GRPOTrainer(
                model=model,
                args=config,
                reward_funcs=has_name,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=lora,
            )
        trainer_.train()
    print(
        json.dumps({"peak": peak(cuda), "baseline": baseline, "unit": "MiB allocated" if cuda else "MiB RSS"})
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=900)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--group", type=int, default=4)
    parser.add_argument("--completion-tokens", type=int, default=32)
    parser.add_argument("--methods", default="sft,dpo,rft")
    parser.add_argument("--checkpointing", default="on,off", help="on, off or both (on,off)")
    parser.add_argument("--host-memory", default="trim", choices=("trim", "reuse", "release"))
    parser.add_argument(
        "--child", nargs=4, metavar=("METHOD", "TRAINER", "ON", "DIR"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        method, trainer, on, folder = args.child
        data = {p.stem: p for p in Path(folder).glob("*.jsonl")}
        child(method, trainer, on == "on", args, data, Path(folder) / f"out-{method}-{trainer}-{on}")
        return 0

    folder = Path(tempfile.mkdtemp(prefix="whetstone-bench-memory-"))
    write_data(folder, args.prompt_tokens, rows=16)
    print(
        f"peak memory, {MODEL} LoRA r16, prompts of ~{args.prompt_tokens} tokens, batch {args.batch}, "
        f"{args.steps} steps, RFT group {args.group} of at most {args.completion_tokens} tokens",
        flush=True,
    )
    for method, on in [(m, c) for m in args.methods.split(",") for c in args.checkpointing.split(",")]:
        label = f"{method:4s} ckpt {on:3s}"
        result = {}
        for trainer in ("whetstone", "trl"):
            cmd = [
                sys.executable,
                __file__,
                "--child",
                method,
                trainer,
                on,
                str(folder),
                "--prompt-tokens",
                str(args.prompt_tokens),
                "--batch",
                str(args.batch),
                "--steps",
                str(args.steps),
                "--group",
                str(args.group),
                "--completion-tokens",
                str(args.completion_tokens),
                "--host-memory",
                args.host_memory,
            ]
            run = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env={**os.environ, "PYTHONPATH": os.pathsep.join(SOURCES)},
            )
            if run.returncode:
                print(f"  {label} {trainer}: failed\n{run.stderr[-2000:]}", flush=True)
                continue
            result[trainer] = r = json.loads(run.stdout.strip().splitlines()[-1])
            print(
                f"  {label} {trainer:10s} peak {r['peak']:8.0f} {r['unit']}  "
                f"(after loading {r['baseline']:6.0f}; training adds {r['peak'] - r['baseline']:7.0f})",
                flush=True,
            )
        if len(result) == 2:
            w, t = result["whetstone"], result["trl"]
            print(
                f"  {label} ratio whetstone / trl: peak {w['peak'] / t['peak']:.2f}x, "
                f"added by training {(w['peak'] - w['baseline']) / max(t['peak'] - t['baseline'], 1):.2f}x",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
