"""Curves from metrics.jsonl, as PNG files beside it: loss (every method), reward (rft), preference accuracy
(dpo)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any


def _series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    points = [
        (r["step"], r[key]) for r in rows if isinstance(r.get(key), int | float) and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def _plot(
    out: Path,
    name: str,
    rows: list[dict[str, Any]],
    curves: list[tuple[str, str, str]],
    ylabel: str,
    log: bool,
) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    drawn = False
    for key, label, style in curves:
        xs, ys = _series(rows, key)
        if xs:
            ax.plot(xs, ys, style, label=label, markersize=3)
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log and all(y > 0 for key, _l, _s in curves for y in _series(rows, key)[1]):
        ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / name
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_curves(out: Path, method: str) -> list[Path]:
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    made = [
        _plot(
            out,
            "loss.png",
            rows,
            [("loss", "train loss", "-"), ("eval_loss", "eval loss", "o-")],
            "loss",
            log=True,
        )
    ]
    if method == "rft":
        made.append(
            _plot(
                out,
                "reward.png",
                rows,
                [
                    ("reward_mean", "train reward (mean of samples)", "-"),
                    ("eval_reward_mean", "held-out reward", "o-"),
                    ("pass_rate", "train pass rate", ":"),
                ],
                "reward",
                log=False,
            )
        )
    if method == "dpo":
        made.append(
            _plot(
                out,
                "accuracy.png",
                rows,
                [
                    ("preference_accuracy", "train preference accuracy", "-"),
                    ("eval_preference_accuracy", "held-out preference accuracy", "o-"),
                    ("eval_choice_accuracy", "held-out: policy prefers chosen", "s--"),
                ],
                "accuracy",
                log=False,
            )
        )
    return [p for p in made if p is not None]
