"""Rollout throughput of Whetstone's sampler against transformers' `generate`, side by side in one run.

Same model, same prompts (left-padded batch of `--prompts` prompts × `--n` samples), same sampling
(temperature 1, no top-k / top-p), same maximum of new tokens, fp32 on the CPU (bf16 on a GPU). Two workloads:
- fixed: no stop token, every row generates exactly `--max-new` tokens (pure decode speed);
- stop: the model's end-of-turn token stops a row (rows end at different steps, as RFT rollouts do).
`generate` gets the prompts already repeated n times (`num_return_sequences`), its KV cache, and for
"stop" the same stop tokens. The figure is generated tokens per second (tokens a row produced up to and
including its stop token); each configuration runs `--repeats` times, interleaved, the best time counts.

    python bench/sampler_throughput.py [--model whetstone://tiny] [--prompts 16] [--n 4] [--max-new 64]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("api", "graders", "trainer-image")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="whetstone://tiny")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--n", type=int, default=4)
    parser.add_argument("--max-new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from whetstone_trainer.data.tokenize import tokenize_prompt
    from whetstone_trainer.models.sources import load_model_and_tokenizer
    from whetstone_trainer.sampling import SamplingParams, default_stop_token_ids, sample
    from whetstone_trainer.synthetic import make_prompt_rows

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=dtype)
    model = model.to(device).eval()
    rows = make_prompt_rows("reverse", args.prompts, seed=3)
    prompts = [tokenize_prompt(tokenizer, row) for row in rows]
    stops = default_stop_token_ids(tokenizer)

    def ours(stop: bool) -> tuple[float, int]:
        params = SamplingParams(
            max_tokens=args.max_new, temperature=1.0, stop_token_ids=stops if stop else (), seed=1
        )
        sync()
        t = time.perf_counter()
        out = sample(model, prompts, params, n=args.n)
        sync()
        return time.perf_counter() - t, sum(len(c.tokens) for g in out for c in g)

    def generate(stop: bool) -> tuple[float, int]:
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        torch.manual_seed(1)
        sync()
        t = time.perf_counter()
        with torch.no_grad():
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                max_new_tokens=args.max_new,
                min_new_tokens=0 if stop else args.max_new,
                num_return_sequences=args.n,
                eos_token_id=list(stops) if stop else None,
                pad_token_id=tokenizer.pad_token_id,
            )
        sync()
        seconds = time.perf_counter() - t
        new = out[:, width:].tolist()
        produced = 0
        for row in new:  # up to and including the first stop token
            produced += next((i + 1 for i, tok in enumerate(row) if stop and tok in stops), len(row))
        return seconds, produced

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    ours(False), generate(False)  # warm-up: first-touch memory, kernels
    print(
        f"sampler vs transformers generate: {args.model} on {device}, {args.prompts} prompts x {args.n} "
        f"samples, max {args.max_new} new tokens, temperature 1, {os.cpu_count()} CPUs, "
        f"best of {args.repeats}"
    )
    for workload in ("fixed", "stop"):
        stop = workload == "stop"
        best: dict[str, tuple[float, int]] = {}
        for _ in range(args.repeats):
            for name, fn in (("whetstone", ours), ("generate", generate)):
                seconds, tokens = fn(stop)
                if name not in best or seconds < best[name][0]:
                    best[name] = (seconds, tokens)
        rate = {k: tokens / seconds for k, (seconds, tokens) in best.items()}
        for name, (seconds, tokens) in best.items():
            print(
                f"  {workload:5s} {name:10s} {seconds:7.3f} s  {tokens:6d} tokens  {rate[name]:9.0f} tokens/s"
            )
        print(f"  {workload:5s} ratio whetstone / generate: {rate['whetstone'] / rate['generate']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
