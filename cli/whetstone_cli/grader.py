"""`whetstone grader test FILE.yaml...`: run the testCases of every RewardGrader in the files, here, through
the same code as the operator's Ready check (whetstone_graders.run_test_cases). Weighted graders find their
children among the RewardGraders of the given files. Exit 1 when a case fails, naming the case, the score it
expected and the score it got."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from whetstone_api import RewardGrader
from whetstone_api.manifests import ManifestError, load_documents, parse_resource


def register(sub: Any) -> None:
    p = sub.add_parser("grader", help="work with RewardGraders")
    actions = p.add_subparsers(dest="grader_command", required=True)
    t = actions.add_parser("test", help="run the testCases of the RewardGraders in the files")
    t.add_argument("files", nargs="+", help="YAML files (multi-document); other kinds in them are ignored")
    t.add_argument(
        "--secrets-dir",
        type=Path,
        default=None,
        help="folder with <secret>/<key> files for http and modelJudge graders "
        "(default: $WHETSTONE_GRADER_SECRETS or /var/run/whetstone/grader-secrets)",
    )
    t.set_defaults(func=run_test)


def load_graders(files: list[str]) -> tuple[dict[str, tuple[Path, RewardGrader]], list[str]]:
    """The RewardGraders of the files by name, and every problem found (file, line, field)."""
    graders: dict[str, tuple[Path, RewardGrader]] = {}
    problems = []
    for file in files:
        path = Path(file)
        try:
            for doc, node in load_documents(path):
                if doc.get("kind") != "RewardGrader":
                    continue
                grader = parse_resource(doc, node, path)
                assert isinstance(grader, RewardGrader)
                name = grader.metadata.name
                if name in graders:
                    problems.append(f"{path}: RewardGrader {name} is also defined in {graders[name][0]}")
                graders[name] = (path, grader)
        except ManifestError as e:
            problems.append(str(e))
    return graders, problems


def run_test(args: argparse.Namespace) -> int:
    from whetstone_graders import run_test_cases

    graders, problems = load_graders(args.files)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        return 1
    if not graders:
        print(f"no RewardGrader in {', '.join(args.files)}", file=sys.stderr)
        return 1
    specs = {name: grader.spec for name, (_, grader) in graders.items()}
    failed = []
    for name, (path, grader) in graders.items():
        report = run_test_cases(name, grader.spec, specs, args.secrets_dir)
        print(f"{path}: RewardGrader/{name} ({grader.spec.type}): {report.summary()}")
        for case in report.cases:
            got = "no score" if case.got is None else f"{case.got:g}"
            mark = "ok  " if case.passed else "FAIL"
            detail = f"  [{case.error}: {case.message}]" if case.error else ""
            print(f"  {mark} case {case.index}: expected {case.expected:g}, got {got}{detail}")
        if not report.ok:
            failed.append(f"{path}: RewardGrader/{name}: {report.summary()}")
    for line in failed:
        print(line, file=sys.stderr)
    return 1 if failed else 0
