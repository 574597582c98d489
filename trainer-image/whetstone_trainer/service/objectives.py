"""The service's loss functions by their wire names: which `loss_fn_inputs` each needs, which
`loss_fn_config` keys it takes, and how the pure functions of methods/losses.py turn into one datum's share
of the request's loss. No loss math lives here.

Tinker's built-ins are token-level and *summed* (tinker-protocol.md §7): cross_entropy, importance_sampling,
ppo, cispo, dro, gspo. The FineTuneJob's RFT losses are reachable too, under their FineTuneJob names (the
0.38 client sends `loss_fn` as a plain string and never checks it against its Literal):

- `grpo`: inputs target_tokens, logprobs, advantages, sequence_ratio_mask (+ ref_logprobs when kl_beta > 0);
  config clip_low_threshold 0.8, clip_high_threshold 1.2, kl_beta 0 (k3 KL to the reference), dual_clip,
  normaliser; PPO-clip terms, token-mean.
- `dapo`: the same inputs without ref_logprobs; clip 0.8 / 1.28, dual_clip, normaliser; no KL; token-mean.
- `gspo-token`: the same inputs; clip 1-3e-4 / 1+4e-4, normaliser; seq-mean-token-mean.

Means are taken over the whole request (every datum of one forward_backward chunk), not per micro-batch;
`normaliser` overrides the denominator (token count, or sequence count for gspo-token) when one step spans
several requests. Clip thresholds are ratio bounds, as on the Tinker wire; like ppo's they may also arrive
as per-token loss_fn_inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..methods import losses
from .protocol import UserError

Tensor = torch.Tensor
Inputs = dict[str, Tensor]
Config = dict[str, float | str]

RL_INPUTS = ("target_tokens", "logprobs", "advantages")


@dataclass(frozen=True)
class Objective:
    """One wire loss: `datum_loss(lp, inputs, config, stats)` is this datum's share of the request loss."""

    required: tuple[str, ...]
    config_keys: tuple[str, ...]
    datum_loss: Callable[[Tensor, Inputs, Config, RequestStats], Tensor]
    two_d_targets: bool = False


@dataclass(frozen=True)
class RequestStats:
    """What a mean over the whole request needs before any micro-batch runs."""

    tokens: float  # Σ mask over every datum
    sequences: int  # datums with at least one masked token


def _number(config: Config, key: str, default: float | None) -> float:
    value = config.get(key, default)
    if value is None:
        raise UserError(f"loss_fn_config[{key!r}] is required")
    if isinstance(value, str):
        raise UserError(f"loss_fn_config[{key!r}] must be a number, got {value!r}")
    return float(value)


def _clip(inputs: Inputs, config: Config, low: float, high: float) -> tuple[float | Tensor, float | Tensor]:
    lo = inputs.get("clip_low_threshold", _number(config, "clip_low_threshold", low))
    hi = inputs.get("clip_high_threshold", _number(config, "clip_high_threshold", high))
    return lo, hi


def _cross_entropy(lp: Tensor, inputs: Inputs, config: Config, stats: RequestStats) -> Tensor:
    weights = inputs.get("weights")
    if weights is None:
        weights = torch.ones_like(lp)
    if weights.shape != lp.shape:
        raise UserError(
            f"weights has shape {list(weights.shape)}, target_tokens {list(lp.shape)}: they must match"
        )
    return losses.cross_entropy(lp, weights)


def _importance_sampling(lp: Tensor, inputs: Inputs, config: Config, stats: RequestStats) -> Tensor:
    return losses.importance_sampling_terms(lp, inputs["logprobs"], inputs["advantages"]).sum()


def _ppo(lp: Tensor, inputs: Inputs, config: Config, stats: RequestStats) -> Tensor:
    lo, hi = _clip(inputs, config, 0.8, 1.2)
    return losses.ppo_terms(lp, inputs["logprobs"], inputs["advantages"], lo, hi).sum()


def _cispo(lp: Tensor, inputs: Inputs, config: Config, stats: RequestStats) -> Tensor:
    lo, hi = _clip(inputs, config, 0.8, 1.2)
    return losses.cispo_terms(lp, inputs["logprobs"], inputs["advantages"], lo, hi).sum()


def _dro(lp: Tensor, inputs: Inputs, config: Config, stats: RequestStats) -> Tensor:
    # Tinker documents no default beta: require it rather than invent one.
    return losses.dro_terms(lp, inputs["logprobs"], inputs["advantages"], _number(config, "beta", None)).sum()


def _gspo(lp: Tensor, inputs: Inputs, config: Config, stats: RequestStats) -> Tensor:
    lo, hi = _clip(inputs, config, 0.8, 1.2)
    mask = inputs["sequence_ratio_mask"]
    terms = losses.gspo_token_terms(
        lp[None], inputs["logprobs"][None], inputs["advantages"][None], mask[None], lo, hi
    )
    return terms.sum()


def _mask(inputs: Inputs) -> Tensor:
    return inputs["sequence_ratio_mask"]


def _dual_clip(config: Config) -> float | None:
    if "dual_clip" not in config:
        return None
    c = _number(config, "dual_clip", None)
    if c <= 1:
        raise UserError(f"loss_fn_config['dual_clip'] must be greater than 1, got {c}")
    return c


