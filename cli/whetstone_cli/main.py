"""The `whetstone` command.

whetstone validate FILE.yaml...        check resources and their datasets; exit 1 on any problem
whetstone run FILE.yaml [--output DIR] run a FineTuneJob here, no cluster
whetstone models NAME --output DIR     write a bundled model as an ordinary HF folder
whetstone grader test FILE.yaml...     run the testCases of the RewardGraders in the files
whetstone crds [DIR]                   regenerate the CustomResourceDefinitions
whetstone operator [--port N] [-n NS]  run the operator against the current kubeconfig
whetstone serve --base-model URI       the Tinker-compatible training service, here
"""

from __future__ import annotations

import argparse
import sys

from . import crds, grader, models, operator, run, serve, validate

SUBCOMMANDS = (validate, run, models, crds, operator, grader, serve)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whetstone", description="Fine-tuning of LLMs on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)
    for module in SUBCOMMANDS:
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
