"""Batched sampling with a KV cache from any Hugging Face causal LM (or anything called like one).

How a call runs:
1. Prefill: the distinct prompts, left-padded to one width (the attention mask hides the padding and the
   position ids count only real tokens, so a padded prompt sees exactly what it would see alone). Each
   prompt is prefilled once; its cache and last logits are repeated n times for its samples.
2. Decode: one token per running row per step. Only the last position goes through the output head
   (`logits_to_keep=1`). A row that finishes (stop token, stop string, max tokens) leaves the batch at
   once: its cache rows are dropped, so later steps cost only what is still running.

Randomness: one uniform number per running row per step, drawn from `generator` (or a fresh one seeded with
`params.seed`, or torch's global generator), turned into a token by inverse-CDF over the filtered
distribution. The generator may live on another device than the model; the same generator state gives the
same completions. `generator` may also be one generator per prompt: a prompt's samples then depend only on
its own generator, not on which other prompts share the batch (RFT seeds one per prompt of its stream, so a
rank samples a prompt exactly as a single process would).

`Completion.logprobs` are the log-probabilities of the sampled tokens under softmax(logits / temperature) over
the *full* vocabulary, before top-k / top-p truncation: the behaviour policy the RFT trainer recomputes with
the same temperature. At temperature 1 (the Tinker default) they are the model's own log-probs. Greedy
decoding (temperature 0) reports the temperature-1 log-probs of the chosen tokens.

The model is only ever called as `model(input_ids=, attention_mask=, position_ids=, cache=, use_cache=True,
logits_to_keep=1)`, so a wrapper (the service's MoE routing capture) can stand in for it. transformers renamed
`past_key_values` to `cache` (5.2x); the name the model's forward takes is used, looked up through PEFT and
DDP wrappers.
"""

from __future__ import annotations

import inspect
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch

from . import decode

FinishReason = Literal["stop", "length"]
FAST_DECODE = True  # tests switch it off to check the generic path
# A stop string ends within the newest token, but a few tokens may decode to nothing on their own (the
# pieces of a multi-byte character): look this many tokens further back than the string is long.
_STOP_WINDOW_SLACK = 8


@dataclass(frozen=True)
class SamplingParams:
    """How to sample. temperature 0 is greedy; top_k -1 (or 0) and top_p 1 switch those filters off.

    top-k is applied before top-p. A stop token or stop string ends a completion with finish_reason "stop";
    `include_stop_in_output` False drops the token that triggered the stop from tokens and logprobs.
    `seed` seeds a generator of this call when none is passed to `sample`."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    include_stop_in_output: bool = True

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, not {self.max_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, not {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], not {self.top_p}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must not be empty")


@dataclass(frozen=True)
class Completion:
    """One sampled answer: its tokens, their log-probs (see the module docstring) and why it ended."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: FinishReason


def default_stop_token_ids(tokenizer: Any) -> tuple[int, ...]:
    """The end-of-text token and, for ChatML models, the end-of-turn token <|im_end|>."""
    ids = {tokenizer.eos_token_id}
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.add(im_end)
    return tuple(sorted(i for i in ids if i is not None))


def _device_of(model: Any) -> torch.device:
    return next(model.parameters()).device


Generators = torch.Generator | Sequence[torch.Generator] | None


def _uniform(rows: int, generator: Generators, row_prompts: list[int]) -> torch.Tensor:
    """One U(0, 1) draw per running row, in float64, on the CPU or the generator's device."""
    if generator is None:
        return torch.rand(rows, dtype=torch.float64)
    if isinstance(generator, torch.Generator):
        return torch.rand(rows, generator=generator, device=generator.device, dtype=torch.float64)
    # A prompt's running rows are consecutive: one call per prompt draws them in row order, instead of one
    # call per row (on a CPU generator these are the very same numbers).
    draws = []
    for p, rows_of_p in itertools.groupby(row_prompts):
        g = generator[p]
        draws.append(
            torch.rand(len(list(rows_of_p)), generator=g, device=g.device, dtype=torch.float64).cpu()
        )
    return torch.cat(draws)


