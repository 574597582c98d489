"""`whetstone delete TYPE NAME...`: delete Whetstone resources as kubectl does. A FineTuneJob's pods,
Service and ConfigMap go with it (owner references); its Checkpoint resources too, while the checkpoint files
stay in storage."""

from __future__ import annotations

import argparse
import time
from typing import Any

from . import output
from .kube import FINETUNEJOB, CliError, Cluster, add_cluster_arguments, command, parse_refs


def register(sub: Any) -> None:
    p = sub.add_parser("delete", help="delete Whetstone resources")
    p.add_argument("resource", nargs="+", help="TYPE NAME..., TYPE/NAME..., or FineTuneJob NAMEs")
    p.add_argument("--all", action="store_true", help="every resource of the type in the namespace")
    p.add_argument("-l", "--selector", help="label selector (with --all)")
    p.add_argument("--wait", action="store_true", help="return once they are gone (finalizers done)")
    p.add_argument("--timeout", type=float, default=120, help="seconds --wait waits (default 120)")
    add_cluster_arguments(p)
    p.set_defaults(func=run)


@command
def run(args: argparse.Namespace) -> int:
    kind, names = parse_refs(args.resource, FINETUNEJOB)
    cluster = Cluster(args)
    if args.all == bool(names):
        raise CliError("name the resources to delete, or give --all (not both)")
    if args.all:
        names = [o["metadata"]["name"] for o in cluster.list(kind, cluster.namespace, args.selector)]
        if not names:
            output.console(stderr=True).print(f"No {kind.plural} found in namespace {cluster.namespace}.")
            return 0
    for name in names:
        cluster.delete(kind, name, cluster.namespace)
        print(f'{kind.kind.lower()}.whetstone.dev "{name}" deleted')
    if args.wait:
        deadline = time.monotonic() + args.timeout
        for name in names:
            while True:
                try:
                    cluster.get(kind, name)
                except CliError:
                    break
                if time.monotonic() > deadline:
                    raise CliError(f"{kind.kind.lower()}/{name} still exists after {args.timeout:.0f} s")
                time.sleep(0.5)
    return 0
