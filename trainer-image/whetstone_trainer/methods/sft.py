"""Supervised fine-tuning, top to bottom: data, model, loop, checkpoints, output.

One optimizer step sees `batchSize` rows (packed sequences, or single examples without packing), split over
the ranks and then into `gradientAccumulationSteps` micro-batches. The loss is the weighted token NLL summed
over the whole step and divided by the step's total weight, so accumulation and world size do not change
what is optimised.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from whetstone_api.finetunejob import FineTuneJobSpec

from .. import distributed
from ..checkpoints import TrainerState, latest_checkpoint, load_checkpoint, save_checkpoint
from ..data.formats import DatasetError, TokenizedExample, read_jsonl, tokenize_chat
from ..data.packing import Batch, Row, collate, epoch_order, one_per_row, pack
from ..models.sources import load_model_and_tokenizer
from ..optim import build_optimizer, build_scheduler
from ..storage import resolve_uri


class Observer(Protocol):
    """Who hears about the run: a progress bar locally, the /status endpoint in a pod."""

    def on_start(self, start_step: int, total_steps: int) -> None: ...
    def on_step(self, metrics: dict[str, Any]) -> None: ...
    def on_checkpoint(self, step: int, path: Path, pruned: list[Path]) -> None: ...
    def on_finish(self, summary: dict[str, Any]) -> None: ...


class SilentObserver:
    def on_start(self, start_step: int, total_steps: int) -> None:
        pass

    def on_step(self, metrics: dict[str, Any]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path, pruned: list[Path]) -> None:
        pass

    def on_finish(self, summary: dict[str, Any]) -> None:
        pass


@dataclass
class SFTData:
    train_rows: list[Row]
    eval_rows: list[Row]
    fingerprint: str
    examples: int
    eval_examples: int


def split_rows(
    spec: FineTuneJobSpec, base_dir: Path | None
) -> tuple[list[tuple[int, dict[str, Any]]], list[tuple[int, dict[str, Any]]]]:
    """The (line, row) pairs to train on and to evaluate on: evalDataset, or a seeded carve-out of the
    training set. Reads and checks the files; tokenises nothing."""
    hp = spec.hyperparameters
    train_path = resolve_uri(spec.dataset.uri, base_dir, "spec.dataset.uri")
    report = read_jsonl(train_path, "chat", spec.dataset.max_examples)
    if not report.ok:
        raise DatasetError(report.describe())
    rows = report.rows
    if spec.eval_dataset is not None:
        eval_path = resolve_uri(spec.eval_dataset.uri, base_dir, "spec.evalDataset.uri")
        eval_report = read_jsonl(eval_path, "chat", spec.eval_dataset.max_examples)
        if not eval_report.ok:
            raise DatasetError(eval_report.describe())
        return rows, eval_report.rows
    shuffled = rows[:]
    random.Random(hp.seed).shuffle(shuffled)
    n_eval = int(len(rows) * hp.eval_fraction)
    return sorted(shuffled[n_eval:]), shuffled[:n_eval]


def load_sft_data(spec: FineTuneJobSpec, tokenizer: Any, base_dir: Path | None) -> SFTData:
    hp = spec.hyperparameters
    settings = spec.sft_settings

    def tokenized(rows: list[tuple[int, dict[str, Any]]], what: str) -> list[TokenizedExample]:
        out, too_long = [], []
        for line, row in rows:
            ex = tokenize_chat(tokenizer, row, train_on_all_turns=settings.train_on_all_turns, line=line)
            if len(ex) > hp.max_seq_len:
                too_long.append(f"line {line}: {len(ex)} tokens, more than maxSeqLen {hp.max_seq_len}")
            out.append(ex)
        if too_long:
            raise DatasetError(
                f"{what}: {len(too_long)} example(s) too long:\n  " + "\n  ".join(too_long[:50])
            )
        return out

    train_source, eval_source = split_rows(spec, base_dir)
    train = tokenized(train_source, spec.dataset.uri)
    evals = tokenized(eval_source, "eval set")
    make_rows = (lambda xs: pack(xs, hp.max_seq_len)) if settings.packing else one_per_row
    digest = hashlib.sha256()
    for ex in train:
        digest.update(json.dumps([ex.input_ids, ex.weights]).encode())
    return SFTData(make_rows(train), make_rows(evals), digest.hexdigest()[:16], len(train), len(evals))


def _apply_tuning(model: torch.nn.Module, spec: FineTuneJobSpec) -> torch.nn.Module:
    if spec.lora is not None:
        from peft import LoraConfig, get_peft_model

        targets: str | list[str] = spec.lora.target_modules
        if targets == ["all-linear"]:
            targets = "all-linear"
        config = LoraConfig(
            r=spec.lora.rank,
            lora_alpha=spec.lora.alpha,
            lora_dropout=spec.lora.dropout,
            target_modules=targets,
            task_type="CAUSAL_LM",
        )
        return get_peft_model(model, config)
    assert spec.full_parameter is not None
    if spec.full_parameter.freeze_embeddings:
        model.get_input_embeddings().requires_grad_(False)
    return model


def _autocast(device: torch.device, dtype: torch.dtype | None) -> torch.autocast:
    """Mixed precision in `dtype`, or a no-op for plain fp32."""
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _precision(spec: FineTuneJobSpec, device: torch.device) -> torch.dtype | None:
    """The autocast dtype, or None for plain fp32."""
    wanted = spec.hyperparameters.precision
    if wanted == "bf16" or (wanted == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def token_nll_sum(model: torch.nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, float]:
    """Sum over tokens of weight × NLL of predicting each token, and the sum of weights.

    Only positions whose next token is trained go through the output head (`logits_to_keep` as a mask): with
    prompts masked that is most of the sequence, and the vocabulary projection is the widest matmul there is.
    """
    ids = batch.input_ids.to(device)
    weights = batch.weights.to(device)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, :-1] = weights[:, 1:] != 0  # position t predicts token t + 1
    logits = model(
        input_ids=ids, position_ids=batch.position_ids.to(device), use_cache=False, logits_to_keep=keep
    ).logits
    if logits.dim() == 3:  # a model that ignores mask-shaped logits_to_keep
        logits = logits[keep]
    targets = ids[:, 1:][keep[:, :-1]]
    w = weights[:, 1:][keep[:, :-1]]
    nll = F.cross_entropy(logits.float(), targets, reduction="none")
    return (nll * w).sum(), float(w.sum())


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    rows: list[Row],
    micro_batch: int,
    pad_id: int,
    device: torch.device,
    world: distributed.World,
    autocast: torch.dtype | None,
) -> float | None:
    if not rows:
        return None
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0.0
    mine = rows[world.rank :: world.size]
    for i in range(0, len(mine), micro_batch):
        with _autocast(device, autocast):
            s, w = token_nll_sum(model, collate(mine[i : i + micro_batch], pad_id), device)
        total += float(s)
        weight += w
    model.train(was_training)
    total, weight = world.sum(total), world.sum(weight)
    return total / weight if weight else None


def train_sft(
    spec: FineTuneJobSpec,
    output: Path,
    base_dir: Path | None = None,
    observer: Observer | None = None,
    stop_after_step: int | None = None,
) -> dict[str, Any]:
    """Run (or resume) an SFT job and write its output folder. Returns the summary also written to
    summary.json. `stop_after_step` ends the process early as if it had been killed (for tests)."""
    observer = observer or SilentObserver()
    hp = spec.hyperparameters
    world = distributed.join()
    device = torch.device(
        world.device if world.distributed else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    random.seed(hp.seed)
    torch.manual_seed(hp.seed)

    # --- data and model
    model, tokenizer = load_model_and_tokenizer(spec.base_model.uri, base_dir)
    data = load_sft_data(spec, tokenizer, base_dir)
    model = _apply_tuning(model, spec).to(device)
    model.train()
    autocast = _precision(spec, device)
    trained_model = model
    if world.distributed:
        model = torch.nn.parallel.DistributedDataParallel(model)

    steps_per_epoch = math.ceil(len(data.train_rows) / hp.batch_size)
    total_steps = hp.max_steps or max(1, math.ceil((hp.epochs or 1.0) * steps_per_epoch))
    optimizer = build_optimizer(trained_model, hp)
    scheduler = build_scheduler(optimizer, total_steps, hp)
    output.mkdir(parents=True, exist_ok=True)

    # --- resume
    start_step = 0
    resume_from = latest_checkpoint(output)
    if resume_from is not None:
        state = load_checkpoint(resume_from, world, trained_model, optimizer, scheduler)
        if state.dataset_fingerprint != data.fingerprint:
            raise DatasetError(
                f"{resume_from}: the checkpoint was written for different training data "
                f"(fingerprint {state.dataset_fingerprint}, now {data.fingerprint}); use a new output folder"
            )
        start_step = state.step
    observer.on_start(start_step, total_steps)

    metrics_file = output / "metrics.jsonl"
    if world.is_main and start_step == 0:
        metrics_file.write_text("")
    if world.is_main and resume_from is not None:
        _truncate_metrics(metrics_file, start_step)

    def checkpoint(step: int, metrics: dict[str, float]) -> None:
        epoch, batch_in_epoch = divmod(step, steps_per_epoch)
        state = TrainerState(step, epoch, batch_in_epoch, total_steps, data.fingerprint, metrics)
        path, pruned = save_checkpoint(
            output, world, trained_model, optimizer, scheduler, state, spec.checkpointing.keep_last
        )
        observer.on_checkpoint(step, path, pruned)

    micro = max(1, math.ceil(hp.micro_batch_size / world.size))
    order: list[int] = []
    order_epoch = -1
    started = time.perf_counter()
    eval_loss: float | None = None
    last: dict[str, Any] = {}
    for step in range(start_step, total_steps):
        t0 = time.perf_counter()
        epoch, batch_in_epoch = divmod(step, steps_per_epoch)
        if epoch != order_epoch:
            order, order_epoch = epoch_order(len(data.train_rows), hp.seed, epoch), epoch
        step_rows = [data.train_rows[i] for i in order[batch_in_epoch * hp.batch_size :][: hp.batch_size]]
        # Every rank knows the whole step, so the normaliser needs no communication.
        step_weight = sum(sum(ex.weights[1:]) for r in step_rows for ex in r.examples)
        mine = step_rows[world.rank :: world.size]
        parts = [mine[i : i + micro] for i in range(0, len(mine), micro)]
        loss_sum = 0.0
        tokens = 0
        for i, rows in enumerate(parts):
            batch = collate(rows, tokenizer.pad_token_id)
            sync = not world.distributed or i == len(parts) - 1
            ctx = contextlib.nullcontext() if sync else model.no_sync()
            with (
                ctx,
                _autocast(device, autocast),
            ):
                s, _w = token_nll_sum(model, batch, device)
                # DDP averages gradients over ranks; undo it so the step optimises sum / step_weight.
                (s * world.size / max(step_weight, 1e-9)).backward()
            loss_sum += float(s.detach())
            tokens += sum(len(r) for r in rows)
        grad_norm = (
            float(torch.nn.utils.clip_grad_norm_(trained_model.parameters(), hp.max_grad_norm))
            if hp.max_grad_norm > 0
            else float("nan")
        )
        lr = scheduler.get_last_lr()[0]
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

        done = step + 1
        loss = world.sum(loss_sum) / max(step_weight, 1e-9)
        tokens = int(world.sum(tokens))
        dt = time.perf_counter() - t0
        last = {
            "step": done,
            "total_steps": total_steps,
            "epoch": round(done / steps_per_epoch, 4),
            "loss": loss,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": tokens,
            "tokens_per_second": tokens / dt if dt > 0 else None,
            "elapsed_seconds": time.perf_counter() - started,
        }
        is_eval_step = (hp.eval_every_steps and done % hp.eval_every_steps == 0) or done == total_steps
        is_ckpt_step = spec.checkpointing.every_steps and done % spec.checkpointing.every_steps == 0
        if is_eval_step or (is_ckpt_step and not hp.eval_every_steps):
            eval_loss = evaluate_loss(
                model, data.eval_rows, micro, tokenizer.pad_token_id, device, world, autocast
            )
            last["eval_loss"] = eval_loss
        if world.is_main:
            with metrics_file.open("a") as f:
                f.write(json.dumps(last) + "\n")
        observer.on_step(last)
        if is_ckpt_step and done < total_steps:
            checkpoint(done, {k: last[k] for k in ("loss", "eval_loss") if last.get(k) is not None})
        if stop_after_step is not None and done >= stop_after_step and done < total_steps:
            distributed.leave(world)
            return {"stopped_at_step": done}

    # --- output
    final = output / "final"
    if world.is_main:
        trained_model.save_pretrained(final)
        tokenizer.save_pretrained(final)
        if spec.lora is not None:
            (final / "BASE_MODEL").write_text(spec.base_model.uri + "\n")
    summary = {
        "steps": total_steps,
        "resumed_from_step": start_step if resume_from is not None else None,
        "train_examples": data.examples,
        "eval_examples": data.eval_examples,
        "train_rows": len(data.train_rows),
        "final_loss": last.get("loss"),
        "final_eval_loss": eval_loss,
        "output": str(final),
        "lora": spec.lora is not None,
    }
    if world.is_main:
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    observer.on_finish(summary)
    distributed.leave(world)
    return summary


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop lines logged after the checkpoint we resume from, so metrics.jsonl has each step once."""
    if not path.is_file():
        return
    kept = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in kept))
