"""Mixture-of-experts routing: record which experts the router chose for every token, and replay given
choices in a later pass (routing replay, "R3", arXiv:2510.11370).

Routing travels as one int64 matrix per sequence, [tokens, moe_layers * top_k]: column l*k + j is the j-th
expert token t was sent to in the l-th MoE layer (MoE layers counted in model order). Replay forces those
experts; the mixing weights are recomputed from the router's current probabilities of the forced experts,
so the router still receives gradients (only the discrete choice is replayed). Rows of -1 are not forced.

Works with the transformers 5 MoE blocks whose router is a `*TopKRouter` returning (logits, scores, indices):
Qwen2-MoE, Qwen3-MoE, Mixtral and their kin, including models/tiny_moe.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from .protocol import UserError


def routers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The router of every MoE layer, in model order."""
    return [m for m in model.modules() if type(m).__name__.endswith("TopKRouter") and hasattr(m, "top_k")]


def is_moe(model: torch.nn.Module) -> bool:
    return bool(routers(model))


def routing_width(model: torch.nn.Module) -> int:
    return sum(int(r.top_k) for r in routers(model))


def check_routing(model: torch.nn.Module, routing: torch.Tensor, where: str) -> None:
    rs = routers(model)
    width = sum(int(r.top_k) for r in rs)
    if routing.dim() != 2 or routing.shape[1] != width:
        raise UserError(
            f"{where} must be int64 [N, {width}] "
            f"(moe layers x top_k = {len(rs)} x {width // max(len(rs), 1)})"
        )
    experts = int(rs[0].num_experts)
    if routing.numel() and (int(routing.max()) >= experts or int(routing.min()) < -1):
        raise UserError(f"{where}: expert ids must be in [0, {experts}) (or -1: not forced)")


@contextmanager
def session(
    model: torch.nn.Module, replay: Sequence[torch.Tensor | None], shape: tuple[int, int] | None = None
) -> Iterator[torch.Tensor | None]:
    """Run the model's next forward with routing recorded (and replayed where `replay` gives rows).

    `replay[b]` is the routing of batch row b ([n_b, width] or None); the batch is right-padded. Yields a
    tensor filled after the forward: [B, T, width] of the experts each token went to (the forced ones where
    replayed). Not an MoE model: yields None and changes nothing."""
    rs = routers(model)
    if not rs:
        yield None
        return
    ks = [int(r.top_k) for r in rs]
    offsets = np.cumsum([0, *ks])
    width = int(offsets[-1])
    forced: torch.Tensor | None = None
    if any(r is not None for r in replay):
        rows = len(replay)
        longest = max(int(r.shape[0]) for r in replay if r is not None)
        if shape is not None:
            longest = max(longest, shape[1])
        device = next(r for r in replay if r is not None).device
        forced = torch.full((rows, longest, width), -1, dtype=torch.long, device=device)
        for b, r in enumerate(replay):
            if r is not None:
                forced[b, : r.shape[0]] = r
    recorded: list[torch.Tensor | None] = [None] * len(rs)
    handles = []

    def hook_for(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> Any:
            logits, scores, indices = output
            if forced is not None:
                want = forced[:, :, offsets[layer] : offsets[layer + 1]]
                want = want[:, : indices.shape[0] // want.shape[0]].reshape(indices.shape)
                indices = torch.where(want >= 0, want, indices)
                probs = torch.softmax(logits.float(), dim=-1)
                scores = probs.gather(-1, indices)
                if getattr(module, "norm_topk_prob", False):
                    scores = scores / scores.sum(dim=-1, keepdim=True)
                scores = scores.to(logits.dtype)
            recorded[layer] = indices.detach()
            return logits, scores, indices

        return hook

    for layer, router in enumerate(rs):
        handles.append(router.register_forward_hook(hook_for(layer)))
    try:
        yield _LazyRoutes(recorded, len(replay))  # type: ignore[misc]
    finally:
        for h in handles:
            h.remove()


class _LazyRoutes:
    """The recorded routing as [B, T, width], assembled on first indexing (after the forward ran)."""

    def __init__(self, recorded: list[torch.Tensor | None], batch: int) -> None:
        self._recorded, self._batch = recorded, batch
        self._value: torch.Tensor | None = None

    def _tensor(self) -> torch.Tensor:
        if self._value is None:
            parts = []
            for r in self._recorded:
                if r is None:
                    raise RuntimeError("the MoE routing was not recorded (no forward ran)")
                parts.append(r.reshape(self._batch, -1, r.shape[-1]))
            self._value = torch.cat(parts, dim=-1)
        return self._value

    def __getitem__(self, key: Any) -> torch.Tensor:
        return self._tensor()[key]


def route_tokens(model: torch.nn.Module, tokens: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Experts and their log router probabilities per token of one sequence: ([T, width], [T, width])."""
    rs = routers(model)
    device = next(model.parameters()).device
    ids = torch.tensor([list(tokens)], dtype=torch.long, device=device)
    logprobs: list[torch.Tensor] = [torch.empty(0)] * len(rs)

    def hook_for(layer: int) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            logits, _, indices = output
            logprobs[layer] = torch.log_softmax(logits.float(), dim=-1).gather(-1, indices)

        return hook

    handles = [r.register_forward_hook(hook_for(i)) for i, r in enumerate(rs)]
    try:
        with torch.no_grad(), session(model, [None]) as routes:
            model(input_ids=ids, use_cache=False)
            experts = routes[0].cpu().numpy()  # type: ignore[index]
    finally:
        for h in handles:
            h.remove()
    weights = torch.cat(logprobs, dim=-1).cpu().numpy()
    return experts.astype(np.int32), weights.astype(np.float32)
