"""`whetstone create -f FILE`: validate every Whetstone resource in the files with the same models as the
API server and the trainer (all or nothing: one bad document creates nothing), then create them.
--dry-run prints each resource as resolved, every default filled in, without creating it
(--dry-run=server asks the API server too: its schema, CEL rules and admission)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from . import output
from .kube import CliError, Cluster, add_cluster_arguments, command, kind_of


def register(sub: Any) -> None:
    p = sub.add_parser("create", help="create resources from files, or print them resolved (--dry-run)")
    p.add_argument(
        "-f", "--filename", action="append", required=True, help="YAML file (repeatable; - is stdin)"
    )
    p.add_argument(
        "--dry-run",
        nargs="?",
        const="client",
        choices=("none", "client", "server"),
        default="none",
        help="client (the default of a bare --dry-run): print, contact no cluster; server: the API server "
        "validates and returns what it would store",
    )
    p.add_argument("-o", "--output", choices=("yaml", "json", "name"), help="print the resources this way")
    add_cluster_arguments(p)
    p.set_defaults(func=run)


def resolve(paths: list[str]) -> list[dict[str, Any]]:
    """The resources of the files, validated and with defaults filled in (camelCase, as stored)."""
    from whetstone_api.manifests import ManifestError, load_documents, parse_resource

    resolved, problems = [], []
    for name in paths:
        path = Path(name)
        if name == "-":
            import tempfile

            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as tmp:
                tmp.write(sys.stdin.read())
            path = Path(tmp.name)
        try:
            for doc, node in load_documents(path):
                body = parse_resource(doc, node, path).to_wire()
                meta = body["metadata"]
                for key in ("labels", "annotations"):  # the model's empty defaults say nothing
                    if not meta.get(key):
                        meta.pop(key, None)
                resolved.append(body)
        except ManifestError as e:
            problems.append(str(e))
        finally:
            if name == "-":
                path.unlink(missing_ok=True)
    if problems:
        raise CliError("nothing created:\n" + "\n".join(problems))
    return resolved


@command
def run(args: argparse.Namespace) -> int:
    resources = resolve(args.filename)
    if args.dry_run == "client":
        _print(resources, args.output or "yaml", suffix=" (dry run)")
        return 0
    cluster = Cluster(args)
    created = []
    for body in resources:
        namespace = body["metadata"].get("namespace") or cluster.namespace
        if args.namespace and body["metadata"].get("namespace") not in (None, args.namespace):
            raise CliError(
                f"{body['kind']}/{body['metadata']['name']} names namespace {body['metadata']['namespace']}, "
                f"not {args.namespace}"
            )
        created.append(cluster.create(body, namespace, dry_run=args.dry_run == "server"))
    _print(created, args.output, suffix=" (server dry run)" if args.dry_run == "server" else "")
    return 0


def _print(objects: list[dict[str, Any]], fmt: str | None, suffix: str) -> None:
    if fmt in ("yaml", "json"):
        for obj in objects:
            (obj.get("metadata") or {}).pop("managedFields", None)
        if fmt == "yaml":
            import yaml

            sys.stdout.write(yaml.safe_dump_all(objects, sort_keys=False))
        else:
            output.dump(objects, "json", as_list=len(objects) > 1)
        return
    for obj in objects:
        kind = kind_of(obj["kind"])
        verb = "" if fmt == "name" else " created" + suffix
        print(f"{kind.kind.lower()}.whetstone.dev/{obj['metadata']['name']}{verb}")
