"""Greedy answers from a model for chat prompts: the before/after samples of `whetstone run` and the held-out
exact-match score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .data.formats import prompt_text
from .models.sources import load_model_and_tokenizer
from .sampling import SamplingParams, default_stop_token_ids, sample


def generate_answers(
    model: Any, tokenizer: Any, prompts: list[list[dict[str, Any]]], max_new_tokens: int, batch_size: int = 64
) -> list[str]:
    """Greedy completions of each prompt (a list of messages), decoded without special tokens."""
    params = SamplingParams(
        max_tokens=max_new_tokens, temperature=0, stop_token_ids=default_stop_token_ids(tokenizer)
    )
    answers: list[str] = []
    for i in range(0, len(prompts), batch_size):
        ids = [
            tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]
            for p in prompts[i : i + batch_size]
        ]
        for (completion,) in sample(model, ids, params):
            answers.append(tokenizer.decode(completion.tokens, skip_special_tokens=True).strip())
    return answers


def exact_match(answers: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    return sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True)) / len(references)


def load_trained(final: Path, base_folder: Path) -> tuple[Any, Any]:
    """The model a job produced: a full model folder, or the base model (its materialised folder) with the
    job's LoRA adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        base, _ = load_model_and_tokenizer(str(base_folder))
        return PeftModel.from_pretrained(base, final), tokenizer
    return AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32), tokenizer
