"""`whetstone wait TYPE/NAME --for=condition=Succeeded`: block until a condition holds (or a phase is
reached, or the resource is deleted), as `kubectl wait` does. One difference: waiting on a FineTuneJob for
any condition other than Failed stops, with exit code 1, as soon as the job has failed, since a failed job
never changes again."""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any

from . import output
from .kube import (
    FINETUNEJOB,
    CliError,
    Cluster,
    Json,
    Kind,
    add_cluster_arguments,
    command,
    condition,
    parse_refs,
)

POLL_SECONDS = 1.0
TERMINAL = ("Succeeded", "Failed")
_DURATION = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$")


def register(sub: Any) -> None:
    p = sub.add_parser("wait", help="wait for a condition, a phase or deletion")
    p.add_argument("resource", nargs="+", help="TYPE/NAME..., TYPE NAME..., or FineTuneJob NAMEs")
    p.add_argument(
        "--for",
        dest="wait_for",
        required=True,
        help="condition=TYPE[=True|False], phase=PHASE, or delete",
    )
    p.add_argument("--timeout", default="30s", help="give up after this long: 90s, 10m, 1h30m (default 30s)")
    add_cluster_arguments(p)
    p.set_defaults(func=run)


def duration(text: str) -> float:
    m = _DURATION.match(text.strip())
    if not text.strip() or m is None:
        raise CliError(f"--timeout {text!r}: expected a duration such as 90s, 10m or 1h30m")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in m.groups())
    return hours * 3600 + minutes * 60 + seconds


def parse_for(text: str) -> tuple[str, str, str]:
    """('condition', TYPE, STATUS) | ('phase', PHASE, '') | ('delete', '', '')"""
    if text == "delete":
        return "delete", "", ""
    what, _, rest = text.partition("=")
    if what == "condition" and rest:
        ctype, _, status = rest.partition("=")
        status = status or "True"
        if status not in ("True", "False", "Unknown"):
            raise CliError(f"--for {text!r}: the status must be True, False or Unknown")
        return "condition", ctype, status
    if what == "phase" and rest:
        return "phase", rest, ""
    raise CliError(f"--for {text!r}: expected condition=TYPE[=STATUS], phase=PHASE or delete")


def met(kind: Kind, obj: Json | None, how: tuple[str, str, str]) -> bool:
    """Whether the wait is over; raises CliError when it never will be (a failed job)."""
    what, target, status = how
    if what == "delete":
        return obj is None
    if obj is None:
        raise CliError(f"{kind.kind} was deleted while waiting")
    observed = obj.get("status") or {}
    if what == "phase":
        done = observed.get("phase") == target
    else:
        c = condition(obj, target)
        done = c is not None and c.get("status") == status
    if not done and kind is FINETUNEJOB and observed.get("phase") in TERMINAL:
        # A finished job never changes again: say so now rather than at the timeout.
        name = f"{kind.kind.lower()}/{obj['metadata']['name']}"
        failed = condition(obj, "Failed")
        if failed and failed.get("status") == "True":
            raise CliError(f"{name} failed: {failed.get('message') or failed.get('reason')}")
        raise CliError(f"{name} already {observed['phase']}; it will not reach {target} any more")
    return done


@command
def run(args: argparse.Namespace) -> int:
    kind, names = parse_refs(args.resource, FINETUNEJOB)
    if not names:
        raise CliError("name what to wait for: TYPE/NAME")
    how = parse_for(args.wait_for)
    deadline = time.monotonic() + duration(args.timeout)
    cluster = Cluster(args)
    pending = list(names)
    while pending:
        for name in list(pending):
            try:
                obj = cluster.get(kind, name)
            except CliError:
                if how[0] != "delete":
                    raise
                obj = None
            if met(kind, obj, how):
                verb = "deleted" if how[0] == "delete" else "condition met"
                output.console().print(f"{kind.kind.lower()}.whetstone.dev/{name} {verb}", highlight=False)
                pending.remove(name)
        if pending and time.monotonic() > deadline:
            print(f"error: timed out waiting for {args.wait_for} on {', '.join(pending)}", file=sys.stderr)
            return 1
        if pending:
            time.sleep(POLL_SECONDS)
    return 0
