"""The dataset formats, in one place: reading JSONL, checking every row, and turning chat rows into tokens
with per-token loss weights.

Formats (one JSON object per line):
- chat (SFT): {"messages": [{"role": "system"|"user"|"assistant"|"tool", "content": str, "weight": 0|1}],
  "tools": [...]?}. The loss covers assistant turns (weight 1 by default; weight 0 switches one off).
- preference (DPO): {"input": {"messages": [...]}, "preferred_output": [assistant message],
  "non_preferred_output": [assistant message]}, or {"prompt", "chosen", "rejected"} as strings or message
  lists (data/tokenize.py turns both into tokens).
- prompt (RFT): {"messages": [..., user message], ...any fields the graders read}.

Reading never stops at the first bad line: every problem is collected with its line number, so a user fixes
a file in one pass.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

ROLES = ("system", "user", "assistant", "tool")
DatasetFormat = Literal["chat", "preference", "prompt"]
FORMAT_OF_METHOD: dict[str, DatasetFormat] = {"sft": "chat", "dpo": "preference", "rft": "prompt"}
MAX_REPORTED_ERRORS = 200


@dataclass(frozen=True)
class RowError:
    line: int
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}"


@dataclass
class DatasetReport:
    """The rows that passed and every problem found, for one file."""

    path: Path
    rows: list[tuple[int, dict[str, Any]]] = field(default_factory=list)  # (line number, row)
    errors: list[RowError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and bool(self.rows)

    def describe(self) -> str:
        lines = [f"{self.path}: {len(self.errors)} problem(s) in {len(self.rows) + len(self.errors)} row(s)"]
        lines += [f"  {self.path.name}:{e}" for e in self.errors[:MAX_REPORTED_ERRORS]]
        if len(self.errors) > MAX_REPORTED_ERRORS:
            lines.append(f"  ... and {len(self.errors) - MAX_REPORTED_ERRORS} more")
        return "\n".join(lines)


class DatasetError(ValueError):
    """A dataset that cannot be used; the message lists every bad line."""


def read_jsonl(path: Path, fmt: DatasetFormat, max_examples: int | None = None) -> DatasetReport:
    """Parse and check every line of a JSONL file in the given format."""
    report = DatasetReport(path=path)
    if not path.is_file():
        report.errors.append(RowError(0, f"file not found: {path}"))
        return report
    check = _CHECKS[fmt]
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if max_examples is not None and len(report.rows) >= max_examples:
                break
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                report.errors.append(RowError(number, f"not UTF-8 text ({e.reason} at byte {e.start})"))
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                report.errors.append(RowError(number, f"invalid JSON: {e.msg} at column {e.colno}"))
                continue
            problem = check(row)
            if problem:
                report.errors.append(RowError(number, problem))
            else:
                report.rows.append((number, row))
    if not report.rows and not report.errors:
        report.errors.append(RowError(0, "the file has no examples"))
    return report


def _check_message(m: Any, where: str, *, allow_weight: bool = True) -> str | None:
    if not isinstance(m, dict):
        return f"{where} is not an object"
    role = m.get("role")
    if role is None:
        return f"{where} has no 'role'"
    if role not in ROLES:
        return f"{where} has unknown role {role!r} (expected one of {', '.join(ROLES)})"
    content = m.get("content")
    if content is None and not (role == "assistant" and m.get("tool_calls")):
        return f"{where} ({role}) has no 'content'"
    if content is not None and not isinstance(content, str):
        return f"{where} ({role}) 'content' must be a string, not {type(content).__name__}"
    if "weight" in m:
        if not allow_weight:
            return f"{where} may not carry a 'weight'"
        if role != "assistant":
            return f"{where} ({role}): 'weight' is only allowed on assistant messages"
        if m["weight"] not in (0, 1) or isinstance(m["weight"], bool):
            return f"{where}: 'weight' must be 0 or 1, not {m['weight']!r}"
    return None


def _check_messages(messages: Any, key: str = "messages") -> str | None:
    if not isinstance(messages, list):
        return f"'{key}' must be a list of messages"
    if not messages:
        return f"'{key}' is empty"
    for i, m in enumerate(messages):
        problem = _check_message(m, f"{key}[{i}]")
        if problem:
            return problem
    return None


def _check_chat(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object with 'messages', got {type(row).__name__}"
    if "messages" not in row:
        hint = ""
        if "preferred_output" in row or "chosen" in row:
            hint = " (this looks like a preference row for method dpo)"
        elif "prompt" in row or "text" in row:
            hint = " (prompt/completion and text rows are not accepted: use chat messages)"
        return f"missing 'messages'{hint}; keys found: {', '.join(sorted(row)) or 'none'}"
    problem = _check_messages(row["messages"])
    if problem:
        return problem
    assistants = [m for m in row["messages"] if m["role"] == "assistant"]
    if not assistants:
        return "no assistant message: nothing to learn from this example"
    if all(m.get("weight", 1) == 0 for m in assistants):
        return "every assistant message has weight 0: nothing to learn from this example"
    if "tools" in row and not isinstance(row["tools"], list):
        return "'tools' must be a list"
    return None


def _check_preference(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object, got {type(row).__name__}"
    if "input" not in row and ("chosen" in row or "rejected" in row):
        return _check_chosen_rejected(row)
    missing = [k for k in ("input", "preferred_output", "non_preferred_output") if k not in row]
    if missing:
        return (
            f"missing {', '.join(repr(k) for k in missing)} (or use prompt/chosen/rejected); keys found: "
            f"{', '.join(sorted(row)) or 'none'}"
        )
    if not isinstance(row["input"], dict):
        return "'input' must be an object with 'messages'"
    problem = _check_messages(row["input"].get("messages"), "input.messages")
    if problem:
        return problem
    for key in ("preferred_output", "non_preferred_output"):
        out = row[key]
        if not isinstance(out, list) or len(out) != 1:
            return f"'{key}' must be a list of exactly one assistant message"
        problem = _check_message(out[0], f"{key}[0]", allow_weight=False)
        if problem:
            return problem
        if out[0]["role"] != "assistant":
            return f"'{key}[0]' must have role assistant"
    if row["preferred_output"][0].get("content") == row["non_preferred_output"][0].get("content"):
        return "preferred and non-preferred answers are identical"
    return None


def _check_chosen_rejected(row: dict[str, Any]) -> str | None:
    """TRL's preference shape: prompt/chosen/rejected as strings (text) or message lists (conversational;
    without 'prompt' the messages chosen and rejected share form the prompt)."""
    missing = [k for k in ("chosen", "rejected") if k not in row]
    if missing:
        return f"missing {', '.join(repr(k) for k in missing)}; keys found: {', '.join(sorted(row))}"
    chosen, rejected, prompt = row["chosen"], row["rejected"], row.get("prompt")
    if isinstance(chosen, str) or isinstance(rejected, str):
        if not (isinstance(chosen, str) and isinstance(rejected, str) and isinstance(prompt, str)):
            return "text preference rows need 'prompt', 'chosen' and 'rejected' all as strings"
        if not chosen or not rejected:
            return "'chosen' and 'rejected' must not be empty"
    else:
        for key in ("chosen", "rejected"):
            problem = _check_messages(row[key], key)
            if problem:
                return problem
        if prompt is not None:
            problem = _check_messages(prompt, "prompt")
            if problem:
                return problem
            answers = {"chosen": chosen, "rejected": rejected}
        else:
            shared = 0
            while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
                shared += 1
            if shared == 0:
                return "without 'prompt', 'chosen' and 'rejected' must start with the same prompt messages"
            answers = {"chosen": chosen[shared:], "rejected": rejected[shared:]}
        for key, answer in answers.items():
            if any(m["role"] != "assistant" for m in answer):
                return f"the answer in '{key}' must be assistant messages only"
    if chosen == rejected:
        return "chosen and rejected answers are identical"
    return None


def _check_prompt(row: Any) -> str | None:
    if not isinstance(row, dict):
        return f"expected a JSON object with 'messages', got {type(row).__name__}"
    if "messages" not in row:
        return f"missing 'messages'; keys found: {', '.join(sorted(row)) or 'none'}"
    problem = _check_messages(row["messages"])
    if problem:
        return problem
    if row["messages"][-1]["role"] != "user":
        return "the last message must be the user's prompt (role user)"
    return None


_CHECKS = {"chat": _check_chat, "preference": _check_preference, "prompt": _check_prompt}


# --- chat rows to tokens ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedExample:
    """One conversation as token ids with a loss weight per token (0 for prompt tokens)."""

    input_ids: list[int]
    weights: list[float]
    line: int = 0

    def __len__(self) -> int:
        return len(self.input_ids)


class TemplateError(ValueError):
    """The chat template cannot be used to find assistant tokens."""


def _render(tokenizer: Any, messages: list[dict[str, Any]], tools: Any, add_generation_prompt: bool) -> str:
    # The template sees only the keys it knows; Whetstone's own `weight` stays out of the prompt.
    clean = [{k: v for k, v in m.items() if k != "weight"} for m in messages]
    return tokenizer.apply_chat_template(
        clean, tools=tools, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def tokenize_chat(
    tokenizer: Any, row: dict[str, Any], *, train_on_all_turns: bool = False, line: int = 0
) -> TokenizedExample:
    """Render a chat row with the model's template and weight the tokens of the trained turns.

    Spans are found on the rendered *text* (rendering messages[:i] is a prefix of rendering messages[:i+1]),
    then mapped to tokens through the tokenizer's offsets, so a BPE merge across a turn boundary cannot shift
    the mask.
    """
    messages = row["messages"]
    tools = row.get("tools")
    full = _render(tokenizer, messages, tools, add_generation_prompt=False)
    spans: list[tuple[int, int, float]] = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant" and not train_on_all_turns:
            continue
        weight = float(m.get("weight", 1)) if m["role"] == "assistant" else 1.0
        if weight == 0:
            continue
        before = (
            _render(tokenizer, messages[:i], tools, add_generation_prompt=m["role"] == "assistant")
            if i
            else ""
        )
        upto = _render(tokenizer, messages[: i + 1], tools, add_generation_prompt=False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise TemplateError(
                "the chat template is not prefix-stable (rendering the first turns is not a prefix of "
                "rendering "
                "the whole conversation), so assistant tokens cannot be located"
            )
        spans.append((len(before), len(upto), weight))
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    weights = [0.0] * len(ids)
    for t, (start, _end) in enumerate(enc["offset_mapping"]):
        for lo, hi, w in spans:
            if lo <= start < hi:
                weights[t] = w
                break
    return TokenizedExample(ids, weights, line)


def prompt_text(tokenizer: Any, messages: list[dict[str, Any]]) -> str:
    """The text a model sees before answering: every message but a final assistant one, plus the generation
    prompt."""
    if messages and messages[-1]["role"] == "assistant":
        messages = messages[:-1]
    return _render(tokenizer, messages, None, add_generation_prompt=True)


def iter_eval_pairs(rows: list[tuple[int, dict[str, Any]]]) -> Iterator[tuple[list[dict[str, Any]], str]]:
    """(prompt messages, reference answer) for rows whose last message is the assistant's answer."""
    for _line, row in rows:
        msgs = row["messages"]
        if msgs and msgs[-1]["role"] == "assistant" and isinstance(msgs[-1].get("content"), str):
            yield msgs[:-1], msgs[-1]["content"]
