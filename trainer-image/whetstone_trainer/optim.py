"""AdamW and the learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR
from whetstone_api.finetunejob import Hyperparameters


def build_optimizer(model: torch.nn.Module, hp: Hyperparameters) -> torch.optim.AdamW:
    # Decay only matrices: norms and biases shrinking toward 0 hurts and buys no regularisation.
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": hp.weight_decay},
        {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel (one call per step instead of a dozen small ops per tensor) where torch has it: it is
    # transformers' default optimizer too ("adamw_torch_fused"), and on the CPU, where torch's own default is
    # the per-tensor loop, a step of a 10M-parameter model is several times faster.
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in trainable) or None
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=hp.learning_rate, fused=fused)


def lr_factor(step: int, total_steps: int, hp: Hyperparameters) -> float:
    """Multiplier of the peak learning rate at `step` (0-based): linear warm-up, then the chosen decay."""
    if step < hp.warmup_steps:
        return (step + 1) / (hp.warmup_steps + 1)
    if hp.scheduler == "constant":
        return 1.0
    decay_steps = max(1, total_steps - hp.warmup_steps)
    progress = min(1.0, (step - hp.warmup_steps) / decay_steps)
    floor = hp.min_learning_rate_ratio
    if hp.scheduler == "linear":
        return floor + (1 - floor) * (1 - progress)
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, hp: Hyperparameters) -> LambdaLR:
    return LambdaLR(optimizer, lambda step: lr_factor(step, total_steps, hp))
