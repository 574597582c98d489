"""Each loss against a hand computation (or TRL's formula), its gradient where that is the point, and its
behaviour at the edges (equal rewards, extreme ratios)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from whetstone_trainer.methods import losses as L


def t(*xs: float) -> torch.Tensor:
    return torch.tensor(xs, dtype=torch.float64)


def test_cross_entropy_is_a_weighted_sum_with_any_sign() -> None:
    lp = t(-1.0, -2.0, -0.5)
    assert L.cross_entropy(lp, t(1, 0, 2)).item() == pytest.approx(1.0 + 1.0)
    assert L.cross_entropy(lp, t(-1, 0, 0)).item() == pytest.approx(-1.0)


def test_token_logprobs_match_log_softmax() -> None:
    logits = torch.randn(2, 3, 7)
    targets = torch.randint(0, 7, (2, 3))
    expected = torch.log_softmax(logits, -1).gather(-1, targets[..., None])[..., 0]
    assert torch.allclose(L.token_logprobs(logits, targets), expected, atol=1e-6)


def _head_and_hidden(
    n: int = 37, h: int = 8, v: int = 50
) -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    head = torch.nn.Linear(h, v, bias=False)
    return head, torch.randn(n, h, requires_grad=True), torch.randint(0, v, (n,))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("chunk_elements", [200, None])  # 10 chunks, recomputed in the backward; one chunk
def test_chunked_token_logprobs_equal_the_whole_head_in_value_and_gradient(
    temperature: float, chunk_elements: int | None
) -> None:
    head, hidden, targets = _head_and_hidden()
    logits = head(hidden) / temperature
    whole = L.token_logprobs(logits, targets)
    whole_entropy = -(torch.softmax(logits, -1) * torch.log_softmax(logits, -1)).sum(-1)
    weights = torch.rand(targets.shape)
    (whole * weights).sum().backward()
    grads = hidden.grad.clone(), head.weight.grad.clone()
    hidden.grad, head.weight.grad = None, None

    # 200: 4 tokens of a 50-word vocabulary per chunk, the last chunk short
    lp, entropy = L.chunked_token_logprobs(
        hidden, targets, head, 50, temperature, with_entropy=True, chunk_elements=chunk_elements
    )
    assert lp.dtype == torch.float32 and lp.shape == targets.shape
    assert torch.allclose(lp, whole, atol=1e-6)
    assert entropy is not None and torch.allclose(entropy, whole_entropy.detach(), atol=1e-6)
    (lp * weights).sum().backward()
    assert torch.allclose(hidden.grad, grads[0], atol=1e-6)
    assert torch.allclose(head.weight.grad, grads[1], atol=1e-6)


def test_chunked_token_logprobs_never_keep_the_whole_logits_for_the_backward() -> None:
    head, hidden, targets = _head_and_hidden(n=64, v=50)
    saved: list[int] = []

    def pack(x: torch.Tensor) -> torch.Tensor:
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        L.token_logprobs(head(hidden), targets).sum().backward()
    assert max(saved) >= 64 * 50  # unchunked: the [N, V] log-softmax is kept
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        lp, _ = L.chunked_token_logprobs(hidden, targets, head, 50, chunk_elements=8 * 50)
        lp.sum().backward()
    # what the forward keeps for the backward is the hidden states and the head, never a logits chunk
    # (chunks are recomputed in the backward; their tensors there are a chunk's, [8, 50] at most)
    assert max(saved) <= max(8 * 50, head.weight.numel())


def test_chunked_token_logprobs_of_no_targets() -> None:
    head, hidden, targets = _head_and_hidden(n=0)
    lp, entropy = L.chunked_token_logprobs(hidden, targets, head, 50, with_entropy=True)
    assert lp.shape == (0,) and entropy is not None and entropy.shape == (0,)


def test_importance_sampling_value_and_gradient() -> None:
    lp = t(-1.0, -2.0).requires_grad_()
    q, a = t(-1.5, -2.0), t(2.0, -1.0)
    terms = L.importance_sampling_terms(lp, q, a)
    assert terms.tolist() == pytest.approx([-math.exp(0.5) * 2, 1.0])
    terms.sum().backward()
    # d(−r·A)/d lp = −r·A
    assert lp.grad.tolist() == pytest.approx([-math.exp(0.5) * 2, 1.0])


@pytest.mark.parametrize(
    ("lp", "q", "a", "expected"),
    [
        (-1.0, -1.0, 1.0, -1.0),  # r = 1: plain −A
        (0.0, math.log(0.5), 1.0, -1.2),  # r = 2 > 1.2 with A > 0: clipped at 1.2
        (0.0, math.log(0.5), -1.0, 2.0),  # r = 2 with A < 0: the unclipped (pessimistic) term
        (math.log(0.5), 0.0, -1.0, 0.8),  # r = 0.5 < 0.8 with A < 0: clipped at 0.8
        (math.log(0.5), 0.0, 1.0, -0.5),  # r = 0.5 with A > 0: unclipped
    ],
)
def test_ppo_clip(lp: float, q: float, a: float, expected: float) -> None:
    assert L.ppo_terms(t(lp), t(q), t(a), 0.8, 1.2).item() == pytest.approx(expected)


def test_ppo_clipped_tokens_carry_no_gradient_and_dual_clip_caps_the_loss() -> None:
    lp = t(0.0).requires_grad_()
    L.ppo_terms(lp, t(math.log(0.5)), t(1.0), 0.8, 1.2).sum().backward()
    assert lp.grad.item() == 0.0
    # r = 10 with A = −1: unclipped loss 10, dual clip c = 3 caps it at 3.
    assert L.ppo_terms(t(math.log(10)), t(0.0), t(-1.0), 0.8, 1.2, dual_clip=3.0).item() == pytest.approx(3.0)


def test_cispo_keeps_every_gradient() -> None:
    lp = t(0.0, -1.0).requires_grad_()
    q = t(math.log(0.5), -1.0)  # ratios 2 and 1
    terms = L.cispo_terms(lp, q, t(1.0, 1.0), 0.8, 1.2)
    assert terms.tolist() == pytest.approx([-1.2 * 0.0, -1.0 * -1.0])
    terms.sum().backward()
    assert lp.grad.tolist() == pytest.approx([-1.2, -1.0])  # the clipped token still learns


def test_dro() -> None:
    assert L.dro_terms(t(-1.0), t(-2.0), t(3.0), beta=0.1).item() == pytest.approx(-(-3.0 - 0.05 * 1.0))


def test_gspo_token_equals_sequence_gspo_with_sequence_advantages() -> None:
    torch.manual_seed(0)
    lp = (torch.randn(2, 4, dtype=torch.float64) * 0.01 - 1).requires_grad_()
    old = lp.detach() + torch.randn(2, 4, dtype=torch.float64) * 0.01
    mask = t(1, 1, 1, 0, 1, 1, 0, 0).reshape(2, 4)
    adv = t(1.0, -2.0)[:, None].expand(2, 4)
    terms = L.gspo_token_terms(lp, old, adv, mask, clip_low=0.5, clip_high=1.5)
    value = L.aggregate(terms, mask, "seq-mean-token-mean")
    s = torch.exp(((lp - old) * mask).sum(-1) / mask.sum(-1))
    expected = -(s * adv[:, 0]).mean()  # unclipped range: s ≈ 1
    assert value.item() == pytest.approx(expected.item(), rel=1e-9)
    # Every token of a sequence gets the same weight s·A / |o|.
    value.backward()
    grad = lp.grad
    assert torch.allclose(grad[0, :3], grad[0, 0].expand(3)) and grad[0, 3] == 0


def test_kl_k3_is_zero_at_equal_policies_and_positive_elsewhere() -> None:
    assert L.kl_k3(t(-1.0), t(-1.0)).item() == 0.0
    assert L.kl_k3(t(-1.0), t(-2.0)).item() == pytest.approx(math.exp(-1) - 1 + 1)


def test_aggregation_modes() -> None:
    terms = t(1, 2, 3, 4).reshape(2, 2)
    mask = t(1, 1, 1, 0).reshape(2, 2)
    assert L.aggregate(terms, mask, "sum").item() == 6
    assert L.aggregate(terms, mask, "token-mean").item() == pytest.approx(2.0)
    assert L.aggregate(terms, mask, "seq-mean-token-mean").item() == pytest.approx((1.5 + 3) / 2)
    # A global normaliser makes micro-batches add up to the whole step.
    halves = [L.aggregate(terms[i : i + 1], mask[i : i + 1], "token-mean", normaliser=3.0) for i in range(2)]
    assert sum(h.item() for h in halves) == pytest.approx(2.0)


def test_group_advantages() -> None:
    adv = L.group_advantages(t(1, 0, 0, 1))
    assert adv.tolist() == pytest.approx([1, -1, -1, 1], abs=1e-5)
    assert L.group_advantages(t(0.5, 0.5, 0.5)).abs().max().item() == 0.0
    assert L.group_advantages(t(2, 0), scale="none").tolist() == [1, -1]


def test_soft_overlong_penalty() -> None:
    out = L.soft_overlong_penalty(torch.tensor([10, 80, 90, 100, 120]), max_tokens=100, buffer_tokens=20)
    assert out.tolist() == pytest.approx([0.0, 0.0, -0.5, -1.0, -1.0])


def _trl_dpo(chosen, rejected, ref_chosen, ref_rejected, beta, loss_type, eps):  # type: ignore[no-untyped-def]
    # TRL's DPOTrainer formulas (dpo_trainer.py), written out for the comparison.
    logits = (chosen - rejected) - (ref_chosen - ref_rejected)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    if loss_type == "robust":
        return (-F.logsigmoid(beta * logits) * (1 - eps) + F.logsigmoid(-beta * logits) * eps) / (1 - 2 * eps)
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    return (logits - 1 / (2 * beta)) ** 2


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "hinge", "ipo"])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_dpo_matches_trl(loss_type: L.DPOLossType, eps: float) -> None:
    torch.manual_seed(1)
    c, r, rc, rr = (torch.randn(5, dtype=torch.float64) * 3 for _ in range(4))
    losses, chosen_reward, rejected_reward = L.dpo_losses(c, r, rc, rr, 0.1, loss_type, eps)
    assert torch.allclose(losses, _trl_dpo(c, r, rc, rr, 0.1, loss_type, eps))
    assert torch.allclose(chosen_reward, 0.1 * (c - rc)) and torch.allclose(rejected_reward, 0.1 * (r - rr))


def test_dpo_gradient_raises_the_chosen_answer() -> None:
    chosen = t(-5.0).requires_grad_()
    rejected = t(-5.0).requires_grad_()
    losses, _, _ = L.dpo_losses(chosen, rejected, t(-5.0), t(-5.0), beta=0.5)
    assert losses.item() == pytest.approx(math.log(2))
    losses.sum().backward()
    assert chosen.grad.item() < 0 < rejected.grad.item()


def test_extreme_ratios_stay_finite() -> None:
    lp, q, a = t(0.0, -1000.0), t(-1000.0, 0.0), t(1.0, 1.0)
    for terms in (L.importance_sampling_terms(lp, q, a), L.ppo_terms(lp, q, a), L.cispo_terms(lp, q, a)):
        assert torch.isfinite(terms).all()


def test_target_logprob_and_entropy_match_autograds_log_softmax_and_are_differentiable_once() -> None:
    torch.manual_seed(3)
    logits = (torch.randn(7, 300) * 20).requires_grad_()  # a peaked distribution, as an LM's often is
    targets = torch.randint(0, 300, (7,))
    weights = torch.randn(7)
    reference = torch.log_softmax(logits, -1)
    want = reference.gather(-1, targets[:, None])[:, 0]
    want_entropy = -(reference.exp() * reference).sum(-1)
    (want * weights).sum().backward()
    want_grad, logits.grad = logits.grad.clone(), None

    chosen, entropy = L.TargetLogprobAndEntropy.apply(logits, targets)
    assert torch.allclose(chosen, want, atol=1e-5)
    assert torch.allclose(entropy, want_entropy.detach(), atol=1e-4) and not entropy.requires_grad
    loss = (chosen * weights).sum()
    loss.backward(retain_graph=True)
    assert torch.allclose(logits.grad, want_grad, atol=1e-6)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()  # the first backward reused the saved probabilities: a second is refused, not wrong


def test_the_entropy_stays_exact_under_autocast_and_for_logits_far_from_zero() -> None:
    """A large vocabulary of logits around 10 (an output head's are not centred), in blocks of rows, and
    under bf16 autocast (the RFT update's on a GPU): the entropy is fp32's −Σ p log p."""
    torch.manual_seed(4)
    logits = torch.randn(24, 60_000) * 3 + 10
    logits[:, :5] += 15
    targets = torch.randint(0, 60_000, (24,))
    logp = torch.log_softmax(logits.double(), -1)
    want = -(logp.exp() * logp).sum(-1)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            chosen, entropy = L.TargetLogprobAndEntropy.apply(logits, targets)
        assert entropy.dtype == chosen.dtype == torch.float32
        torch.testing.assert_close(entropy.double(), want, atol=5e-4, rtol=0)
        torch.testing.assert_close(
            chosen.double(), logp.gather(-1, targets[:, None])[:, 0], atol=1e-4, rtol=0
        )
