"""The cost of the python grader's sandbox, side by side in one run: the same grade(sample, item) called
in-process (what TRL, the Tinker cookbook and Fireworks' client-side reward functions do: no isolation),
in a fresh process per call (the naive way to isolate), and through whetstone's GraderSet (a warm pool of
confined worker processes, batches streamed call by call).

Two graders: a cheap one (string compare, ~1 µs in-process) that shows the per-call overhead, and a
CPU-bound one (~2 ms of arithmetic) where the pool's workers grade in parallel. Each figure is the best of
`--repeats` interleaved runs (a shared machine only ever slows a run down).

    python bench/graders.py [--samples 512] [--repeats 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "api"), str(ROOT / "graders")]

from whetstone_api.rewardgrader import RewardGraderSpec  # noqa: E402
from whetstone_graders import GraderSet, Sample  # noqa: E402

CHEAP = "def grade(sample, item):\n    return float(sample['output_text'].strip() == item['answer'])\n"
HEAVY = (
    "def grade(sample, item):\n"
    "    total = 0\n"
    "    for i in range(40000):\n"
    "        total += i * i % 7\n"
    "    return float(sample['output_text'].strip() == item['answer'])\n"
)


def in_process(source: str, samples: list[Sample], items: list[dict]) -> float:
    namespace: dict = {}
    exec(source, namespace)
    grade = namespace["grade"]
    started = time.perf_counter()
    for s, i in zip(samples, items, strict=True):
        grade(s.as_dict(), i)
    return time.perf_counter() - started


def process_per_call(source: str, samples: list[Sample], items: list[dict]) -> float:
    code = source + "\nimport json, sys\nprint(grade(*json.loads(sys.argv[1])))\n"
    started = time.perf_counter()
    for s, i in zip(samples, items, strict=True):
        import json

        subprocess.run([sys.executable, "-I", "-S", "-c", code, json.dumps([s.as_dict(), i])], check=True,
                       capture_output=True)  # fmt: skip
    return time.perf_counter() - started


def sandboxed(workers: int, batch: int) -> Callable[[str, list[Sample], list[dict]], float]:
    def run(source: str, samples: list[Sample], items: list[dict]) -> float:
        spec = RewardGraderSpec.model_validate({"python": {"source": source}})
        with GraderSet([("g", 1.0)], {"g": spec}, workers=workers) as graders:
            graders.preload()  # warm: workers started and code loaded, as after a job's first step
            started = time.perf_counter()
            for k in range(0, len(samples), batch):
                rewards = graders.grade(samples[k : k + batch], items[k : k + batch])
                assert all(r.total is not None for r in rewards)
            return time.perf_counter() - started

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    n = args.samples
    samples = [Sample(str(k % 10)) for k in range(n)]
    items = [{"answer": "3"} for _ in range(n)]
    ways = {
        "in-process (no isolation)": in_process,
        "sandbox, 1 worker, batches of 64": sandboxed(1, 64),
        "sandbox, 2 workers, batches of 64": sandboxed(2, 64),
        "sandbox, 2 workers, one call at a time": sandboxed(2, 1),
        "fresh process per call": process_per_call,
    }
    for title, source in (("cheap grader (string compare)", CHEAP), ("CPU-bound grader (~2 ms)", HEAVY)):
        best = {name: float("inf") for name in ways}
        for _ in range(args.repeats):
            for name, way in ways.items():
                count = n if "per call" not in name else min(n, 64)  # a process per call is slow: fewer
                seconds = way(source, samples[:count], items[:count]) / count
                best[name] = min(best[name], seconds)
        base = best["in-process (no isolation)"]
        print(f"\n{title}, {n} samples, best of {args.repeats}")
        print("| way | µs per sample | vs in-process |\n| --- | ---: | ---: |")
        for name, seconds in best.items():
            print(f"| {name} | {seconds * 1e6:,.1f} | {seconds / base:,.2f}× |")


if __name__ == "__main__":
    main()
