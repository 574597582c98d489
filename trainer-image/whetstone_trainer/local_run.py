"""`whetstone run`: a FineTuneJob on this machine, no cluster. Pre-flight (the entry gate), the held-out score
before training, training with a progress bar, the score after, curves as PNG.

The held-out score is the method's own: exact match of greedy answers (sft), preference accuracy and the
policy's own choice between the answers (dpo), mean reward of greedy answers (rft).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .entry import Inputs, load_job_file, output_folder, prepare, train
from .plots import plot_curves


class ProgressBar:
    """The local observer: a tqdm bar with step, loss (or reward), tokens/s and ETA."""

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
        post = {"loss": f"{m['loss']:.4f}", "tok/s": f"{m.get('tokens_per_second') or 0:.0f}"}
        for key, label in (
            ("reward_mean", "reward"),
            ("preference_accuracy", "acc"),
            ("eval_loss", "eval"),
            ("eval_reward_mean", "eval reward"),
            ("eval_preference_accuracy", "eval acc"),
        ):
            if m.get(key) is not None:
                post[label] = f"{m[key]:.3f}"
        self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)

    def on_grades(self, latencies: dict[str, list[float]], errors: dict[tuple[str, str], int]) -> None:
        for (grader, reason), n in errors.items():
            self.bar.write(f"{self.name}: grader {grader}: {n} error(s) ({reason})")

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
    grader_files: Sequence[Path] = (),
) -> dict[str, Any]:
    """Validate, train (or resume) and evaluate the FineTuneJob in `manifest`; returns the summary. Raises
    ManifestError or entry.JobRefused when the job cannot run (nothing is written then)."""
    job_file = load_job_file(manifest, grader_files)
    inputs = prepare(job_file)
    out = output_folder(job_file, output)
    scorer = _SCORERS[inputs.spec.method](inputs, eval_limit)
    before = scorer.score(None)

    print(
        f"{inputs.name}: {len(inputs.train_rows)} training examples, {len(inputs.eval_rows)} eval examples; "
        f"output {out}"
    )
    summary = train(inputs, out, observer=ProgressBar(inputs.name), stop_after_step=stop_after_step)
    if "stopped_at_step" in summary:
        return summary

    after = scorer.score(out / "final")
    summary.update(scorer.summarise(before, after))
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    scorer.write_samples(out, before, after)
    pictures = plot_curves(out, inputs.spec.method)
    scorer.print(inputs.name, before, after, samples, summary)
    print(
        f"{inputs.name}: final loss {summary['final_loss']:.4f}"
        + (f", eval loss {summary['final_eval_loss']:.4f}" if summary.get("final_eval_loss") else "")
        + f"; wrote {out / 'final'}, {out / 'metrics.jsonl'}, "
        + ", ".join(str(p) for p in pictures)
    )
    return summary


def _load(inputs: Inputs, final: Path | None) -> tuple[Any, Any]:
    """The base model (final None) or the trained one."""
    from .eval_samples import load_trained
    from .loop import load_model

    return load_model(inputs.model_folder) if final is None else load_trained(final, inputs.model_folder)


class _ExactMatch:
    """SFT: greedy answers to held-out prompts against the reference answers."""

    def __init__(self, inputs: Inputs, limit: int) -> None:
        from .data.formats import iter_eval_pairs

        self.inputs = inputs
        pairs = list(iter_eval_pairs(inputs.eval_rows))[:limit]
        self.prompts, self.references = [p for p, _ in pairs], [r for _, r in pairs]

    def score(self, final: Path | None) -> list[str]:
        from .eval_samples import generate_answers

        model, tokenizer = _load(self.inputs, final)
        lengths = [len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in self.references]
        return generate_answers(model, tokenizer, self.prompts, max(lengths or [16]) + 8)

    def summarise(self, before: list[str], after: list[str]) -> dict[str, Any]:
        from .eval_samples import exact_match

        return {
            "eval_exact_match_before": exact_match(before, self.references),
            "eval_exact_match_after": exact_match(after, self.references),
            "eval_prompts": len(self.references),
        }

    def write_samples(self, out: Path, before: list[str], after: list[str]) -> None:
        with (out / "samples.jsonl").open("w") as f:
            for p, r, b, a in zip(self.prompts, self.references, before, after, strict=True):
                f.write(json.dumps({"prompt": p, "reference": r, "before": b, "after": a}) + "\n")

    def print(
        self, name: str, before: list[str], after: list[str], samples: int, summary: dict[str, Any]
    ) -> None:
        for p, r, b, a in list(zip(self.prompts, self.references, before, after, strict=True))[:samples]:
            print(
                f"\n  prompt:    {p[-1]['content'][:100]!r}\n  expected:  {r[:100]!r}\n"
                f"  before:    {b[:100]!r}\n  after:     {a[:100]!r}"
            )
        if self.references:
            s = self.summarise(before, after)
            print(
                f"\n{name}: held-out exact match {s['eval_exact_match_before']:.1%} before, "
                f"{s['eval_exact_match_after']:.1%} after ({len(self.references)} prompts)"
            )


class _Preferences:
    """DPO: on held-out pairs, the policy's own choice (more log-probability on the chosen answer) before and
    after; the trainer's eval gives the preference accuracy (implicit reward margin > 0) after."""

    def __init__(self, inputs: Inputs, limit: int) -> None:
        self.inputs = inputs
        self.rows = inputs.eval_rows[:limit]

    def score(self, final: Path | None) -> float:
        from .methods.dpo import choice_accuracy

        model, tokenizer = _load(self.inputs, final)
        return choice_accuracy(model, tokenizer, self.rows)

    def summarise(self, before: float, after: float) -> dict[str, Any]:
        return {
            "eval_choice_accuracy_before": before,
            "eval_choice_accuracy_after": after,
            "eval_pairs": len(self.rows),
        }

    def write_samples(self, out: Path, before: float, after: float) -> None:
        pass

    def print(self, name: str, before: float, after: float, samples: int, summary: dict[str, Any]) -> None:
        print(
            f"\n{name}: held-out pairs where the model prefers the chosen answer: {before:.1%} before, "
            f"{after:.1%} after ({len(self.rows)} pairs)"
        )
        if summary.get("final_eval_preference_accuracy") is not None:
            print(
                f"{name}: held-out preference accuracy (implicit reward of chosen > rejected) 50.0% before "
                f"(the policy is the reference), {summary['final_eval_preference_accuracy']:.1%} after"
            )


