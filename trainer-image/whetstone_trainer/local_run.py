"""`whetstone run`: a FineTuneJob on this machine, no cluster. Pre-flight, before-samples, training with a
progress bar, after-samples, a loss curve."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from whetstone_api import FineTuneJob

from .preflight import preflight
from .storage import resolve_uri


class PreflightFailed(RuntimeError):
    """The job did not pass pre-flight validation; nothing was trained."""


class ProgressBar:
    """The local observer: a tqdm bar with step, loss, tokens/s and ETA."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.bar: Any = None

    def on_start(self, start_step: int, total_steps: int) -> None:
        from tqdm import tqdm

        if start_step:
            print(f"{self.name}: resuming from step {start_step}")
        self.bar = tqdm(
            total=total_steps, initial=start_step, desc=self.name, unit="step", dynamic_ncols=True
        )

    def on_step(self, m: dict[str, Any]) -> None:
        post = {"loss": f"{m['loss']:.4f}", "tok/s": f"{m['tokens_per_second'] or 0:.0f}"}
        if m.get("eval_loss") is not None:
            post["eval"] = f"{m['eval_loss']:.4f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def on_checkpoint(self, step: int, path: Path, pruned: list[Path]) -> None:
        self.bar.write(
            f"{self.name}: checkpoint step {step} saved to {path}"
            + (f"; pruned {', '.join(p.name for p in pruned)}" if pruned else "")
        )

    def on_finish(self, summary: dict[str, Any]) -> None:
        self.bar.close()


def run_job(
    manifest: Path,
    output: Path | None = None,
    samples: int = 5,
    eval_limit: int = 200,
    stop_after_step: int | None = None,
) -> dict[str, Any]:
    """Validate, train (or resume) and evaluate the FineTuneJob in `manifest`; returns the summary."""
    from whetstone_api.manifests import load_resource

    job = load_resource(manifest)
    if not isinstance(job, FineTuneJob):
        raise PreflightFailed(f"{manifest}: `whetstone run` runs a FineTuneJob, not a {job.kind}")
    spec = job.spec
    name = job.metadata.name
    base_dir = manifest.resolve().parent
    if spec.method != "sft":
        raise PreflightFailed(
            f"{manifest}: spec.method {spec.method!r}: this trainer runs sft so far "
            "(dpo and rft are validated but not trained yet)"
        )
    problems = preflight(spec, base_dir)
    if problems:
        raise PreflightFailed(
            f"{manifest}: pre-flight found {len(problems)} problem(s):\n" + "\n".join(problems)
        )
    out = output.resolve() if output else resolve_uri(spec.output.uri, base_dir, "spec.output.uri")

    from .data.formats import iter_eval_pairs
    from .eval_samples import exact_match, generate_answers, load_trained
    from .methods.sft import split_rows, train_sft
    from .models.sources import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(spec.base_model.uri, base_dir)
    train_rows, eval_rows = split_rows(spec, base_dir)
    pairs = list(iter_eval_pairs(eval_rows))[:eval_limit]
    prompts, references = [p for p, _ in pairs], [r for _, r in pairs]
    max_new = max([len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references] or [16]) + 8
    before = generate_answers(model, tokenizer, prompts, max_new)
    del model

    print(f"{name}: {len(train_rows)} training examples, {len(eval_rows)} eval examples; output {out}")
    summary = train_sft(spec, out, base_dir, observer=ProgressBar(name), stop_after_step=stop_after_step)
    if "stopped_at_step" in summary:
        return summary

    trained, tokenizer = load_trained(out / "final", spec.base_model.uri, base_dir)
    after = generate_answers(trained, tokenizer, prompts, max_new)
    summary["eval_exact_match_before"] = exact_match(before, references)
    summary["eval_exact_match_after"] = exact_match(after, references)
    summary["eval_prompts"] = len(references)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_samples(out, prompts, references, before, after)
    _plot_loss(out)

    for p, r, b, a in list(zip(prompts, references, before, after, strict=True))[:samples]:
        print(
            f"\n  prompt:    {p[-1]['content'][:100]!r}\n  expected:  {r[:100]!r}\n"
            f"  before:    {b[:100]!r}\n  after:     {a[:100]!r}"
        )
    if references:
        print(
            f"\n{name}: held-out exact match {summary['eval_exact_match_before']:.1%} before, "
            f"{summary['eval_exact_match_after']:.1%} after ({len(references)} prompts)"
        )
    print(
        f"{name}: final loss {summary['final_loss']:.4f}"
        + (f", eval loss {summary['final_eval_loss']:.4f}" if summary.get("final_eval_loss") else "")
        + f"; wrote {out / 'final'}, {out / 'metrics.jsonl'}, {out / 'loss.png'}"
    )
    return summary


def _write_samples(
    out: Path, prompts: list, references: list[str], before: list[str], after: list[str]
) -> None:
    with (out / "samples.jsonl").open("w") as f:
        for p, r, b, a in zip(prompts, references, before, after, strict=True):
            f.write(json.dumps({"prompt": p, "reference": r, "before": b, "after": a}) + "\n")


def _plot_loss(out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    evals = [
        (r["step"], r["eval_loss"])
        for r in rows
        if r.get("eval_loss") is not None and math.isfinite(r["eval_loss"])
    ]
    if evals:
        ax.plot(*zip(*evals, strict=True), "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
