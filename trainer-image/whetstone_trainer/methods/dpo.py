"""Direct preference optimisation, top to bottom: data, model, reference, loop, checkpoints, output.

A step sees `batchSize` pairs, split over the ranks and then into `gradientAccumulationSteps` micro-batches.
A micro-batch forwards the chosen and the rejected sequences of its pairs together ([2b, T], only answer
positions through the output head) and sums each answer's token log-probs (per-token means for ipo, as TRL
does). The loss is the mean over the step's pairs of losses.dpo_losses (spec.dpo: beta, lossType,
labelSmoothing), plus rpoAlpha × the chosen answer's mean token NLL when set (RPO).

The reference is the frozen base model:
- LoRA: the same model with its adapters disabled, per micro-batch and without gradient: no second copy.
- full-parameter: the reference log-probs of every training and eval pair are computed once, before the first
  step, while the weights are still the base's, and kept (two floats a pair). No second copy of the model in
  memory, and one reference forward per pair instead of one per pair and epoch; on resume they are computed
  again from the base weights before the checkpoint is loaded, so a resumed run sees the same numbers.

Metrics per step: loss, dpo_reward_chosen / _rejected / _margin (implicit rewards β·(log π − log π_ref)),
preference_accuracy (share of pairs with a positive margin, ties count half); on held-out pairs at eval steps:
eval_loss, eval_preference_accuracy and eval_choice_accuracy (the policy alone puts more log-probability on
the chosen answer: meaningful before training too, when every margin is 0).

The same loop trains under DDP and, full-parameter, under DeepSpeed ZeRO (spec.distributed.strategy):
`loop.Trainee` holds what differs. Every rank runs the same number of forwards (ZeRO-3 gathers weights in
each); a rank without pairs left runs one on any pair and drops it (weight 0).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .. import loop
from ..data.packing import Row, collate, epoch_order
from ..data.tokenize import PreferencePair, tokenize_preference
from .losses import dpo_losses

if TYPE_CHECKING:
    from ..entry import Inputs, Rows


def tokenized_pairs(tokenizer: Any, rows: Rows) -> list[PreferencePair]:
    return [tokenize_preference(tokenizer, row, line) for line, row in rows]


def answer_logps(
    model: torch.nn.Module, pairs: list[PreferencePair], pad_id: int, device: torch.device, mean: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed (or per-token mean) log-probs of the chosen and of the rejected answers, [b] each, from one
    forward over the 2b sequences; and the chosen answers' mean token NLL (for RPO)."""
    rows = [Row((p.chosen,)) for p in pairs] + [Row((p.rejected,)) for p in pairs]
    t = loop.target_logprobs(model, collate(rows, pad_id), device)
    sums, counts = t.per_row_sum(), t.per_row_count()
    values = sums / counts if mean else sums
    b = len(pairs)
    return values[:b], values[b:], -(sums[:b] / counts[:b])


# |margin| below TIE is a tie: float noise between two forwards of the same weights decides nothing.
TIE = 1e-6


def _ties_half(x: torch.Tensor) -> torch.Tensor:
    """1 where x > 0, ½ for a tie, 0 below: an untrained policy scores chance, not 0."""
    return (x > TIE).float() + 0.5 * (x.abs() <= TIE).float()


@contextlib.contextmanager
def _reference_mode(model: torch.nn.Module) -> Any:
    """The LoRA model as its frozen base: adapters off, no gradient."""
    with model.disable_adapter(), torch.no_grad():  # type: ignore[operator]
        yield


def choice_accuracy(model: torch.nn.Module, tokenizer: Any, rows: Rows, micro: int = 16) -> float:
    """Share of pairs where the model alone gives the chosen answer more log-probability (ties count half)."""
    pairs = tokenized_pairs(tokenizer, rows)
    device = next(model.parameters()).device
    model.eval()
    hits = 0.0
    with torch.no_grad():
        for i in range(0, len(pairs), micro):
            chosen, rejected, _ = answer_logps(model, pairs[i : i + micro], tokenizer.pad_token_id, device)
            hits += float(_ties_half(chosen - rejected).sum())
    return hits / len(pairs) if pairs else float("nan")


