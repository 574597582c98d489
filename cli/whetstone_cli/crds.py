"""`whetstone crds [DIR]`: regenerate the CustomResourceDefinitions from the API models."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("crds", help="regenerate the CustomResourceDefinitions")
    p.add_argument("folder", nargs="?", default="crds")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from whetstone_api.crd import write_all

    for p in write_all(Path(args.folder)):
        print(p)
    return 0
