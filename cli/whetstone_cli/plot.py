"""`whetstone plot JOB`: the training curves of a job as a PNG, from the metrics.jsonl the trainer writes in
its output folder (one JSON object per step): loss and eval loss for every method, then what the method
logs: rewards and pass rate (RFT), implicit rewards and preference accuracy (DPO), the learning rate.

JOB is a FineTuneJob on the cluster (its spec.output.uri says where the file is: a pvc:// output is read
under --pvc-root, where the claim is mounted on this machine) or, without a cluster, an output folder or the
metrics.jsonl itself.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

from .kube import FINETUNEJOB, CliError, Cluster, add_cluster_arguments, command

METRICS_FILE = "metrics.jsonl"

# One subplot per group whose series the file has: (title, y label, [(key, label)], log scale).
GROUPS: list[tuple[str, str, list[tuple[str, str]], bool]] = [
    ("Loss", "loss", [("loss", "train"), ("eval_loss", "eval")], True),
    (
        "Reward",
        "reward",
        [("reward_mean", "mean"), ("reward_min", "min"), ("reward_max", "max"), ("eval_reward_mean", "eval")],
        False,
    ),
    ("Pass rate", "share", [("pass_rate", "pass rate"), ("truncation_rate", "truncated")], False),
    ("KL", "KL", [("kl", "KL to reference")], False),
    (
        "DPO implicit rewards",
        "reward",
        [
            ("dpo_reward_chosen", "chosen"),
            ("dpo_reward_rejected", "rejected"),
            ("dpo_reward_margin", "margin"),
        ],
        False,
    ),
    (
        "Preference accuracy",
        "accuracy",
        [("preference_accuracy", "train"), ("eval_preference_accuracy", "eval")],
        False,
    ),
    ("Learning rate", "lr", [("lr", "lr")], False),
]


def register(sub: Any) -> None:
    p = sub.add_parser("plot", help="draw a job's loss / reward curves to a PNG")
    p.add_argument("job", help="FineTuneJob name, or an output folder / metrics.jsonl on this machine")
    p.add_argument("-o", "--output", help="PNG to write (default: <job>-curves.png here)")
    p.add_argument(
        "--pvc-root",
        help="where claims are mounted here: pvc://CLAIM/PATH is read at PVC_ROOT/CLAIM/PATH "
        "(default $WHETSTONE_PVC_ROOT)",
    )
    add_cluster_arguments(p)
    p.set_defaults(func=run)


def metrics_path(args: argparse.Namespace) -> tuple[str, Path]:
    """(the name for the title, the metrics.jsonl) of a local path or of a job on the cluster."""
    local = Path(args.job)
    if local.exists():
        path = local / METRICS_FILE if local.is_dir() else local
        name = (local if local.is_dir() else local.parent).resolve().name
        return name, path
    from whetstone_api.uris import URIError, parse_uri

    name = args.job.split("/", 1)[1] if "/" in args.job else args.job
    job = Cluster(args).get(FINETUNEJOB, name)
    uri = job["spec"]["output"]["uri"]
    try:
        parsed = parse_uri(uri)
    except URIError as e:
        raise CliError(str(e)) from None
    if parsed.scheme == "pvc":
        root = args.pvc_root or os.environ.get("WHETSTONE_PVC_ROOT")
        if not root:
            raise CliError(
                f"{name} writes to {uri}: mount the claim {parsed.host} here and pass --pvc-root "
                "(the folder that holds the claim's folder)"
            )
        return name, Path(root) / parsed.host / parsed.path / METRICS_FILE
    if parsed.scheme == "path":
        return name, Path(parsed.path) / METRICS_FILE
    raise CliError(f"{name} writes to {uri}: copy its {METRICS_FILE} here and plot that file")


def read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise CliError(f"no {path}: the job has not logged a step yet, or the output is elsewhere")
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise CliError(f"{path}:{number}: not JSON") from None
        if isinstance(row, dict) and isinstance(row.get("step"), int | float):
            rows.append(row)
    if not rows:
        raise CliError(f"{path} holds no step yet")
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    points = [
        (float(r["step"]), float(r[key]))
        for r in rows
        if isinstance(r.get(key), int | float) and math.isfinite(r[key])
    ]
    return [p[0] for p in points], [p[1] for p in points]


def draw(title: str, rows: list[dict[str, Any]], out: Path) -> list[str]:
    """Write the PNG; returns the titles of the subplots drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    groups = [g for g in GROUPS if any(series(rows, key)[0] for key, _ in g[2])]
    cols = 1 if len(groups) == 1 else 2
    nrows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(7 * cols, 3.6 * nrows), squeeze=False)
    for ax, (name, ylabel, keys, log) in zip(axes.flat, groups, strict=False):
        for key, label in keys:
            xs, ys = series(rows, key)
            if xs:
                # Eval points are sparse: mark them.
                ax.plot(xs, ys, "o-" if len(xs) < len(rows) / 2 else "-", label=label, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log and all(y > 0 for key, _ in keys for y in series(rows, key)[1]):
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
            ax.yaxis.set_minor_formatter(matplotlib.ticker.ScalarFormatter())
        ax.grid(alpha=0.3)
        ax.legend()
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    fig.suptitle(f"{title}: {len(rows)} steps, last {int(rows[-1]['step'])}")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return [g[0] for g in groups]


@command
def run(args: argparse.Namespace) -> int:
    name, path = metrics_path(args)
    rows = read_rows(path)
    out = Path(args.output or f"{name}-curves.png")
    drawn = draw(name, rows, out)
    print(f"wrote {out} ({', '.join(drawn)}; {len(rows)} steps from {path})")
    return 0
