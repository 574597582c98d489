"""The decode step of Llama-family models (Llama, Mistral and Qwen2 without sliding window, Qwen3), without
the per-call machinery of a transformers forward: the KV cache is preallocated for the whole generation and
written in place, the attention mask is kept as one [B, T] tensor, and each layer is called through its own
modules (norms, q/k/v/o projections, MLP), so LoRA adapters and autocast apply as in the model's forward.

On a small model the transformers forward spends most of a decode step in Python (mask building, cache
concatenation, output bookkeeping); this path does only the tensor work. tests/test_sampling.py checks that
it gives the same tokens and log-probs as the model's own forward (greedy = transformers' generate).

Anything else (another architecture, or a wrapper such as the training service's MoE routing capture) is
decoded by calling the model itself.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F

_FAMILIES = {"llama", "mistral", "qwen2", "qwen3"}


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
        and type(base).__name__.endswith("ForCausalLM")
        and all(hasattr(inner, a) for a in ("embed_tokens", "layers", "norm", "rotary_emb"))
        and hasattr(base, "lm_head")
    )


class Decoder:
    """Preallocated KV cache of every layer for `rows` sequences of up to `width` tokens, filled from a
    prefill's cache, then extended one token per step."""

    def __init__(self, model: Any, cache: Any, mask: torch.Tensor, width: int) -> None:
        base = _base(model)
        self.inner, self.lm_head, self.config = base.model, base.lm_head, base.config
        layer0 = self.inner.layers[0].self_attn
        self.rope = sys.modules[type(layer0).__module__].apply_rotary_pos_emb
        self.head_dim = layer0.head_dim
        self.scaling = layer0.scaling
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
        self.mask = mask.new_zeros((rows, width), dtype=torch.bool)
        self.mask[:, :filled] = mask.bool()
        self.length = filled

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row not in `rows` (finished ones)."""
        self.keys = [k.index_select(0, rows) for k in self.keys]
        self.values = [v.index_select(0, rows) for v in self.values]
        self.mask = self.mask.index_select(0, rows)

    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Append one token per row (at `positions`); the logits of the next token, [B, V]."""
        t = self.length
        self.mask[:, t] = True
        x = self.inner.embed_tokens(tokens[:, None])
        cos, sin = self.inner.rotary_emb(x, position_ids=positions[:, None])
        attend = self.mask[:, None, None, : t + 1]
        rows = x.shape[0]
        for i, layer in enumerate(self.inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(rows, 1, -1, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(rows, 1, -1, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(rows, 1, -1, self.head_dim).transpose(1, 2)
            if hasattr(attn, "q_norm"):  # Qwen3 normalises queries and keys per head
                q, k = attn.q_norm(q), attn.k_norm(k)
            q, k = self.rope(q, k, cos, sin)
            self.keys[i][:, :, t] = k[:, :, 0]
            self.values[i][:, :, t] = v[:, :, 0]
            out = F.scaled_dot_product_attention(
                q,
                self.keys[i][:, :, : t + 1],
                self.values[i][:, :, : t + 1],
                attn_mask=attend,
                scale=self.scaling,
                enable_gqa=q.shape[1] != k.shape[1],
            )
            x = x + attn.o_proj(out.transpose(1, 2).reshape(rows, 1, -1))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        self.length = t + 1
        return self.lm_head(self.inner.norm(x))[:, -1, :].float()


def _layer_cache(cache: Any, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    layer = cache.layers[i]
    return layer.keys, layer.values
