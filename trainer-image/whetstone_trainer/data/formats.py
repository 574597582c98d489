"""The dataset formats, in one place: reading JSONL, checking the structure of every row, and turning chat
rows into tokens with per-token loss weights.

Formats (one JSON object per line):
- chat (SFT): {"messages": [message, ...], "tools": [tool, ...]?}. A message is {"role": system | user |
  assistant | tool, "content": str, ...}; assistant messages may carry "weight" (0 or 1), "tool_calls" and
  "reasoning_content", tool messages "tool_call_id". The loss covers assistant turns (weight 0 switches one
  off).
- preference (DPO), either shape, one per row:
  - {"input": {"messages": [...], "tools": [...]?}, "preferred_output": [assistant message],
    "non_preferred_output": [assistant message]} (OpenAI, Fireworks, Together);
  - {"prompt": str | [messages], "chosen": str | [assistant message], "rejected": str | [assistant message]}
    (TRL; text or conversational, not mixed; without "prompt", conversational chosen and rejected start with
    the same prompt messages). `preference_pair` gives every shape as one PreferencePair.
- prompt (RFT): {"messages": [..., user message], ...any fields the graders read as {{ item.<key> }}}.

Reading never stops at the first bad line: every problem is collected with its line number and the field
inside the row, so a user fixes a file in one pass. Work is bounded on hostile files: a line longer than
MAX_ROW_BYTES is skipped unread, nesting, numbers and strings are checked before a row is used, and nothing
in a row can raise anything but a RowError.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from whetstone_api.openapi import suggestion

ROLES = ("system", "user", "assistant", "tool")
DatasetFormat = Literal["chat", "preference", "prompt"]
FORMAT_OF_METHOD: dict[str, DatasetFormat] = {"sft": "chat", "dpo": "preference", "rft": "prompt"}
MAX_REPORTED_ERRORS = 200
MAX_ROW_BYTES = 16 * 1024 * 1024
"""A longer line is reported, not parsed."""
MAX_JSON_DEPTH = 32
MAX_MESSAGES = 4096
MAX_INT_DIGITS = 19

MESSAGE_KEYS = ("role", "content", "name", "weight", "tool_calls", "tool_call_id", "reasoning_content")
CHAT_KEYS = ("messages", "tools")
OPENAI_PREFERENCE_KEYS = ("input", "preferred_output", "non_preferred_output")
TRL_PREFERENCE_KEYS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class RowError:
    line: int  # 0: the file as a whole (missing, unreadable, empty)
    reason: str

    def __str__(self) -> str:
        return f"line {self.line}: {self.reason}" if self.line else self.reason


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
        if len(self.errors) == 1 and self.errors[0].line == 0:
            return f"{self.path}: {self.errors[0].reason}"
        lines = [f"{self.path}: {len(self.errors)} problem(s) in {len(self.rows) + len(self.errors)} row(s)"]
        lines += [f"  {self.path.name}:{e}" for e in self.errors[:MAX_REPORTED_ERRORS]]
        if len(self.errors) > MAX_REPORTED_ERRORS:
            lines.append(f"  ... and {len(self.errors) - MAX_REPORTED_ERRORS} more")
        return "\n".join(lines)


class DatasetError(ValueError):
    """A dataset that cannot be used; the message lists every bad line."""


class _Bad(ValueError):
    """A problem with one row; the message names the field."""


def read_jsonl(path: Path, fmt: DatasetFormat, max_examples: int | None = None) -> DatasetReport:
    """Parse and check every line of a JSONL file in the given format."""
    report = DatasetReport(path=path)
    if not path.is_file():
        report.errors.append(RowError(0, "file not found"))
        return report
    check = _CHECKS[fmt]
    try:
        f = path.open("rb")
    except OSError as e:
        report.errors.append(RowError(0, f"cannot read: {e.strerror}"))
        return report
    with f:
        for number, raw in _lines(f):
            if max_examples is not None and len(report.rows) >= max_examples:
                break
            if raw is None:
                report.errors.append(RowError(number, f"the line is longer than {MAX_ROW_BYTES} bytes"))
                continue
            if number == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")  # a UTF-8 byte-order mark
            try:
                row = parse_row(raw)
                if row is None:
                    continue
                check(row)
            except _Bad as e:
                report.errors.append(RowError(number, str(e)))
                continue
            report.rows.append((number, row))
    if not report.rows and not report.errors:
        report.errors.append(RowError(0, "the file has no examples"))
    return report


def _lines(f: Any) -> Iterator[tuple[int, bytes | None]]:
    """(line number, bytes) of every line; None for a line over MAX_ROW_BYTES, which is skipped unread."""
    number = 0
    while True:
        chunk = f.readline(MAX_ROW_BYTES + 1)
        if not chunk:
            return
        number += 1
        if len(chunk) > MAX_ROW_BYTES and not chunk.endswith(b"\n"):
            while chunk and not chunk.endswith(b"\n"):
                chunk = f.readline(1 << 20)
            yield number, None
            continue
        yield number, chunk


def parse_row(raw: bytes) -> Any:
    """One JSON line, strictly: UTF-8, no NaN or Infinity, no duplicate keys, bounded numbers and nesting,
    no lone surrogates. None for a blank line; raises _Bad."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _Bad(f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        return None
    try:
        row = json.loads(
            text,
            parse_constant=_no_constant,
            parse_int=_bounded_int,
            parse_float=_finite_float,
            object_pairs_hook=_no_duplicates,
        )
    except json.JSONDecodeError as e:
        raise _Bad(f"invalid JSON: {e.msg} at column {e.colno}") from None
    except RecursionError:
        raise _Bad(f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels") from None
    except ValueError as e:  # from the hooks
        raise _Bad(f"invalid JSON: {e}") from None
    _check_tree(row)
    return row


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _bounded_int(text: str) -> int:
    if len(text.lstrip("-")) > MAX_INT_DIGITS:
        raise ValueError(f"the number {text[:24]}... has more than {MAX_INT_DIGITS} digits")
    return int(text)


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"the number {text[:24]} is too large")
    return value


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _check_tree(row: Any) -> None:
    """Depth and strings of a parsed row, without recursion."""
    stack: list[tuple[Any, int, str]] = [(row, 1, "")]
    while stack:
        value, depth, where = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise _Bad(f"invalid JSON: nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, str):
            _utf8(value, where)
        elif isinstance(value, dict):
            for k, v in value.items():
                _utf8(k, where or "a key")
                stack.append((v, depth + 1, f"{where}.{k}" if where else k))
        elif isinstance(value, list):
            stack.extend((v, depth + 1, f"{where}[{i}]") for i, v in enumerate(value))


def _utf8(text: str, where: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _Bad(f"{where or 'the row'}: a \\u escape is a lone surrogate, not a character") from None


# --- structure of rows ------------------------------------------------------------------------------------


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number"
    )


def _string(value: Any, where: str, *, empty: bool = True) -> str:
    if not isinstance(value, str):
        raise _Bad(f"{where} must be a string, not {_type(value)}")
    if not empty and not value.strip():
        raise _Bad(f"{where} must not be empty")
    return value


def _unknown_keys(obj: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    for key in obj:
        if key not in known:
            near = suggestion(key, list(known))
            raise _Bad(
                f"{where}.{key}: unknown key"
                + (f"; did you mean {near}?" if near else f" (known: {', '.join(known)})")
            )


def _close_misspellings(row: dict[str, Any], known: tuple[str, ...]) -> None:
    """Extra top-level keys are allowed (metadata, fields graders read), but not a misspelt known one."""
    for key in row:
        if key in known:
            continue
        near = suggestion(key, list(known))
        if near:
            raise _Bad(f"{key}: unknown key; did you mean {near}?")


def _check_tool_calls(calls: Any, where: str) -> list[str]:
    """The ids of an assistant message's tool calls."""
    if not isinstance(calls, list) or not calls:
        raise _Bad(f"{where} must be a non-empty list of tool calls")
    ids = []
    for i, call in enumerate(calls):
        at = f"{where}[{i}]"
        if not isinstance(call, dict):
            raise _Bad(f"{at} must be an object, not {_type(call)}")
        _unknown_keys(call, ("id", "type", "function"), at)
        if "type" in call and call["type"] != "function":
            raise _Bad(f"{at}.type must be 'function', not {call['type']!r}")
        if "id" in call:
            ids.append(_string(call["id"], f"{at}.id", empty=False))
        function = call.get("function")
        if not isinstance(function, dict):
            raise _Bad(f"{at}.function must be an object with name and arguments")
        _unknown_keys(function, ("name", "arguments"), f"{at}.function")
        _string(function.get("name"), f"{at}.function.name", empty=False)
        arguments = function.get("arguments", {})
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments, parse_constant=_no_constant)
            except (ValueError, RecursionError):
                raise _Bad(f"{at}.function.arguments is not valid JSON") from None
        if not isinstance(arguments, dict):
            raise _Bad(
                f"{at}.function.arguments must be a JSON object (or its JSON text), not {_type(arguments)}"
            )
    return ids


def _check_message(m: Any, where: str, *, allow_weight: bool = True) -> None:
    if not isinstance(m, dict):
        raise _Bad(f"{where} must be an object, not {_type(m)}")
    _unknown_keys(m, MESSAGE_KEYS, where)
    if "role" not in m:
        raise _Bad(f"{where} has no 'role'")
    role = m["role"]
    if role not in ROLES:
        raise _Bad(f"{where}.role: unknown role {role!r} (expected one of {', '.join(ROLES)})")
    content = m.get("content")
    if isinstance(content, list):
        raise _Bad(f"{where}.content ({role}) must be a string: content parts (lists) are not supported")
    if content is None and not (role == "assistant" and m.get("tool_calls")):
        raise _Bad(f"{where} ({role}) has no 'content'")
    if content is not None:
        _string(content, f"{where}.content ({role})")
    if "name" in m:
        _string(m["name"], f"{where}.name")
    if "weight" in m:
        if not allow_weight:
            raise _Bad(f"{where}.weight: not allowed here")
        if role != "assistant":
            raise _Bad(f"{where}.weight ({role}): only allowed on assistant messages")
        if isinstance(m["weight"], bool) or m["weight"] not in (0, 1):
            raise _Bad(f"{where}.weight must be 0 or 1, not {m['weight']!r}")
    if "reasoning_content" in m:
        if role != "assistant":
            raise _Bad(f"{where}.reasoning_content ({role}): only allowed on assistant messages")
        _string(m["reasoning_content"], f"{where}.reasoning_content")
    if "tool_calls" in m:
        if role != "assistant":
            raise _Bad(f"{where}.tool_calls ({role}): only allowed on assistant messages")
        _check_tool_calls(m["tool_calls"], f"{where}.tool_calls")
    if "tool_call_id" in m:
        if role != "tool":
            raise _Bad(f"{where}.tool_call_id ({role}): only allowed on tool messages")
        _string(m["tool_call_id"], f"{where}.tool_call_id", empty=False)


def _check_messages(
    messages: Any, key: str = "messages", *, allow_weight: bool = True
) -> list[dict[str, Any]]:
    """A conversation: valid messages, system first, tool results right after the calls they answer."""
    if not isinstance(messages, list):
        raise _Bad(f"'{key}' must be a list of messages, not {_type(messages)}")
    if not messages:
        raise _Bad(f"'{key}' is empty")
    if len(messages) > MAX_MESSAGES:
        raise _Bad(f"'{key}' has {len(messages)} messages, more than {MAX_MESSAGES}")
    call_ids: list[str] | None = None
    for i, m in enumerate(messages):
        where = f"{key}[{i}]"
        _check_message(m, where, allow_weight=allow_weight)
        role = m["role"]
        if role == "system" and i:
            raise _Bad(f"{where}: a system message must come first")
        if role == "tool":
            if call_ids is None:
                raise _Bad(f"{where}: a tool message must follow an assistant message with tool_calls")
            if "tool_call_id" in m and call_ids and m["tool_call_id"] not in call_ids:
                raise _Bad(
                    f"{where}.tool_call_id {m['tool_call_id']!r} answers no call of the message before"
                )
        elif role == "assistant" and m.get("tool_calls"):
            call_ids = [c["id"] for c in m["tool_calls"] if "id" in c]
        else:
            call_ids = None
    return messages


def _check_tools(tools: Any, key: str = "tools") -> None:
    if not isinstance(tools, list):
        raise _Bad(f"'{key}' must be a list, not {_type(tools)}")
    for i, tool in enumerate(tools):
        where = f"{key}[{i}]"
        if not isinstance(tool, dict):
            raise _Bad(f"{where} must be an object, not {_type(tool)}")
        _unknown_keys(tool, ("type", "function"), where)
        if tool.get("type", "function") != "function":
            raise _Bad(f"{where}.type must be 'function', not {tool.get('type')!r}")
        function = tool.get("function")
        if not isinstance(function, dict):
            raise _Bad(f"{where}.function must be an object with a name")
        _unknown_keys(function, ("name", "description", "parameters", "strict"), f"{where}.function")
        _string(function.get("name"), f"{where}.function.name", empty=False)
        if "description" in function:
            _string(function["description"], f"{where}.function.description")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise _Bad(f"{where}.function.parameters must be a JSON schema object")


def _object(row: Any, expected: str) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise _Bad(f"expected a JSON object with {expected}, got {_type(row)}")
    return row


def _check_chat(row: Any) -> None:
    row = _object(row, "'messages'")
    if "messages" not in row:
        hint = ""
        if any(k in row for k in (*OPENAI_PREFERENCE_KEYS[1:], *TRL_PREFERENCE_KEYS[1:])):
            hint = " (this looks like a preference row for method dpo)"
        elif "prompt" in row or "text" in row or "completion" in row:
            hint = " (prompt/completion and text rows are not accepted: use chat messages)"
        else:
            near = next((k for k in row if suggestion(k, ["messages"])), None)
            hint = f" (did you mean messages instead of {near}?)" if near else ""
        raise _Bad(f"missing 'messages'{hint}; keys found: {', '.join(sorted(row)) or 'none'}")
    _close_misspellings(row, CHAT_KEYS)
    messages = _check_messages(row["messages"])
    if "tools" in row:
        _check_tools(row["tools"])
    assistants = [m for m in messages if m["role"] == "assistant"]
    if not assistants:
        raise _Bad("no assistant message: nothing to learn from this example")
    if all(m.get("weight", 1) == 0 for m in assistants):
        raise _Bad("every assistant message has weight 0: nothing to learn from this example")


def _check_prompt_messages(messages: Any, key: str) -> None:
    _check_messages(messages, key, allow_weight=False)
    if messages[-1]["role"] not in ("user", "tool"):
        raise _Bad(f"{key}[{len(messages) - 1}]: the prompt must end with the user's turn (role user)")


def _check_answer(answer: Any, key: str) -> None:
    if not isinstance(answer, list) or len(answer) != 1:
        raise _Bad(f"'{key}' must be a list of exactly one assistant message")
    _check_message(answer[0], f"{key}[0]", allow_weight=False)
    if answer[0]["role"] != "assistant":
        raise _Bad(f"{key}[0].role must be assistant, not {answer[0]['role']!r}")


@dataclass(frozen=True)
class PreferencePair:
    """One preference row in either shape. `prompt` is messages (conversational) or text; `chosen` and
    `rejected` an assistant message or text, in the same form as the prompt."""

    prompt: list[dict[str, Any]] | str
    chosen: dict[str, Any] | str
    rejected: dict[str, Any] | str
    tools: list[dict[str, Any]] | None = None

    @property
    def conversational(self) -> bool:
        return isinstance(self.prompt, list)


def preference_pair(row: dict[str, Any]) -> PreferencePair:
    """A checked preference row as a PreferencePair."""
    if "input" in row:
        return PreferencePair(
            row["input"]["messages"],
            row["preferred_output"][0],
            row["non_preferred_output"][0],
            row["input"].get("tools"),
        )
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" not in row:  # implicit prompt: the messages chosen and rejected start with
        shared = _shared_prefix(chosen, rejected)
        return PreferencePair(chosen[:shared], chosen[shared], rejected[shared], row.get("tools"))
    if isinstance(row["prompt"], list):
        chosen, rejected = chosen[0], rejected[0]
    return PreferencePair(row["prompt"], chosen, rejected, row.get("tools"))


def _shared_prefix(chosen: list[Any], rejected: list[Any]) -> int:
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return shared


def _check_preference(row: Any) -> None:
    row = _object(row, "input/preferred_output/non_preferred_output or prompt/chosen/rejected")
    openai = [k for k in OPENAI_PREFERENCE_KEYS if k in row]
    trl = [k for k in TRL_PREFERENCE_KEYS if k in row]
    if openai and trl:
        raise _Bad(
            f"the row mixes two preference shapes ({', '.join(openai + trl)}): use either "
            "input/preferred_output/non_preferred_output or prompt/chosen/rejected"
        )
    if not openai and not trl:
        hint = " (this looks like a chat row for method sft)" if "messages" in row else ""
        raise _Bad(
            "missing 'input', 'preferred_output', 'non_preferred_output' (or 'prompt', 'chosen', 'rejected')"
            f"{hint}; keys found: {', '.join(sorted(row)) or 'none'}"
        )
    if openai:
        _check_openai_preference(row)
    else:
        _check_trl_preference(row)
    pair = preference_pair(row)
    if _answer_text(pair.chosen) == _answer_text(pair.rejected):
        raise _Bad("preferred and non-preferred answers are identical")


def _answer_text(answer: dict[str, Any] | str) -> Any:
    return (
        answer if isinstance(answer, str) else (answer.get("content"), json.dumps(answer.get("tool_calls")))
    )


def _check_openai_preference(row: dict[str, Any]) -> None:
    missing = [k for k in OPENAI_PREFERENCE_KEYS if k not in row]
    if missing:
        raise _Bad(f"missing {', '.join(repr(k) for k in missing)}; keys found: {', '.join(sorted(row))}")
    _close_misspellings(row, OPENAI_PREFERENCE_KEYS)
    prompt = row["input"]
    if not isinstance(prompt, dict):
        raise _Bad(f"'input' must be an object with 'messages', not {_type(prompt)}")
    _unknown_keys(prompt, ("messages", "tools"), "input")
    _check_prompt_messages(prompt.get("messages"), "input.messages")
    if "tools" in prompt:
        _check_tools(prompt["tools"], "input.tools")
    for key in OPENAI_PREFERENCE_KEYS[1:]:
        _check_answer(row[key], key)


def _check_trl_preference(row: dict[str, Any]) -> None:
    if "prompt" not in row and isinstance(row.get("chosen"), list) and isinstance(row.get("rejected"), list):
        _check_implicit_prompt(row)
        return
    missing = [k for k in TRL_PREFERENCE_KEYS if k not in row]
    if missing:
        raise _Bad(f"missing {', '.join(repr(k) for k in missing)}; keys found: {', '.join(sorted(row))}")
    _close_misspellings(row, (*TRL_PREFERENCE_KEYS, "tools"))
    prompt = row["prompt"]
    if isinstance(prompt, str):
        _string(prompt, "prompt", empty=False)
        for key in TRL_PREFERENCE_KEYS[1:]:
            if not isinstance(row[key], str):
                raise _Bad(f"'{key}' must be text like the prompt, not {_type(row[key])}")
    elif isinstance(prompt, list):
        _check_prompt_messages(prompt, "prompt")
        for key in TRL_PREFERENCE_KEYS[1:]:
            if isinstance(row[key], str):
                raise _Bad(f"'{key}' must be a list of one assistant message, like the conversational prompt")
            _check_answer(row[key], key)
    else:
        raise _Bad(f"'prompt' must be text or a list of messages, not {_type(prompt)}")
    if "tools" in row:
        _check_tools(row["tools"])


def _check_implicit_prompt(row: dict[str, Any]) -> None:
    """TRL's conversational rows without 'prompt': chosen and rejected are whole conversations that share the
    prompt messages and differ in the last, assistant, message."""
    _close_misspellings(row, (*TRL_PREFERENCE_KEYS, "tools"))
    for key in ("chosen", "rejected"):
        _check_messages(row[key], key, allow_weight=False)
    chosen, rejected = row["chosen"], row["rejected"]
    shared = _shared_prefix(chosen, rejected)
    if shared == 0:
        raise _Bad("without 'prompt', 'chosen' and 'rejected' must start with the same prompt messages")
    _check_prompt_messages(chosen[:shared], "chosen")
    for key, messages in (("chosen", chosen), ("rejected", rejected)):
        if len(messages) != shared + 1:
            raise _Bad(
                f"'{key}' must be the shared prompt messages and one assistant answer; it has "
                f"{len(messages) - shared} messages after the {shared} it shares"
            )
        if messages[shared]["role"] != "assistant":
            raise _Bad(f"{key}[{shared}].role must be assistant, not {messages[shared]['role']!r}")
    if "tools" in row:
        _check_tools(row["tools"])


def _check_prompt(row: Any) -> None:
    row = _object(row, "'messages'")
    if "messages" not in row:
        hint = " (write the prompt as messages: [{role: user, content: ...}])" if "prompt" in row else ""
        raise _Bad(f"missing 'messages'{hint}; keys found: {', '.join(sorted(row)) or 'none'}")
    _check_messages(row["messages"], allow_weight=False)
    if row["messages"][-1]["role"] != "user":
        raise _Bad(
            f"messages[{len(row['messages']) - 1}]: the last message must be the user's prompt (role user)"
        )
    if "tools" in row:
        _check_tools(row["tools"])


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
