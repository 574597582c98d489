"""The attention of a shared-prompt batch (data.packing.collate_shared_prompts) computed as what it is: each
prompt's own causal attention, then each answer attending to its prompt's keys and to itself, without the
[T × T] masked attention over the whole row.

The row holds a prompt once and its G answers side by side, so the row's attention mask is mostly False:
an answer sees neither the other answers nor their padding. torch's CPU sdpa with an arbitrary mask still
computes every query-key pair of the row (and its backward every gradient), G² times the pairs that count
once the answers outweigh the prompt: the RFT update's attention took a quarter of its time at the bench
shape (8 answers of 32 tokens after a 14-token prompt). Here the answers become a batch of their own whose
keys are the prompt's (the same tensor for every answer of a group, expanded, so its gradient is summed
over them) followed by the answer's; the work is the pairs that count.

It reaches the model's layers as a keyword argument (`SHARED_PROMPT_KWARG`) that transformers hands down to
its attention function with the other forward kwargs. `install()` registers a pass-through in place of
transformers' "sdpa" attention: a call without the argument (every other forward: sampling, SFT, DPO, a
model of another library in the same process) goes to transformers' own sdpa function unchanged. The dense
mask stays in the batch, so an attention that never sees the argument still computes the same values.
tests/test_shared_prompts.py checks log-probs, entropies and gradients against one row per answer, with
and without this path, full-parameter and LoRA with checkpointing.

On the CPU, where the answers' scores are small (`EXPLICIT_LIMIT_BYTES`), they are computed as explicit
products instead: the flash kernel's per-block overhead dominates at a few dozen tokens (forward and
backward of the bench shape: 7.5 → 4.7 ms a layer), and one product of all G answers' queries against the
prompt's keys replaces G copies of those keys. Above the limit sdpa's kernel runs, which never holds the
[answers × keys] scores.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

SHARED_PROMPT_KWARG = "whetstone_shared_prompt"  # (prompt width P, answers per row S, answer width W)
# Families whose decoder layers pass forward kwargs to transformers' attention function, without a
# sliding window (the dense mask of the layout has none either).
_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}
# The answers' [queries × keys] scores of one layer, in bytes, up to which the CPU computes them explicitly
# (the explicit path holds a few tensors of that size at once: the scores, their fp32 softmax, its parts).
EXPLICIT_LIMIT_BYTES = 8 << 20
_sdpa: Any = None
_installing = threading.Lock()


def install() -> None:
    """Route transformers' "sdpa" attention through `_attention` (once per process, from any thread)."""
    global _sdpa
    with _installing:
        if _sdpa is not None:
            return
        from transformers import AttentionInterface
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        _sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]
        AttentionInterface.register("sdpa", _attention)


def supported(config: Any) -> bool:
    return (
        getattr(config, "model_type", None) in _FAMILIES
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and not getattr(config, "sliding_window", None)
    )


