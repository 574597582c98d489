"""Packing and loss masks: packed examples never see each other, and only the trained turns carry loss."""

from __future__ import annotations

import random

import pytest
import torch
from whetstone_trainer.data.formats import TokenizedExample, tokenize_chat
from whetstone_trainer.data.packing import Row, collate, epoch_order, pack
from whetstone_trainer.models.sources import load_model_and_tokenizer


@pytest.fixture(scope="module")
def tiny() -> tuple:
    model, tokenizer = load_model_and_tokenizer("whetstone://tiny")
    return model.eval(), tokenizer


CHAT = {
    "messages": [
        {"role": "system", "content": "You reverse digits."},
        {"role": "user", "content": "Reverse 123"},
        {"role": "assistant", "content": "321"},
        {"role": "user", "content": "Reverse 45"},
        {"role": "assistant", "content": "54", "weight": 0},
        {"role": "user", "content": "Reverse 678"},
        {"role": "assistant", "content": "876"},
    ]
}


def _trained_text(tokenizer, ex: TokenizedExample) -> list[str]:  # type: ignore[no-untyped-def]
    """Decode each maximal run of weighted tokens."""
    runs, current = [], []
    for tok, w in zip(ex.input_ids, ex.weights, strict=True):
        if w:
            current.append(tok)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    if current:
        runs.append(tokenizer.decode(current))
    return runs


def test_only_assistant_turns_with_weight_are_trained(tiny: tuple) -> None:
    _, tokenizer = tiny
    ex = tokenize_chat(tokenizer, CHAT)
    runs = _trained_text(tokenizer, ex)
    # The answer and its end-of-turn token are learned; prompts and the weight-0 turn are not.
    assert [r.replace("<|im_end|>", "|").strip() for r in runs] == ["321|", "876|"]
    assert (
        ex.input_ids
        == tokenizer(
            tokenizer.apply_chat_template(
                [{k: v for k, v in m.items() if k != "weight"} for m in CHAT["messages"]], tokenize=False
            ),
            add_special_tokens=False,
        )["input_ids"]
    )


def test_train_on_all_turns_includes_prompts(tiny: tuple) -> None:
    _, tokenizer = tiny
    runs = " ".join(_trained_text(tokenizer, tokenize_chat(tokenizer, CHAT, train_on_all_turns=True)))
    assert "You reverse digits." in runs and "Reverse 678" in runs and "54" not in runs


def test_packed_row_gives_the_logits_of_each_example_alone(tiny: tuple) -> None:
    model, tokenizer = tiny
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Reverse {n}"},
                {"role": "assistant", "content": str(n)[::-1]},
            ]
        }
        for n in (12, 3456, 789012)
    ]
    examples = [tokenize_chat(tokenizer, r) for r in rows]
    packed = collate([Row(tuple(examples)), Row((examples[1],))], tokenizer.pad_token_id)
    with torch.no_grad():
        together = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        at = 0
        for ex in examples:
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(together[0, at : at + len(ex)], alone, atol=1e-5, rtol=1e-5)
            at += len(ex)
        # The shorter second row is padded; its real tokens are unaffected by the padding.
        alone = model(input_ids=torch.tensor([examples[1].input_ids]), use_cache=False).logits[0]
        torch.testing.assert_close(together[1, : len(examples[1])], alone, atol=1e-5, rtol=1e-5)


def test_collate_masks_boundaries_and_padding() -> None:
    a = TokenizedExample([1, 2, 3], [1.0, 1.0, 1.0])
    b = TokenizedExample([4, 5], [1.0, 1.0])
    batch = collate([Row((a, b)), Row((b,))], pad_id=0)
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5], [4, 5, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 0, 1], [0, 1, 0, 1, 2]]
    # An example's first token is never a target (its context would be the previous example).
    assert batch.weights.tolist() == [[0, 1, 1, 0, 1], [0, 1, 0, 0, 0]]


def test_pack_keeps_every_example_once_within_the_limit() -> None:
    rng = random.Random(0)
    examples = [TokenizedExample([i] * rng.randint(1, 60), [1.0] * 1) for i in range(300)]
    examples = [TokenizedExample(e.input_ids, [1.0] * len(e)) for e in examples]
    rows = pack(examples, max_seq_len=64)
    assert all(len(r) <= 64 for r in rows)
    assert sorted(e.input_ids[0] for r in rows for e in r.examples) == list(range(300))
    total = sum(len(e) for e in examples)
    assert len(rows) <= total / 64 * 1.15 + 1  # first-fit decreasing wastes little
    assert pack(examples, 64) == rows  # deterministic


def test_epoch_order_is_a_function_of_seed_and_epoch() -> None:
    assert epoch_order(50, 7, 3) == epoch_order(50, 7, 3)
    assert epoch_order(50, 7, 3) != epoch_order(50, 7, 4)
    assert sorted(epoch_order(50, 7, 3)) == list(range(50))
