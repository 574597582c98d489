"""Dataset validation: every malformed line is reported with its number and reason, all at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import valid_job
from whetstone_cli.main import main
from whetstone_trainer.data.formats import read_jsonl

GOOD = {"messages": [{"role": "user", "content": "Reverse 12"}, {"role": "assistant", "content": "21"}]}

# (case id, the raw line, a fragment of the reason)
BROKEN_ROWS: list[tuple[str, str, str]] = [
    ("bad-json", '{"messages": [', "invalid JSON"),
    ("trailing-comma", '{"messages": [],}', "invalid JSON"),
    ("not-object", '["user", "hi"]', "expected a JSON object"),
    ("no-messages", '{"conversation": []}', "missing 'messages'"),
    (
        "preference-row-in-sft",
        json.dumps({"input": {}, "preferred_output": [], "non_preferred_output": []}),
        "looks like a preference row",
    ),
    ("prompt-completion", '{"prompt": "a", "completion": "b"}', "prompt/completion and text rows"),
    ("messages-not-list", '{"messages": "hello"}', "must be a list of messages"),
    ("empty-messages", '{"messages": []}', "'messages' is empty"),
    ("message-not-object", '{"messages": ["hi"]}', "messages[0] is not an object"),
    ("missing-role", '{"messages": [{"content": "hi"}]}', "messages[0] has no 'role'"),
    ("unknown-role", '{"messages": [{"role": "bot", "content": "hi"}]}', "unknown role 'bot'"),
    ("missing-content", '{"messages": [{"role": "user"}]}', "(user) has no 'content'"),
    ("content-not-string", '{"messages": [{"role": "user", "content": 5}]}', "'content' must be a string"),
    ("no-assistant", '{"messages": [{"role": "user", "content": "hi"}]}', "no assistant message"),
    (
        "weight-on-user",
        '{"messages": [{"role": "user", "content": "a", "weight": 1}, '
        '{"role": "assistant", "content": "b"}]}',
        "only allowed on assistant",
    ),
    (
        "weight-not-binary",
        '{"messages": [{"role": "user", "content": "a"}, '
        '{"role": "assistant", "content": "b", "weight": 0.5}]}',
        "must be 0 or 1",
    ),
    (
        "all-weights-zero",
        '{"messages": [{"role": "user", "content": "a"}, '
        '{"role": "assistant", "content": "b", "weight": 0}]}',
        "every assistant message has weight 0",
    ),
    ("tools-not-list", json.dumps({**GOOD, "tools": {"name": "x"}}), "'tools' must be a list"),
]


def test_catalogue_is_large_enough() -> None:
    assert len(BROKEN_ROWS) >= 15


@pytest.mark.parametrize(("line", "reason"), [c[1:] for c in BROKEN_ROWS], ids=[c[0] for c in BROKEN_ROWS])
def test_bad_row_is_reported_with_its_line(tmp_path: Path, line: str, reason: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(GOOD) + "\n" + line + "\n" + json.dumps(GOOD) + "\n")
    report = read_jsonl(path, "chat")
    assert [e.line for e in report.errors] == [2], report.errors
    assert reason in report.errors[0].reason
    assert len(report.rows) == 2


def test_invalid_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    report = read_jsonl(path, "chat")
    assert report.errors[0].line == 2 and "not UTF-8" in report.errors[0].reason


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "no examples" in read_jsonl(tmp_path / "empty.jsonl", "chat").errors[0].reason
    assert "file not found" in read_jsonl(tmp_path / "nope.jsonl", "chat").errors[0].reason


def test_preference_and_prompt_formats(tmp_path: Path) -> None:
    pref = {
        "input": {"messages": [{"role": "user", "content": "q"}]},
        "preferred_output": [{"role": "assistant", "content": "good"}],
        "non_preferred_output": [{"role": "assistant", "content": "bad"}],
    }
    same = {**pref, "non_preferred_output": pref["preferred_output"]}
    path = tmp_path / "pref.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in (pref, same, GOOD)) + "\n")
    report = read_jsonl(path, "preference")
    assert [(e.line, e.reason.split(";")[0]) for e in report.errors] == [
        (2, "preferred and non-preferred answers are identical"),
        (3, "missing 'input', 'preferred_output', 'non_preferred_output'"),
    ]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        json.dumps({"messages": [{"role": "user", "content": "q"}], "answer": "4"})
        + "\n"
        + json.dumps(GOOD)
        + "\n"
    )
    report = read_jsonl(prompts, "prompt")
    assert [e.line for e in report.errors] == [2] and "must be the user's prompt" in report.errors[0].reason


def test_validate_reports_all_bad_lines_and_too_long_examples(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    long_answer = {
        "messages": [{"role": "user", "content": "Copy"}, {"role": "assistant", "content": "7" * 400}]
    }
    lines = [json.dumps(GOOD), "{broken", json.dumps(GOOD), '{"messages": []}', json.dumps(long_answer)]
    (tmp_path / "data.jsonl").write_text("\n".join(lines) + "\n")
    doc = valid_job()
    doc["spec"]["dataset"]["uri"] = "data.jsonl"
    doc["spec"].pop("evalDataset")
    doc["spec"]["hyperparameters"]["maxSeqLen"] = 64
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(job)]) == 1
    err = capsys.readouterr().err
    assert "data.jsonl:line 2: invalid JSON" in err and "data.jsonl:line 4: 'messages' is empty" in err

    # Once the syntax is fixed, the lengths are checked with the model's own tokenizer.
    (tmp_path / "data.jsonl").write_text("\n".join([lines[0], lines[2], lines[4]]) + "\n")
    assert main(["validate", str(job)]) == 1
    err = capsys.readouterr().err
    assert "data.jsonl:line 3:" in err and "more than spec.hyperparameters.maxSeqLen 64" in err


def test_validate_names_missing_dataset_and_bad_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = valid_job()
    doc["spec"]["dataset"]["uri"] = "missing.jsonl"
    doc["spec"]["baseModel"]["uri"] = "ftp://models/x"
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    assert main(["validate", str(job)]) == 1
    err = capsys.readouterr().err
    assert "spec.dataset.uri" in err and "file not found" in err
    assert "spec.baseModel.uri" in err and "ftp://models/x" in err
