"""One row per prompt (data.packing.collate_shared_prompts): the RFT update runs a group's prompt once and its
answers side by side, each answer attending to the prompt and to itself. The log-probs, entropies and
gradients are those of one row per answer, in the same order; loop.answers_batch takes the layout only for
an attention that takes such a mask and only where the model's sizes say it is cheaper."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from conftest import valid_job
from whetstone_api import FineTuneJob
from whetstone_trainer import loop
from whetstone_trainer.data.formats import TokenizedExample
from whetstone_trainer.data.packing import Row, collate, collate_shared_prompts
from whetstone_trainer.models import shared_prompt_attention
from whetstone_trainer.models.activations import is_gradient_checkpointing
from whetstone_trainer.models.sources import load_model_and_tokenizer, materialise, parse_model_uri

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    model, tokenizer = load_model_and_tokenizer("whetstone://tiny")
    return model.train(), tokenizer


def _answers(
    lengths: list[list[int]], seed: int = 0, twins: bool = False
) -> tuple[list[TokenizedExample], list[int]]:
    """Groups of answers after their prompt (group k: a prompt of 3 + 2k tokens), interleaved as the
    update's micro-batches deal them out (answer j of every group, then answer j + 1...); `twins`: the first
    two answers of the first group are the same."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 2000, (3 + 2 * k,), generator=g).tolist() for k in range(len(lengths))]
    per_group = [[torch.randint(5, 2000, (n,), generator=g).tolist() for n in ns] for ns in lengths]
    if twins:
        per_group[0][1] = per_group[0][0]
    examples, prompt_lens = [], []
    for j in range(max(len(ns) for ns in lengths)):
        for prompt, answers in zip(prompts, per_group, strict=True):
            if j < len(answers):
                answer = answers[j]
                examples.append(TokenizedExample(prompt + answer, [0.0] * len(prompt) + [1.0] * len(answer)))
                prompt_lens.append(len(prompt))
    return examples, prompt_lens


def test_the_layout_puts_each_prompt_once_and_masks_answers_from_each_other() -> None:
    examples, prompt_lens = _answers([[2, 3], [1]])  # examples 0 and 2 answer group 0, example 1 group 1
    batch = collate_shared_prompts(examples, prompt_lens, pad_id=0)
    # P = 4 prompt columns (group 1's prompt of 5, less its last token), S = 2 segments of W = 4 columns
    # (the longest answer, 3, after the prompt's last token again).
    assert batch.shared_prompt == (4, 2, 4)
    assert batch.input_ids.shape == (2, 4 + 2 * 4)
    assert batch.num_examples == 3 and batch.attention_mask is not None
    ids, seg, mask = batch.input_ids[0].tolist(), batch.example_ids[0].tolist(), batch.attention_mask[0, 0]
    p0, a0, a2 = examples[0].input_ids[:3], examples[0].input_ids[3:], examples[2].input_ids[3:]
    assert ids == [0, 0, *p0[:2]] + [p0[2], *a0, 0] + [p0[2], *a2]
    assert seg == [-1, -1, -1, -1, 0, 0, 0, -1, 2, 2, 2, 2]
    assert batch.position_ids[0].tolist()[2:7] == [0, 1, 2, 3, 4]
    assert batch.position_ids[0].tolist()[8:] == [2, 3, 4, 5]
    assert batch.weights[0].tolist() == [0, 0, 0, 0, 0, 1, 1, 0, 0, 1, 1, 1]
    # Answer 2 sees the prompt and itself, not answer 0 nor the prompt's left padding.
    assert mask[9].tolist() == [False, False, True, True] + [False] * 4 + [True, True, False, False]
    assert mask[6].tolist() == [False, False, True, True, True, True, True] + [False] * 5
    # Group 1's row: its single answer, then a segment of padding that nothing real attends to.
    row1 = batch.attention_mask[1, 0]
    assert batch.example_ids[1].tolist() == [-1] * 4 + [1, 1, -1, -1] + [-1] * 4
    real = batch.example_ids[1] >= 0
    assert not row1[real][:, 6:].any()
    assert row1.diagonal().all()  # every position, padding too, attends to something
    with pytest.raises(ValueError, match="example 0: a prompt of 0"):
        collate_shared_prompts(examples[:1], [0], pad_id=0)


