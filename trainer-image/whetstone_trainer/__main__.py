"""The trainer's entry point in a pod: `torchrun ... -m whetstone_trainer train JOB.yaml --output DIR`.

JOB.yaml is the FineTuneJob as the operator renders it into the ConfigMap (the same schema `kubectl apply`
took). Every rank validates and trains; rank 0 writes checkpoints and the output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m whetstone_trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) the FineTuneJob in FILE")
    p.add_argument("file")
    p.add_argument("--output", help="output folder (default: the job's spec.output.uri)")
    args = parser.parse_args(argv)

    from whetstone_operator.api import FineTuneJob
    from whetstone_operator.manifests import ManifestError, load_resource

    from .datasets import DatasetError
    from .preflight import preflight
    from .sft import train_sft
    from .storage import resolve_uri

    path = Path(args.file)
    try:
        job = load_resource(path)
    except ManifestError as e:
        print(e, file=sys.stderr)
        return 2
    if not isinstance(job, FineTuneJob) or job.spec.method != "sft":
        print(f"{path}: this trainer runs FineTuneJobs with method sft", file=sys.stderr)
        return 2
    base_dir = path.resolve().parent
    problems = preflight(job.spec, base_dir)
    if problems:
        print(f"{path}: pre-flight found {len(problems)} problem(s):\n" + "\n".join(problems), file=sys.stderr)
        return 2
    output = Path(args.output) if args.output else resolve_uri(job.spec.output.uri, base_dir, "spec.output.uri")
    try:
        train_sft(job.spec, output, base_dir)
    except DatasetError as e:
        print(e, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