def _choose(
    logits_BV: torch.Tensor, params: SamplingParams, generator: Generators, row_prompts: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The next token of each row and its log-prob (see the module docstring for which log-prob)."""
    if params.temperature == 0:
        tokens_B = logits_BV.argmax(-1)
        logp_BV = torch.log_softmax(logits_BV, -1)
        return tokens_B, logp_BV.gather(-1, tokens_B[:, None])[:, 0]
    scaled = logits_BV / params.temperature if params.temperature != 1 else logits_BV
    # One softmax (one exponential, in one pass) serves both the log-prob of the chosen token and the
    # draw (top-p takes one more, over its sorted logits): a token is only ever chosen with a probability
    # far above float32's smallest normal number, so log(p) is its log-prob to within rounding.
    probs_BV = torch.softmax(scaled, -1)
    weights_BV = probs_BV
    vocab = scaled.shape[-1]
    filtered = scaled
    if 0 < params.top_k < vocab:
        kth = torch.topk(scaled, params.top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if params.top_p < 1:
        sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # Drop a token when the ones before it already reach top_p; the most likely token always stays.
        drop_sorted = probs.cumsum(-1) - probs >= params.top_p
        drop_sorted[:, 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        filtered = filtered.masked_fill(drop, float("-inf"))
    if filtered is not scaled:  # the most likely token is never filtered, so some weight always stays
        weights_BV = probs_BV.masked_fill(filtered == float("-inf"), 0.0)
    u_B = _uniform(weights_BV.shape[0], generator, row_prompts).to(weights_BV.device, weights_BV.dtype)
    tokens_B = inverse_cdf(weights_BV, u_B)
    return tokens_B, probs_BV.gather(-1, tokens_B[:, None])[:, 0].log()


_BLOCK = 64


def inverse_cdf(weights_BV: torch.Tensor, u_B: torch.Tensor) -> torch.Tensor:
    """For each row, the first token whose running sum of (unnormalised, non-negative) weights exceeds
    u × total, u in [0, 1): a token of weight 0 is never chosen, whatever the rounding. In two levels, the
    sums of blocks of 64 tokens and then the running sum inside the one block hit, since a running sum over
    the whole vocabulary is serial and costs more than the softmax before it (4× at 49 152 tokens)."""
    rows, vocab = weights_BV.shape
    blocks = -(-vocab // _BLOCK)
    if blocks * _BLOCK != vocab:
        weights_BV = torch.nn.functional.pad(weights_BV, (0, blocks * _BLOCK - vocab))
    weights = weights_BV.view(rows, blocks, _BLOCK)
    block_cdf = weights.sum(-1).cumsum(-1)  # [B, blocks]
    total = block_cdf[:, -1:]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        bad = (~torch.isfinite(total) | (total <= 0))[:, 0].nonzero()[:, 0].tolist()
        raise ValueError(
            f"no token can be drawn in rows {bad[:8]}: the model's logits are not finite (NaN/inf)"
        )
    zero = torch.zeros_like(total)
    # Strictly below the total, so some block's running sum exceeds it; likewise inside that block.
    u = torch.minimum(u_B[:, None] * total, torch.nextafter(total, zero))
    block = torch.searchsorted(block_cdf, u, right=True)  # [B, 1]
    before = block_cdf.gather(-1, (block - 1).clamp_min(0)).masked_fill(block == 0, 0.0)
    inside = weights.gather(1, block[:, :, None].expand(rows, 1, _BLOCK))[:, 0].cumsum(-1)  # [B, 64]
    rest = torch.minimum(u - before, torch.nextafter(inside[:, -1:], zero))
    return (block * _BLOCK + torch.searchsorted(inside, rest, right=True))[:, 0]


def _cache_kwarg(model: Any) -> str:
    """`cache` (transformers >= 5.2x) or `past_key_values`, whichever the innermost forward accepts."""
    seen = model
    for _ in range(6):
        params = inspect.signature(type(seen).forward).parameters
        if "cache" in params:
            return "cache"
        if "past_key_values" in params:
            return "past_key_values"
        inner = seen.get_base_model() if hasattr(seen, "get_base_model") else None
        inner = inner or getattr(seen, "module", None) or getattr(seen, "model", None)
        if not isinstance(inner, torch.nn.Module):
            break
        seen = inner
    return "cache"


def _returned_cache(out: Any) -> Any:
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _left_pad(prompts: Sequence[Sequence[int]], device: torch.device) -> tuple[torch.Tensor, ...]:
    width = max(len(p) for p in prompts)
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :] = torch.tensor(list(p), dtype=torch.long)
        mask[b, width - len(p) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    return ids.to(device), mask.to(device), positions.to(device)


def _hit_stop_string(tokenizer: Any, tokens: list[int], stops: tuple[str, ...], window: int) -> bool:
    tail = tokenizer.decode(tokens[-window:], skip_special_tokens=False)
    return any(s in tail for s in stops)


@torch.inference_mode()
def sample(
    model: Any,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    n: int = 1,
    tokenizer: Any = None,
    generator: Generators = None,
) -> list[list[Completion]]:
    """`n` completions of each prompt (token ids): result[i][j] is sample j of prompt i. `generator`: one for
    the call, or one per prompt (see the module docstring)."""
    if n < 1:
        raise ValueError(f"n must be at least 1, not {n}")
    if params.stop_strings and tokenizer is None:
        raise ValueError("stop strings need the tokenizer to decode completions")
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if (
        generator is not None
        and not isinstance(generator, torch.Generator)
        and len(generator) != len(prompts)
    ):
        raise ValueError(f"{len(generator)} generators for {len(prompts)} prompts")
    if not prompts:
        return []
    if generator is None and params.seed is not None and params.temperature > 0:
        generator = torch.Generator().manual_seed(params.seed)
    device = _device_of(model)
    was_training = model.training
    model.eval()
    try:
        return _sample(model, prompts, params, n, tokenizer, generator, device)
    finally:
        model.train(was_training)


def _sample(
    model: Any,
    prompts: Sequence[Sequence[int]],
    params: SamplingParams,
    n: int,
    tokenizer: Any,
    generator: Generators,
    device: torch.device,
) -> list[list[Completion]]:
    cache_kwarg = _cache_kwarg(model)
    ids, mask, positions = _left_pad(prompts, device)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1)
    cache = _returned_cache(out)
    logits = out.logits[:, -1, :].float()
    next_pos = positions[:, -1] + 1
    if n > 1:
        cache.batch_repeat_interleave(n)
        logits = logits.repeat_interleave(n, 0)
        mask = mask.repeat_interleave(n, 0)
        next_pos = next_pos.repeat_interleave(n, 0)
    rows = len(prompts) * n
    # Llama-family models decode through decode.py (a preallocated cache, no per-call machinery); anything
    # else, the training service's wrappers included, is called as model(...).
    fast = (
        decode.Decoder(model, cache, mask, mask.shape[1] + params.max_tokens)
        if FAST_DECODE and decode.supported(model)
        else None
    )
    tokens: list[list[int]] = [[] for _ in range(rows)]
    logprobs: list[list[float]] = [[] for _ in range(rows)]
    finish: list[FinishReason | None] = [None] * rows
    running = list(range(rows))  # the original row of each batch row
    stop_ids = set(params.stop_token_ids)
    window = max((len(s) for s in params.stop_strings), default=0) + _STOP_WINDOW_SLACK

    for step in range(params.max_tokens):
        chosen, chosen_lp = _choose(logits, params, generator, [row // n for row in running])
        still: list[int] = []  # batch rows that go on
        for b, (row, tok, lp) in enumerate(zip(running, chosen.tolist(), chosen_lp.tolist(), strict=True)):
            tokens[row].append(tok)
            logprobs[row].append(lp)
            if tok in stop_ids or (
                params.stop_strings and _hit_stop_string(tokenizer, tokens[row], params.stop_strings, window)
            ):
                finish[row] = "stop"
            elif step + 1 == params.max_tokens:
                finish[row] = "length"
            else:
                still.append(b)
        if not still:
            break
        if len(still) < len(running):
            keep = torch.tensor(still, device=device)
            if fast is not None:
                fast.keep(keep)
            else:
                cache.batch_select_indices(keep)
            chosen, mask, next_pos = chosen[keep], mask[keep], next_pos[keep]
            running = [running[b] for b in still]
        if fast is not None:
            logits = fast.step(chosen, next_pos)
            next_pos = next_pos + 1
            continue
        mask = torch.cat([mask, mask.new_ones((len(running), 1))], dim=1)
        out = model(
            input_ids=chosen[:, None],
            attention_mask=mask,
            position_ids=next_pos[:, None],
            use_cache=True,
            logits_to_keep=1,
            **{cache_kwarg: cache},
        )
        cache = _returned_cache(out)
        logits = out.logits[:, -1, :].float()
        next_pos = next_pos + 1

    results: list[Completion] = []
    for row in range(rows):
        toks, lps, reason = tokens[row], logprobs[row], finish[row]
        assert reason is not None
        if reason == "stop" and not params.include_stop_in_output:
            toks, lps = toks[:-1], lps[:-1]
        results.append(Completion(toks, lps, reason))
    return [results[i * n : (i + 1) * n] for i in range(len(prompts))]


@torch.no_grad()
def prompt_logprobs(model: Any, tokens: Sequence[int]) -> list[float | None]:
    """log p(token t | tokens before it) for every position of one sequence; None at position 0."""
    if not tokens:
        return []
    device = _device_of(model)
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
    was_training = model.training
    model.eval()
    try:
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1].float()
    finally:
        model.train(was_training)
    lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
    return [None, *lp.tolist()]
