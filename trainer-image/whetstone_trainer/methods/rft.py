"""Reinforcement fine-tuning, top to bottom: prompts, model, graders, then per step: sample from the current
weights, grade, filter, advantages, update; checkpoints, output.

A step takes hyperparameters.batchSize prompts from the prompt stream (an epoch-shuffled order, the data
cursor), splits them over the ranks and samples rft.samplesPerPrompt answers to each with the KV-cache
sampler (sampling/). Each rank grades its answers with the job's RewardGraders (whetstone_graders, python in
sandboxed workers); the groups are gathered so every rank sees the same batch in stream order.

Zero-variance groups (every answer got the same reward: every advantage 0) are kept, dropped, or dropped and
replaced by groups of further prompts until the batch is full, at most rft.maxRefillRounds more rounds
(rft.zeroVarianceGroups; judged on the graders' reward, before overlong shaping). Advantages: the group's
rewards (plus DAPO's soft overlong punishment) minus their mean, over their standard deviation.

The update: the log-probs of the kept answers under the current weights (the "old" policy, at the sampling
temperature) are computed once before the first update (with a single update per batch, that update's own
forward gives them, detached: one pass less, the same numbers); then rft.updateEpochs passes, each of
rft.miniBatches optimizer steps, of the clipped loss of rft.algorithm (methods/losses.py) with a k3 KL to the
frozen reference when klBeta > 0 (LoRA: adapters disabled; full-parameter: a frozen copy). Answers cut at
maxCompletionTokens are left out of the loss with overlong filtering (DAPO).

Exact resume: weights, optimizer, scheduler, the torch and python RNG and the cursor (prompts consumed, refill
rounds included) are checkpointed. The sampler draws each prompt's answers from a generator seeded with the
job's seed and the prompt's position in the stream, so its state is a function of the cursor: a resumed run
samples and scores what the uninterrupted run would have, and so does a run on another number of ranks.

The same loop trains under DDP and, full-parameter, under DeepSpeed ZeRO-2 / ZeRO-3
(spec.distributed.strategy): `loop.Trainee` holds what differs. The sampler runs on the whole model
(`Trainee.generating`: ZeRO-3 gathers the weights once per sampling call); the old and reference log-probs
and the updates run as many micro-batches on every rank (ZeRO-3 gathers weights in every forward). The
full-parameter KL reference is a frozen copy of the base (`Trainee.frozen_reference`; under ZeRO-3 itself
partitioned): unlike DPO's, the answers it scores are only known once sampled, so its log-probs cannot be
computed ahead.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from whetstone_graders import GraderSet, Sample

from .. import loop
from ..data.formats import TokenizedExample
from ..data.packing import epoch_order
from ..data.tokenize import tokenize_prompt
from ..distributed import World
from ..sampling import SamplingParams, default_stop_token_ids, sample
from .losses import aggregate, group_advantages, gspo_token_terms, kl_k3, ppo_terms, soft_overlong_penalty
from .rollouts import Group, Prompt, grade_observations, rollout_lines, rollout_metrics

if TYPE_CHECKING:
    from whetstone_api.finetunejob import RFTSpec

    from ..entry import Inputs, Rows


@dataclass
class Sequence:
    """One answer to train on: prompt + completion tokens, its advantage and its log-probs per completion
    token under the old policy (and the reference)."""

    example: TokenizedExample
    advantage: float
    sampler_logprobs: list[float]
    prompt_len: int  # the example's first prompt_len tokens are the prompt
    old_logprobs: torch.Tensor | None = None
    ref_logprobs: torch.Tensor | None = None


@dataclass
class EvalResult:
    mean_reward: float
    pass_rate: float
    samples: list[dict[str, Any]]  # this rank's: completion and reward per prompt


def sampling_params(rft: RFTSpec, tokenizer: Any, temperature: float | None = None) -> SamplingParams:
    return SamplingParams(
        max_tokens=rft.max_completion_tokens,
        temperature=rft.temperature if temperature is None else temperature,
        top_p=rft.top_p,
        top_k=rft.top_k or -1,
        stop_token_ids=default_stop_token_ids(tokenizer),
        stop_strings=tuple(rft.stop),
    )


def grader_set(inputs: Inputs) -> GraderSet:
    rft = inputs.spec.rft
    assert rft is not None
    return GraderSet([(g.name, g.weight) for g in rft.graders], inputs.graders, workers=rft.grader_workers)


def evaluate_rewards(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Rows,
    inputs: Inputs,
    graders: GraderSet | None = None,
    rt: loop.Runtime | None = None,
    seed: int = 0,
) -> EvalResult:
    """One answer per held-out prompt at rft.evalTemperature (0: greedy), graded: the mean reward (a sample a
    grader skipped scores 0 here) and pass rate over all ranks, each rank taking its share of the prompts."""
    rft = inputs.spec.rft
    assert rft is not None
    world = rt.world if rt else World()
    mine = rows[world.rank :: world.size]
    params = sampling_params(rft, tokenizer, rft.eval_temperature)
    own = graders is None
    graders = graders or grader_set(inputs)
    try:
        totals: list[float] = []
        samples: list[dict[str, Any]] = []
        for i in range(0, len(mine), 64):
            part = mine[i : i + 64]
            with rt.autocast() if rt else contextlib.nullcontext():
                out = sample(
                    model,
                    [tokenize_prompt(tokenizer, row) for _line, row in part],
                    params,
                    tokenizer=tokenizer,
                    generator=torch.Generator().manual_seed(seed + i),
                )
            texts = [tokenizer.decode(c.tokens, skip_special_tokens=True) for (c,) in out]
            rewards = graders.grade([Sample(t) for t in texts], [row for _line, row in part])
            for text, reward in zip(texts, rewards, strict=True):
                score = reward.total if reward.total is not None else 0.0
                totals.append(score)
                samples.append({"completion": text, "reward": reward.total})
    finally:
        if own:
            graders.close()
    n = world.sum(len(totals))
    total, passed = world.sum(sum(totals)), world.sum(sum(t >= rft.pass_threshold for t in totals))
    return EvalResult(total / n if n else float("nan"), passed / n if n else float("nan"), samples)


def train(
    inputs: Inputs, output: Path, observer: loop.Observer, stop_after_step: int | None = None
) -> dict[str, Any]:
    spec = inputs.spec
    hp = spec.hyperparameters
    rft = spec.rft
    assert rft is not None
    rt = loop.start(spec)
    clip_low, clip_high = rft.clip_range
    aggregation = rft.aggregation_mode
    G = rft.samples_per_prompt  # noqa: N806 (the group size, as in the papers)

    # --- data, model, reference, graders, sampler
    tokenizer = loop.load_tokenizer(inputs.model_folder)
    pad_id = tokenizer.pad_token_id
    prompts = [Prompt(tokenize_prompt(tokenizer, row), row, line) for line, row in inputs.train_rows]
    digest = hashlib.sha256()
    for p in prompts:
        digest.update(json.dumps([p.tokens, p.row]).encode())
    _steps_per_epoch, total_steps = loop.plan_steps(len(prompts), hp.batch_size, hp)
    updates_per_step = rft.update_epochs * rft.mini_batches
    micro = max(1, math.ceil(hp.micro_batch_size * G / rt.world.size))
    # DDP (LoRA or full-parameter) or DeepSpeed ZeRO (full-parameter): loop.Trainee holds what differs.
    trainee = loop.prepare_trainee(spec, rt, inputs.model_folder, total_steps * updates_per_step, micro)
    policy = trainee.module  # forwards without gradient: old and reference log-probs
    frozen = None
    if rft.kl_beta > 0 and spec.lora is None:  # full-parameter: the reference is a frozen copy of the base
        frozen = trainee.frozen_reference(inputs.model_folder)
    graders = grader_set(inputs)  # closed by the `with` around the loop, or just below
    not_loading = graders.preload()
    if not_loading:
        graders.close()
        from ..entry import JobRefused

        raise JobRefused(
            "RewardGraders that do not load: "
            + "; ".join(f"{name}: {why}" for name, why in not_loading.items())
        )
    params = sampling_params(rft, tokenizer)
    output.mkdir(parents=True, exist_ok=True)

    # --- resume
    checkpoints = trainee.checkpoints(output, digest.hexdigest()[:16], spec.checkpointing.keep_last, observer)
    resumed = checkpoints.resume()
    start_step = resumed.step if resumed else 0
    cursor = int(resumed.cursor.get("prompts", start_step * hp.batch_size)) if resumed else 0
    observer.on_start(start_step, total_steps)
    log = loop.MetricsLog(output, rt.world, start_step)
    rollout_log = loop.MetricsLog(output, rt.world, start_step, "rollouts.jsonl")

    orders: dict[int, list[int]] = {}

    def stream(position: int) -> int:
        """The prompt at `position` of the stream: epoch after epoch, each in its own seeded order."""
        epoch, i = divmod(position, len(prompts))
        if epoch not in orders:
            orders[epoch] = epoch_order(len(prompts), hp.seed, epoch)
        return orders[epoch][i]

    def rollout_round(first: int, count: int) -> list[Group]:
        """Sample and grade the groups of stream positions [first, first + count) from the current weights:
        each rank its share, then every rank gets all of them in stream order."""
        positions = list(range(first, first + count))[rt.world.rank :: rt.world.size]
        local: list[Group] = []
        # Every rank enters `generating`, prompts of its own or not (ZeRO-3 gathers the weights).
        with trainee.generating() as sampler_model, rt.autocast():
            out = sample(
                sampler_model,
                [prompts[stream(p)].tokens for p in positions],
                params,
                n=G,
                tokenizer=tokenizer,
                # Each prompt's own generator, seeded by its place in the stream: its samples depend on
                # neither the rank nor the batch, and a resumed run redraws them from the cursor.
                generator=[torch.Generator().manual_seed(hp.seed * 1_000_003 + p) for p in positions],
            )
        if positions:
            texts = [[tokenizer.decode(c.tokens, skip_special_tokens=True) for c in group] for group in out]
            rewards = graders.grade(
                [Sample(t) for group in texts for t in group],
                [prompts[stream(p)].row for p in positions for _ in range(G)],
            )
            for j, p in enumerate(positions):
                local.append(Group(p, stream(p), out[j], texts[j], rewards[j * G : (j + 1) * G]))
        groups = [g for part in rt.world.gather(local) for g in part]
        return sorted(groups, key=lambda g: g.position)

    def sequence_logprobs(
        net: torch.nn.Module, seqs: list[Sequence], with_entropy: bool = False
    ) -> loop.TargetLogprobs:
        # A group's answers share their prompt's forward where that is cheaper (loop.answers_batch).
        return loop.target_logprobs(
            net,
            loop.answers_batch(net, [s.example for s in seqs], [s.prompt_len for s in seqs], pad_id),
            rt.device,
            with_entropy=with_entropy,
            temperature=params.temperature,
        )

    def evaluate(step: int) -> dict[str, float]:
        if not inputs.eval_rows:
            return {}
        with trainee.generating() as net:
            result = evaluate_rewards(net, tokenizer, inputs.eval_rows, inputs, graders, rt, seed=step)
        return {"eval_reward_mean": result.mean_reward, "eval_pass_rate": result.pass_rate}

    def collect_groups() -> tuple[list[Group], list[Group], int]:
        """Every group sampled this step, the batchSize groups to train on, and the refill rounds taken."""
        nonlocal cursor
        mode = rft.zero_variance_mode
        sampled: list[Group] = []
        kept: list[Group] = []
        count, rounds = hp.batch_size, 0
        while True:
            new = rollout_round(cursor, count)
            cursor += count
            sampled += new
            kept += [g for g in new if mode == "keep" or not g.zero_variance]
            if mode != "refill" or len(kept) >= hp.batch_size or rounds >= rft.max_refill_rounds:
                return sampled, kept[: hp.batch_size], rounds
            rounds += 1  # sample as many prompts as the keep rate so far says will fill the batch
            keep_rate, need = len(kept) / len(sampled), hp.batch_size - len(kept)
            count = min(4 * hp.batch_size, math.ceil(need / keep_rate) if keep_rate else hp.batch_size)

    def score_before_update(parts: list[tuple[list[Sequence], list[Sequence]]], old: bool) -> float:
        """Old log-probs (when several updates follow: with one, the update's own forward gives them) and
        the reference's (for the KL) of this rank's answers, once, before the first update: `parts` are
        (answers, what to forward) per micro-batch; a stand-in forwarded for an empty micro-batch keeps its
        scores too (its weight-0 update needs them). Returns Σ |sampler − trainer| log-prob over this rank's
        answers' tokens (the inference mismatch) when it scored them."""
        drift = 0.0
        policy.eval()
        with torch.no_grad():
            for part, run in parts:
                if old:
                    with rt.autocast():
                        scored = _split(sequence_logprobs(policy, run))
                    for s, values in zip(run, scored, strict=True):
                        s.old_logprobs = values
                    for s in part:
                        drift += float((s.old_logprobs.cpu() - torch.tensor(s.sampler_logprobs)).abs().sum())
                if rft.kl_beta > 0:
                    off = policy.disable_adapter() if frozen is None else contextlib.nullcontext()
                    with off, rt.autocast():  # type: ignore[attr-defined]
                        ref = _split(sequence_logprobs(policy if frozen is None else frozen, run))
                    for s, values in zip(run, ref, strict=True):
                        s.ref_logprobs = values
        policy.train()
        return drift

    started = time.perf_counter()
    last: dict[str, Any] = {}
    evals: dict[str, float] = {}
    with graders:
        for step in range(start_step, total_steps):
            # --- rollouts from the current weights, graded, filtered
            t0 = time.perf_counter()
            sampled, kept, rounds = collect_groups()
            rollout_seconds = rt.world.sum(time.perf_counter() - t0) / rt.world.size
            latencies, errors = grade_observations(sampled)
            observer.on_grades(latencies, errors)
            seqs, advantages = training_sequences(kept, prompts, rft)

            # --- old (and reference) log-probs of this rank's share of each mini-batch, then the updates
            t1 = time.perf_counter()
            minis = [seqs[i :: rft.mini_batches] for i in range(rft.mini_batches)]
            mine = [m[rt.world.rank :: rt.world.size] for m in minis]
            # This rank's micro-batches of each mini-batch, as many on every rank (ZeRO reduces gradients in
            # every backward and ZeRO-3 gathers weights in every forward); an empty one runs on the
            # mini-batch's first answer with weight 0: (answers, what to forward, weight).
            micro_parts = [
                [(part, part or m[:1], 1.0 if part else 0.0) for part in trainee.micro_batches(m, micro)]
                for m in minis
            ]
            on_policy = rft.update_epochs * rft.mini_batches == 1
            drift = score_before_update(
                [(part, run) for parts in micro_parts for part, run, _w in parts if run], old=not on_policy
            )
            scored = float(sum(len(s.sampler_logprobs) for m in mine for s in m))
            sums = torch.zeros(STATS + 2, dtype=torch.float64)  # the policy stats, tokens forwarded, steps
            for _pass in range(rft.update_epochs):
                for m_all, parts in zip(minis, micro_parts, strict=True):
                    if not m_all:
                        continue
                    normaliser = (
                        sum(len(s.sampler_logprobs) for s in m_all)
                        if aggregation == "token-mean"
                        else len(m_all)
                    )
                    for i, (_part, run, scale) in enumerate(parts):
                        with trainee.accumulating(last=i == len(parts) - 1), rt.autocast():
                            t = sequence_logprobs(trainee.model, run, with_entropy=True)
                            loss, stats = policy_loss(t, run, rft, aggregation, normaliser)
                            # DDP and ZeRO average gradients over ranks; undo it: each step optimises the
                            # global mean.
                            trainee.backward(loss * rt.world.size * scale)
                        sums[:STATS] += scale * stats
                        sums[STATS] += scale * sum(len(s.example) for s in run)
                    trainee.step()
                    sums[STATS + 1] += 1 / rt.world.size
            update_seconds = time.perf_counter() - t1
            if on_policy:  # the update's forward scored the answers: its drift is the mismatch
                drift = float(sums[5])
            loss_sum, clipped, kl_sum, entropy_sum, tokens, _drift, forwarded, opt_steps = (
                rt.world.sum(float(v)) for v in sums
            )

            # --- metrics, rollout log, eval, checkpoint
            done = step + 1
            completion_tokens = sum(len(c.tokens) for g in sampled for c in g.completions)
            adv_values = [s.advantage for s in seqs]
            last = {
                "step": done,
                "total_steps": total_steps,
                "epoch": round(cursor / len(prompts), 4),
                "loss": loss_sum / opt_steps if opt_steps else None,
                **rollout_metrics(sampled, rft.pass_threshold, [g.name for g in rft.graders]),
                "advantage_mean": sum(adv_values) / len(adv_values) if adv_values else None,
                "advantage_std": _std(adv_values),
                "kl": kl_sum / tokens if rft.kl_beta > 0 and tokens else None,
                "clip_fraction": clipped / tokens if tokens else None,
                "entropy": entropy_sum / tokens if tokens else None,
                "filtered_group_rate": sum(g.zero_variance for g in sampled) / len(sampled),
                "groups_sampled": len(sampled),
                "groups_trained": len(kept),
                "refill_rounds": rounds,
                "sampler_logprob_diff": rt.world.sum(drift) / max(rt.world.sum(scored), 1),
                "rollout_tokens_per_second": completion_tokens / rollout_seconds if rollout_seconds else None,
                "grader_latency_seconds": {k: sum(v) / len(v) for k, v in latencies.items() if v},
                "grader_errors": _errors_by_grader(errors),
                "lr": trainee.lr,
                "tokens": int(forwarded),
                "tokens_per_second": forwarded / update_seconds if update_seconds > 0 else None,
                "elapsed_seconds": time.perf_counter() - started,
            }
            is_eval_step = (hp.eval_every_steps and done % hp.eval_every_steps == 0) or done == total_steps
            is_ckpt_step = spec.checkpointing.every_steps and done % spec.checkpointing.every_steps == 0
            if is_eval_step or (is_ckpt_step and not hp.eval_every_steps):
                evals = evaluate(done)
                last.update(evals)
            log.write(last)
            trained = {g.position for g in kept}
            for line in rollout_lines(done, sampled, prompts, trained, advantages, rft.rollout_log_samples):
                rollout_log.write(line)
            observer.on_step(last)
            if is_ckpt_step and done < total_steps:
                checkpoints.save(done, total_steps, last, cursor={"prompts": cursor})
            if stop_after_step is not None and stop_after_step <= done < total_steps:
                return loop.stop_early(rt, done)

    # --- output
    final = trainee.save_final(output, tokenizer, spec)
    summary = {
        "method": "rft",
        "algorithm": rft.algorithm,
        "steps": total_steps,
        "resumed_from_step": start_step if resumed else None,
        "train_prompts": len(prompts),
        "eval_prompts": len(inputs.eval_rows),
        "prompts_sampled": cursor,
        "final_loss": last.get("loss"),
        "final_reward_mean": last.get("reward_mean"),
        "final_eval_reward_mean": evals.get("eval_reward_mean"),
        "final_eval_pass_rate": evals.get("eval_pass_rate"),
        "output": str(final),
        "lora": spec.lora is not None,
    }
    return loop.finish(output, rt, summary, observer)


STATS = 6  # what policy_loss reports: loss, clipped tokens, Σ kl, Σ entropy, completion tokens, Σ drift


def training_sequences(
    kept: list[Group], prompts: list[Prompt], rft: RFTSpec
) -> tuple[list[Sequence], dict[tuple[int, int], float]]:
    """The answers to train on, with their advantages: each group's rewards (plus DAPO's soft overlong
    punishment) normalised within the group; skipped samples (a grader said skip) and, with overlong
    filtering, answers cut at maxCompletionTokens are left out. Also every advantage by (position, sample)."""
    seqs: list[Sequence] = []
    advantages: dict[tuple[int, int], float] = {}
    for g in kept:
        valid = [k for k, t in enumerate(g.totals) if t is not None]
        shaped = torch.tensor([g.totals[k] for k in valid], dtype=torch.float64)
        if rft.overlong_buffer:
            lengths = torch.tensor([len(g.completions[k].tokens) for k in valid])
            shaped = shaped + soft_overlong_penalty(lengths, rft.max_completion_tokens, rft.overlong_buffer)
        for k, a in zip(valid, group_advantages(shaped, rft.advantage_scale).tolist(), strict=True):
            advantages[(g.position, k)] = a
            c = g.completions[k]
            if rft.filters_overlong and c.finish_reason == "length":
                continue
            p = prompts[g.prompt].tokens
            seqs.append(
                Sequence(
                    TokenizedExample(p + c.tokens, [0.0] * len(p) + [1.0] * len(c.tokens)),
                    a,
                    c.logprobs,
                    len(p),
                )
            )
    return seqs, advantages


def policy_loss(
    t: loop.TargetLogprobs, part: list[Sequence], rft: RFTSpec, aggregation: str, normaliser: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The algorithm's loss of a micro-batch (its share of the mini-batch's, see losses.aggregate) and its
    statistics: loss, tokens where the clip binds, Σ k3 KL, Σ entropy, completion tokens, Σ |sampler − these|
    log-probs. Without old log-probs (one update per batch) the old policy is this forward's, detached."""
    clip_low, clip_high = rft.clip_range
    lp, mask = t.padded()
    old = lp.detach() if part[0].old_logprobs is None else _padded([s.old_logprobs for s in part], lp)
    adv = torch.tensor([s.advantage for s in part], device=lp.device, dtype=lp.dtype)[:, None].expand_as(lp)
    if rft.algorithm == "gspo-token":
        terms = gspo_token_terms(lp, old, adv, mask, 1 - clip_low, 1 + clip_high)
        seq_log_ratio = ((lp - old) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp_min(1)
        ratio = torch.exp(seq_log_ratio).expand_as(lp)
    else:
        terms = ppo_terms(lp, old, adv, 1 - clip_low, 1 + clip_high)
        ratio = torch.exp(lp - old)
    kl = torch.zeros_like(lp)
    if rft.kl_beta > 0:
        kl = kl_k3(lp, _padded([s.ref_logprobs for s in part], lp))
        terms = terms + rft.kl_beta * kl
    loss = aggregate(terms, mask, aggregation, normaliser)  # type: ignore[arg-type]
    with torch.no_grad():
        r = ratio.detach()
        clipped = (((r < 1 - clip_low) & (adv < 0)) | ((r > 1 + clip_high) & (adv > 0))) & mask
        entropy = t.entropy.sum() if t.entropy is not None else torch.zeros(())
        sampler = _padded([torch.tensor(s.sampler_logprobs) for s in part], lp)
        drift = ((lp.detach() - sampler).abs() * mask).sum()
        values = [loss.detach(), clipped.sum(), (kl.detach() * mask).sum(), entropy, mask.sum(), drift]
        stats = torch.stack(values).to(torch.float64).cpu()
    return loss, stats


def _split(t: loop.TargetLogprobs) -> list[torch.Tensor]:
    """Each row's target log-probs (fp32, no gradient)."""
    counts = t.per_row_count().long().tolist()
    return list(t.logprobs.detach().float().split(counts))


def _errors_by_grader(errors: dict[tuple[str, str], int]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for (grader, reason), n in errors.items():
        out.setdefault(grader, {})[reason] = n
    return out


def _padded(rows: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """Per-sequence values as [B, L] like the policy's padded log-probs (left-aligned, zeros after)."""
    out = torch.zeros_like(like)
    for b, v in enumerate(rows):
        assert v is not None
        out[b, : len(v)] = v.to(like.device, like.dtype)
    return out


def _std(xs: list[float]) -> float | None:
    if len(xs) < 2:
        return 0.0 if xs else None
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs))
