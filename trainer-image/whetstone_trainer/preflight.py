"""Pre-flight validation: everything about a job that can be checked before any training, reported all at
once. `whetstone validate` prints it; `whetstone run` and the trainer refuse to start when it finds anything.
"""

from __future__ import annotations

from pathlib import Path

from whetstone_api.finetunejob import FineTuneJobSpec

from .data.formats import FORMAT_OF_METHOD, TemplateError, read_jsonl, tokenize_chat
from .models.sources import ModelSourceError, check_model_source, materialise, parse_model_uri
from .storage import StorageError, resolve_uri


def preflight(spec: FineTuneJobSpec, base_dir: Path | None, *, check_lengths: bool = True) -> list[str]:
    """Every problem found, each naming the field, file and line it concerns. Empty: ready to train."""
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

    if check_lengths and fmt == "chat" and source is not None and readable:
        problems += _length_problems(spec, source, readable)
    return problems


def _length_problems(spec: FineTuneJobSpec, source, readable) -> list[str]:  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(materialise(source))
    except ModelSourceError as e:
        return [f"spec.baseModel.uri: {e}"]
    limit = spec.hyperparameters.max_seq_len
    problems = []
    for field, path, report in readable:
        bad = []
        for line, row in report.rows:
            try:
                n = len(
                    tokenize_chat(tokenizer, row, train_on_all_turns=spec.sft_settings.train_on_all_turns)
                )
            except TemplateError as e:
                return [f"spec.baseModel.uri: {e}"]
            if n > limit:
                bad.append(
                    f"  {path.name}:line {line}: {n} tokens, more than spec.hyperparameters.maxSeqLen {limit}"
                )
        if bad:
            problems.append(
                f"{field}.uri: {len(bad)} example(s) too long (they would be cut):\n" + "\n".join(bad[:50])
            )
    return problems
