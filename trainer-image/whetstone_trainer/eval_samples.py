"""Greedy answers from a model for chat prompts: the before/after samples of `whetstone run` and the held-out
exact-match score."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .data.formats import prompt_text
from .models.sources import load_model_and_tokenizer


@torch.no_grad()
def generate_answers(
    model: Any, tokenizer: Any, prompts: list[list[dict[str, Any]]], max_new_tokens: int, batch_size: int = 32
) -> list[str]:
    """Greedy completions of each prompt (a list of messages), decoded without special tokens."""
    model.eval()
    device = next(model.parameters()).device
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues at the right edge
    answers: list[str] = []
    try:
        for i in range(0, len(prompts), batch_size):
            texts = [prompt_text(tokenizer, p) for p in prompts[i : i + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=_stop_ids(tokenizer),
            )
            for row in out[:, enc["input_ids"].shape[1] :]:
                answers.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    finally:
        tokenizer.padding_side = side
    return answers


def _stop_ids(tokenizer: Any) -> list[int]:
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return sorted(i for i in ids if i is not None)


def exact_match(answers: list[str], references: list[str]) -> float:
    if not references:
        return float("nan")
    return sum(a.strip() == r.strip() for a, r in zip(answers, references, strict=True)) / len(references)


def load_trained(final: Path, base_uri: str, base_dir: Path | None) -> tuple[Any, Any]:
    """The model a job produced: a full model folder, or the base model with the job's LoRA adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(final)
    if (final / "adapter_config.json").is_file():
        from peft import PeftModel

        base, _ = load_model_and_tokenizer(base_uri, base_dir)
        return PeftModel.from_pretrained(base, final), tokenizer
    return AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32), tokenizer
