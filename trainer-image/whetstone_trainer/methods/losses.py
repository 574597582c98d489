"""Every loss Whetstone optimises, as small pure tensor functions: the FineTuneJob methods (SFT, DPO, RFT with
grpo / dapo / gspo-token) and the training service's built-in Tinker losses use these and nothing else.

Conventions (shapes use the suffixes of the cookbook: `_T` per token, `_B` per sequence, `_BT` both):
- `logprobs` are the learner's log-probabilities of the target tokens, with gradient; `old_logprobs` those of
  the policy that sampled them (the sampler's, or the trainer's before this update), `ref_logprobs` those of
  the frozen reference. Ratios are built in log space and clamped before `exp`, so one extreme token cannot
  produce inf or NaN.
- Clip bounds are *ratio* bounds (`clip_low` 0.8, `clip_high` 1.2), as on the Tinker wire; the FineTuneJob's
  epsilons are turned into these by the caller (1 - eps_low, 1 + eps_high).
- Per-token functions return per-token terms to *minimise*; `aggregate` reduces them (token-mean, seq-mean-
  token-mean, or sum), so the normaliser is decided in one place.

The math and its sources are in shared/reference/rl-objectives.md and tinker-protocol.md §7.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

Tensor = torch.Tensor
Aggregation = Literal["token-mean", "seq-mean-token-mean", "sum"]
LOG_RATIO_CAP = 20.0  # exp(20) ≈ 5e8: far beyond any clip bound, finite in fp32


def _ratio(logprobs: Tensor, old_logprobs: Tensor) -> Tensor:
    return torch.exp(torch.clamp(logprobs - old_logprobs, -LOG_RATIO_CAP, LOG_RATIO_CAP))


# --- supervised ---------------------------------------------------------------------------------------------


def cross_entropy(logprobs: Tensor, weights: Tensor) -> Tensor:
    """−Σ w·lp: the weighted, *summed* negative log-likelihood (Tinker `cross_entropy`; SFT divides by the
    step's total weight itself). Weights may be any real number, negative ones included."""
    return -(weights * logprobs).sum()


def token_logprobs(logits: Tensor, targets: Tensor) -> Tensor:
    """log p(target) for each position: logits [..., V] and targets [...] → [...], computed in fp32."""
    return -F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none"
    ).reshape(targets.shape)


ENTROPY_BLOCK_ELEMENTS = 2**20  # the probabilities of a block of rows exist twice at once: 4 MiB of fp32


