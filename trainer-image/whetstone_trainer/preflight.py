"""Pre-flight validation: everything about a job that can be checked before any training, reported all at
once. `whetstone validate` prints it; `whetstone run` and the trainer refuse to start when it finds anything.

Beyond what the API server checks: the model can be reached, every dataset row has the structure of the
method's format, the world size fits the batch (every rank gets the same, non-zero number of rows per
micro-batch), maxSeqLen fits the model's positions, and (SFT) every example fits maxSeqLen in the model's own
tokens. Nothing here raises for bad input. (Every method trains under every spec.distributed.strategy the API
allows: nothing to refuse there.)
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path
from typing import Any

from whetstone_api.finetunejob import FineTuneJobSpec
from whetstone_api.rewardgrader import RewardGraderSpec

from .data.formats import FORMAT_OF_METHOD, TemplateError, read_jsonl
from .data.tokenize import example_length
from .models.sources import ModelSource, ModelSourceError, check_model_source, materialise, parse_model_uri
from .storage import StorageError, resolve_uri

# config.json keys that hold a model's number of positions, by architecture family.
_POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


@dataclass
class Checked:
    """What pre-flight found and read: the problems, and for a job without any, the checked rows of each
    dataset (by field, "spec.dataset" / "spec.evalDataset") and the materialised model folder, so that
    training reads nothing twice."""

    problems: list[str]
    rows: dict[str, list[tuple[int, dict[str, Any]]]] = dataclass_field(default_factory=dict)
    paths: dict[str, Path] = dataclass_field(default_factory=dict)
    model_folder: Path | None = None


def preflight(
    spec: FineTuneJobSpec,
    base_dir: Path | None,
    *,
    check_lengths: bool = True,
    graders: dict[str, RewardGraderSpec] | None = None,
) -> list[str]:
    """Every problem found, each naming the field, file and line it concerns. Empty: ready to train.
    `graders`: the RewardGraders at hand (some of the job's, maybe not all), checked against the datasets."""
    checked = check_job(spec, base_dir, check_lengths=check_lengths)
    if graders is None:
        return checked.problems
    return checked.problems + grader_problems(spec, graders, checked, all_known=False)


def check_job(spec: FineTuneJobSpec, base_dir: Path | None, *, check_lengths: bool = True) -> Checked:
    """preflight(), keeping what it read."""
    problems: list[str] = world_size_problems(spec)
    source = None
    try:
        source = parse_model_uri(spec.base_model.uri, base_dir)
        check_model_source(source)
    except ModelSourceError as e:
        problems.append(f"spec.baseModel.uri: {e}")
        source = None
    if source is not None and source.local_path is not None and source.local_path.is_dir():
        problems += position_problems(spec, source.local_path)

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


def world_size_problems(spec: FineTuneJobSpec) -> list[str]:
    """Every rank must get the same, non-zero number of rows in every micro-batch, or the ranks' gradient
    synchronisations stop matching (a hang) or a rank trains on nothing."""
    hp = spec.hyperparameters
    world = spec.world_size
    per_step = hp.gradient_accumulation_steps * world
    if hp.batch_size % per_step == 0:
        return []
    return [
        f"spec.hyperparameters.batchSize: {hp.batch_size} rows per step cannot be shared by "
        f"gradientAccumulationSteps {hp.gradient_accumulation_steps} x {world} process(es) "
        f"(spec.nodes {spec.nodes} x {spec.processes_per_node} per node): it must be a multiple of "
        f"{per_step}, so that every rank gets the same number of rows (at least one) in every micro-batch"
    ]


def model_positions(folder: Path) -> tuple[int, str] | None:
    """The number of positions of the model in `folder` and the config key that says so, when known."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    configs = [config, config.get("text_config")]  # multimodal configs nest the language model's
    for cfg in configs:
        if not isinstance(cfg, dict):
            continue
        for key in _POSITION_KEYS:
            value = cfg.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value, key
    return None


def position_problems(spec: FineTuneJobSpec, folder: Path) -> list[str]:
    known = model_positions(folder)
    limit = spec.hyperparameters.max_seq_len
    if known is None or limit <= known[0]:
        return []
    return [
        f"spec.hyperparameters.maxSeqLen: {limit} is more than the model's {known[0]} positions "
        f"({known[1]} in {folder / 'config.json'})"
    ]


def _length_problems(
    spec: FineTuneJobSpec, source: ModelSource, readable: list[Any]
) -> tuple[Path | None, list[str]]:
    from transformers import AutoTokenizer

    try:
        folder = materialise(source)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except ModelSourceError as e:
        return None, [f"spec.baseModel.uri: {e}"]
    except (OSError, ValueError) as e:
        return None, [f"spec.baseModel.uri: the model's tokenizer cannot be loaded: {e}"]
    problems = [] if source.local_path is not None else position_problems(spec, folder)
    limit = spec.hyperparameters.max_seq_len
    for field, path, report in readable:
        bad = _too_long(spec, tokenizer, report, limit)
        if isinstance(bad, str):
            return folder, [f"spec.baseModel.uri: {bad}"]
        if bad:
            problems.append(
                f"{field}.uri: {len(bad)} example(s) too long or refused by the model's chat template:\n"
                + "\n".join(f"  {path.name}:{b}" for b in bad[:50])
            )
    return folder, problems


def _too_long(spec: FineTuneJobSpec, tokenizer: Any, report: Any, limit: int) -> list[str] | str:
    """The rows whose sequences are over `limit` tokens (or that the template refuses); a string when the
    template is unusable."""
    bad = []
    for line, row in report.rows:
        try:
            n, what = example_length(spec, tokenizer, row)
        except TemplateError as e:
            return str(e)
        except Exception as e:  # noqa: BLE001 - a chat template may raise anything (jinja's raise_exception)
            bad.append(f"line {line}: the model's chat template refused the row: {type(e).__name__}: {e}")
            continue
        if n > limit:
            bad.append(f"line {line}: {what}{n} tokens, more than spec.hyperparameters.maxSeqLen {limit}")
    return bad


def grader_problems(
    spec: FineTuneJobSpec, graders: dict[str, RewardGraderSpec], checked: Checked, *, all_known: bool = True
) -> list[str]:
    """The graders of an RFT job: a missing one or a cycle; a template field that no row of a checked dataset
    has (such a grader fails on every sample). all_known=False (`whetstone validate`, whose file may hold only
    some of the graders, the others being in the cluster): only the graders at hand are checked."""
    if spec.rft is None:
        return []
    from whetstone_graders import GraderConfigError, grader_order
    from whetstone_graders.graders import spec_problems
    from whetstone_graders.templates import missing_item_fields, rendered_templates

    try:
        names = grader_order([g.name for g in spec.rft.graders], graders)
    except GraderConfigError as e:
        if not all_known:
            names = [g.name for g in spec.rft.graders if g.name in graders]
        else:
            return [
                f"spec.rft.graders: RewardGrader {e}; put its document in the job's file or pass it with "
                "--graders"
            ]
    problems = []
    for name in names:
        problems += [f"spec.rft.graders: RewardGrader {name}: {p}" for p in spec_problems(graders[name])]
        templates = rendered_templates(graders[name].settings)
        for where, rows in checked.rows.items():
            for missing in missing_item_fields(templates, rows):
                problems.append(
                    f"spec.rft.graders: RewardGrader {name} reads a field that no row of {where}.uri has, so "
                    f"it would fail on every sample: {checked.paths[where].name}:{missing}"
                )
    return problems
