"""What keeps a training step's activation memory down, on any HF causal LM the trainer loads: activation
(gradient) checkpointing of the transformer layers, and reaching the output head so that loop.target_logprobs
can run it a chunk of tokens at a time (methods/losses.chunked_token_logprobs) instead of inside the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch


def enable_gradient_checkpointing(model: Any) -> None:
    """Recompute each transformer layer in the backward instead of keeping its activations (transformers'
    own per-layer checkpointing). Non-reentrant checkpointing: it needs no input that requires grad, so it
    works with LoRA's frozen embeddings, under DDP and ZeRO alike; transformers still hooks the embeddings'
    output to require grad, which is harmless. Layers checkpoint only in training mode, so forwards without
    gradient (reference, eval, sampling) run as before."""
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})


def is_gradient_checkpointing(model: Any) -> bool:
    """Whether `model` (plain, PEFT, DDP or a DeepSpeed engine) checkpoints its layers."""
    return bool(getattr(hf_model(model), "is_activation_checkpointing", False))


def hf_model(model: Any) -> Any:
    """The transformers model inside DDP (`.module`), a DeepSpeed engine (`.module`) and PEFT wrappers."""
    while isinstance(model, torch.nn.Module) and not hasattr(model, "get_output_embeddings"):
        inner = getattr(model, "module", None)
        if inner is None:
            break
        model = inner
    return model


def output_head(model: Any) -> torch.nn.Module | None:
    """The output projection (lm_head) of `model` when the trainer can run it itself, else None: a model
    without one, or one whose head weight ZeRO-3 has partitioned (it exists whole only inside the engine's
    forward, so it must stay there)."""
    getter = getattr(hf_model(model), "get_output_embeddings", None)
    head = getter() if getter is not None else None
    if not isinstance(head, torch.nn.Module):
        return None
    if any(hasattr(p, "ds_id") for p in head.parameters()):  # a ZeRO-3 partitioned parameter
        return None
    return head


@contextlib.contextmanager
def head_passes_hidden_states(head: torch.nn.Module) -> Iterator[None]:
    """Inside, `head` returns its input: the model's `.logits` are the (kept) last hidden states, [N, H].
    An instance attribute shadows the class's forward, so parameters, state_dict keys and module hooks
    (DeepSpeed's, PEFT's) stay as they are; leaving restores the head."""
    head.forward = lambda hidden, *args, **kwargs: hidden  # type: ignore[method-assign]
    try:
        yield
    finally:
        del head.forward
