"""What the trainer's report becomes, as pure functions: status.progress and the Checkpoint resources to
create, delete, orphan (kept by the user) or mark Pruned. The report comes from a pod running the user's
image, so nothing in it is trusted: checkpoint URIs must lie inside the job's output, at most keepLast new
Checkpoints are taken per pass, names another job holds are never touched.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from whetstone_api.uris import is_within, uri_of_pod_path
from whetstone_api.wire import (
    CHECKPOINTS_DIR,
    ReportedCheckpoint,
    TrainerReport,
    checkpoint_folder,
    checkpoint_resource_name,
)

from .views import CheckpointView, parse_time, rfc3339

Json = dict[str, Any]


def progress_from(report: TrainerReport, now: datetime) -> Json:
    """status.progress from the trainer's report (never a NaN: the report has none)."""
    step, total = report.step, report.total_steps
    progress: Json = {
        "step": step,
        "totalSteps": total,
        "steps": f"{step}/{total}" if total is not None else str(step),
        "epoch": report.epoch,
        "loss": report.loss,
        "evalLoss": report.eval_loss,
        "reward": report.reward,
        "tokensPerSecond": report.tokens_per_second,
        "etaSeconds": report.eta_seconds,
        "lastUpdateTime": rfc3339(now),
    }
    return {
        k: v
        for k, v in progress.items()
        if v is not None and not (isinstance(v, float) and not math.isfinite(v))
    }


def progress_due(status: Json, now: datetime, interval: float, progress: Json, finished: bool) -> bool:
    """Write progress only when it changed, and not more often than every `interval` seconds (a finished
    trainer is written at once: it is about to exit)."""
    old = dict(status.get("progress") or {})
    last = parse_time(old.pop("lastUpdateTime", None))
    new = {k: v for k, v in progress.items() if k != "lastUpdateTime"}
    if old == new:
        return False
    if last is None or finished:
        return True
    return (now - last).total_seconds() >= interval


@dataclass
class CheckpointPlan:
    """The Checkpoint resources that follow from one report."""

    create: list[ReportedCheckpoint] = field(default_factory=list)  # uri already in the user's form
    delete: list[str] = field(default_factory=list)
    orphan: list[str] = field(default_factory=list)
    mark_pruned: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # messages, one per refused checkpoint
    latest: Json | None = None


def _ours(job: Json, existing: list[CheckpointView]) -> tuple[dict[str, CheckpointView], set[str]]:
    uid = job["metadata"]["uid"]
    ours = {c.name: c for c in existing if c.job_uid == uid}
    taken = {c.name for c in existing if c.job_uid != uid}
    return ours, taken


def keep_annotated(job: Json, existing: list[CheckpointView]) -> list[str]:
    """Checkpoints of this job a user marked to keep that still carry its ownerReference: orphan them, so
    the garbage collector leaves them when the job is deleted."""
    uid = job["metadata"]["uid"]
    return sorted(c.name for c in existing if c.job_uid == uid and c.keep and c.owner_uid == uid)


def checkpoints_from_report(
    job: Json, report: TrainerReport, existing: list[CheckpointView]
) -> CheckpointPlan:
    """The trainer's list of kept checkpoints is authoritative for this job's resumable Checkpoints: new
    ones are recorded, pruned ones deleted (or marked Pruned when the user keeps them)."""
    meta, spec = job["metadata"], job["spec"]
    name, output = meta["name"], spec["output"]["uri"]
    keep_last = int((spec.get("checkpointing") or {}).get("keepLast", 3))
    out = CheckpointPlan(orphan=keep_annotated(job, existing))
    ours, taken = _ours(job, existing)

    valid: dict[str, ReportedCheckpoint] = {}
    for c in sorted(report.checkpoints, key=lambda c: c.step, reverse=True):
        if c.kind == "export":
            continue  # the result is recorded when the job succeeds, as <job>-final
        uri = uri_of_pod_path(c.uri)
        if not is_within(uri, output):
            out.refused.append(
                f"checkpoint at step {c.step}: {uri!r} is not inside spec.output.uri {output!r}"
            )
            continue
        cname = checkpoint_resource_name(name, c.step)
        if cname in valid:
            continue
        if len(valid) == keep_last:
            break  # more than the trainer keeps: not believed
        valid[cname] = c.model_copy(update={"uri": uri})
    for cname, c in valid.items():
        if cname in taken:
            out.refused.append(f"Checkpoint {cname} exists and belongs to another job of this name")
        elif cname not in ours:
            out.create.append(c)
    for cname, c in sorted(ours.items()):
        if c.kind != "resumable" or cname in valid:
            continue
        if c.keep:
            if c.phase != "Pruned":
                out.mark_pruned.append(cname)
        else:
            out.delete.append(cname)
    if valid:
        newest = max(valid.values(), key=lambda c: c.step)
        out.latest = {
            "name": checkpoint_resource_name(name, newest.step),
            "step": newest.step,
            "uri": newest.uri,
        }
    return out


def checkpoints_kept_at_end(spec: Json, total_steps: int) -> set[int]:
    """The resumable checkpoints the trainer keeps when it finishes: it saves every `everySteps` before the
    last step and keeps the newest `keepLast`. What it pruned after the operator's last read of /status is
    pruned here too, since the finished trainer can no longer say so."""
    ckpt = spec.get("checkpointing") or {}
    every, keep = ckpt.get("everySteps"), int(ckpt.get("keepLast", 3))
    if not every:
        return set()
    saved = list(range(int(every), int(total_steps), int(every)))
    return set(saved[-keep:])


@dataclass
class FinalPlan:
    """On success: the export Checkpoint, the resumable ones the trainer pruned after the last read, and the
    ones it wrote and kept after that read (a fast job can finish between two reads of /status; the final
    report in its termination message is too small to list them)."""

    output: str
    step: int
    create_final: bool
    delete: list[str]
    mark_pruned: list[str]
    refused: str | None = None
    create: list[tuple[int, str]] = field(default_factory=list)  # (step, uri) of each kept, unrecorded one


def final_from(job: Json, existing: list[CheckpointView]) -> FinalPlan:
    meta, spec, status = job["metadata"], job["spec"], job.get("status") or {}
    name = meta["name"]
    output = spec["output"]["uri"].rstrip("/") + "/final"
    progress = status.get("progress") or {}
    step = int(progress.get("totalSteps") or progress.get("step") or 0)
    ours, taken = _ours(job, existing)
    final = checkpoint_resource_name(name, step, "export")
    refused = f"Checkpoint {final} exists and belongs to another job of this name" if final in taken else None
    total = progress.get("totalSteps") or (spec.get("hyperparameters") or {}).get("maxSteps")
    delete, pruned, create = [], [], []
    if total:
        kept = checkpoints_kept_at_end(spec, int(total))
        for cname, c in sorted(ours.items()):
            if c.kind == "resumable" and c.step not in kept:
                if c.keep:
                    if c.phase != "Pruned":
                        pruned.append(cname)
                else:
                    delete.append(cname)
        # Named as the trainer names them (wire.py), under the job's own output, so never another's.
        base = spec["output"]["uri"].rstrip("/")
        for at in sorted(kept):
            cname = checkpoint_resource_name(name, at)
            if cname not in ours and cname not in taken:
                create.append((at, f"{base}/{CHECKPOINTS_DIR}/{checkpoint_folder(at)}"))
    return FinalPlan(output, step, final not in ours and final not in taken, delete, pruned, refused, create)