def _attention(
    module: Any,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    layout = kwargs.pop(SHARED_PROMPT_KWARG, None)
    if layout is None or attention_mask is None or attention_mask.dtype != torch.bool or args:
        return _sdpa(module, query, key, value, attention_mask, *args, **kwargs)
    return attend(
        query, key, value, attention_mask, layout, kwargs.get("scaling"), kwargs.get("dropout", 0.0)
    )


def attend(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    layout: tuple[int, int, int],
    scaling: float | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, None]:
    """query [B, H, T, D], key/value [B, Hkv, T, D], mask [B, 1, T, T] (True: may attend) of a row laid out as
    P prompt columns then S answer segments of W columns; the output as transformers' attention functions
    give it, [B, T, H, D]."""
    p, s, w = layout
    b, heads, t, d = query.shape
    kv_heads = key.shape[1]
    if t != p + s * w:
        raise ValueError(f"a shared-prompt row of {t} columns is not {p} + {s} × {w}")
    gqa = heads != kv_heads
    if (
        query.device.type == "cpu"
        and not dropout
        and b * s * heads * w * (p + w) * query.element_size() <= EXPLICIT_LIMIT_BYTES
    ):
        return _explicit(query, key, value, mask, layout, d**-0.5 if scaling is None else scaling), None
    outputs = []
    if p:
        prompt = F.scaled_dot_product_attention(
            query[:, :, :p],
            key[:, :, :p],
            value[:, :, :p],
            attn_mask=mask[:, :, :p, :p],
            dropout_p=dropout,
            scale=scaling,
            enable_gqa=gqa,
        )
        outputs.append(prompt.transpose(1, 2))

    def answers(x: torch.Tensor) -> torch.Tensor:  # [B, h, S·W, D] -> [B·S, h, W, D]
        return x[:, :, p:].unflatten(2, (s, w)).transpose(1, 2).flatten(0, 1)

    def with_prompt(x: torch.Tensor) -> torch.Tensor:  # each answer's keys: its prompt's, then its own
        own = answers(x)
        if not p:
            return own
        shared = x[:, None, :, :p].expand(b, s, x.shape[1], p, d).flatten(0, 1)
        return torch.cat((shared, own), dim=2)

    # Which prompt columns are real (the row of the first answer's first token sees exactly those), then
    # causal inside the answer; padding at an answer's end sees what is before it and is never a target.
    sees_prompt = mask[:, :, p : p + 1, :p].expand(b, 1, w, p)
    causal = torch.ones((w, w), dtype=torch.bool, device=mask.device).tril().expand(b, 1, w, w)
    answer_mask = torch.cat((sees_prompt, causal), dim=3).repeat_interleave(s, dim=0)
    out = F.scaled_dot_product_attention(
        answers(query),
        with_prompt(key),
        with_prompt(value),
        attn_mask=answer_mask,
        dropout_p=dropout,
        scale=scaling,
        enable_gqa=gqa,
    )  # [B·S, H, W, D]
    outputs.append(out.unflatten(0, (b, s)).permute(0, 1, 3, 2, 4).reshape(b, s * w, heads, d))
    return torch.cat(outputs, dim=1).contiguous(), None


def _explicit(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    layout: tuple[int, int, int],
    scaling: float,
) -> torch.Tensor:
    """`attend` as explicit products (small shapes, see the module docstring): [B, T, H, D]. A query head
    h reads key head h // (H / Hkv), as transformers' repeat_kv and sdpa's enable_gqa do. The prompt and
    answer columns are taken apart by `split`, whose backward is one concatenation (a slice's backward writes
    its gradient into a zero-filled copy of the whole tensor, then the copies are added). Softmax in fp32."""
    p, s, w = layout
    b, heads, _t, d = query.shape
    kv_heads = key.shape[1]
    g = heads // kv_heads
    (prompt_q, answer_q), (prompt_k, answer_k), (prompt_v, answer_v) = (
        x.split((p, s * w), dim=2) for x in (query, key, value)
    )
    outputs = []
    if p:
        prompt = F.scaled_dot_product_attention(
            prompt_q, prompt_k, prompt_v, attn_mask=mask[:, :, :p, :p], scale=scaling, enable_gqa=g > 1
        )
        outputs.append(prompt.transpose(1, 2))
    q = answer_q.unflatten(1, (kv_heads, g)).unflatten(3, (s, w))  # [B, Hkv, g, S, W, D]
    own_k = answer_k.unflatten(2, (s, w))[:, :, None]  # [B, Hkv, 1, S, W, D]
    own_v = answer_v.unflatten(2, (s, w))[:, :, None]
    # Scores against the answer's own keys, causal, then (one product for the whole group) its prompt's.
    scores = [q @ own_k.transpose(-1, -2)]  # [B, Hkv, g, S, W, W]
    causal = torch.full((w, w), float("-inf"), device=query.device).triu(1)
    biases = [causal.expand(b, 1, 1, 1, w, w)]
    if p:
        scores.insert(0, (q.flatten(2, 4) @ prompt_k.transpose(-1, -2)).view(b, kv_heads, g, s, w, p))
        seen = mask[:, 0, p, :p]  # the prompt columns that are real (what the first answer token sees)
        prompt_bias = torch.zeros((b, p), device=query.device).masked_fill_(~seen, float("-inf"))
        biases.insert(0, prompt_bias[:, None, None, None, None, :].expand(b, 1, 1, 1, w, p))
    weights = torch.softmax(torch.cat(scores, -1).float() * scaling + torch.cat(biases, -1), -1)
    from_prompt, from_own = weights.to(query.dtype).split((p, w), dim=-1)
    out = from_own @ own_v  # [B, Hkv, g, S, W, D]
    if p:
        out = out + (from_prompt.flatten(2, 4) @ prompt_v).view(b, kv_heads, g, s, w, d)
    outputs.append(out.permute(0, 3, 4, 1, 2, 5).reshape(b, s * w, heads, d))
    return torch.cat(outputs, dim=1).contiguous()