def _grpo(lp: Tensor, inputs: Inputs, config: Config, stats: RequestStats) -> Tensor:
    lo, hi = _clip(inputs, config, 0.8, 1.2)
    terms = losses.ppo_terms(lp, inputs["logprobs"], inputs["advantages"], lo, hi, _dual_clip(config))
    beta = _number(config, "kl_beta", 0.0)
    if beta:
        if "ref_logprobs" not in inputs:
            raise UserError(
                "grpo with kl_beta > 0 needs loss_fn_inputs['ref_logprobs'] (the reference's log-probs)"
            )
        terms = terms + beta * losses.kl_k3(lp, inputs["ref_logprobs"])
    normaliser = _number(config, "normaliser", stats.tokens)
    return losses.aggregate(terms[None], _mask(inputs)[None], "token-mean", max(normaliser, 1.0))


def _dapo(lp: Tensor, inputs: Inputs, config: Config, stats: RequestStats) -> Tensor:
    if config.get("kl_beta"):
        raise UserError(
            "dapo has no KL term: leave loss_fn_config['kl_beta'] unset (use grpo for a KL penalty)"
        )
    lo, hi = _clip(inputs, config, 0.8, 1.28)
    terms = losses.ppo_terms(lp, inputs["logprobs"], inputs["advantages"], lo, hi, _dual_clip(config))
    normaliser = _number(config, "normaliser", stats.tokens)
    return losses.aggregate(terms[None], _mask(inputs)[None], "token-mean", max(normaliser, 1.0))


def _gspo_token(lp: Tensor, inputs: Inputs, config: Config, stats: RequestStats) -> Tensor:
    if config.get("kl_beta"):
        raise UserError("gspo-token has no KL term: leave loss_fn_config['kl_beta'] unset")
    lo, hi = _clip(inputs, config, 1 - 3e-4, 1 + 4e-4)
    mask = _mask(inputs)
    terms = losses.gspo_token_terms(
        lp[None], inputs["logprobs"][None], inputs["advantages"][None], mask[None], lo, hi
    )
    normaliser = _number(config, "normaliser", stats.sequences)
    return losses.aggregate(terms, mask[None], "seq-mean-token-mean", max(normaliser, 1.0))


CLIPS = ("clip_low_threshold", "clip_high_threshold")
OBJECTIVES: dict[str, Objective] = {
    "cross_entropy": Objective(("target_tokens",), (), _cross_entropy, two_d_targets=True),
    "importance_sampling": Objective(RL_INPUTS, (), _importance_sampling),
    "ppo": Objective(RL_INPUTS, CLIPS, _ppo),
    "cispo": Objective(RL_INPUTS, CLIPS, _cispo),
    "dro": Objective(RL_INPUTS, ("beta",), _dro),
    "gspo": Objective((*RL_INPUTS, "sequence_ratio_mask"), CLIPS, _gspo),
    "grpo": Objective(
        (*RL_INPUTS, "sequence_ratio_mask"), (*CLIPS, "kl_beta", "dual_clip", "normaliser"), _grpo
    ),
    "dapo": Objective(
        (*RL_INPUTS, "sequence_ratio_mask"), (*CLIPS, "kl_beta", "dual_clip", "normaliser"), _dapo
    ),
    "gspo-token": Objective(
        (*RL_INPUTS, "sequence_ratio_mask"), (*CLIPS, "kl_beta", "normaliser"), _gspo_token
    ),
}
# Keys that carry data, not loss configuration, and that any loss may receive.
PASSIVE_INPUTS = {"weights", "routing", "ref_logprobs", *CLIPS}


def objective(name: str) -> Objective:
    if name not in OBJECTIVES:
        hint = ""
        if name == "stable_reinforce":
            hint = " (its formula is unpublished; use importance_sampling, ppo, cispo or grpo)"
        elif name == "custom":
            hint = (
                " (server-side custom losses are off; forward_backward_custom runs your loss in the client)"
            )
        raise UserError(f"unknown loss_fn {name!r}{hint}; available: {', '.join(OBJECTIVES)}")
    return OBJECTIVES[name]


def check_call(name: str, inputs_of_data: list[dict[str, object]], config: Config) -> Objective:
    """Validate a request before any work: the loss exists, every datum has its inputs, config keys known."""
    obj = objective(name)
    for i, inputs in enumerate(inputs_of_data):
        missing = [k for k in obj.required if k not in inputs]
        if missing:
            raise UserError(
                f"loss_fn {name!r}: data[{i}] lacks loss_fn_inputs {missing} (it needs {list(obj.required)})"
            )
    unknown = sorted(set(config) - set(obj.config_keys))
    if unknown:
        allowed = ", ".join(obj.config_keys) or "none"
        raise UserError(f"loss_fn {name!r} does not take loss_fn_config keys {unknown} (it takes: {allowed})")
    return obj


def request_stats(masks: list[Tensor | None]) -> RequestStats:
    present = [m for m in masks if m is not None]
    return RequestStats(
        tokens=float(sum(float(m.sum()) for m in present)),
        sequences=sum(1 for m in present if float(m.sum()) > 0),
    )
