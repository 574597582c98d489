"""`whetstone describe TYPE NAME`: one resource in full, as kubectl describe shows it, plus what only
Whetstone knows: a job's progress, its Checkpoints and pods, and, while it runs, rank 0's own report
(/status, read through the API server's pod proxy) with its latest rollouts when the trainer reports them."""

from __future__ import annotations

import argparse
import json
from typing import Any

from . import output
from .kube import (
    FINETUNEJOB,
    JOB_LABEL,
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

# Trainer-report keys that may hold recent RFT rollouts (the trainer adds them as optional fields).
ROLLOUT_KEYS = ("latestRollouts", "rollouts", "samples")
SHOWN_ROLLOUTS = 3


def register(sub: Any) -> None:
    types = ", ".join(f"{k.plural} ({k.short})" for k in KINDS)
    p = sub.add_parser("describe", help="show one resource in detail", description=f"Describe {types}.")
    p.add_argument("resource", nargs="+", help="TYPE NAME, TYPE/NAME, or a FineTuneJob's NAME")
    p.add_argument(
        "-o", "--output", choices=("json", "yaml"), help="the same facts as one JSON / YAML document"
    )
    add_cluster_arguments(p)
    p.set_defaults(func=run)


@command
def run(args: argparse.Namespace) -> int:
    kind, names = parse_refs(args.resource, FINETUNEJOB)
    if len(names) != 1:
        raise CliError(f"describe one {kind.kind} at a time: whetstone describe {kind.short} NAME")
    cluster = Cluster(args)
    facts = gather(cluster, kind, names[0])
    if args.output:
        output.dump([facts], args.output, as_list=False)
    else:
        output.print_lines(render(kind, facts))
    return 0


def gather(cluster: Cluster, kind: Kind, name: str) -> Json:
    """Everything describe shows, as data (what -o json prints)."""
    obj = clean(cluster.get(kind, name))
    ns = obj["metadata"]["namespace"]
    facts: Json = {"object": obj, "events": sorted_events(cluster.events(ns, kind.kind, name))}
    if kind.kind == "FineTuneJob":
        selector = f"{JOB_LABEL}={name}"
        facts["pods"] = cluster.pods(ns, selector)
        facts["checkpoints"] = sorted(
            cluster.list(KINDS[1], ns, selector),
            key=lambda c: (c["spec"].get("kind") == "export", c["spec"]["step"]),
        )
        facts["trainer"] = trainer_report(cluster, ns, facts["pods"])
    return facts


def sorted_events(events: list[Json]) -> list[Json]:
    def when(e: Json) -> str:
        return e.get("lastTimestamp") or e.get("eventTime") or e["metadata"].get("creationTimestamp") or ""

    return sorted(events, key=when)


def trainer_report(cluster: Cluster, namespace: str, pods: list[Json]) -> Json | None:
    """Rank 0's /status while it runs: {"report": ...} or {"error": why it could not be read}."""
    rank0 = next(
        (p for p in pods if p["metadata"].get("labels", {}).get("whetstone.dev/node-rank") == "0"), None
    )
    if rank0 is None or (rank0.get("status") or {}).get("phase") != "Running":
        return None
    ports = [
        port["containerPort"]
        for c in rank0["spec"]["containers"]
        for port in c.get("ports") or []
        if port.get("name") == "metrics"
    ]
    if not ports:
        return None
    try:
        body = cluster.pod_proxy_get(namespace, rank0["metadata"]["name"], ports[0], "status")
        return {"pod": rank0["metadata"]["name"], "report": json.loads(body)}
    except Exception as e:  # noqa: BLE001 - the report is a bonus: say why it is missing, keep describing
        reason = getattr(e, "reason", None) or type(e).__name__
        return {"pod": rank0["metadata"]["name"], "error": f"{reason}: {str(e).splitlines()[0][:200]}"}


# --- rendering --------------------------------------------------------------------------------


def render(kind: Kind, facts: Json) -> Any:
    from rich.console import Group
    from rich.padding import Padding
    from rich.text import Text

    obj = facts["object"]
    parts: list[Any] = []

    def lines(items: list[str]) -> None:
        parts.extend(Text.from_markup(line) for line in items)

    def sub_table(
        title: str, headers: list[str], rows: list[list[str]], styled: tuple[str, ...] = ()
    ) -> None:
        lines([output.section(title + ":")])
        if not rows:
            lines(["  <none>"])
            return
        parts.append(Padding(_table(headers, rows, styled), (0, 0, 0, 2)))

    meta, spec, status = obj["metadata"], obj.get("spec") or {}, obj.get("status") or {}
    lines(
        output.fields(
            [
                ("Name", meta["name"]),
                ("Namespace", meta.get("namespace")),
                *_labels(meta),
                ("Created", _when(meta.get("creationTimestamp"))),
                *SUMMARY[kind.kind](spec, status),
            ]
        )
    )
    if kind.kind == "FineTuneJob":
        progress = _progress(status)
        if progress:
            lines([output.section("Progress:"), *output.fields(progress, indent=2)])
    conditions = status.get("conditions") or []
    sub_table(
        "Conditions",
        ["TYPE", "STATUS", "REASON", "AGE", "MESSAGE"],
        [
            [
                c["type"],
                c["status"],
                c.get("reason", ""),
                age(c.get("lastTransitionTime")),
                c.get("message", ""),
            ]
            for c in conditions
        ],
        styled=("STATUS",),
    )
    if kind.kind == "FineTuneJob":
        sub_table(
            "Checkpoints",
            ["NAME", "STEP", "KIND", "PHASE", "METRICS"],
            [
                [
                    c["metadata"]["name"],
                    str(c["spec"]["step"]),
                    c["spec"].get("kind", ""),
                    (c.get("status") or {}).get("phase", ""),
                    ", ".join(f"{k}={output.number(v)}" for k, v in (c["spec"].get("metrics") or {}).items()),
                ]
                for c in facts["checkpoints"]
            ],
            styled=("PHASE",),
        )
        sub_table(
            "Pods",
            ["NAME", "PHASE", "NODE", "IP", "ATTEMPT"],
            [
                [
                    p["metadata"]["name"],
                    (p.get("status") or {}).get("phase", ""),
                    p["spec"].get("nodeName") or "<unscheduled>",
                    (p.get("status") or {}).get("podIP") or "",
                    p["metadata"].get("labels", {}).get("whetstone.dev/attempt", ""),
                ]
                for p in sorted(facts["pods"], key=lambda p: p["metadata"]["name"])
            ],
            styled=("PHASE",),
        )
        trainer = facts.get("trainer")
        if trainer is not None:
            lines([output.section(f"Trainer report (/status of {trainer['pod']}):")])
            if "error" in trainer:
                lines([f"  not reachable: {trainer['error']}"])
            else:
                lines(output.fields(_report(trainer["report"]), indent=2))
                rollouts = _rollouts(trainer["report"])
                if rollouts:
                    sub_table("Latest rollouts", ["REWARD", "PROMPT", "ANSWER"], rollouts)
    sub_table(
        "Events",
        ["TYPE", "REASON", "AGE", "FROM", "MESSAGE"],
        [
            [
                e.get("type", ""),
                e.get("reason", ""),
                age(e.get("lastTimestamp") or e.get("eventTime") or e["metadata"].get("creationTimestamp")),
                (e.get("source") or {}).get("component") or e.get("reportingComponent") or "",
                e.get("message", ""),
            ]
            for e in facts["events"]
        ],
        styled=("TYPE",),
    )
    return Group(*parts)


def _table(headers: list[str], rows: list[list[str]], styled: tuple[str, ...]) -> Any:
    from rich.markup import escape
    from rich.table import Table

    t = Table(box=None, pad_edge=False, show_edge=False, header_style="bold", padding=(0, 3, 0, 0))
    for h in headers:
        t.add_column(h, no_wrap=h != "MESSAGE" and h != "ANSWER" and h != "PROMPT", overflow="fold")
    for row in rows:
        t.add_row(
            *(output.styled(v) if h in styled else escape(v) for h, v in zip(headers, row, strict=True))
        )
    return t


def _labels(meta: Json) -> list[tuple[str, str | None]]:
    labels = meta.get("labels") or {}
    return [("Labels", ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or None)]


def _when(timestamp: str | None) -> str | None:
    return f"{timestamp} ({age(timestamp)} ago)" if timestamp else None


def _job_summary(spec: Json, status: Json) -> list[tuple[str, str | None]]:
    tuning = "LoRA rank {rank}".format(**spec["lora"]) if spec.get("lora") else "full parameter"
    method = spec.get("method", "")
    extra = spec.get(method) or {}
    if method == "rft" and extra.get("graders"):
        graders = ", ".join(f"{g['name']}×{g.get('weight', 1)}" for g in extra["graders"])
        tuning += f"; {extra.get('algorithm', 'grpo')} with graders {graders}"
    elif method == "dpo":
        tuning += f"; beta {extra.get('beta', 0.1)}"
    nodes, gpus = spec.get("nodes", 1), spec.get("gpusPerNode", 0)
    latest = status.get("latestCheckpoint") or {}
    return [
        ("Method", f"{method} ({tuning})"),
        ("Base model", (spec.get("baseModel") or {}).get("uri")),
        ("Dataset", (spec.get("dataset") or {}).get("uri")),
        ("Eval dataset", (spec.get("evalDataset") or {}).get("uri")),
        ("Output", status.get("outputUri") or (spec.get("output") or {}).get("uri")),
        ("Nodes", f"{nodes} × {gpus} GPU" + ("s" if gpus != 1 else "")),
        ("Suspend", "true" if spec.get("suspend") else None),
        ("Phase", status.get("phase") or "<not yet seen by the operator>"),
        ("Message", status.get("message")),
        ("Started", _when(status.get("startTime"))),
        ("Completed", _when(status.get("completionTime"))),
        ("Restarts", f"{status.get('restartCount', 0)} (backoffLimit {spec.get('backoffLimit', 3)})"),
        ("Latest checkpoint", f"{latest.get('name')} (step {latest.get('step')})" if latest else None),
    ]


def _progress(status: Json) -> list[tuple[str, str | None]]:
    p = status.get("progress") or {}
    if not p:
        return []
    step, total = p.get("step", 0), p.get("totalSteps")
    eta = p.get("etaSeconds")
    return [
        ("Step", f"{step}/{total} ({100 * step // total}%)" if total else str(step)),
        ("Epoch", output.number(p.get("epoch")) if p.get("epoch") is not None else None),
        ("Loss", output.number(p.get("loss")) if p.get("loss") is not None else None),
        ("Eval loss", output.number(p.get("evalLoss")) if p.get("evalLoss") is not None else None),
        ("Reward", output.number(p.get("reward")) if p.get("reward") is not None else None),
        ("Tokens/s", output.number(p.get("tokensPerSecond"), 5) if p.get("tokensPerSecond") else None),
        ("ETA", f"{eta // 60}m{eta % 60:02d}s" if isinstance(eta, int) and eta > 0 else None),
        ("Updated", _when(p.get("lastUpdateTime"))),
    ]


def _report(report: Json) -> list[tuple[str, str | None]]:
    checkpoints = report.get("checkpoints") or []
    return [
        ("Phase", report.get("phase")),
        ("Step", f"{report.get('step')}/{report.get('totalSteps')}"),
        ("Loss", output.number(report.get("loss")) if report.get("loss") is not None else None),
        ("Reward", output.number(report.get("reward")) if report.get("reward") is not None else None),
        ("World size", str(report.get("worldSize")) if report.get("worldSize") else None),
        ("Checkpoints kept", ", ".join(str(c.get("step")) for c in checkpoints) or None),
        ("Message", report.get("message")),
    ]


def _rollouts(report: Json) -> list[list[str]]:
    for key in ROLLOUT_KEYS:
        items = report.get(key)
        if isinstance(items, list) and items:
            rows = []
            for item in items[-SHOWN_ROLLOUTS:]:
                if not isinstance(item, dict):
                    continue
                reward = item.get("reward", item.get("score"))
                rows.append(
                    [
                        output.number(reward) if isinstance(reward, int | float) else "-",
                        _short(item.get("prompt")),
                        _short(item.get("completion", item.get("output_text", item.get("answer")))),
                    ]
                )
            return rows
    return []


def _short(value: Any, limit: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if value is not None else ""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _checkpoint_summary(spec: Json, status: Json) -> list[tuple[str, str | None]]:
    source = spec.get("source") or {}
    return [
        ("Source", f"{source.get('kind')}/{source.get('name')}"),
        ("Step", str(spec.get("step"))),
        ("Kind", spec.get("kind")),
        ("URI", spec.get("uri")),
        ("Base model", spec.get("baseModel")),
        ("LoRA", "yes" if spec.get("lora") else "no"),
        (
            "Metrics",
            ", ".join(f"{k}={output.number(v)}" for k, v in (spec.get("metrics") or {}).items()) or None,
        ),
        ("Phase", status.get("phase") or "<not yet recorded>"),
        ("Saved", _when(status.get("createdTime"))),
    ]


def _grader_summary(spec: Json, status: Json) -> list[tuple[str, str | None]]:
    from .get import _grader_type

    kind = _grader_type(spec)
    body = spec.get(kind) or {}
    detail = {
        "stringCheck": lambda: f"{body.get('operation', 'eq')} {body.get('reference')!r}",
        "regex": lambda: repr(body.get("pattern")),
        "similarity": lambda: f"{body.get('metric', 'fuzzy_match')} to {body.get('reference')!r}",
        "python": lambda: f"{len((body.get('source') or '').splitlines())} lines of Python",
        "http": lambda: body.get("url"),
        "modelJudge": lambda: f"{body.get('model')} at {body.get('endpoint')}",
        "weighted": lambda: ", ".join(f"{k}×{v}" for k, v in (body.get("graders") or {}).items()),
    }.get(kind, lambda: None)()
    cases = len(spec.get("testCases") or [])
    passed = status.get("testCasesPassed")
    return [
        ("Type", f"{kind}: {detail}" if detail else kind),
        ("On error", spec.get("onError", "zero")),
        ("Test cases", f"{passed if passed is not None else '?'} of {cases} pass"),
        ("Phase", status.get("phase") or "<not yet tested>"),
        ("Message", status.get("message")),
    ]


def _session_summary(spec: Json, status: Json) -> list[tuple[str, str | None]]:
    return [
        ("Base model", (spec.get("baseModel") or {}).get("uri")),
        ("LoRA", "rank {rank}".format(**spec["lora"]) if spec.get("lora") else "full parameter allowed"),
        ("GPUs", str(spec.get("gpus", 0))),
        ("Suspend", "true" if spec.get("suspend") else None),
        ("Phase", status.get("phase") or "<not yet seen by the operator>"),
        ("Endpoint", status.get("endpoint")),
        ("Clients", str(status["trainingClients"]) if status.get("trainingClients") is not None else None),
        ("Last request", _when(status.get("lastRequestTime"))),
    ]


SUMMARY = {
    "FineTuneJob": _job_summary,
    "Checkpoint": _checkpoint_summary,
    "RewardGrader": _grader_summary,
    "TrainingSession": _session_summary,
}
