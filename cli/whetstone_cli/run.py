"""`whetstone run FILE.yaml`: a FineTuneJob on this machine, no cluster."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from whetstone_api.manifests import ManifestError


def register(sub: Any) -> None:
    p = sub.add_parser("run", help="run a FineTuneJob on this machine")
    p.add_argument(
        "file", help="the FineTuneJob, followed by the RewardGraders an RFT job names (multi-document)"
    )
    p.add_argument("--output", help="output folder (default: the manifest's spec.output.uri)")
    p.add_argument("--samples", type=int, default=5, help="before/after samples to print")
    p.add_argument(
        "--graders",
        action="append",
        default=[],
        metavar="FILE",
        help="more RewardGrader documents (repeatable)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from whetstone_trainer.entry import JobRefused, permanent_errors
    from whetstone_trainer.local_run import run_job

    try:
        run_job(
            Path(args.file),
            Path(args.output) if args.output else None,
            samples=args.samples,
            grader_files=[Path(g) for g in args.graders],
        )
    except (ManifestError, JobRefused, *permanent_errors()) as e:
        print(e, file=sys.stderr)
        return 1
    return 0
