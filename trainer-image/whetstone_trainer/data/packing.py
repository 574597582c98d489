"""Sequence packing and batching.

A packed row holds several examples back to back. They never see each other: position ids restart at 0 at
each example, and with `attention_mask=None` transformers derives a block-diagonal causal mask from those
restarts (its packed-sequence path), so example k attends only to itself. Padding at the end of a row is one
more "example" whose tokens carry no loss. `tests/test_packing.py` checks that a packed row gives exactly the
logits of its examples run one by one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .formats import TokenizedExample


@dataclass(frozen=True)
class Row:
    """One training sequence: one example, or several packed."""

    examples: tuple[TokenizedExample, ...]

    def __len__(self) -> int:
        return sum(len(e) for e in self.examples)


def pack(examples: list[TokenizedExample], max_seq_len: int) -> list[Row]:
    """First-fit decreasing into rows of at most max_seq_len tokens. Deterministic for the same input."""
    order = sorted(range(len(examples)), key=lambda i: (-len(examples[i]), i))
    bins: list[list[TokenizedExample]] = []
    free: list[int] = []
    for i in order:
        ex = examples[i]
        for b, room in enumerate(free):
            if len(ex) <= room:
                bins[b].append(ex)
                free[b] -= len(ex)
                break
        else:
            bins.append([ex])
            free.append(max_seq_len - len(ex))
    return [Row(tuple(b)) for b in bins]


def one_per_row(examples: list[TokenizedExample]) -> list[Row]:
    return [Row((e,)) for e in examples]


def epoch_order(num_rows: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a fixed function of (seed, epoch), so a resumed run sees the same data."""
    order = list(range(num_rows))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    # weights[b, t] is the loss weight of predicting input_ids[b, t] from the tokens before it.
    weights: torch.Tensor  # [B, T] float

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.numel())


def collate(rows: list[Row], pad_id: int) -> Batch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    w = torch.zeros((len(rows), width), dtype=torch.float32)
    for b, row in enumerate(rows):
        at = 0
        for ex in row.examples:
            n = len(ex)
            ids[b, at : at + n] = torch.tensor(ex.input_ids)
            pos[b, at : at + n] = torch.arange(n)
            w[b, at : at + n] = torch.tensor(ex.weights)
            # The first token of an example has no context of its own: never a target.
            w[b, at] = 0.0
            at += n
        if at < width:  # padding forms its own segment, so real tokens never attend to it
            pos[b, at:] = torch.arange(width - at)
    return Batch(ids, pos, w)
