"""Dataset validation: every malformed row of the catalogue is reported with its line and the field inside
the row, all at once, for SFT chat rows, both DPO preference shapes and RFT prompt rows; hostile files are
read with bounded work and never raise."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import yaml
from conftest import valid_job
from whetstone_api.finetunejob import FineTuneJobSpec
from whetstone_cli.main import main
from whetstone_trainer.data import formats
from whetstone_trainer.data.formats import DatasetFormat, preference_pair, read_jsonl
from whetstone_trainer.preflight import model_positions, preflight, world_size_problems

USER = {"role": "user", "content": "Reverse 12"}
ANSWER = {"role": "assistant", "content": "21"}
GOOD = {"messages": [USER, ANSWER]}
CALL = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
TOOL = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}


def chat(*messages: dict, **extra: object) -> str:
    return json.dumps({"messages": list(messages), **extra})


def openai_pref(**changes: object) -> str:
    row: dict = {
        "input": {"messages": [USER]},
        "preferred_output": [{"role": "assistant", "content": "21"}],
        "non_preferred_output": [{"role": "assistant", "content": "12"}],
    }
    row.update(changes)
    return json.dumps(row)


def trl_pref(**changes: object) -> str:
    row: dict = {
        "prompt": [USER],
        "chosen": [{"role": "assistant", "content": "21"}],
        "rejected": [{"role": "assistant", "content": "12"}],
    }
    row.update(changes)
    return json.dumps(row)


def prompt_row(*messages: dict, **extra: object) -> str:
    return json.dumps({"messages": list(messages) or [USER], **extra})


GOOD_ROWS: dict[DatasetFormat, str] = {
    "chat": json.dumps(GOOD),
    "preference": openai_pref(),
    "prompt": prompt_row(answer="21"),
}

# (case id, format, the raw line, a fragment of the reason: the field in the row and what is wrong)
BROKEN_ROWS: list[tuple[str, DatasetFormat, str, str]] = [
    # --- JSON itself (any format) ---
    ("bad-json", "chat", '{"messages": [', "invalid JSON"),
    ("trailing-comma", "chat", '{"messages": [],}', "invalid JSON"),
    ("single-quotes", "chat", "{'messages': []}", "invalid JSON"),
    ("nan-literal", "chat", '{"messages": [], "x": NaN}', "NaN is not JSON"),
    ("infinity-literal", "prompt", '{"messages": [], "x": -Infinity}', "-Infinity is not JSON"),
    ("huge-integer", "prompt", '{"messages": [], "x": ' + "9" * 5000 + "}", "more than 19 digits"),
    ("huge-float", "prompt", '{"messages": [], "x": 1e999}', "too large"),
    ("deep-nesting", "prompt", '{"x": ' + "[" * 100000 + "]" * 100000 + "}", "nested deeper than 32"),
    ("moderate-nesting", "chat", '{"x": ' + "[" * 40 + "]" * 40 + "}", "nested deeper than 32"),
    ("duplicate-key", "chat", '{"messages": [], "messages": []}', "duplicate key 'messages'"),
    (
        "lone-surrogate",
        "chat",
        '{"messages": [{"role": "user", "content": "\\ud800"}]}',
        "messages[0].content: a \\u escape is a lone surrogate",
    ),
    (
        "raw-control-char",
        "chat",
        '{"messages": [{"role": "user", "content": "a\x01b"}]}',
        "invalid JSON: Invalid control character",
    ),
    ("not-object", "chat", '["user", "hi"]', "expected a JSON object"),
    ("just-a-string", "prompt", '"hello"', "expected a JSON object"),
    # --- SFT chat rows ---
    ("no-messages", "chat", '{"conversation": []}', "missing 'messages'"),
    ("misspelt-messages", "chat", '{"message": []}', "did you mean messages instead of message?"),
    ("preference-row-in-sft", "chat", openai_pref(), "looks like a preference row"),
    ("trl-row-in-sft", "chat", trl_pref(), "looks like a preference row"),
    ("prompt-completion", "chat", '{"prompt": "a", "completion": "b"}', "prompt/completion and text rows"),
    (
        "messages-not-list",
        "chat",
        '{"messages": "hello"}',
        "'messages' must be a list of messages, not a string",
    ),
    ("empty-messages", "chat", '{"messages": []}', "'messages' is empty"),
    ("message-not-object", "chat", '{"messages": ["hi"]}', "messages[0] must be an object, not a string"),
    ("missing-role", "chat", '{"messages": [{"content": "hi"}]}', "messages[0] has no 'role'"),
    ("unknown-role", "chat", chat({"role": "bot", "content": "hi"}), "messages[0].role: unknown role 'bot'"),
    ("role-not-string", "chat", chat({"role": 1, "content": "hi"}), "messages[0].role: unknown role 1"),
    ("missing-content", "chat", chat({"role": "user"}, ANSWER), "messages[0] (user) has no 'content'"),
    (
        "content-not-string",
        "chat",
        chat({"role": "user", "content": 5}, ANSWER),
        "messages[0].content (user) must be a string, not a number",
    ),
    (
        "content-parts",
        "chat",
        chat({"role": "user", "content": [{"type": "text", "text": "hi"}]}, ANSWER),
        "content parts (lists) are not supported",
    ),
    (
        "content-null-user",
        "chat",
        chat({"role": "user", "content": None}, ANSWER),
        "messages[0] (user) has no 'content'",
    ),
    (
        "message-key-typo",
        "chat",
        chat(USER, {"role": "assistant", "contnet": "21"}),
        "messages[1].contnet: unknown key; did you mean content?",
    ),
    (
        "message-key-case",
        "chat",
        chat(USER, {"role": "assistant", "content": "21", "Weight": 0}),
        "messages[1].Weight: unknown key; did you mean weight?",
    ),
    ("no-assistant", "chat", chat(USER), "no assistant message"),
    (
        "weight-on-user",
        "chat",
        chat({**USER, "weight": 1}, ANSWER),
        "messages[0].weight (user): only allowed on assistant",
    ),
    (
        "weight-not-binary",
        "chat",
        chat(USER, {**ANSWER, "weight": 0.5}),
        "messages[1].weight must be 0 or 1, not 0.5",
    ),
    (
        "weight-boolean",
        "chat",
        chat(USER, {**ANSWER, "weight": True}),
        "messages[1].weight must be 0 or 1, not True",
    ),
    ("all-weights-zero", "chat", chat(USER, {**ANSWER, "weight": 0}), "every assistant message has weight 0"),
    (
        "system-not-first",
        "chat",
        chat(USER, {"role": "system", "content": "s"}, ANSWER),
        "messages[1]: a system message must come first",
    ),
    (
        "tools-not-list",
        "chat",
        json.dumps({**GOOD, "tools": {"name": "x"}}),
        "'tools' must be a list, not an object",
    ),
    (
        "tool-without-function",
        "chat",
        json.dumps({**GOOD, "tools": [{"type": "function"}]}),
        "tools[0].function must be an object",
    ),
    (
        "tool-name-empty",
        "chat",
        json.dumps({**GOOD, "tools": [{"type": "function", "function": {"name": ""}}]}),
        "tools[0].function.name must not be empty",
    ),
    (
        "tool-parameters-string",
        "chat",
        json.dumps({**GOOD, "tools": [{"function": {"name": "f", "parameters": "{}"}}]}),
        "tools[0].function.parameters must be a JSON schema object",
    ),
    (
        "misspelt-tools",
        "chat",
        json.dumps({**GOOD, "tool": [TOOL]}),
        "tool: unknown key; did you mean tools?",
    ),
    (
        "tool-calls-on-user",
        "chat",
        chat({**USER, "tool_calls": [CALL]}, ANSWER),
        "messages[0].tool_calls (user): only allowed on assistant",
    ),
    (
        "tool-calls-not-list",
        "chat",
        chat(USER, {"role": "assistant", "tool_calls": CALL}),
        "messages[1].tool_calls must be a non-empty list",
    ),
    (
        "tool-calls-empty",
        "chat",
        chat(USER, {"role": "assistant", "content": "x", "tool_calls": []}),
        "messages[1].tool_calls must be a non-empty list",
    ),
    (
        "tool-call-no-function",
        "chat",
        chat(USER, {"role": "assistant", "tool_calls": [{"id": "c1"}]}),
        "messages[1].tool_calls[0].function must be an object",
    ),
    (
        "tool-call-no-name",
        "chat",
        chat(USER, {"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}),
        "messages[1].tool_calls[0].function.name must be a string",
    ),
    (
        "tool-call-bad-arguments",
        "chat",
        chat(USER, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{a: 1"}}]}),
        "messages[1].tool_calls[0].function.arguments is not valid JSON",
    ),
    (
        "tool-call-list-arguments",
        "chat",
        chat(USER, {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": [1]}}]}),
        "arguments must be a JSON object",
    ),
    (
        "tool-call-type",
        "chat",
        chat(USER, {"role": "assistant", "tool_calls": [{**CALL, "type": "code"}]}),
        "messages[1].tool_calls[0].type must be 'function'",
    ),
    (
        "tool-call-extra-key",
        "chat",
        chat(USER, {"role": "assistant", "tool_calls": [{**CALL, "fn": 1}]}),
        "messages[1].tool_calls[0].fn: unknown key",
    ),
    (
        "tool-message-first",
        "chat",
        chat({"role": "tool", "content": "3"}, ANSWER),
        "messages[0]: a tool message must follow an assistant message with tool_calls",
    ),
    (
        "tool-message-after-user",
        "chat",
        chat(USER, {"role": "tool", "content": "3"}, ANSWER),
        "messages[1]: a tool message must follow",
    ),
    (
        "tool-call-id-unknown",
        "chat",
        chat(
            USER,
            {"role": "assistant", "tool_calls": [CALL]},
            {"role": "tool", "content": "3", "tool_call_id": "c9"},
            ANSWER,
        ),
        "messages[2].tool_call_id 'c9' answers no call",
    ),
    (
        "tool-call-id-on-user",
        "chat",
        chat({**USER, "tool_call_id": "c1"}, ANSWER),
        "messages[0].tool_call_id (user): only allowed on tool",
    ),
    (
        "reasoning-on-user",
        "chat",
        chat({**USER, "reasoning_content": "hm"}, ANSWER),
        "messages[0].reasoning_content (user)",
    ),
    (
        "reasoning-not-string",
        "chat",
        chat(USER, {**ANSWER, "reasoning_content": ["a"]}),
        "messages[1].reasoning_content must be a string",
    ),
    ("name-not-string", "chat", chat({**USER, "name": 7}, ANSWER), "messages[0].name must be a string"),
    # --- DPO, OpenAI shape ---
    ("pref-chat-row", "preference", json.dumps(GOOD), "looks like a chat row for method sft"),
    (
        "pref-missing-output",
        "preference",
        json.dumps({"input": {"messages": [USER]}, "preferred_output": [ANSWER]}),
        "missing 'non_preferred_output'",
    ),
    (
        "pref-input-not-object",
        "preference",
        openai_pref(input=[USER]),
        "'input' must be an object with 'messages', not a list",
    ),
    (
        "pref-input-extra-key",
        "preference",
        openai_pref(input={"messages": [USER], "message": []}),
        "input.message: unknown key",
    ),
    (
        "pref-input-ends-with-answer",
        "preference",
        openai_pref(input={"messages": [USER, ANSWER]}),
        "input.messages[1]: the prompt must end with the user's turn",
    ),
    (
        "pref-input-weight",
        "preference",
        openai_pref(input={"messages": [{**USER, "weight": 1}]}),
        "input.messages[0].weight: not allowed here",
    ),
    (
        "pref-output-two-messages",
        "preference",
        openai_pref(preferred_output=[ANSWER, ANSWER]),
        "'preferred_output' must be a list of exactly one assistant message",
    ),
    (
        "pref-output-object",
        "preference",
        openai_pref(non_preferred_output=ANSWER),
        "'non_preferred_output' must be a list of exactly one",
    ),
    (
        "pref-output-user-role",
        "preference",
        openai_pref(preferred_output=[USER]),
        "preferred_output[0].role must be assistant",
    ),
    (
        "pref-output-weight",
        "preference",
        openai_pref(preferred_output=[{**ANSWER, "weight": 1}]),
        "preferred_output[0].weight: not allowed here",
    ),
    (
        "pref-identical",
        "preference",
        openai_pref(non_preferred_output=[{"role": "assistant", "content": "21"}]),
        "preferred and non-preferred answers are identical",
    ),
    (
        "pref-misspelt-key",
        "preference",
        json.dumps({**json.loads(openai_pref()), "prefered_output": []}),
        "prefered_output: unknown key; did you mean preferred_output?",
    ),
    (
        "pref-mixed-shapes",
        "preference",
        json.dumps({**json.loads(openai_pref()), "chosen": "a"}),
        "the row mixes two preference shapes",
    ),
    (
        "pref-bad-tools",
        "preference",
        openai_pref(input={"messages": [USER], "tools": [{"function": {}}]}),
        "input.tools[0].function.name must be a string",
    ),
    # --- DPO, TRL shape ---
    ("trl-missing-rejected", "preference", json.dumps({"prompt": "q", "chosen": "a"}), "missing 'rejected'"),
    (
        "trl-prompt-number",
        "preference",
        trl_pref(prompt=5),
        "'prompt' must be text or a list of messages, not a number",
    ),
    (
        "trl-prompt-empty-text",
        "preference",
        json.dumps({"prompt": " ", "chosen": "a", "rejected": "b"}),
        "prompt must not be empty",
    ),
    (
        "trl-text-prompt-message-answers",
        "preference",
        json.dumps({"prompt": "q", "chosen": [ANSWER], "rejected": "b"}),
        "'chosen' must be text like the prompt",
    ),
    (
        "trl-message-prompt-text-answers",
        "preference",
        trl_pref(rejected="12"),
        "'rejected' must be a list of one assistant message",
    ),
    (
        "trl-prompt-ends-with-answer",
        "preference",
        trl_pref(prompt=[USER, ANSWER]),
        "prompt[1]: the prompt must end with the user's turn",
    ),
    (
        "trl-answer-role",
        "preference",
        trl_pref(chosen=[{"role": "system", "content": "21"}]),
        "chosen[0].role must be assistant",
    ),
    (
        "trl-identical-text",
        "preference",
        json.dumps({"prompt": "q", "chosen": "a", "rejected": "a"}),
        "answers are identical",
    ),
    (
        "trl-identical-messages",
        "preference",
        trl_pref(rejected=[{"role": "assistant", "content": "21"}]),
        "answers are identical",
    ),
    (
        "trl-misspelt-key",
        "preference",
        json.dumps({**json.loads(trl_pref()), "choosen": []}),
        "choosen: unknown key; did you mean chosen?",
    ),
    (
        "trl-bad-message",
        "preference",
        trl_pref(prompt=[{"role": "user", "content": {"text": "q"}}]),
        "prompt[0].content (user) must be a string, not an object",
    ),
    # --- RFT prompt rows ---
    ("rft-no-messages", "prompt", '{"question": "2+2", "answer": "4"}', "missing 'messages'"),
    ("rft-prompt-key", "prompt", '{"prompt": "2+2", "answer": "4"}', "write the prompt as messages"),
    (
        "rft-ends-with-assistant",
        "prompt",
        prompt_row(USER, ANSWER),
        "messages[1]: the last message must be the user's prompt",
    ),
    ("rft-weight", "prompt", prompt_row({**USER, "weight": 1}), "messages[0].weight: not allowed here"),
    ("rft-bad-tools", "prompt", prompt_row(USER, tools="add"), "'tools' must be a list, not a string"),
    ("rft-message-not-object", "prompt", '{"messages": [null]}', "messages[0] must be an object, not null"),
]


@pytest.mark.parametrize(
    ("fmt", "line", "reason"), [c[1:] for c in BROKEN_ROWS], ids=[c[0] for c in BROKEN_ROWS]
)
def test_bad_row_is_reported_with_its_line(
    tmp_path: Path, fmt: DatasetFormat, line: str, reason: str
) -> None:
    good = GOOD_ROWS[fmt]
    path = tmp_path / "data.jsonl"
    path.write_text(good + "\n" + line + "\n" + good + "\n")
    report = read_jsonl(path, fmt)
    assert [e.line for e in report.errors] == [2], report.errors
    assert reason in report.errors[0].reason, report.errors[0].reason
    assert [n for n, _ in report.rows] == [1, 3]


GOOD_EDGE_ROWS: list[tuple[str, DatasetFormat, str]] = [
    (
        "chat-with-tools",
        "chat",
        chat(
            USER,
            {"role": "assistant", "content": None, "tool_calls": [CALL]},
            {"role": "tool", "content": "3", "tool_call_id": "c1"},
            ANSWER,
            tools=[TOOL],
        ),
    ),
    (
        "chat-arguments-object",
        "chat",
        chat(
            USER,
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]},
            ANSWER,
        ),
    ),
    (
        "chat-reasoning-and-weight",
        "chat",
        chat(
            {"role": "system", "content": "s"},
            USER,
            {**ANSWER, "weight": 0, "reasoning_content": "r"},
            USER,
            ANSWER,
        ),
    ),
    ("chat-extra-metadata", "chat", chat(USER, ANSWER, id="row-1", source="synthetic")),
    ("chat-unicode", "chat", chat({"role": "user", "content": "é 中 \U0001f600 \u0000"}, ANSWER)),
    (
        "pref-openai-multi-turn",
        "preference",
        openai_pref(input={"messages": [{"role": "system", "content": "s"}, USER, ANSWER, USER]}),
    ),
    ("pref-trl-text", "preference", json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})),
    ("pref-trl-messages", "preference", trl_pref()),
    (
        "pref-tool-answers",
        "preference",
        openai_pref(preferred_output=[{"role": "assistant", "tool_calls": [CALL]}]),
    ),
    ("rft-extra-fields", "prompt", prompt_row(answer="4", tests=[{"in": 1, "out": 2}], meta={"a": None})),
]


@pytest.mark.parametrize(("fmt", "line"), [c[1:] for c in GOOD_EDGE_ROWS], ids=[c[0] for c in GOOD_EDGE_ROWS])
def test_valid_edge_rows_are_accepted(tmp_path: Path, fmt: DatasetFormat, line: str) -> None:
    path = tmp_path / "data.jsonl"
    path.write_text(line + "\n")
    report = read_jsonl(path, fmt)
    assert report.errors == [] and len(report.rows) == 1


def test_both_preference_shapes_give_the_same_pair(tmp_path: Path) -> None:
    path = tmp_path / "pref.jsonl"
    path.write_text(
        openai_pref()
        + "\n"
        + trl_pref()
        + "\n"
        + json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"})
        + "\n"
    )
    rows = [row for _, row in read_jsonl(path, "preference").rows]
    openai, trl, text = (preference_pair(r) for r in rows)
    assert openai == trl and openai.conversational
    assert openai.prompt == [USER] and openai.chosen["content"] == "21" and openai.rejected["content"] == "12"
    assert not text.conversational and (text.prompt, text.chosen, text.rejected) == ("q", "a", "b")


def test_every_bad_line_is_reported_at_once(tmp_path: Path) -> None:
    lines = [json.dumps(GOOD)] + [row for _, fmt, row, _ in BROKEN_ROWS if fmt == "chat"]
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(lines) + "\n")
    report = read_jsonl(path, "chat")
    assert [e.line for e in report.errors] == list(range(2, len(lines) + 1))
    assert len(report.rows) == 1


def test_invalid_utf8_bom_and_crlf(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(
        b"\xef\xbb\xbf" + json.dumps(GOOD).encode() + b"\r\n\xff\xfe\r\n" + json.dumps(GOOD).encode()
    )
    report = read_jsonl(path, "chat")
    assert [(e.line, e.reason.split(" (")[0]) for e in report.errors] == [(2, "not UTF-8 text")]
    assert [n for n, _ in report.rows] == [1, 3]


def test_an_overlong_line_is_skipped_unread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(formats, "MAX_ROW_BYTES", 1000)
    path = tmp_path / "data.jsonl"
    path.write_text(
        json.dumps(GOOD) + "\n" + '{"messages": "' + "x" * 5000 + '"}\n' + json.dumps(GOOD) + "\n"
    )
    report = read_jsonl(path, "chat")
    assert [(e.line, e.reason) for e in report.errors] == [(2, "the line is longer than 1000 bytes")]
    assert [n for n, _ in report.rows] == [1, 3]


def test_a_file_of_hostile_lines_takes_bounded_time(tmp_path: Path) -> None:
    # 200 lines of 100k-deep nesting and 200 of 5000-digit numbers: each is refused at parse time, without
    # building the structure or the number (the time is printed, not asserted: CI machines differ).
    path = tmp_path / "data.jsonl"
    deep = "[" * 100000 + "]" * 100000
    path.write_text((deep + "\n") * 200 + ('{"x": ' + "9" * 5000 + "}\n") * 200)
    started = time.perf_counter()
    report = read_jsonl(path, "prompt")
    print(f"400 hostile lines read in {time.perf_counter() - started:.2f} s")
    assert len(report.errors) == 400 and not report.rows


def test_empty_and_missing_files(tmp_path: Path) -> None:
    (tmp_path / "empty.jsonl").write_text("\n\n")
    assert "no examples" in read_jsonl(tmp_path / "empty.jsonl", "chat").errors[0].reason
    assert "file not found" in read_jsonl(tmp_path / "nope.jsonl", "chat").errors[0].reason
    # A problem of the whole file reads as one line naming the file, not as "line 0" of a row count.
    assert (
        read_jsonl(tmp_path / "nope.jsonl", "chat").describe() == f"{tmp_path / 'nope.jsonl'}: file not found"
    )
    assert (
        read_jsonl(tmp_path / "empty.jsonl", "chat")
        .describe()
        .endswith("empty.jsonl: the file has no examples")
    )


def _spec(**changes: object) -> FineTuneJobSpec:
    doc = valid_job()["spec"]
    for key, value in changes.items():
        section, _, field = key.partition("__")
        if field:
            doc.setdefault(section, {})[field] = value
        else:
            doc[section] = value
    return FineTuneJobSpec.model_validate(doc)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        (
            {"nodes": 2, "hyperparameters__batchSize": 16, "hyperparameters__gradientAccumulationSteps": 16},
            "a multiple of 32",
        ),
        ({"nodes": 4, "gpusPerNode": 8, "hyperparameters__batchSize": 16}, "a multiple of 32"),
        ({"nodes": 3, "hyperparameters__batchSize": 16}, "a multiple of 3"),
        (
            {
                "nodes": 2,
                "gpusPerNode": 8,
                "hyperparameters__batchSize": 32,
                "hyperparameters__gradientAccumulationSteps": 2,
            },
            None,
        ),
        ({"nodes": 1, "hyperparameters__batchSize": 7}, None),
    ],
)
def test_world_size_must_share_the_batch(changes: dict, problem: str | None) -> None:
    problems = world_size_problems(_spec(**changes))
    if problem is None:
        assert problems == []
    else:
        assert (
            len(problems) == 1
            and problems[0].startswith("spec.hyperparameters.batchSize:")
            and problem in problems[0]
        )


def test_max_seq_len_beyond_the_model_positions(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"model_type": "llama", "max_position_embeddings": 512}))
    (model / "model.safetensors").write_bytes(b"")  # never loaded: the check reads config.json only
    assert model_positions(model) == (512, "max_position_embeddings")
    spec = _spec(baseModel={"uri": str(model)}, hyperparameters__maxSeqLen=1024)
    problems = [p for p in preflight(spec, tmp_path, check_lengths=False) if "maxSeqLen" in p]
    assert problems == [
        f"spec.hyperparameters.maxSeqLen: 1024 is more than the model's 512 positions "
        f"(max_position_embeddings in {model / 'config.json'})"
    ]
    fits = _spec(baseModel={"uri": str(model)}, hyperparameters__maxSeqLen=512)
    assert not [p for p in preflight(fits, tmp_path, check_lengths=False) if "maxSeqLen" in p]


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


@pytest.mark.parametrize(
    "line",
    [row for _, fmt, row, _ in BROKEN_ROWS if fmt == "chat"][:20],
)
def test_run_refuses_bad_rows_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], line: str
) -> None:
    (tmp_path / "data.jsonl").write_text(json.dumps(GOOD) + "\n" + line + "\n")
    doc = valid_job()
    doc["spec"]["dataset"]["uri"] = "data.jsonl"
    doc["spec"].pop("evalDataset")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(doc))
    assert main(["run", str(job)]) == 1
    err = capsys.readouterr().err
    assert "data.jsonl:line 2:" in err and "Traceback" not in err