class TargetLogprobAndEntropy(torch.autograd.Function):
    """log p(target) [N] and the entropy [N] (no gradient) of fp32 logits [N, V], with targets [N], from one
    log-softmax whose buffer becomes the probabilities, which are also all the backward needs:
    d log p(t) / d logits = onehot(t) − p. Autograd's log_softmax → gather plus a separate entropy takes two
    more [N, V] buffers and passes (the product p · log p, and the gather's zero-filled gradient), and its
    backward recomputes the exponentials. The entropy is −Σ p log p, a block of rows at a time while both
    exist (logsumexp − Σ p · logits would save that, but cancels: 1e-2 nats off at 150k tokens of logits
    near 10). Runs in fp32 whatever autocast says. Differentiable once (the backward reuses the buffer)."""

    @staticmethod
    def forward(ctx: Any, logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(logits.device.type, enabled=False):
            probs = torch.log_softmax(logits.float(), -1)  # log-probs until each block is turned
            chosen = probs.gather(-1, targets[:, None])[:, 0]
            rows, vocab = probs.shape
            entropy = probs.new_empty(rows)
            block = max(1, ENTROPY_BLOCK_ELEMENTS // max(vocab, 1))
            for start in range(0, rows, block):
                logp = probs[start : start + block]
                p = logp.exp()
                entropy[start : start + block] = (p * logp).sum(-1).neg_()
                logp.copy_(p)
        ctx.save_for_backward(probs, targets)
        ctx.mark_non_differentiable(entropy)
        return chosen, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_chosen: Tensor, _grad_entropy: Tensor | None) -> tuple[Tensor, None]:
        probs, targets = ctx.saved_tensors
        grad = probs.mul_(-grad_chosen[:, None])
        grad.scatter_add_(-1, targets[:, None], grad_chosen[:, None])
        return grad, None


LOGIT_CHUNK_ELEMENTS = 2**24  # 64 MiB of fp32 logits per chunk: a few hundred tokens of a 50-150k vocabulary


def chunked_token_logprobs(
    hidden: Tensor,
    targets: Tensor,
    head: Callable[[Tensor], Tensor],
    vocab_size: int,
    temperature: float = 1.0,
    with_entropy: bool = False,
    chunk_elements: int | None = None,
) -> tuple[Tensor, Tensor | None]:
    """log p(target) from the last hidden states through the output head, a chunk of tokens at a time:
    hidden [N, H], targets [N] → log-probs [N] (fp32) and, when asked, the entropy of each predicted
    distribution [N] (no gradient).

    The [N, V] logits and their fp32 log-softmax (which the backward keeps) are the largest tensors of a long
    answer's step; here only [chunk, V] exist at a time. When there is more than one chunk each is
    recomputed in the backward (torch.utils.checkpoint), one more pass of the head for |N × V| memory less.
    With one chunk this is exactly head → token_logprobs (head → TargetLogprobAndEntropy with the entropy).
    `temperature` divides the logits first; `chunk_elements` bounds a chunk's logits (default
    LOGIT_CHUNK_ELEMENTS)."""

    def scaled_logits(h: Tensor) -> Tensor:
        logits = head(h)
        return logits.float() / temperature if temperature != 1.0 else logits

    def piece(h: Tensor, t: Tensor) -> Tensor:
        return token_logprobs(scaled_logits(h), t)

    chunk = max(1, (chunk_elements or LOGIT_CHUNK_ELEMENTS) // max(vocab_size, 1))
    recompute = hidden.shape[0] > chunk and torch.is_grad_enabled()
    logprobs, entropies = [], []
    for start in range(0, hidden.shape[0], chunk):
        h, t = hidden[start : start + chunk], targets[start : start + chunk]
        if recompute:
            logprobs.append(torch.utils.checkpoint.checkpoint(piece, h, t, use_reentrant=False))
            if with_entropy:
                with torch.no_grad():  # a recomputed chunk keeps no logits, so its head runs again here
                    entropies.append(TargetLogprobAndEntropy.apply(scaled_logits(h), t)[1])
        elif with_entropy:
            chosen, entropy = TargetLogprobAndEntropy.apply(scaled_logits(h), t)
            logprobs.append(chosen)
            entropies.append(entropy)
        else:
            logprobs.append(token_logprobs(scaled_logits(h), t))
    if not logprobs:  # no targets at all
        return hidden.new_zeros(0, dtype=torch.float32), (
            hidden.new_zeros(0, dtype=torch.float32) if with_entropy else None
        )
    return torch.cat(logprobs), (torch.cat(entropies) if with_entropy else None)


# --- policy gradient: per-token terms -----------------------------------------------------------------------


def importance_sampling_terms(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor) -> Tensor:
    """REINFORCE with an importance-sampling correction: −r·A, r = π/q (Tinker `importance_sampling`)."""
    return -_ratio(logprobs, old_logprobs) * advantages


def ppo_terms(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_low: float | Tensor = 0.8,
    clip_high: float | Tensor = 1.2,
    dual_clip: float | None = None,
) -> Tensor:
    """PPO's clipped surrogate, −min(r·A, clip(r, lo, hi)·A) (Tinker `ppo`; grpo and dapo per token). With
    `dual_clip` c > 1 the loss of a negative-advantage token is also capped at c·|A| (dual-clip PPO)."""
    ratio = _ratio(logprobs, old_logprobs)
    clipped = torch.minimum(torch.maximum(ratio, torch.as_tensor(clip_low)), torch.as_tensor(clip_high))
    terms = -torch.minimum(ratio * advantages, clipped * advantages)
    if dual_clip is not None:
        terms = torch.where(advantages < 0, torch.minimum(terms, -dual_clip * advantages), terms)
    return terms


def cispo_terms(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    clip_low: float | Tensor = 0.8,
    clip_high: float | Tensor = 1.2,
) -> Tensor:
    """CISPO: −sg(clip(r, lo, hi))·A·lp. The importance weight is clipped, every token keeps its gradient."""
    ratio = _ratio(logprobs, old_logprobs).detach()
    weight = torch.minimum(torch.maximum(ratio, torch.as_tensor(clip_low)), torch.as_tensor(clip_high))
    return -weight * advantages * logprobs


def dro_terms(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, beta: float) -> Tensor:
    """DRO (Tinker `dro`): −(lp·A − ½·β·(lp − q)²)."""
    return -(logprobs * advantages - 0.5 * beta * (logprobs - old_logprobs) ** 2)


def gspo_token_terms(
    logprobs_BT: Tensor,
    old_logprobs_BT: Tensor,
    advantages_BT: Tensor,
    mask_BT: Tensor,
    clip_low: float | Tensor = 1 - 3e-4,
    clip_high: float | Tensor = 1 + 4e-4,
    log_cap: float = 10.0,
) -> Tensor:
    """GSPO-token: each sequence's length-normalised ratio s = exp(mean over its masked tokens of lp − q),
    carried to every token as s_t = sg(s)·π_t/sg(π_t), then the PPO clip with per-token advantages. The value
    equals GSPO's when advantages are per sequence; the gradient of a token is that of its own log-prob."""
    mask = mask_BT.to(logprobs_BT.dtype)
    count = mask.sum(-1, keepdim=True).clamp_min(1.0)
    seq_log_ratio = (((logprobs_BT - old_logprobs_BT) * mask).sum(-1, keepdim=True) / count).detach()
    log_s = torch.clamp(seq_log_ratio, -log_cap, log_cap) + logprobs_BT - logprobs_BT.detach()
    s = torch.exp(log_s)
    clipped = torch.minimum(torch.maximum(s, torch.as_tensor(clip_low)), torch.as_tensor(clip_high))
    return -torch.minimum(s * advantages_BT, clipped * advantages_BT) * mask


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Schulman's k3 estimate of KL(π‖π_ref) per token: ρ − 1 − log ρ with ρ = π_ref/π; ≥ 0, unbiased."""
    log_rho = torch.clamp(ref_logprobs - logprobs, -LOG_RATIO_CAP, LOG_RATIO_CAP)
    return torch.exp(log_rho) - 1 - log_rho


def aggregate(
    terms_BT: Tensor, mask_BT: Tensor, mode: Aggregation, normaliser: float | None = None
) -> Tensor:
    """Reduce per-token terms over the masked tokens.

    token-mean: Σ terms / Σ mask (DAPO) — `normaliser` replaces Σ mask when the step spans several micro-
    batches or ranks, so each token weighs the same however the batch is split; seq-mean-token-mean: the mean
    over sequences of each sequence's token mean (GRPO's sample level, GSPO); sum: Σ terms (Tinker).
    `normaliser` for seq-mean-token-mean is the number of sequences in the whole step."""
    mask = mask_BT.to(terms_BT.dtype)
    masked = terms_BT * mask
    if mode == "sum":
        return masked.sum()
    if mode == "token-mean":
        return masked.sum() / (normaliser if normaliser is not None else mask.sum().clamp_min(1.0))
    per_seq = masked.sum(-1) / mask.sum(-1).clamp_min(1.0)
    return per_seq.sum() / (normaliser if normaliser is not None else max(per_seq.numel(), 1))


# --- advantages and reward shaping --------------------------------------------------------------------------


def group_advantages(
    rewards_G: Tensor, scale: Literal["group", "none"] = "group", eps: float = 1e-6
) -> Tensor:
    """GRPO's advantages of one prompt's group: reward minus the group mean, divided by the group's standard
    deviation (`group`) or not (`none`, Dr. GRPO). A group whose rewards are all equal gets zeros."""
    centred = rewards_G - rewards_G.mean()
    if scale == "none" or rewards_G.numel() < 2:
        return centred
    return centred / (rewards_G.std(unbiased=False) + eps)


def soft_overlong_penalty(lengths_B: Tensor, max_tokens: int, buffer_tokens: int) -> Tensor:
    """DAPO's soft overlong punishment added to the reward: 0 up to max − buffer tokens, then falling linearly
    to −1 at max; −1 beyond."""
    start = max_tokens - buffer_tokens
    lengths = lengths_B.to(torch.float32)
    penalty = (start - lengths) / max(buffer_tokens, 1)
    return torch.where(
        lengths <= start,
        torch.zeros_like(lengths),
        torch.where(lengths <= max_tokens, penalty, -torch.ones_like(lengths)),
    )


# --- preferences --------------------------------------------------------------------------------------------


DPOLossType = Literal["sigmoid", "ipo", "hinge", "robust"]


def dpo_losses(
    chosen_logps_B: Tensor,
    rejected_logps_B: Tensor,
    ref_chosen_logps_B: Tensor,
    ref_rejected_logps_B: Tensor,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair DPO losses and the implicit rewards β·(log π − log π_ref) of the chosen and rejected answers.

    Log-probs are summed over each answer's tokens, except for ipo, whose caller passes per-token means (as in
    TRL). h = β·(Δ_chosen − Δ_rejected):
    sigmoid: −(1−ε)·log σ(h) − ε·log σ(−h) (cDPO when ε > 0); robust: (−(1−ε)·log σ(h) + ε·log σ(−h))/(1−2ε);
    hinge: max(0, 1 − h); ipo: ((Δ_chosen − Δ_rejected) − 1/(2β))²."""
    chosen_delta = chosen_logps_B - ref_chosen_logps_B
    rejected_delta = rejected_logps_B - ref_rejected_logps_B
    margin = chosen_delta - rejected_delta
    h = beta * margin
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(h) - label_smoothing * F.logsigmoid(-h)
    elif loss_type == "robust":
        losses = (-(1 - label_smoothing) * F.logsigmoid(h) + label_smoothing * F.logsigmoid(-h)) / (
            1 - 2 * label_smoothing
        )
    elif loss_type == "hinge":
        losses = torch.relu(1 - h)
    elif loss_type == "ipo":
        losses = (margin - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss type {loss_type!r}")
    return losses, (beta * chosen_delta).detach(), (beta * rejected_delta).detach()
