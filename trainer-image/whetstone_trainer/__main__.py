"""The trainer's entry point in a pod: `torchrun ... -m whetstone_trainer train JOB.yaml --output DIR`.

JOB.yaml is the FineTuneJob as the operator renders it into the ConfigMap (the same schema `kubectl apply`
took), followed by the RewardGraders an RFT job names. Every rank validates and trains; rank 0 writes
checkpoints and the output. Exit code wire.EXIT_PERMANENT: an error retrying cannot fix (bad data, a grader
with onError: fail that failed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from whetstone_api.wire import (
    ENV_POD_IP,
    ENV_STATUS_PORT,
    ENV_TERMINATION_LOG,
    EXIT_PERMANENT,
    STATUS_PORT,
    final_report_message,
    termination_message,
)


def _stop(error: str) -> int:
    """A permanent error (retrying cannot fix it): said on stderr and, in a pod, in the container's
    termination message, marked permanent, so the operator fails the job at once with this text even though
    torchrun turns the exit code into 1."""
    print(error, file=sys.stderr)
    path = os.environ.get(ENV_TERMINATION_LOG)
    if path:
        with contextlib.suppress(OSError):
            Path(path).write_text(termination_message(error, permanent=True))
    return EXIT_PERMANENT


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m whetstone_trainer")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("train", help="train (or resume) the FineTuneJob in FILE")
    p.add_argument("file")
    p.add_argument("--output", help="output folder (default: the job's spec.output.uri)")
    p.add_argument(
        "--status-port",
        type=int,
        default=int(os.environ.get(ENV_STATUS_PORT, str(STATUS_PORT))),
        help="port of /healthz, /metrics and /status on each pod's first process (-1: none)",
    )
    args = parser.parse_args(argv)

    from whetstone_api.manifests import ManifestError

    from .entry import JobRefused, load_job_file, output_folder, permanent_errors, prepare, train
    from .status_server import TrainerStatus, serve

    try:
        job_file = load_job_file(Path(args.file))
        inputs = prepare(job_file)
    except (ManifestError, JobRefused) as e:
        return _stop(str(e))
    output = output_folder(job_file, Path(args.output) if args.output else None)
    status = TrainerStatus(
        inputs.name, output, int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    )
    if args.status_port >= 0 and os.environ.get("LOCAL_RANK", "0") == "0":
        # The pod's own address (the operator reads rank 0's /status there); every address outside a pod.
        server = serve(status, args.status_port, host=os.environ.get(ENV_POD_IP) or "0.0.0.0")
        print(f"{inputs.name}: status on port {server.server_address[1]}", flush=True)
    try:
        train(inputs, output, observer=status)
    except permanent_errors() as e:
        status.fail(str(e))
        return _stop(str(e))
    path = os.environ.get(ENV_TERMINATION_LOG)
    if path and os.environ.get("RANK", "0") == "0":
        with contextlib.suppress(OSError):
            Path(path).write_text(final_report_message(status.report()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
