"""The one way into training, for a pod (`python -m whetstone_trainer train`) and for `whetstone run`.

    job_file = load_job_file(path)      # every document: one FineTuneJob, the RewardGraders it names
    inputs = prepare(job_file)          # pre-flight once: resolve, read and check every dataset, the model
    summary = train(inputs, output)     # the method's loop, handed the checked rows and the model folder

Nothing is resolved or read twice: pre-flight's rows and materialised model folder are what the method trains
on, and the eval split is made here once for every method.
"""

from __future__ import annotations

import importlib
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from whetstone_api import FineTuneJob
from whetstone_api.finetunejob import FineTuneJobSpec
from whetstone_api.manifests import ManifestError, Problem, load_documents, parse_resource
from whetstone_api.rewardgrader import RewardGrader, RewardGraderSpec

from .preflight import check_job, grader_problems
from .storage import resolve_uri

if TYPE_CHECKING:
    from .loop import Observer

Rows = list[tuple[int, dict[str, Any]]]


class JobRefused(ValueError):
    """The job cannot run here; the message says every reason (kind, graders, pre-flight problems)."""


@dataclass
class JobFile:
    """A FineTuneJob, the folder its relative URIs resolve against (its manifest's), the RewardGraders found
    with it by name, and the manifest it came from (for messages)."""

    job: FineTuneJob
    base_dir: Path
    graders: dict[str, RewardGraderSpec] = field(default_factory=dict)
    path: Path | None = None

    @property
    def where(self) -> str:
        return str(self.path) if self.path else f"FineTuneJob {self.job.metadata.name}"


def load_job_file(path: Path, grader_files: Sequence[Path] = ()) -> JobFile:
    """Every document of `path` (exactly one FineTuneJob, any RewardGraders) and the RewardGraders of
    `grader_files`. Raises ManifestError naming file, line and field, or JobRefused."""
    jobs: list[FineTuneJob] = []
    graders: dict[str, RewardGraderSpec] = {}
    for file in [path, *grader_files]:
        for doc, node in load_documents(file):
            resource = parse_resource(doc, node, file)
            where = f"{file}:{node.line}"
            if isinstance(resource, FineTuneJob) and file == path:
                jobs.append(resource)
            elif isinstance(resource, RewardGrader):
                name = resource.metadata.name
                if name in graders:
                    raise ManifestError(
                        [
                            Problem(
                                file,
                                node.line,
                                "metadata.name",
                                f"a second RewardGrader named {name!r}",
                            )
                        ]
                    )
                graders[name] = resource.spec
            else:
                raise JobRefused(
                    f"{where}: a {resource.kind} here; a job file holds one FineTuneJob and RewardGraders"
                )
    if len(jobs) != 1:
        raise JobRefused(f"{path}: expected exactly one FineTuneJob, found {len(jobs)}")
    return JobFile(jobs[0], path.resolve().parent, graders, path)


@dataclass
class Inputs:
    """Everything a method trains from, checked: the spec, the model folder, the training and eval rows
    ((line, row) pairs) and the grader specs."""

    name: str
    spec: FineTuneJobSpec
    base_dir: Path
    model_folder: Path
    train_rows: Rows
    eval_rows: Rows
    train_source: str
    graders: dict[str, RewardGraderSpec] = field(default_factory=dict)


def prepare(job_file: JobFile) -> Inputs:
    """Pre-flight, once: the model, every dataset line, the graders an RFT job names. JobRefused lists every
    problem found; nothing is trained."""
    spec = job_file.job.spec
    checked = check_job(spec, job_file.base_dir)
    problems = checked.problems + grader_problems(spec, job_file.graders, checked)
    if problems:
        raise JobRefused(
            f"{job_file.where}: pre-flight found {len(problems)} problem(s):\n" + "\n".join(problems)
        )
    assert checked.model_folder is not None
    train, evals = split_rows(spec, checked.rows["spec.dataset"], checked.rows.get("spec.evalDataset"))
    return Inputs(
        name=job_file.job.metadata.name,
        spec=spec,
        base_dir=job_file.base_dir,
        model_folder=checked.model_folder,
        train_rows=train,
        eval_rows=evals,
        train_source=str(checked.paths["spec.dataset"]),
        graders=job_file.graders,
    )


def split_rows(spec: FineTuneJobSpec, rows: Rows, eval_rows: Rows | None) -> tuple[Rows, Rows]:
    """The rows to train on and to evaluate on: evalDataset, or a seeded carve-out of the training set."""
    if eval_rows is not None:
        return rows, eval_rows
    hp = spec.hyperparameters
    shuffled = rows[:]
    random.Random(hp.seed).shuffle(shuffled)
    n_eval = int(len(rows) * hp.eval_fraction)
    return sorted(shuffled[n_eval:]), shuffled[:n_eval]


def output_folder(job_file: JobFile, override: Path | None = None) -> Path:
    """--output when given, else the job's spec.output.uri."""
    if override is not None:
        return override.resolve()
    return resolve_uri(job_file.job.spec.output.uri, job_file.base_dir, "spec.output.uri")


def train(
    inputs: Inputs, output: Path, observer: Observer | None = None, stop_after_step: int | None = None
) -> dict[str, Any]:
    """Run (or resume) the job's method; returns its summary (also written to summary.json).
    `stop_after_step` ends the run early as if the process had been killed (for tests)."""
    from .loop import SilentObserver

    method = importlib.import_module(f"{__package__}.methods.{inputs.spec.method}")  # sft, dpo or rft
    return method.train(inputs, output, observer or SilentObserver(), stop_after_step)


def permanent_errors() -> tuple[type[Exception], ...]:
    """Errors a restart cannot fix: bad data (a resume on other data included), a checkpoint another
    strategy or world size wrote, and a grader with onError: fail that failed."""
    from whetstone_graders import GraderConfigError, GraderFailed

    from .checkpoints import CheckpointMismatch
    from .data.formats import DatasetError

    return (DatasetError, JobRefused, GraderFailed, GraderConfigError, CheckpointMismatch)


def train_job(
    job: FineTuneJob,
    output: Path,
    base_dir: Path | None = None,
    graders: dict[str, RewardGraderSpec] | None = None,
    observer: Observer | None = None,
    stop_after_step: int | None = None,
) -> dict[str, Any]:
    """prepare() and train() for a job held in memory (tests, benchmarks); relative URIs resolve against
    `base_dir` (default: the current folder)."""
    inputs = prepare(JobFile(job, (base_dir or Path.cwd()).resolve(), dict(graders or {})))
    return train(inputs, output, observer, stop_after_step)
