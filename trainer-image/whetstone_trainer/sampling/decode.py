"""The decode step of Llama-family models (Llama, Mistral and Qwen2 without sliding window, Qwen3), without
the per-call machinery of a transformers forward: the KV cache is preallocated for the whole generation and
written in place, the attention mask is kept as one [B, T] tensor, and each layer is computed from its own
weights.

On a small model a decode step is bound by the number of tensor operations, not by their arithmetic: the
transformers forward spends most of it in Python (mask building, cache concatenation, output bookkeeping),
and even a bare module call costs more than a [64 × 128] matrix product. So a plain `nn.Linear` is applied
as `F.linear` on its weight, an fp32 RMSNorm as one `F.rms_norm`, the rotary embedding as one operation on
queries and keys together, and, when the copies are small (`FUSE_LIMIT_BYTES`), the q/k/v and gate/up
projections as one product each. Anything else (a LoRA or quantised layer, another activation, autocast) is
called as the model's own module, so adapters and mixed precision apply as in the model's forward.
tests/test_sampling.py and tests/test_decode.py check that this gives the model's own logits (greedy =
transformers' generate), fused or not, for Llama, Qwen2 (biases) and Qwen3 (q/k norms), with and without
LoRA.

Anything else (another architecture, or a wrapper such as the training service's MoE routing capture) is
decoded by calling the model itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}
# Rotary embeddings whose angles depend on the position alone: their cos/sin are computed once per
# generation for every position. (dynamic and longrope rescale with the length seen so far: called per step.)
_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}
# Fused q/k/v and gate/up weights are copies made for each sampling call (the policy's weights change every
# step). Under this size they cost nothing that matters and save a product per layer; above it the products
# themselves dominate the step, and the copies would be memory taken from the KV cache (a GPU's above all).
FUSE_LIMIT_BYTES = 64 << 20


def _base(model: Any) -> Any:
    """The transformers model under a PEFT wrapper, or the model itself."""
    return (
        model.get_base_model()
        if hasattr(model, "get_base_model") and hasattr(model, "peft_config")
        else model
    )


def supported(model: Any) -> bool:
    base = _base(model)
    config = getattr(base, "config", None)
    inner = getattr(base, "model", None)
    return (
        getattr(config, "model_type", None) in _FAMILIES
        and not getattr(config, "sliding_window", None)
        and getattr(config, "partial_rotary_factor", 1.0) == 1.0
        and type(base).__name__.endswith("ForCausalLM")
        and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
        and hasattr(base, "lm_head")
    )


def _plain(module: Any) -> bool:
    return type(module) is torch.nn.Linear


def _rms(module: Any) -> bool:
    return type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")


def _silu(module: Any) -> bool:
    return type(module).__name__ in ("SiLU", "SiLUActivation")


def _fused(modules: list[Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
    weight = torch.cat([m.weight for m in modules])
    if all(m.bias is None for m in modules):
        return weight, None
    biases = [m.bias if m.bias is not None else m.weight.new_zeros(m.out_features) for m in modules]
    return weight, torch.cat(biases)


@dataclass
class _Layer:
    """How one decoder layer is computed in a decode step: fused weights where they were made."""

    module: Any
    qkv: tuple[torch.Tensor, torch.Tensor | None] | None  # q, k and v stacked, or each projection alone
    gate_up: tuple[torch.Tensor, torch.Tensor | None] | None
    own_mlp: bool  # the MLP is called as a module (not gate/up/down plain linears with SiLU)
    q_size: int
    k_size: int


def _layers(inner: Any) -> list[_Layer]:
    layers = []
    for layer in inner.layers:
        attn, mlp = layer.self_attn, layer.mlp
        projections = [getattr(mlp, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
        layers.append(
            _Layer(
                module=layer,
                qkv=None,
                gate_up=None,
                own_mlp=not (all(_plain(p) for p in projections) and _silu(getattr(mlp, "act_fn", None))),
                q_size=attn.q_proj.out_features,
                k_size=attn.k_proj.out_features,
            )
        )
    qkv_bytes = sum(
        getattr(x.module.self_attn, n).weight.nbytes for x in layers for n in ("q_proj", "k_proj", "v_proj")
    )
    gate_up_bytes = sum(
        x.module.mlp.gate_proj.weight.nbytes + x.module.mlp.up_proj.weight.nbytes
        for x in layers
        if not x.own_mlp
    )
    if qkv_bytes + gate_up_bytes <= FUSE_LIMIT_BYTES:
        for x in layers:
            attn, mlp = x.module.self_attn, x.module.mlp
            if all(_plain(p) for p in (attn.q_proj, attn.k_proj, attn.v_proj)):
                x.qkv = _fused([attn.q_proj, attn.k_proj, attn.v_proj])
            if not x.own_mlp:
                x.gate_up = _fused([mlp.gate_proj, mlp.up_proj])
    return layers


def _linear(module: Any, h: torch.Tensor) -> torch.Tensor:
    return F.linear(h, module.weight, module.bias) if _plain(module) else module(h)


def _norm(module: Any, x: torch.Tensor, exact: bool) -> torch.Tensor:
    """The model's RMSNorm; as one operation where that computes it the same way (fp32, no autocast; the
    values agree to within ~1e-7)."""
    if exact and _rms(module):
        return F.rms_norm(x, (x.shape[-1],), module.weight, module.variance_epsilon)
    return module(x)


def _rotate_half(head_dim: int, like: torch.Tensor) -> torch.Tensor:
    """The matrix R with x @ R = cat(-x[half:], x[:half]) (transformers' rotate_half): one exact product
    (one ±1 per column) instead of a negation, two slices and a concatenation."""
    half = head_dim // 2
    r = torch.zeros((head_dim, head_dim), dtype=like.dtype, device=like.device)
    r[torch.arange(half) + half, torch.arange(half)] = -1
    r[torch.arange(half), torch.arange(half) + half] = 1
    return r


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half_turn: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of [rows, heads, head_dim]: x·cos + rotate_half(x)·sin."""
    return torch.addcmul(x * cos, x @ half_turn, sin)


class Decoder:
    """Preallocated KV cache of every layer for `rows` sequences of up to `width` tokens, filled from a
    prefill's cache, then extended one token per step."""

    def __init__(self, model: Any, cache: Any, mask: torch.Tensor, width: int) -> None:
        base = _base(model)
        self.inner, self.lm_head, self.config = base.model, base.lm_head, base.config
        layer0 = self.inner.layers[0].self_attn
        self.head_dim = layer0.head_dim
        self.scaling = layer0.scaling
        self.layers = _layers(self.inner)
        self.half_turn = _rotate_half(self.head_dim, self.inner.embed_tokens.weight)
        rows, filled = mask.shape
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        for i in range(len(self.inner.layers)):
            k, v = _layer_cache(cache, i)
            buf_k = k.new_zeros((rows, k.shape[1], width, k.shape[3]))
            buf_v = v.new_zeros((rows, v.shape[1], width, v.shape[3]))
            buf_k[:, :, :filled] = k
            buf_v[:, :, :filled] = v
            self.keys.append(buf_k)
            self.values.append(buf_v)
        # The attention mask as the additive bias sdpa would make of a boolean one, kept for the whole
        # generation: 0 where a row may attend, -inf on padding and on positions not yet written.
        self.bias = k.new_full((rows, width), float("-inf"))
        self.bias[:, :filled].masked_fill_(mask.bool(), 0.0)
        self.length = filled
        # cos and sin of every position the generation can reach, [width, 2, head_dim] (the model's own
        # rotary module, once): a step indexes them instead of running the module's dozen operations.
        self.rope: torch.Tensor | None = None
        if getattr(self.inner.rotary_emb, "rope_type", None) in _STATIC_ROPE:
            positions = torch.arange(width, device=mask.device)[None]
            cos, sin = self.inner.rotary_emb(self.inner.embed_tokens.weight, position_ids=positions)
            self.rope = torch.stack((cos[0], sin[0]), dim=1)

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row not in `rows` (finished ones)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.bias = self.bias.index_select(0, rows)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append one token per row (at `positions`); the logits of the next token, [B, V]."""
        t = self.length
        self.bias[:, t] = 0.0
        x = self.inner.embed_tokens(tokens)  # [B, D]: one token a row, no sequence axis
        if self.rope is not None:
            rope = self.rope[positions]
            cos, sin = rope[:, :1], rope[:, 1:]  # [B, 1, head_dim]
        else:
            cos, sin = self.inner.rotary_emb(x, position_ids=positions[:, None])
        exact = x.dtype == torch.float32 and not torch.is_autocast_enabled(x.device.type)
        attend = self.bias[:, None, None, : t + 1]
        rows, hd = x.shape[0], self.head_dim
        for i, layer in enumerate(self.layers):
            module, attn = layer.module, layer.module.self_attn
            h = _norm(module.input_layernorm, x, exact)
            if layer.qkv is not None:
                qkv = F.linear(h, *layer.qkv)
                qk, v = qkv[:, : layer.q_size + layer.k_size], qkv[:, layer.q_size + layer.k_size :]
            else:
                qk = torch.cat((_linear(attn.q_proj, h), _linear(attn.k_proj, h)), dim=-1)
                v = _linear(attn.v_proj, h)
            qk = qk.view(rows, -1, hd)  # the query heads, then the key heads
            heads = layer.q_size // hd
            if hasattr(attn, "q_norm"):  # Qwen3 normalises queries and keys per head, before the rotation
                qk = torch.cat(
                    (_norm(attn.q_norm, qk[:, :heads], exact), _norm(attn.k_norm, qk[:, heads:], exact)), 1
                )
            qk = _rotate(qk, cos, sin, self.half_turn)
            self.keys[i][:, :, t] = qk[:, heads:]
            self.values[i][:, :, t] = v.view(rows, -1, hd)
            out = F.scaled_dot_product_attention(
                qk[:, :heads, None],
                self.keys[i][:, :, : t + 1],
                self.values[i][:, :, : t + 1],
                attn_mask=attend,
                scale=self.scaling,
                enable_gqa=heads != self.keys[i].shape[1],
            )
            x = x + _linear(attn.o_proj, out.reshape(rows, -1))
            h = _norm(module.post_attention_layernorm, x, exact)
            mlp = module.mlp
            if layer.own_mlp:
                x = x + mlp(h)
                continue
            if layer.gate_up is not None:
                gate, up = F.linear(h, *layer.gate_up).chunk(2, dim=-1)
            else:
                gate, up = _linear(mlp.gate_proj, h), _linear(mlp.up_proj, h)
            x = x + _linear(mlp.down_proj, F.silu(gate) * up)
        self.length = t + 1
        return self.lm_head(_norm(self.inner.norm, x, exact)).float()


def _layer_cache(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    layer = cache.layers[i]
    return layer.keys, layer.values
