"""Preference (DPO) and prompt (RFT) rows to tokens, and the length each method puts through the model (what
pre-flight checks against maxSeqLen). SFT's chat rows are tokenised by formats.tokenize_chat.

Preference rows come in two shapes (formats.py checks them):
- OpenAI: {"input": {"messages": [...], "tools": [...]?}, "preferred_output": [assistant message],
  "non_preferred_output": [assistant message]};
- TRL: {"prompt": ..., "chosen": ..., "rejected": ...}, conversational (lists of messages; without
  "prompt" the shared leading messages of chosen and rejected are the prompt) or text (strings; the
  end-of-text token is appended to each answer, so the model also learns where an answer ends).
Conversational rows are rendered with the model's chat template; only the answer's tokens carry weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from whetstone_api.finetunejob import FineTuneJobSpec

from .formats import TemplateError, TokenizedExample, _render, tokenize_chat

Messages = list[dict[str, Any]]


@dataclass(frozen=True)
class PreferencePair:
    """One preference row as tokens: prompt + chosen answer and prompt + rejected answer, weight 1 on the
    answer tokens."""

    chosen: TokenizedExample
    rejected: TokenizedExample
    line: int = 0


def preference_parts(row: dict[str, Any]) -> tuple[Messages | str, Messages | str, Messages | str, Any]:
    """(prompt, chosen answer, rejected answer, tools) of a checked preference row of either shape."""
    if "input" in row:
        return (
            row["input"]["messages"],
            row["preferred_output"],
            row["non_preferred_output"],
            row["input"].get("tools"),
        )
    chosen, rejected = row["chosen"], row["rejected"]
    if "prompt" in row:
        return row["prompt"], chosen, rejected, row.get("tools")
    shared = 0  # implicit prompt: the leading messages chosen and rejected have in common
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:], row.get("tools")


def _answer_tokens(
    tokenizer: Any, prompt: Messages | str, answer: Messages | str, tools: Any, line: int
) -> TokenizedExample:
    if isinstance(prompt, str):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        a = tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return TokenizedExample(p + a, [0.0] * len(p) + [1.0] * len(a), line)
    assert isinstance(answer, list)
    before = _render(tokenizer, prompt, tools, add_generation_prompt=True)
    full = _render(tokenizer, prompt + answer, tools, add_generation_prompt=False)
    if not full.startswith(before):
        raise TemplateError(
            "the chat template is not prefix-stable (the prompt with a generation prompt is not a prefix of "
            "the prompt followed by the answer), so the answer's tokens cannot be located"
        )
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    weights = [1.0 if start >= len(before) else 0.0 for start, _end in enc["offset_mapping"]]
    return TokenizedExample(enc["input_ids"], weights, line)


def tokenize_preference(tokenizer: Any, row: dict[str, Any], line: int = 0) -> PreferencePair:
    prompt, chosen, rejected, tools = preference_parts(row)
    return PreferencePair(
        _answer_tokens(tokenizer, prompt, chosen, tools, line),
        _answer_tokens(tokenizer, prompt, rejected, tools, line),
        line,
    )


def tokenize_prompt(tokenizer: Any, row: dict[str, Any]) -> list[int]:
    """An RFT prompt row's messages, rendered with the generation prompt: what the policy continues."""
    text = _render(tokenizer, row["messages"], row.get("tools"), add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def example_length(spec: FineTuneJobSpec, tokenizer: Any, row: dict[str, Any]) -> tuple[int, str]:
    """Tokens of the longest sequence the job's method builds from this row, and what they are made of (for
    the pre-flight message; empty when the count says it all)."""
    if spec.method == "sft":
        return len(tokenize_chat(tokenizer, row, train_on_all_turns=spec.sft_settings.train_on_all_turns)), ""
    if spec.method == "dpo":
        pair = tokenize_preference(tokenizer, row)
        return max(len(pair.chosen), len(pair.rejected)), "prompt + longer answer: "
    assert spec.rft is not None
    prompt = len(tokenize_prompt(tokenizer, row))
    budget = spec.rft.max_completion_tokens
    return prompt + budget, f"prompt {prompt} + rft.maxCompletionTokens {budget} = "
