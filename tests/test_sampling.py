"""The sampler: greedy equals transformers' greedy generate, log-probs are the model's own at the chosen
temperature, stop tokens / stop strings / max tokens end a completion with the right reason, seeded sampling
repeats itself, top-k / top-p only ever pick allowed tokens, and a left-padded batch equals each prompt
alone."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from whetstone_trainer.models.sources import load_model_and_tokenizer
from whetstone_trainer.sampling import (
    SamplingParams,
    default_stop_token_ids,
    prompt_logprobs,
    sample,
)


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    model, tokenizer = load_model_and_tokenizer("whetstone://tiny")
    return model.eval(), tokenizer


def _prompts(tokenizer: Any) -> list[list[int]]:
    texts = ["Reverse 12345", "hello", "1+2=", "Copy 8 7 6 5 4 3 2 1 and then some more words"]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def _full_logits(model: Any, prompt: list[int], completion: list[int]) -> torch.Tensor:
    """Logits predicting each completion token, from one forward over prompt + completion."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0].float()
    return logits[len(prompt) - 1 : len(prompt) + len(completion) - 1]


def test_greedy_equals_transformers_generate(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    stops = default_stop_token_ids(tokenizer)
    prompts = _prompts(tokenizer)
    ours = sample(model, prompts, SamplingParams(max_tokens=24, temperature=0, stop_token_ids=stops))
    for prompt, (completion,) in zip(prompts, ours, strict=True):
        with torch.no_grad():
            out = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                max_new_tokens=24,
                do_sample=False,
                eos_token_id=list(stops),
                pad_token_id=tokenizer.pad_token_id,
            )
        expected = out[0, len(prompt) :].tolist()
        assert completion.tokens == expected
        assert completion.finish_reason == ("stop" if expected[-1] in stops else "length")


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_are_the_full_vocabulary_logprobs_at_the_temperature(
    tiny: tuple[Any, Any], temperature: float
) -> None:
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    # top_k narrows what may be sampled, never the log-prob reported (full vocabulary, before filtering).
    params = SamplingParams(max_tokens=12, temperature=temperature, top_k=50, seed=1)
    for prompt, group in zip(prompts, sample(model, prompts, params, n=2), strict=True):
        for c in group:
            logits = _full_logits(model, prompt, c.tokens)
            expected = torch.log_softmax(logits / temperature, -1).gather(-1, torch.tensor(c.tokens)[:, None])
            torch.testing.assert_close(torch.tensor(c.logprobs), expected[:, 0], atol=2e-5, rtol=1e-5)


def test_stop_token_and_stop_string_end_with_stop_and_stay_in_the_output(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompt = _prompts(tokenizer)[0]
    greedy = SamplingParams(max_tokens=10, temperature=0)
    [[free]] = sample(model, [prompt], greedy)
    assert free.finish_reason == "length" and len(free.tokens) == 10

    stop_token = free.tokens[3]
    first = free.tokens.index(stop_token)
    [[c]] = sample(model, [prompt], replace(greedy, stop_token_ids=(stop_token,)))
    assert c.finish_reason == "stop" and c.tokens == free.tokens[: first + 1] and len(c.logprobs) == first + 1
    [[dropped]] = sample(
        model, [prompt], replace(greedy, stop_token_ids=(stop_token,), include_stop_in_output=False)
    )
    assert dropped.tokens == free.tokens[:first] and dropped.finish_reason == "stop"

    # A stop string spanning two tokens: the completion ends with the token that completes it.
    stop = tokenizer.decode(free.tokens[4:6])
    [[s]] = sample(model, [prompt], replace(greedy, stop_strings=(stop,)), tokenizer=tokenizer)
    assert s.finish_reason == "stop" and s.tokens == free.tokens[: len(s.tokens)]
    assert stop in tokenizer.decode(s.tokens) and stop not in tokenizer.decode(s.tokens[:-1])
    assert len(s.tokens) <= 6


def test_max_tokens_ends_with_length(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    out = sample(model, _prompts(tokenizer), SamplingParams(max_tokens=5, temperature=1.0, seed=0), n=3)
    assert all(len(c.tokens) == 5 and c.finish_reason == "length" for g in out for c in g)


def test_seeded_sampling_repeats_and_samples_differ(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    params = SamplingParams(max_tokens=8, temperature=1.0)

    def run(seed: int) -> list[list[list[int]]]:
        out = sample(model, prompts, params, n=4, generator=torch.Generator().manual_seed(seed))
        return [[c.tokens for c in g] for g in out]

    a, b, other = run(7), run(7), run(8)
    assert a == b and a != other
    assert all(len({tuple(t) for t in group}) > 1 for group in a)  # the n samples of a prompt differ
    seeded = SamplingParams(max_tokens=8, temperature=1.0, seed=7)
    assert [[c.tokens for c in g] for g in sample(model, prompts, seeded, n=4)] == a


@pytest.mark.parametrize(("top_k", "top_p"), [(3, 1.0), (-1, 0.6), (5, 0.5)])
def test_top_k_and_top_p_only_pick_allowed_tokens(tiny: tuple[Any, Any], top_k: int, top_p: float) -> None:
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    temperature = 0.05  # the tiny model's random weights are nearly uniform: sharpen so top-p means something
    params = SamplingParams(max_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, seed=3)
    seen = 0
    for prompt, group in zip(prompts, sample(model, prompts, params, n=3), strict=True):
        for c in group:
            scaled = _full_logits(model, prompt, c.tokens) / temperature
            for pos, tok in enumerate(c.tokens):
                order = torch.argsort(scaled[pos], descending=True)
                rank = int((order == tok).nonzero())
                if top_k > 0:
                    assert rank < top_k
                probs = torch.softmax(scaled[pos][order[: top_k if top_k > 0 else None]], -1)
                # Allowed: the tokens before it in the (top-k) order did not already reach top_p.
                assert float(probs[:rank].sum()) < top_p + 1e-6
                seen += 1
    assert seen == len(prompts) * 3 * 10


def test_a_left_padded_batch_equals_each_prompt_alone(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    prompts = _prompts(tokenizer)
    assert len({len(p) for p in prompts}) > 1  # different lengths: the short ones are padded
    params = SamplingParams(max_tokens=16, temperature=0)
    batched = sample(model, prompts, params)
    for prompt, (c,) in zip(prompts, batched, strict=True):
        [[alone]] = sample(model, [prompt], params)
        assert c.tokens == alone.tokens
        assert c.logprobs == pytest.approx(alone.logprobs, abs=1e-4)


def test_prompt_logprobs_match_a_forward_pass(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    tokens = _prompts(tokenizer)[3]
    got = prompt_logprobs(model, tokens)
    assert got[0] is None and len(got) == len(tokens)
    logits = _full_logits(model, tokens[:1], tokens[1:])
    expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(tokens[1:])[:, None])[:, 0]
    torch.testing.assert_close(torch.tensor(got[1:]), expected, atol=1e-5, rtol=1e-5)


def test_bad_requests_are_refused(tiny: tuple[Any, Any]) -> None:
    model, _tokenizer = tiny
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="tokenizer"):
        sample(model, [[1, 2]], SamplingParams(max_tokens=2, stop_strings=("x",)))
    with pytest.raises(ValueError, match="at least one token"):
        sample(model, [[]], SamplingParams(max_tokens=2))