class _Rewards:
    """RFT: the graders' mean reward of greedy answers to held-out prompts."""

    def __init__(self, inputs: Inputs, limit: int) -> None:
        self.inputs = inputs
        self.rows = inputs.eval_rows[:limit]

    def score(self, final: Path | None) -> Any:
        from .methods.rft import evaluate_rewards

        model, tokenizer = _load(self.inputs, final)
        return evaluate_rewards(model, tokenizer, self.rows, self.inputs)

    def summarise(self, before: Any, after: Any) -> dict[str, Any]:
        return {
            "eval_reward_before": before.mean_reward,
            "eval_reward_after": after.mean_reward,
            "eval_pass_rate_before": before.pass_rate,
            "eval_pass_rate_after": after.pass_rate,
            "eval_prompts": len(self.rows),
        }

    def write_samples(self, out: Path, before: Any, after: Any) -> None:
        with (out / "samples.jsonl").open("w") as f:
            for (_line, row), b, a in zip(self.rows, before.samples, after.samples, strict=True):
                f.write(json.dumps({"prompt": row["messages"], "before": b, "after": a}) + "\n")

    def print(self, name: str, before: Any, after: Any, samples: int, summary: dict[str, Any]) -> None:
        for (_line, row), b, a in list(zip(self.rows, before.samples, after.samples, strict=True))[:samples]:
            print(
                f"\n  prompt:    {row['messages'][-1]['content'][:100]!r}\n"
                f"  before:    {b['completion'][:100]!r} (reward {b['reward']})\n"
                f"  after:     {a['completion'][:100]!r} (reward {a['reward']})"
            )
        print(
            f"\n{name}: held-out mean reward {before.mean_reward:.3f} before, {after.mean_reward:.3f} after; "
            f"pass rate {before.pass_rate:.1%} -> {after.pass_rate:.1%} ({len(self.rows)} prompts)"
        )


_SCORERS: dict[str, Any] = {"sft": _ExactMatch, "dpo": _Preferences, "rft": _Rewards}
