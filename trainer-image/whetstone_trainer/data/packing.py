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
    # Only from collate_shared_prompts: the example each position belongs to (-1: a shared prompt or
    # padding), how many examples there are, and who may attend to whom ([B, 1, T, T] bool, True: may).
    example_ids: torch.Tensor | None = None
    num_examples: int | None = None
    attention_mask: torch.Tensor | None = None

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


def prompt_groups(
    examples: list[TokenizedExample], prompt_lens: list[int]
) -> dict[tuple[int, ...], list[int]]:
    """The examples' indices by prompt (the first `prompt_lens[i]` tokens of example i), in order of first
    appearance."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (ex, n) in enumerate(zip(examples, prompt_lens, strict=True)):
        if not 1 <= n <= len(ex):
            raise ValueError(
                f"example {i}: a prompt of {n} tokens in {len(ex)} (need 1 <= prompt <= example)"
            )
        groups.setdefault(tuple(ex.input_ids[:n]), []).append(i)
    return groups


def shared_prompt_lengths(examples: list[TokenizedExample], prompt_lens: list[int]) -> list[int]:
    """The lengths of collate_shared_prompts' rows, before padding, without building them: the prompt less its
    last token, then each answer after that token again."""
    return [
        len(prompt) - 1 + sum(len(examples[i]) - len(prompt) + 1 for i in members)
        for prompt, members in prompt_groups(examples, prompt_lens).items()
    ]


def collate_shared_prompts(examples: list[TokenizedExample], prompt_lens: list[int], pad_id: int) -> Batch:
    """One row per distinct prompt: the prompt once, then each of its examples' answers, each answer
    attending to the prompt and to itself only (a tree, as in the sampler's shared prefill). The answers of a
    group then cost their own tokens, not the prompt's again: an RFT group of G answers runs its prompt
    once instead of G times, and no row is padded to the longest answer of the batch.

    A segment starts with the prompt's last token again (at its own position): position t predicts token
    t + 1 inside every segment, so each answer's first token is predicted from the prompt as before, and the
    logits are those of the examples run one per row. The first `prompt_lens[i]` tokens of example i are its
    prompt; they carry no weight."""
    rows: list[tuple[list[int], list[int], list[int], list[float]]] = []
    for prompt, members in prompt_groups(examples, prompt_lens).items():
        n = len(prompt)
        ids, pos, seg, w = list(prompt[:-1]), list(range(n - 1)), [-1] * (n - 1), [0.0] * (n - 1)
        for i in members:
            ex = examples[i]
            ids += [prompt[-1], *ex.input_ids[n:]]
            pos += range(n - 1, len(ex))
            seg += [i] * (len(ex) - n + 1)
            w += [0.0, *ex.weights[n:]]
        rows.append((ids, pos, seg, w))
    width = max(len(r[0]) for r in rows)
    ids_t = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos_t = torch.zeros((len(rows), width), dtype=torch.long)
    seg_t = torch.full((len(rows), width), -2, dtype=torch.long)  # -2: padding, -1: a shared prompt
    w_t = torch.zeros((len(rows), width), dtype=torch.float32)
    for b, (ids, pos, seg, w) in enumerate(rows):
        ids_t[b, : len(ids)] = torch.tensor(ids)
        pos_t[b, : len(ids)] = torch.tensor(pos)
        seg_t[b, : len(ids)] = torch.tensor(seg)
        w_t[b, : len(ids)] = torch.tensor(w)
    query, key = seg_t[:, :, None], seg_t[:, None, :]
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    mask = causal & (key != -2) & ((key == -1) | (key == query))
    mask |= torch.eye(width, dtype=torch.bool)  # a padding position attends to itself: no empty softmax
    return Batch(ids_t, pos_t, w_t, seg_t.clamp_min(-1), len(examples), mask[:, None])
