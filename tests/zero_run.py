"""A minimal SFT loop for tests/test_zero.py, run under torchrun: the tiny model on packed synthetic chats,
either under DeepSpeed ZeRO (whetstone_trainer.zero, any number of processes) or as one plain PyTorch
process (the reference). Writes one JSON line per step to <out>/losses.jsonl.

    python -m torch.distributed.run --standalone --nproc-per-node=2 tests/zero_run.py JOB.yaml OUT \
        [--plain] [--stop-after K] [--export]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from whetstone_api.finetunejob import FineTuneJob
from whetstone_trainer import distributed
from whetstone_trainer.checkpoints import TrainerState, latest_checkpoint
from whetstone_trainer.data.formats import read_jsonl, tokenize_chat
from whetstone_trainer.data.packing import Batch, collate, epoch_order, pack
from whetstone_trainer.models.sources import load_model_and_tokenizer
from whetstone_trainer.optim import build_optimizer, build_scheduler
from whetstone_trainer.zero import ZeroModel, even_micro_batches

PROBE = "reverse 1234567 please"


def nll_sum(model: object, batch: Batch) -> torch.Tensor:
    """Sum over tokens of weight x NLL of each token given the ones before it."""
    logits = model(input_ids=batch.input_ids, position_ids=batch.position_ids, use_cache=False).logits
    nll = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch.input_ids[:, 1:].flatten(), reduction="none"
    )
    return (nll * batch.weights[:, 1:].flatten()).sum()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("job", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--plain", action="store_true", help="one process, no DeepSpeed: the reference")
    parser.add_argument("--stop-after", type=int, default=None)
    parser.add_argument("--export", action="store_true")
    args = parser.parse_args()

    spec = FineTuneJob.model_validate(yaml.safe_load(args.job.read_text())).spec
    hp = spec.hyperparameters
    world = distributed.join()
    random.seed(hp.seed)
    torch.manual_seed(hp.seed)
    base = args.job.parent
    total = hp.max_steps
    micro = max(1, hp.micro_batch_size // world.size)

    def load() -> tuple[torch.nn.Module, object]:
        return load_model_and_tokenizer(spec.base_model.uri, base)

    if args.plain:
        assert world.size == 1
        model, tokenizer = load()
        model.train()
        optimizer = build_optimizer(model, hp)
        scheduler = build_scheduler(optimizer, total, hp)
        zm = None
    else:
        zm, tokenizer = ZeroModel.build(spec, world, total, micro, hp.gradient_accumulation_steps, load)
        model = zm

    report = read_jsonl(base / spec.dataset.uri, "chat")
    rows = pack([tokenize_chat(tokenizer, r, line=i) for i, r in report.rows], hp.max_seq_len)
    pad = tokenizer.pad_token_id
    steps_per_epoch = -(-len(rows) // hp.batch_size)

    start = 0
    ckpt = latest_checkpoint(args.out)
    if ckpt is not None:
        assert zm is not None
        start = zm.load_checkpoint(ckpt).step
    log = args.out / "losses.jsonl"
    args.out.mkdir(parents=True, exist_ok=True)

    for step in range(start, total):
        epoch, index = divmod(step, steps_per_epoch)
        order = epoch_order(len(rows), hp.seed, epoch)
        step_rows = [rows[i] for i in order[index * hp.batch_size :][: hp.batch_size]]
        step_weight = sum(sum(ex.weights[1:]) for r in step_rows for ex in r.examples)
        loss_sum = 0.0
        for part in even_micro_batches(step_rows, world, micro):
            # An empty part still runs forward and backward (collectives), on any row, with weight 0.
            batch = collate(part or step_rows[:1], pad)
            s = nll_sum(model, batch) * (1.0 if part else 0.0)
            scaled = s * world.size / step_weight
            if zm is not None:
                zm.backward(scaled)
            else:
                scaled.backward()
            loss_sum += float(s.detach())
        if zm is not None:
            lr = zm.lr
            grad_norm = zm.step()
        else:
            lr = scheduler.get_last_lr()[0]
            grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), hp.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        done = step + 1
        loss = world.sum(loss_sum) / step_weight
        if world.is_main:
            with log.open("a") as f:
                f.write(json.dumps({"step": done, "loss": loss, "lr": lr, "grad_norm": grad_norm}) + "\n")
        every = spec.checkpointing.every_steps
        if zm is not None and every and done % every == 0 and done < total:
            zm.save_checkpoint(args.out, TrainerState(done, epoch, index + 1, total, "test"), keep_last=2)
        if args.stop_after is not None and done >= args.stop_after:
            distributed.leave(world)
            return 0

    if args.export and zm is not None:
        zm.export(args.out / "final", tokenizer)
        # The trained engine's logits on a probe, to compare with the exported folder's.
        ids = tokenizer(PROBE, return_tensors="pt").input_ids
        zm.train(False)
        with torch.no_grad():
            logits = zm(input_ids=ids, use_cache=False).logits
        if world.is_main:
            torch.save(logits, args.out / "engine-logits.pt")
    distributed.leave(world)
    return 0


if __name__ == "__main__":
    sys.exit(main())