def train(
    inputs: Inputs, output: Path, observer: loop.Observer, stop_after_step: int | None = None
) -> dict[str, Any]:
    spec = inputs.spec
    hp = spec.hyperparameters
    settings = spec.dpo
    assert settings is not None
    ipo = settings.loss_type == "ipo"
    rt = loop.start(spec)

    # --- data and model
    tokenizer = loop.load_tokenizer(inputs.model_folder)
    pad_id = tokenizer.pad_token_id
    train_pairs = tokenized_pairs(tokenizer, inputs.train_rows)
    eval_pairs = tokenized_pairs(tokenizer, inputs.eval_rows)
    digest = hashlib.sha256()
    for p in train_pairs:
        digest.update(json.dumps([p.chosen.input_ids, p.chosen.weights, p.rejected.input_ids]).encode())
    steps_per_epoch, total_steps = loop.plan_steps(len(train_pairs), hp.batch_size, hp)
    micro = max(1, math.ceil(hp.micro_batch_size / rt.world.size))
    trainee = loop.prepare_trainee(spec, rt, inputs.model_folder, total_steps, micro)
    policy = trainee.module  # forwards without gradient: reference log-probs, eval

    # --- reference log-probs of full-parameter jobs: now, while the weights are the base's
    precomputed: dict[str, list[tuple[float, float]]] = {}
    t_ref = time.perf_counter()
    if spec.lora is None:
        policy.eval()
        for name, pairs in (("train", train_pairs), ("eval", eval_pairs)):
            values: dict[int, tuple[float, float]] = {}
            with torch.no_grad():
                for idx in trainee.micro_batches(list(range(len(pairs))), micro) if pairs else []:
                    with rt.autocast():
                        # A rank with no pairs left forwards one all the same (ZeRO-3), and drops it.
                        c, r, _ = answer_logps(policy, [pairs[j] for j in idx or [0]], pad_id, rt.device, ipo)
                    if idx:
                        values.update(zip(idx, zip(c.tolist(), r.tolist(), strict=True), strict=True))
            merged = {k: v for part in rt.world.gather(values) for k, v in part.items()}
            precomputed[name] = [merged[j] for j in range(len(pairs))]
        policy.train()
    reference_seconds = time.perf_counter() - t_ref

    def reference(
        which: str, index: list[int], pairs: list[PreferencePair]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if spec.lora is None:
            ref = torch.tensor([precomputed[which][j] for j in index], device=rt.device)
            return ref[:, 0], ref[:, 1]
        with _reference_mode(policy), rt.autocast():
            c, r, _ = answer_logps(policy, pairs, pad_id, rt.device, ipo)
        return c, r

    def evaluate() -> dict[str, float]:
        """DPO loss, preference accuracy, the policy's own choice and the margin on held-out pairs."""
        if not eval_pairs:
            return {}
        policy.eval()
        sums = torch.zeros(4, dtype=torch.float64)
        with torch.no_grad():
            for idx in trainee.micro_batches(list(range(len(eval_pairs))), micro):
                pairs = [eval_pairs[j] for j in idx or [0]]
                with rt.autocast():
                    c, r, _ = answer_logps(policy, pairs, pad_id, rt.device, ipo)
                if not idx:  # this rank has no pairs left: a forward all the same (ZeRO-3), dropped
                    continue
                rc, rr = reference("eval", idx, pairs)
                losses, reward_c, reward_r = dpo_losses(
                    c, r, rc, rr, settings.beta, settings.loss_type, settings.label_smoothing
                )
                sums += torch.tensor(
                    [
                        float(losses.sum()),
                        float(_ties_half(reward_c - reward_r).sum()),
                        float(_ties_half(c - r).sum()),
                        float((reward_c - reward_r).sum()),
                    ],
                    dtype=torch.float64,
                )
        policy.train()
        n = len(eval_pairs)
        loss, acc, choice, margin = (rt.world.sum(float(v)) / n for v in sums)
        return {
            "eval_loss": loss,
            "eval_preference_accuracy": acc,
            "eval_choice_accuracy": choice,
            "eval_dpo_reward_margin": margin,
        }

    output.mkdir(parents=True, exist_ok=True)

    # --- resume
    checkpoints = trainee.checkpoints(output, digest.hexdigest()[:16], spec.checkpointing.keep_last, observer)
    resumed = checkpoints.resume()
    start_step = resumed.step if resumed else 0
    observer.on_start(start_step, total_steps)
    log = loop.MetricsLog(output, rt.world, start_step)

    order: list[int] = []
    order_epoch = -1
    started = time.perf_counter()
    last: dict[str, Any] = {}
    evals: dict[str, float] = {}
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        epoch, batch_in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(train_pairs), hp.seed, epoch), epoch
        step_index = order[batch_in_epoch * hp.batch_size :][: hp.batch_size]
        n_pairs = len(step_index)
        parts = trainee.micro_batches(step_index, micro)
        # loss, reward chosen, reward rejected, accuracy, tokens: summed over this rank's pairs
        sums = torch.zeros(5, dtype=torch.float64)
        for i, idx in enumerate(parts):
            run = idx or step_index[:1]  # an empty micro-batch runs on any pair, with weight 0
            pairs = [train_pairs[j] for j in run]
            rc, rr = reference("train", run, pairs)
            with trainee.accumulating(last=i == len(parts) - 1), rt.autocast():
                c, r, chosen_nll = answer_logps(trainee.model, pairs, pad_id, rt.device, ipo)
                losses, reward_c, reward_r = dpo_losses(
                    c, r, rc, rr, settings.beta, settings.loss_type, settings.label_smoothing
                )
                if settings.rpo_alpha:
                    losses = losses + settings.rpo_alpha * chosen_nll
                if not idx:
                    losses = losses * 0.0
                # The step optimises the mean over its pairs; DDP and ZeRO average over ranks: undo that.
                trainee.backward(losses.sum() * rt.world.size / n_pairs)
            if not idx:
                continue
            sums += torch.tensor(
                [
                    float(losses.detach().sum()),
                    float(reward_c.sum()),
                    float(reward_r.sum()),
                    float(_ties_half(reward_c - reward_r).sum()),
                    sum(len(p.chosen) + len(p.rejected) for p in pairs),
                ],
                dtype=torch.float64,
            )
        grad_norm, lr = trainee.step()

        done = step + 1
        loss, chosen, rejected, accuracy, tokens = (rt.world.sum(float(v)) for v in sums)
        dt = time.perf_counter() - t0
        last = {
            "step": done,
            "total_steps": total_steps,
            "epoch": round(done / steps_per_epoch, 4),
            "loss": loss / n_pairs,
            "dpo_reward_chosen": chosen / n_pairs,
            "dpo_reward_rejected": rejected / n_pairs,
            "dpo_reward_margin": (chosen - rejected) / n_pairs,
            "preference_accuracy": accuracy / n_pairs,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": int(tokens),
            "tokens_per_second": tokens / dt if dt > 0 else None,
            "elapsed_seconds": time.perf_counter() - started,
        }
        is_eval_step = (hp.eval_every_steps and done % hp.eval_every_steps == 0) or done == total_steps
        is_ckpt_step = spec.checkpointing.every_steps and done % spec.checkpointing.every_steps == 0
        if is_eval_step or (is_ckpt_step and not hp.eval_every_steps):
            evals = evaluate()
            last.update(evals)
        log.write(last)
        observer.on_step(last)
        if is_ckpt_step and done < total_steps:
            checkpoints.save(done, total_steps, last)
        if stop_after_step is not None and stop_after_step <= done < total_steps:
            return loop.stop_early(rt, done)

    # --- output
    final = trainee.save_final(output, tokenizer, spec)
    summary = {
        "method": "dpo",
        "steps": total_steps,
        "resumed_from_step": start_step if resumed else None,
        "train_pairs": len(train_pairs),
        "eval_pairs": len(eval_pairs),
        "reference": "precomputed" if spec.lora is None else "adapters disabled",
        "reference_seconds": reference_seconds,
        "final_loss": last.get("loss"),
        "final_preference_accuracy": last.get("preference_accuracy"),
        "final_eval_loss": evals.get("eval_loss"),
        "final_eval_preference_accuracy": evals.get("eval_preference_accuracy"),
        "final_eval_choice_accuracy": evals.get("eval_choice_accuracy"),
        "output": str(final),
        "lora": spec.lora is not None,
    }
    return loop.finish(output, rt, summary, observer)
