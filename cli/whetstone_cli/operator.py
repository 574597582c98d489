"""`whetstone operator`: run the operator against the current kubeconfig (or in-cluster config)."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: Any) -> None:
    p = sub.add_parser("operator", help="run the operator (kopf) against the current kubeconfig")
    try:
        from whetstone_operator.operator_main import add_arguments
    except ImportError as e:  # the trainer image has no kopf: say so when the command is used
        missing = str(e)
        p.set_defaults(func=lambda _args: _missing(missing))
        return
    add_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from whetstone_operator.operator_main import main

    return main(args)


def _missing(why: str) -> int:
    print(f"whetstone operator needs the operator extra (pip install 'whetstone[operator]'): {why}")
    return 1
