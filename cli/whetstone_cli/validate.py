"""`whetstone validate FILE.yaml...`: every problem of every resource, with file, line and field."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from whetstone_api import FineTuneJob
from whetstone_api.manifests import ManifestError, load_documents, parse_resource
from whetstone_api.rewardgrader import RewardGrader, RewardGraderSpec


def register(sub: Any) -> None:
    p = sub.add_parser("validate", help="check manifests and their datasets before any training")
    p.add_argument("files", nargs="+")
    p.add_argument(
        "--schema-only", action="store_true", help="check the resource only, not its data or model"
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    failed = False
    for file in args.files:
        path = Path(file)
        try:
            docs = load_documents(path)
        except ManifestError as e:
            print(e, file=sys.stderr)
            failed = True
            continue
        resources = []
        for doc, where in docs:
            try:
                resources.append(parse_resource(doc, where, path))
            except ManifestError as e:
                print(e, file=sys.stderr)
                failed = True
        # The file's RewardGraders are checked against its jobs' datasets too.
        graders = {r.metadata.name: r.spec for r in resources if isinstance(r, RewardGrader)}
        for resource in resources:
            problems = [] if args.schema_only else _preflight(resource, path, graders)
            name = f"{resource.kind}/{resource.metadata.name}"
            if problems:
                failed = True
                print(f"{path}: {name}: {len(problems)} problem(s):", file=sys.stderr)
                for p in problems:
                    print(f"  {p}", file=sys.stderr)
            else:
                print(f"{path}: {name} is valid")
    return 1 if failed else 0


def _preflight(resource: Any, path: Path, graders: dict[str, RewardGraderSpec]) -> list[str]:
    if isinstance(resource, RewardGrader):
        from whetstone_graders.graders import spec_problems

        return spec_problems(resource.spec)
    if not isinstance(resource, FineTuneJob):
        return []
    try:
        from whetstone_trainer.preflight import preflight
    except ImportError as e:  # the operator image has no trainer dependencies
        print(f"{path}: schema valid; dataset checks need the trainer extra ({e})", file=sys.stderr)
        return []
    return preflight(resource.spec, path.resolve().parent, graders=graders)
