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
    # padding), how many examples there are, and who may attend to whom ([B, 1, T, T] bool, True: may; or
    # only its first P + 1 rows and columns, see there).
    example_ids: torch.Tensor | None = None
    num_examples: int | None = None
    attention_mask: torch.Tensor | None = None
    # (P prompt columns, S answer segments, W columns each): the layout of collate_shared_prompts' rows.
    shared_prompt: tuple[int, int, int] | None = None

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


def shared_prompt_layout(
    examples: list[TokenizedExample], prompt_lens: list[int]
) -> tuple[dict[tuple[int, ...], list[int]], tuple[int, int, int]]:
    """The groups of collate_shared_prompts and its row layout (P, S, W), without building the rows: P prompt
    columns (the longest prompt less its last token), then S segments (the largest group) of W columns (the
    longest answer, after the prompt's last token again)."""
    groups = prompt_groups(examples, prompt_lens)
    prompt_width = max(len(prompt) - 1 for prompt in groups)
    segments = max(len(members) for members in groups.values())
    answer_width = max(len(examples[i]) - len(prompt) + 1 for prompt, ms in groups.items() for i in ms)
    return groups, (prompt_width, segments, answer_width)


def collate_shared_prompts(
    examples: list[TokenizedExample], prompt_lens: list[int], pad_id: int, full_mask: bool = True
) -> Batch:
    """One row per distinct prompt: the prompt once, then each of its examples' answers, each answer
    attending to the prompt and to itself only (a tree, as in the sampler's shared prefill). The answers of a
    group then cost their own tokens, not the prompt's again: an RFT group of G answers runs its prompt
    once instead of G times.

    Every row has the same layout (`Batch.shared_prompt` = (P, S, W)): the prompt right-aligned in its first
    P columns, then S segments of W columns, one per answer, each padded at its end, so the attention can
    take the answers as a batch of their own (models/shared_prompt_attention.py). A segment starts with the
    prompt's last token again (at its own position): position t predicts token t + 1 inside every segment,
    so each answer's first token is predicted from the prompt as before, and the logits are those of the
    examples run one per row. The first `prompt_lens[i]` tokens of example i are its prompt; they carry no
    weight. The [B, 1, T, T] mask says the same for any attention; `full_mask=False` keeps only its first
    P + 1 rows and columns (the prompt, and what an answer's first token sees of it), all that
    models/shared_prompt_attention.py reads: the full one grows with the square of the row, which is G
    answers long. An attention that would need the full mask fails on the short one instead of guessing
    (with one-token prompts only, P = 0, the mask is the full one)."""
    groups, (p, s, w) = shared_prompt_layout(examples, prompt_lens)
    width = p + s * w
    rows = len(groups)
    ids = torch.full((rows, width), pad_id, dtype=torch.long)
    pos = torch.zeros((rows, width), dtype=torch.long)
    seg = torch.full((rows, width), -2, dtype=torch.long)  # -2: padding, -1: a shared prompt
    weights = torch.zeros((rows, width), dtype=torch.float32)
    for b, (prompt, members) in enumerate(groups.items()):
        n = len(prompt)
        ids[b, p - (n - 1) : p] = torch.tensor(prompt[:-1], dtype=torch.long)
        pos[b, p - (n - 1) : p] = torch.arange(n - 1)
        seg[b, p - (n - 1) : p] = -1
        for j, i in enumerate(members):
            ex, at = examples[i], p + j * w
            answer = ex.input_ids[n:]
            ids[b, at : at + 1 + len(answer)] = torch.tensor([prompt[-1], *answer], dtype=torch.long)
            pos[b, at : at + 1 + len(answer)] = torch.arange(n - 1, len(ex))
            seg[b, at : at + 1 + len(answer)] = i
            weights[b, at + 1 : at + 1 + len(answer)] = torch.tensor(ex.weights[n:], dtype=torch.float32)
    # With no prompt column the short mask would be [1 × 1], which any attention broadcasts without
    # complaint: build the full one, small then.
    side = width if full_mask or p == 0 else p + 1
    query, key = seg[:, :side, None], seg[:, None, :side]
    causal = torch.ones((side, side), dtype=torch.bool).tril()
    mask = causal & (key != -2) & ((key == -1) | (key == query))
    mask |= torch.eye(side, dtype=torch.bool)  # a padding position attends to itself: no empty softmax
    return Batch(ids, pos, weights, seg.clamp_min(-1), len(examples), mask[:, None], (p, s, w))
