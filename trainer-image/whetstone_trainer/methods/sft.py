"""Supervised fine-tuning, top to bottom: data, model, loop, checkpoints, output.

One optimizer step sees `batchSize` rows (packed sequences, or single examples without packing), split over
the ranks and then into `gradientAccumulationSteps` micro-batches. The loss is the weighted token NLL summed
over the whole step and divided by the step's total weight, so accumulation and world size do not change
what is optimised.

The same loop trains under DDP and under DeepSpeed ZeRO (spec.distributed.strategy): `loop.Trainee` holds
what differs (the backward, the step, checkpoints, the export). Every rank runs the same number of
micro-batches; a rank without rows left runs an empty one on any row with weight 0.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import loop
from ..data.formats import DatasetError, TokenizedExample, tokenize_chat
from ..data.packing import collate, epoch_order, one_per_row, pack

if TYPE_CHECKING:
    from ..entry import Inputs, Rows


def tokenized(
    tokenizer: Any, rows: Rows, train_on_all_turns: bool, max_len: int, what: str
) -> list[TokenizedExample]:
    out, too_long = [], []
    for line, row in rows:
        ex = tokenize_chat(tokenizer, row, train_on_all_turns=train_on_all_turns, line=line)
        if len(ex) > max_len:  # pre-flight refuses these; a guard for callers that skip it
            too_long.append(f"line {line}: {len(ex)} tokens, more than maxSeqLen {max_len}")
        out.append(ex)
    if too_long:
        raise DatasetError(f"{what}: {len(too_long)} example(s) too long:\n  " + "\n  ".join(too_long[:50]))
    return out


def train(
    inputs: Inputs, output: Path, observer: loop.Observer, stop_after_step: int | None = None
) -> dict[str, Any]:
    spec = inputs.spec
    hp = spec.hyperparameters
    settings = spec.sft_settings
    rt = loop.start(spec)

    # --- data and model
    tokenizer = loop.load_tokenizer(inputs.model_folder)
    train_ex = tokenized(
        tokenizer, inputs.train_rows, settings.train_on_all_turns, hp.max_seq_len, inputs.train_source
    )
    eval_ex = tokenized(tokenizer, inputs.eval_rows, settings.train_on_all_turns, hp.max_seq_len, "eval set")
    make_rows = (lambda xs: pack(xs, hp.max_seq_len)) if settings.packing else one_per_row
    train_rows, eval_rows = make_rows(train_ex), make_rows(eval_ex)
    digest = hashlib.sha256()
    for ex in train_ex:
        digest.update(json.dumps([ex.input_ids, ex.weights]).encode())
    steps_per_epoch, total_steps = loop.plan_steps(len(train_rows), hp.batch_size, hp)
    micro = max(1, math.ceil(hp.micro_batch_size / rt.world.size))
    trainee = loop.prepare_trainee(spec, rt, inputs.model_folder, total_steps, micro)
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
    eval_loss: float | None = None
    last: dict[str, Any] = {}
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        epoch, batch_in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(train_rows), hp.seed, epoch), epoch
        step_rows = [train_rows[i] for i in order[batch_in_epoch * hp.batch_size :][: hp.batch_size]]
        # Every rank knows the whole step, so the normaliser needs no communication.
        step_weight = sum(sum(ex.weights[1:]) for r in step_rows for ex in r.examples)
        parts = trainee.micro_batches(step_rows, micro)
        loss_sum = 0.0
        tokens = 0
        for i, rows in enumerate(parts):
            batch = collate(rows or step_rows[:1], tokenizer.pad_token_id)
            with trainee.accumulating(last=i == len(parts) - 1), rt.autocast():
                s, _w = loop.token_nll_sum(trainee.model, batch, rt.device)
                s = s if rows else s * 0.0  # an empty micro-batch: collectives only, no gradient
                # DDP and ZeRO average gradients over ranks; undo it so the step optimises sum / step_weight.
                trainee.backward(s * rt.world.size / max(step_weight, 1e-9))
            loss_sum += float(s.detach())
            tokens += sum(len(r) for r in rows)
        grad_norm, lr = trainee.step()

        done = step + 1
        tokens = int(rt.world.sum(tokens))
        dt = time.perf_counter() - t0
        last = {
            "step": done,
            "total_steps": total_steps,
            "epoch": round(done / steps_per_epoch, 4),
            "loss": rt.world.sum(loss_sum) / max(step_weight, 1e-9),
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_second": tokens / dt if dt > 0 else None,
            "elapsed_seconds": time.perf_counter() - started,
        }
        is_eval_step = (hp.eval_every_steps and done % hp.eval_every_steps == 0) or done == total_steps
        is_ckpt_step = spec.checkpointing.every_steps and done % spec.checkpointing.every_steps == 0
        if is_eval_step or (is_ckpt_step and not hp.eval_every_steps):
            eval_loss = loop.evaluate_loss(trainee.model, eval_rows, micro, tokenizer.pad_token_id, rt)
            last["eval_loss"] = eval_loss
        log.write(last)
        observer.on_step(last)
        if is_ckpt_step and done < total_steps:
            checkpoints.save(
                done, total_steps, {k: last[k] for k in ("loss", "eval_loss") if last.get(k) is not None}
            )
        if stop_after_step is not None and stop_after_step <= done < total_steps:
            return loop.stop_early(rt, done)

    # --- output
    final = trainee.save_final(output, tokenizer, spec)
    summary = {
        "method": "sft",
        "steps": total_steps,
        "resumed_from_step": start_step if resumed else None,
        "train_examples": len(train_ex),
        "eval_examples": len(eval_ex),
        "train_rows": len(train_rows),
        "final_loss": last.get("loss"),
        "final_eval_loss": eval_loss,
        "output": str(final),
        "lora": spec.lora is not None,
    }
    return loop.finish(output, rt, summary, observer)
