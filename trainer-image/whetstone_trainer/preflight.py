"""Pre-flight validation: everything about a job that can be checked before any training, reported all at
once. `whetstone validate` prints it; `whetstone run` and the trainer refuse to start when it finds anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from whetstone_api.finetunejob import FineTuneJobSpec

from .data.formats import FORMAT_OF_METHOD, TemplateError, read_jsonl
from .data.tokenize import example_length
from .models.sources import ModelSourceError, check_model_source, materialise, parse_model_uri
from .storage import StorageError, resolve_uri


@dataclass
class Checked:
    """What pre-flight found and read: the problems, and for a job without any, the checked rows of each
    dataset (by field, "spec.dataset" / "spec.evalDataset") and the materialised model folder, so that
    training reads nothing twice."""

    problems: list[str]
    rows: dict[str, list[tuple[int, dict[str, Any]]]] = dataclass_field(default_factory=dict)
    paths: dict[str, Path] = dataclass_field(default_factory=dict)
    model_folder: Path | None = None


def preflight(spec: FineTuneJobSpec, base_dir: Path | None, *, check_lengths: bool = True) -> list[str]:
    """Every problem found, each naming the field, file and line it concerns. Empty: ready to train."""
    return check_job(spec, base_dir, check_lengths=check_lengths).problems


def check_job(spec: FineTuneJobSpec, base_dir: Path | None, *, check_lengths: bool = True) -> Checked:
    """preflight(), keeping what it read."""
    problems: list[str] = []
    source = None
    try:
        source = parse_model_uri(spec.base_model.uri, base_dir)
        check_model_source(source)
    except ModelSourceError as e:
        problems.append(f"spec.baseModel.uri: {e}")
        source = None

    fmt = FORMAT_OF_METHOD[spec.method]
    datasets = [("spec.dataset", spec.dataset)]
    if spec.eval_dataset is not None:
        datasets.append(("spec.evalDataset", spec.eval_dataset))
    readable = []
    for field, ds in datasets:
        try:
            path = resolve_uri(ds.uri, base_dir, f"{field}.uri")
        except StorageError as e:
            problems.append(str(e))
            continue
        report = read_jsonl(path, fmt, ds.max_examples)
        if report.errors:
            problems.append(f"{field}.uri: " + report.describe())
        else:
            readable.append((field, path, report))

    try:
        out = resolve_uri(spec.output.uri, base_dir, "spec.output.uri")
        if out.exists() and not out.is_dir():
            problems.append(f"spec.output.uri: {out} exists and is not a folder")
    except StorageError as e:
        problems.append(str(e))

    checked = Checked(problems)
    if check_lengths and source is not None and readable:
        checked.model_folder, length_problems = _length_problems(spec, source, readable)
        problems += length_problems
    checked.rows = {f: report.rows for f, _path, report in readable}
    checked.paths = {f: path for f, path, _report in readable}
    return checked


def _length_problems(spec: FineTuneJobSpec, source, readable) -> tuple[Path | None, list[str]]:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    try:
        folder = materialise(source)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except ModelSourceError as e:
        return None, [f"spec.baseModel.uri: {e}"]
    limit = spec.hyperparameters.max_seq_len
    problems = []
    for field, path, report in readable:
        bad = []
        for line, row in report.rows:
            try:
                n, what = example_length(spec, tokenizer, row)
            except TemplateError as e:
                return folder, [f"spec.baseModel.uri: {e}"]
            if n > limit:
                bad.append(
                    f"  {path.name}:line {line}: {what}{n} tokens, more than "
                    f"spec.hyperparameters.maxSeqLen {limit}"
                )
        if bad:
            problems.append(
                f"{field}.uri: {len(bad)} example(s) too long (they would be cut):\n" + "\n".join(bad[:50])
            )
    return folder, problems