@pytest.fixture(params=["answers-apart", "dense-mask", "answers-apart-short-mask", "answers-apart-sdpa"])
def attention(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> tuple[bool, list[tuple[int, int, int]]]:
    """How the shared rows' attention runs: models/shared_prompt_attention.py (with the full mask, or the
    short one it needs; its explicit products, or sdpa's kernel as for large shapes), or transformers' sdpa
    over the whole row with the dense mask. Yields whether the full mask is built, and the layouts the
    answers-apart attention was called with."""
    calls: list[tuple[int, int, int]] = []
    if request.param == "answers-apart-sdpa":
        monkeypatch.setattr(shared_prompt_attention, "EXPLICIT_LIMIT_BYTES", -1)
    if request.param == "dense-mask":
        monkeypatch.setattr(shared_prompt_attention, "supported", lambda config: False)
    else:
        attend = shared_prompt_attention.attend

        def spy(*args: Any, **kwargs: Any) -> Any:
            calls.append(args[4])
            return attend(*args, **kwargs)

        monkeypatch.setattr(shared_prompt_attention, "attend", spy)
    return request.param != "answers-apart-short-mask", calls


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_shared_prompts_give_the_log_probs_entropy_and_gradients_of_one_row_per_answer(
    tiny: tuple[Any, Any], temperature: float, attention: tuple[bool, list[tuple[int, int, int]]]
) -> None:
    model, tokenizer = tiny
    full_mask, calls = attention
    examples, prompt_lens = _answers([[4, 6, 0, 9], [7, 2, 5], [3, 8]], twins=True)
    advantages = torch.linspace(-1.5, 2.0, len(examples))
    results = []
    for batch in (
        collate([Row((e,)) for e in examples], tokenizer.pad_token_id),
        collate_shared_prompts(examples, prompt_lens, tokenizer.pad_token_id, full_mask=full_mask),
    ):
        model.zero_grad(set_to_none=True)
        t = loop.target_logprobs(model, batch, CPU, with_entropy=True, temperature=temperature)
        (-(t.per_row_sum() * advantages).sum()).backward()
        results.append((t, [p.grad.clone() for p in model.parameters()]))
    (plain, plain_grads), (shared, shared_grads) = results
    assert shared.num_rows == plain.num_rows == len(examples)
    assert shared.rows.tolist() == plain.rows.tolist()  # the same targets, in the same order
    torch.testing.assert_close(shared.logprobs, plain.logprobs, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.entropy, plain.entropy, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shared.weights, plain.weights)
    assert plain.per_row_count()[6] == 0  # the empty answer (group 0, third) has no targets either way
    assert any(g.abs().sum() > 0 for g in plain_grads)
    for a, b in zip(plain_grads, shared_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
    # The answers-apart attention ran in every layer on the shared rows (P = 6, S = 4, W = 10), or never.
    dense = bool(calls) is False
    assert calls == ([] if dense else [(6, 4, 10)] * model.config.num_hidden_layers)


@pytest.mark.parametrize("prompt_tokens", [[3, 5], [1, 1]])  # P = 4 with one row's prompt padded; P = 0
def test_the_explicit_answers_attention_is_sdpas_with_grouped_heads(
    monkeypatch: pytest.MonkeyPatch, prompt_tokens: list[int]
) -> None:
    g = torch.Generator().manual_seed(7)
    examples = [
        TokenizedExample([1] * n + [2] * k, [0.0] * n + [1.0] * k)
        for n, k in [(prompt_tokens[0], 3), (prompt_tokens[1], 2), (prompt_tokens[0], 1)]
    ]
    batch = collate_shared_prompts(examples, [prompt_tokens[0], prompt_tokens[1], prompt_tokens[0]], pad_id=0)
    assert batch.shared_prompt is not None and batch.attention_mask is not None
    rows, t = batch.input_ids.shape
    query = torch.randn(rows, 4, t, 8, generator=g, requires_grad=True)  # 4 query heads on 2 key heads
    key, value = (torch.randn(rows, 2, t, 8, generator=g, requires_grad=True) for _ in range(2))
    upstream = torch.randn(rows, t, 4, 8, generator=g)
    results = []
    for limit in (shared_prompt_attention.EXPLICIT_LIMIT_BYTES, -1):  # explicit, then sdpa's kernel
        monkeypatch.setattr(shared_prompt_attention, "EXPLICIT_LIMIT_BYTES", limit)
        out, _ = shared_prompt_attention.attend(query, key, value, batch.attention_mask, batch.shared_prompt)
        grads = torch.autograd.grad((out * upstream).sum(), (query, key, value))
        results.append((out, grads))
    (explicit, explicit_grads), (kernel, kernel_grads) = results
    assert explicit.shape == (rows, t, 4, 8)
    torch.testing.assert_close(explicit, kernel, atol=1e-5, rtol=1e-5)
    for a, b in zip(explicit_grads, kernel_grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # In bf16 (autocast's dtype), no further from the fp32 values than the kernel's own bf16 result.
    with torch.no_grad():
        half = [x.detach().bfloat16() for x in (query, key, value)]
        explicit_bf16, _ = shared_prompt_attention.attend(*half, batch.attention_mask, batch.shared_prompt)
        assert explicit_bf16.dtype == torch.bfloat16
        monkeypatch.setattr(shared_prompt_attention, "EXPLICIT_LIMIT_BYTES", -1)
        kernel_bf16, _ = shared_prompt_attention.attend(*half, batch.attention_mask, batch.shared_prompt)
    worst = (kernel_bf16.float() - kernel).abs().max()
    assert (explicit_bf16.float() - kernel).abs().max() <= 2 * worst + 1e-2


def test_a_short_mask_never_reaches_an_attention_that_needs_the_full_one(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    examples, prompt_lens = _answers([[4, 6], [7, 2]])
    batch = collate_shared_prompts(examples, prompt_lens, tokenizer.pad_token_id, full_mask=False)
    assert batch.attention_mask is not None and batch.attention_mask.shape[-1] == 5  # P + 1, not T
    with pytest.raises(RuntimeError):  # without the layout argument, sdpa gets a mask of the wrong size
        model(input_ids=batch.input_ids, position_ids=batch.position_ids, attention_mask=batch.attention_mask)


def test_one_token_prompts_uneven_groups_and_empty_answers_give_the_rows_log_probs(
    tiny: tuple[Any, Any],
) -> None:
    """No prompt column at all (P = 0: the full mask, since a 1 × 1 one would broadcast silently), and a
    prompt region that is all padding in one row, groups of 3 and 1 answers, an empty answer."""
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    for prompts in ([[11], [12]], [[11], [12, 13, 14]]):
        examples = [
            TokenizedExample(prompts[0] + [20, 21, 22], [0.0] + [1.0] * 3),
            TokenizedExample(prompts[1] + [23], [0.0] * len(prompts[1]) + [1.0]),
            TokenizedExample(prompts[0] + [], [0.0]),
            TokenizedExample(prompts[0] + [24, 25], [0.0, 1.0, 1.0]),
        ]
        lens = [1, len(prompts[1]), 1, 1]
        shared = collate_shared_prompts(examples, lens, pad, full_mask=False)
        assert shared.attention_mask is not None
        assert shared.attention_mask.shape[-1] == (shared.input_ids.shape[1] if len(prompts[1]) == 1 else 3)
        with torch.no_grad():
            got = loop.target_logprobs(model, shared, CPU, with_entropy=True)
            want = loop.target_logprobs(
                model, collate([Row((e,)) for e in examples], pad), CPU, with_entropy=True
            )
        assert got.rows.tolist() == want.rows.tolist()
        torch.testing.assert_close(got.logprobs, want.logprobs, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.entropy, want.entropy, atol=1e-5, rtol=1e-5)


def test_the_layout_is_taken_where_it_is_cheaper_and_the_attention_takes_its_mask(
    tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny
    pad = tokenizer.pad_token_id
    # An RFT group: 8 short answers after a longer prompt: the prompt once is cheaper.
    short, short_lens = _answers([[6] * 8, [5] * 8], seed=1)
    short = [TokenizedExample([7] * 40 + e.input_ids, [0.0] * 40 + e.weights) for e in short]
    chosen = loop.answers_batch(model, short, [n + 40 for n in short_lens], pad)
    assert chosen.shared_prompt == (44, 8, 7)  # prompts of 43 and 45, answers of 6
    assert chosen.attention_mask is not None and chosen.attention_mask.shape[-2:] == (45, 45)  # short mask
    # Long answers after a short prompt: with the answers apart, an answer's attention is the same as in a
    # row of its own, and its prompt still runs once.
    long, long_lens = _answers([[900] * 8], seed=2)
    assert loop.answers_batch(model, long, long_lens, pad).shared_prompt is not None
    # Through the dense mask over the whole row, the rows' attention would outgrow the few tokens saved.
    monkeypatch.setattr(shared_prompt_attention, "supported", lambda config: False)
    assert loop.answers_batch(model, long, long_lens, pad).attention_mask is None
    dense = loop.answers_batch(model, short, [n + 40 for n in short_lens], pad)
    assert dense.attention_mask is not None and dense.attention_mask.shape[-1] == 44 + 8 * 7  # full mask
    # An attention without arbitrary masks (eager here) always gets one row per answer.
    config = model.config
    kept = config._attn_implementation
    try:
        config._attn_implementation = "eager"
        assert loop.answers_batch(model, short, [n + 40 for n in short_lens], pad).attention_mask is None
    finally:
        config._attn_implementation = kept


def test_lora_with_checkpointing_gets_the_same_log_probs_and_gradients() -> None:
    """The model as the RFT loop has it: PEFT-wrapped, its layers checkpointed (LoRA's default); the mask
    goes through both, and the layout is chosen through the wrapper."""
    doc = valid_job()
    doc["spec"].pop("fullParameter")
    doc["spec"]["lora"] = {"rank": 4}
    spec = FineTuneJob.model_validate(doc).spec
    folder = materialise(parse_model_uri(spec.base_model.uri))
    trainee = loop.prepare_trainee(spec, loop.start(spec), folder, total_steps=1, micro=2)
    model = trainee.model
    assert is_gradient_checkpointing(model)
    examples, prompt_lens = _answers([[5, 3, 6], [4, 2, 7]])
    examples = [TokenizedExample([9] * 30 + e.input_ids, [0.0] * 30 + e.weights) for e in examples]
    prompt_lens = [n + 30 for n in prompt_lens]
    chosen = loop.answers_batch(model, examples, prompt_lens, pad_id=0)
    assert chosen.attention_mask is not None
    results = []
    for batch in (collate([Row((e,)) for e in examples], pad_id=0), chosen):
        model.zero_grad(set_to_none=True)
        t = loop.target_logprobs(model, batch, CPU)
        (-(t.per_row_sum() * torch.linspace(-1, 1, len(examples)))).sum().backward()
        results.append(
            (t.logprobs.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None])
        )
    (plain, plain_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared, plain, atol=1e-5, rtol=1e-5)
    assert len(plain_grads) == len(shared_grads) > 0  # the adapters' gradients
    for a, b in zip(plain_grads, shared_grads, strict=True):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-4)
