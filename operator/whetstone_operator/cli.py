"""The `whetstone` command.

    whetstone validate FILE.yaml...        check resources and their datasets; exit 1 on any problem
    whetstone run FILE.yaml [--output DIR] run a FineTuneJob here, no cluster
    whetstone models tiny|smollm2 --output DIR   write a bundled model as an ordinary HF folder
    whetstone crds [DIR]                   regenerate the CustomResourceDefinitions
    whetstone operator [--port N] [-n NS]  run the FineTuneJob operator against the current kubeconfig

Trainer commands import torch lazily, so the operator image (no torch) can still validate manifests.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .manifests import ManifestError, load_documents, parse_resource


def _validate(args: argparse.Namespace) -> int:
    from .api import FineTuneJob

    failed = False
    for file in args.files:
        path = Path(file)
        try:
            resources = [parse_resource(doc, node, path) for doc, node in load_documents(path)]
        except ManifestError as e:
            print(e, file=sys.stderr)
            failed = True
            continue
        for res in resources:
            problems: list[str] = []
            if isinstance(res, FineTuneJob) and not args.schema_only:
                try:
                    from whetstone_trainer.preflight import preflight
                except ImportError as e:  # the operator image has no trainer dependencies
                    print(
                        f"{path}: schema valid; dataset checks need the trainer extra ({e})", file=sys.stderr
                    )
                    continue
                problems = preflight(res.spec, path.resolve().parent)
            name = f"{res.kind}/{res.metadata.name}"
            if problems:
                failed = True
                print(f"{path}: {name}: {len(problems)} problem(s):", file=sys.stderr)
                for p in problems:
                    print(f"  {p}", file=sys.stderr)
            else:
                print(f"{path}: {name} is valid")
    return 1 if failed else 0


def _run(args: argparse.Namespace) -> int:
    from whetstone_trainer.datasets import DatasetError
    from whetstone_trainer.local_run import PreflightFailed, run_job

    try:
        run_job(Path(args.file), Path(args.output) if args.output else None, samples=args.samples)
    except (ManifestError, PreflightFailed, DatasetError) as e:
        print(e, file=sys.stderr)
        return 1
    return 0


def _models(args: argparse.Namespace) -> int:
    out = Path(args.output)
    if args.name == "smollm2":
        from whetstone_trainer.smollm2 import materialise_smollm2

        materialise_smollm2(out)
    else:
        from whetstone_trainer.tiny_models import build_tiny_model

        build_tiny_model(args.name, out)
    print(out)
    return 0


def _crds(args: argparse.Namespace) -> int:
    from .api.crd import write_all

    for p in write_all(Path(args.folder)):
        print(p)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="whetstone", description="Fine-tuning of LLMs on Kubernetes.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="check manifests and their datasets before any training")
    p.add_argument("files", nargs="+")
    p.add_argument(
        "--schema-only", action="store_true", help="check the resource only, not its data or model"
    )
    p.set_defaults(func=_validate)

    p = sub.add_parser("run", help="run a FineTuneJob on this machine")
    p.add_argument("file")
    p.add_argument("--output", help="output folder (default: the manifest's spec.output.uri)")
    p.add_argument("--samples", type=int, default=5, help="before/after samples to print")
    p.set_defaults(func=_run)

    p = sub.add_parser("models", help="write a bundled model as a Hugging Face folder")
    p.add_argument("name", help="tiny, tiny-1m, tiny-10m, tiny-50m or smollm2")
    p.add_argument("--output", required=True)
    p.set_defaults(func=_models)

    p = sub.add_parser("crds", help="regenerate the CustomResourceDefinitions")
    p.add_argument("folder", nargs="?", default="crds")
    p.set_defaults(func=_crds)

    from .operator_main import add_arguments
    from .operator_main import main as operator_main

    p = sub.add_parser("operator", help="run the operator (kopf) against the current kubeconfig")
    add_arguments(p)
    p.set_defaults(func=operator_main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
