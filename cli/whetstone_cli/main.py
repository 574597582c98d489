"""The `whetstone` command.

whetstone validate FILE.yaml...        check resources and their datasets; exit 1 on any problem
whetstone run FILE.yaml [--output DIR] run a FineTuneJob here, no cluster
whetstone models NAME --output DIR     write a bundled model as an ordinary HF folder
whetstone grader test FILE.yaml...     run the testCases of the RewardGraders in the files
whetstone crds [DIR]                   regenerate the CustomResourceDefinitions
whetstone operator [--port N] [-n NS]  run the operator against the current kubeconfig
whetstone serve --base-model URI       the Tinker-compatible training service, here

On a cluster (kubectl's habits: -n, -A, -o json|yaml, --kubeconfig, --context):
whetstone get ftj|ckpt|rg|ts [NAME]    list resources (-w to follow changes)
whetstone describe ftj NAME            conditions, events, progress, checkpoints, pods, rank 0's report
whetstone logs JOB [-f]                the rank-0 trainer's log, following the job across restarts
whetstone wait ftj/NAME --for=condition=Succeeded [--timeout 1h]
whetstone delete ftj NAME...           delete resources
whetstone create -f FILE [--dry-run]   validate and create, or print resolved with defaults
whetstone plot JOB|DIR [-o FILE.png]   loss / reward curves from the trainer's metrics.jsonl
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

# The modules of the subcommands, in --help's order; each has register(sub) adding its parser.
SUBCOMMANDS = (
    "validate",
    "run",
    "models",
    "crds",
    "operator",
    "grader",
    "serve",
    "get",
    "describe",
    "logs",
    "wait",
    "delete",
    "create",
    "plot",
)


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"{__package__}.{name}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole parser, or with `only` the parser of that one subcommand: each subcommand imports what it
    needs (the API models, the Kubernetes client, the operator), and the operator's start-up should not pay
    for the others' imports."""
    parser = argparse.ArgumentParser(prog="whetstone", description="Fine-tuning of LLMs on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in (only,) if only in SUBCOMMANDS else SUBCOMMANDS:
        _module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # A first argument naming a subcommand is argparse's own choice of subparser (an option never is).
    args = build_parser(argv[0] if argv else None).parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
