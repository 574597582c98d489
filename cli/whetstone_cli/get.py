"""`whetstone get TYPE [NAME...]`: list FineTuneJobs, Checkpoints, RewardGraders and TrainingSessions as
kubectl does (a table; -o wide, json, yaml or name; -w to follow changes)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from whetstone_api import API_GROUP

from . import output
from .kube import (
    FINETUNEJOB,
    KINDS,
    CliError,
    Cluster,
    Json,
    Kind,
    add_cluster_arguments,
    age,
    command,
    parse_refs,
)
from .kube import strip_managed_fields as clean

Row = Callable[[Json, bool], list[str]]


def register(sub: Any) -> None:
    types = ", ".join(f"{k.plural} ({k.short})" for k in KINDS)
    p = sub.add_parser("get", help="list Whetstone resources", description=f"List {types}.")
    p.add_argument("resource", nargs="+", help="TYPE [NAME...] or TYPE/NAME...")
    p.add_argument("-o", "--output", choices=output.OUTPUT_FORMATS, help="json, yaml, name or wide")
    p.add_argument("-l", "--selector", help="label selector, e.g. whetstone.dev/job=my-job")
    p.add_argument("-w", "--watch", action="store_true", help="after the list, print each change")
    add_cluster_arguments(p, all_namespaces=True)
    p.set_defaults(func=run)


def _job_row(obj: Json, wide: bool) -> list[str]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    progress = status.get("progress") or {}
    steps = progress.get("steps") or (
        f"{progress.get('step', 0)}/{progress['totalSteps']}" if progress.get("totalSteps") else ""
    )
    row = [
        status.get("phase") or "",
        spec.get("method", ""),
        (spec.get("baseModel") or {}).get("uri", ""),
        steps,
        output.number(progress.get("loss")) if progress.get("loss") is not None else "",
        output.number(progress.get("reward")) if progress.get("reward") is not None else "",
    ]
    if wide:
        latest = status.get("latestCheckpoint") or {}
        eta = progress.get("etaSeconds")
        row += [
            f"{spec.get('nodes', 1)}x{spec.get('gpusPerNode', 0)}",
            str(status.get("restartCount", 0)),
            f"{eta // 60}m{eta % 60:02d}s"
            if isinstance(eta, int) and status.get("phase") == "Running"
            else "",
            latest.get("name") or "",
        ]
    return row


def _checkpoint_row(obj: Json, wide: bool) -> list[str]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    row = [
        (spec.get("source") or {}).get("name", ""),
        str(spec.get("step", "")),
        spec.get("kind", ""),
        status.get("phase") or "",
    ]
    return row + ([spec.get("uri", "")] if wide else [])


def _grader_type(spec: Json) -> str:
    for t in ("stringCheck", "regex", "similarity", "python", "http", "modelJudge", "weighted"):
        if t in spec:
            return t
    return ""


def _grader_row(obj: Json, wide: bool) -> list[str]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    cases = len(spec.get("testCases") or [])
    passed = status.get("testCasesPassed")
    row = [_grader_type(spec), status.get("phase") or "", f"{passed if passed is not None else '-'}/{cases}"]
    return row + ([status.get("message") or ""] if wide else [])


def _session_row(obj: Json, wide: bool) -> list[str]:
    spec, status = obj.get("spec") or {}, obj.get("status") or {}
    row = [
        status.get("phase") or "",
        (spec.get("baseModel") or {}).get("uri", ""),
        status.get("endpoint") or "",
    ]
    return row + ([str(spec.get("gpus", 0)), str(status.get("trainingClients", ""))] if wide else [])


# Columns between NAME and AGE, and the extra ones of -o wide.
COLUMNS: dict[str, tuple[list[str], list[str], Row]] = {
    "FineTuneJob": (
        ["PHASE", "METHOD", "MODEL", "STEPS", "LOSS", "REWARD"],
        ["NODESxGPUS", "RESTARTS", "ETA", "CHECKPOINT"],
        _job_row,
    ),
    "Checkpoint": (["SOURCE", "STEP", "KIND", "PHASE"], ["URI"], _checkpoint_row),
    "RewardGrader": (["TYPE", "PHASE", "TESTS"], ["MESSAGE"], _grader_row),
    "TrainingSession": (["PHASE", "MODEL", "ENDPOINT"], ["GPUS", "CLIENTS"], _session_row),
}


def rows_for(
    kind: Kind, objects: list[Json], wide: bool, all_namespaces: bool
) -> tuple[list[str], list[list[str]]]:
    middle, extra, row = COLUMNS[kind.kind]
    headers = (["NAMESPACE"] if all_namespaces else []) + ["NAME", *middle, "AGE", *(extra if wide else [])]
    rows = []
    for obj in objects:
        meta = obj["metadata"]
        cells = row(obj, wide)
        base, more = cells[: len(middle)], cells[len(middle) :]
        rows.append(
            ([meta.get("namespace", "")] if all_namespaces else [])
            + [meta["name"], *base, age(meta.get("creationTimestamp")), *more]
        )
    return headers, rows


def print_objects(
    kind: Kind, objects: list[Json], fmt: str | None, all_namespaces: bool, as_list: bool, header: bool = True
) -> None:
    if fmt in ("json", "yaml"):
        output.dump([clean(o) for o in objects], fmt, as_list)
    elif fmt == "name":
        for obj in objects:
            print(f"{kind.kind.lower()}.{API_GROUP}/{obj['metadata']['name']}")
    else:
        headers, rows = rows_for(kind, objects, fmt == "wide", all_namespaces)
        output.table(headers, rows, styled_columns=("PHASE",), header=header)


@command
def run(args: argparse.Namespace) -> int:
    kind, names = parse_refs(args.resource, FINETUNEJOB if len(args.resource) > 1 else None)
    cluster = Cluster(args)
    namespace = None if args.all_namespaces else cluster.namespace
    if names:
        if args.all_namespaces:
            raise CliError("a resource cannot be named with --all-namespaces")
        objects = [cluster.get(kind, n) for n in names]
    else:
        objects = sorted(
            cluster.list(kind, namespace, args.selector),
            key=lambda o: (o["metadata"].get("namespace", ""), o["metadata"]["name"]),
        )
    if objects or args.output in ("json", "yaml"):
        print_objects(kind, objects, args.output, args.all_namespaces, as_list=not names or len(names) > 1)
    elif not args.watch:
        where = "any namespace" if args.all_namespaces else f"namespace {cluster.namespace}"
        output.console(stderr=True).print(f"No {kind.plural} found in {where}.")
    if args.watch:
        wanted = set(names)
        # From the list's version on: each change once, as a row without the header (kubectl get -w).
        for event, obj in cluster.watch(kind, namespace, resource_version=cluster.last_resource_version):
            if event == "ERROR" or (wanted and obj["metadata"]["name"] not in wanted):
                continue
            print_objects(kind, [obj], args.output, args.all_namespaces, as_list=False, header=not objects)
            objects = objects or [obj]
    return 0
