"""The RFT update's shortcut: with one update per rollout batch (updateEpochs 1, miniBatches 1) the loop
skips the separate pass that scores the answers under the "old" policy and takes the update's own forward,
detached, as the old log-probs. The weights have not moved between sampling and that forward, so the two are
the same numbers; here the shortcut gives the loss and every gradient of the long way, for each algorithm,
at a sampling temperature other than 1 (the path that divides the logits)."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from whetstone_api.finetunejob import RFTSpec
from whetstone_trainer import loop
from whetstone_trainer.data.formats import TokenizedExample
from whetstone_trainer.data.packing import Row, collate
from whetstone_trainer.methods.rft import Sequence, _split, policy_loss
from whetstone_trainer.models.sources import load_model_and_tokenizer


@pytest.fixture(scope="module")
def tiny() -> tuple[Any, Any]:
    model, tokenizer = load_model_and_tokenizer("whetstone://tiny")
    return model.train(), tokenizer


def _sequences() -> list[Sequence]:
    """Six answers of different lengths after two prompts, with advantages of both signs."""
    g = torch.Generator().manual_seed(0)
    seqs = []
    for k in range(6):
        prompt = torch.randint(5, 2000, (4 + k % 2,), generator=g).tolist()
        answer = torch.randint(5, 2000, (3 + k,), generator=g).tolist()
        weights = [0.0] * len(prompt) + [1.0] * len(answer)
        seqs.append(
            Sequence(TokenizedExample(prompt + answer, weights), (-1.0) ** k * (0.5 + k), [], len(prompt))
        )
    return seqs


def _loss_and_grads(model: Any, seqs: list[Sequence], rft: RFTSpec, pad_id: int) -> tuple[Any, list[Any]]:
    model.zero_grad(set_to_none=True)
    batch = collate([Row((s.example,)) for s in seqs], pad_id)
    t = loop.target_logprobs(model, batch, torch.device("cpu"), temperature=rft.temperature)
    for s in seqs:  # the drift statistic compares with the sampler's log-probs: any will do here
        s.sampler_logprobs = [0.0] * int(sum(s.example.weights[1:]))
    normaliser = sum(len(s.sampler_logprobs) for s in seqs)
    loss, _stats = policy_loss(t, seqs, rft, rft.aggregation_mode, normaliser)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("algorithm", ["grpo", "dapo", "gspo-token"])
def test_the_update_forward_as_old_policy_gives_the_loss_and_gradients_of_a_separate_pass(
    tiny: tuple[Any, Any], algorithm: str
) -> None:
    model, tokenizer = tiny
    rft = RFTSpec.model_validate({"algorithm": algorithm, "graders": [{"name": "g"}], "temperature": 0.7})
    shortcut = _sequences()  # old_logprobs None: policy_loss takes the forward's own, detached
    loss_short, grads_short = _loss_and_grads(model, shortcut, rft, tokenizer.pad_token_id)

    long_way = _sequences()  # what the loop does with several updates: a no-grad pass first
    model.eval()
    with torch.no_grad():
        batch = collate([Row((s.example,)) for s in long_way], tokenizer.pad_token_id)
        scored = loop.target_logprobs(model, batch, torch.device("cpu"), temperature=rft.temperature)
    model.train()
    for s, values in zip(long_way, _split(scored), strict=True):
        s.old_logprobs = values
    loss_long, grads_long = _loss_and_grads(model, long_way, rft, tokenizer.pad_token_id)

    assert all(s.old_logprobs is None for s in shortcut)
    assert loss_long.abs() > 0  # advantages of both signs: a real loss and a real gradient
    torch.testing.assert_close(loss_short, loss_long)
    assert any(g.abs().sum() > 0 for g in grads_long)
    for short, long in zip(grads_short, grads_long, strict=True):
        torch.testing.assert_close(short, long)
