"""The trainer's entry point in a pod: `torchrun ... -m whetstone_trainer train JOB.yaml --output DIR`.

JOB.yaml is the FineTuneJob as the operator renders it into the ConfigMap (the same schema `kubectl apply`
took). Every rank validates and trains; rank 0 writes checkpoints and the output.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from whetstone_api.wire import ENV_TERMINATION_LOG, termination_message


def _stop(error: str) -> int:
    """A permanent error (retrying cannot fix it): said on stderr and, in a pod, in the container's
    termination message, marked permanent, so the operator fails the job at once with this text even though
    torchrun turns the exit code into 1."""
    print(error, file=sys.stderr)
    path = os.environ.get(ENV_TERMINATION_LOG)
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(termination_message(error, permanent=True))
    return 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m whetstone_trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) the FineTuneJob in FILE")
    p.add_argument("file")
    p.add_argument("--output", help="output folder (default: the job's spec.output.uri)")
    p.add_argument(
        "--status-port",
        type=int,
        default=int(os.environ.get("WHETSTONE_STATUS_PORT", "8080")),
        help="port of /healthz, /metrics and /status on each pod's first process (-1: none)",
    )
    args = parser.parse_args(argv)

    from whetstone_api import FineTuneJob
    from whetstone_api.manifests import ManifestError, load_resource

    from .data.formats import DatasetError
    from .methods.sft import train_sft
    from .preflight import preflight
    from .status_server import TrainerStatus, serve
    from .storage import resolve_uri

    path = Path(args.file)
    try:
        job = load_resource(path)
    except ManifestError as e:
        return _stop(str(e))
    if not isinstance(job, FineTuneJob) or job.spec.method != "sft":
        return _stop(f"{path}: this trainer runs FineTuneJobs with method sft")
    base_dir = path.resolve().parent
    problems = preflight(job.spec, base_dir)
    if problems:
        return _stop(f"{path}: pre-flight found {len(problems)} problem(s):\n" + "\n".join(problems))
    output = (
        Path(args.output) if args.output else resolve_uri(job.spec.output.uri, base_dir, "spec.output.uri")
    )
    status = TrainerStatus(
        job.metadata.name, output, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    )
    if args.status_port >= 0 and os.environ.get("LOCAL_RANK", "0") == "0":
        server = serve(status, args.status_port)
        print(f"{job.metadata.name}: status on port {server.server_address[1]}", flush=True)
    try:
        train_sft(job.spec, output, base_dir, observer=status)
    except DatasetError as e:
        status.fail(str(e))
        return _stop(str(e))
    return 0


if __name__ == "__main__":
    sys.exit(main())
