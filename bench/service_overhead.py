"""The training service's overhead: the same work through the official `tinker` client and `whetstone serve`
(a subprocess on 127.0.0.1) against in process (the service's own Engine, no HTTP), side by side in one run.

- train: forward_backward (cross_entropy, `--batch` datums of `--seq` tokens) + optim_step, LoRA rank 8,
  on whetstone://tiny-10m; the figure is the median seconds per step over `--steps` steps, interleaved.
- sample: `--samples` completions of `--tokens` tokens (temperature 1, no stop) from one prompt; the figure
  is sampled tokens per second (median of `--rounds`).

    python bench/service_overhead.py [--steps 12] [--batch 8] [--seq 128] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / d) for d in ("api", "cli", "operator", "trainer-image", "tests")]
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["TINKER_TELEMETRY"] = "0"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="whetstone://tiny-10m")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import numpy as np
    import tinker
    from service_harness import ALICE, running_server
    from tinker import types
    from whetstone_trainer.service.engine import Engine, LoraShape
    from whetstone_trainer.service.protocol import AdamParams, Datum

    rng = np.random.default_rng(0)
    rows = [rng.integers(10, 2000, size=args.seq + 1) for _ in range(args.batch)]
    local = Engine(args.model, device=args.device)
    local.create_client("bench", LoraShape(8), seed=0)
    local_data = [
        Datum(
            r[:-1].astype(np.int64),
            {"target_tokens": r[1:].astype(np.int64), "weights": np.ones(args.seq, np.float32)},
        )
        for r in rows
    ]
    wire_data = [
        types.Datum(
            model_input=types.ModelInput.from_ints(r[:-1].tolist()),
            loss_fn_inputs={
                "target_tokens": r[1:].astype(np.int64),
                "weights": np.ones(args.seq, np.float32),
            },
        )
        for r in rows
    ]
    adam = AdamParams(learning_rate=1e-4)
    prompt = rows[0][:16].tolist()

    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(Path(tmp), args.model, "--device", args.device) as server,
    ):
        sc = tinker.ServiceClient(base_url=server.url, api_key=ALICE)
        tc = sc.create_lora_training_client(base_model=args.model, rank=8, seed=0).result()
        sampler = sc.create_sampling_client(base_model=args.model).result()
        params = types.SamplingParams(max_tokens=args.tokens, temperature=1.0, stop=[], seed=0)

        def client_step() -> None:
            fb = tc.forward_backward(wire_data, "cross_entropy")
            opt = tc.optim_step(types.AdamParams(learning_rate=1e-4))
            fb.result()
            opt.result()

        def local_step() -> None:
            local.forward_backward("bench", "cross_entropy", {}, local_data, False)
            local.optim_step("bench", adam)

        def client_sample() -> None:
            sampler.sample(types.ModelInput.from_ints(prompt), args.samples, params).result()

        def local_sample() -> None:
            local.sample(None, prompt, args.tokens, args.samples, 1.0, -1, 1.0, [], 0, False, False)

        def timed(fn) -> float:  # noqa: ANN001
            start = time.perf_counter()
            fn()
            return time.perf_counter() - start

        for fn in (client_step, local_step, client_sample, local_sample):  # warm-up
            fn()
        train = {"client": [], "local": []}
        for _ in range(args.steps):
            train["client"].append(timed(client_step))
            train["local"].append(timed(local_step))
        sample = {"client": [], "local": []}
        for _ in range(args.rounds):
            sample["client"].append(timed(client_sample))
            sample["local"].append(timed(local_sample))

    step_c, step_l = statistics.median(train["client"]), statistics.median(train["local"])
    tok = args.samples * args.tokens
    samp_c, samp_l = tok / statistics.median(sample["client"]), tok / statistics.median(sample["local"])
    params_m = sum(p.numel() for p in local.model.parameters()) / 1e6
    print(f"model {args.model} ({params_m:.1f}M parameters), device {args.device}, LoRA rank 8")
    print(
        f"train step ({args.batch} x {args.seq} tokens): client {step_c:.3f} s, in process {step_l:.3f} s, "
        f"ratio {step_c / step_l:.3f}"
    )
    print(
        f"sample ({args.samples} x {args.tokens} tokens): client {samp_c:.0f} tok/s, "
        f"in process {samp_l:.0f} tok/s, ratio {samp_l / samp_c:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
