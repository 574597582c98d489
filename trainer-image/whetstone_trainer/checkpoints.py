"""Resumable checkpoints: weights, optimizer, scheduler, RNG and the data cursor, written atomically.

Layout under the job's output folder:

    checkpoints/step-00000040/   weights (adapter/ or model/), optimizer.pt, scheduler.pt, rng-rank<r>.pt,
                                 trainer_state.json (written last: a folder without it is incomplete)
    final/                       the HF-loadable adapter or model, with the tokenizer
    metrics.jsonl                one JSON object per logged step

The trainer owns this folder: it writes and prunes checkpoints and reports both, so the operator can mirror
them as Checkpoint resources without touching storage.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from whetstone_api.wire import CHECKPOINTS_DIR, checkpoint_folder, step_of_folder

from .distributed import World

STATE_FILE = "trainer_state.json"


class CheckpointMismatch(RuntimeError):
    """The latest checkpoint cannot be resumed by this run (another strategy or world size wrote it): a
    restart cannot fix it, the message says what to change."""


@dataclass
class TrainerState:
    step: int
    epoch: int
    batch_in_epoch: int
    total_steps: int
    dataset_fingerprint: str
    metrics: dict[str, float] = field(default_factory=dict)
    cursor: dict[str, Any] = field(default_factory=dict)
    """Where the method is in its data when that is not a function of the step alone (RFT's prompt stream)."""


def checkpoint_dir(output: Path, step: int) -> Path:
    return output / CHECKPOINTS_DIR / checkpoint_folder(step)


def list_checkpoints(output: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    root = output / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        step = step_of_folder(d.name)
        if step is not None and d.is_dir() and (d / STATE_FILE).is_file():
            found.append((step, d))
    return sorted(found)


def latest_checkpoint(output: Path) -> Path | None:
    found = list_checkpoints(output)
    return found[-1][1] if found else None


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(
    output: Path,
    world: World,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: TrainerState,
    keep_last: int,
) -> tuple[Path, list[Path]]:
    """Write a checkpoint and prune old ones. Every rank calls this; only rank 0 writes shared files.

    Returns the checkpoint folder and the folders pruned."""
    final = checkpoint_dir(output, state.step)
    tmp = final.with_name(final.name + ".partial")
    if world.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    world.barrier()
    torch.save(_rng_state(), tmp / f"rng-rank{world.rank}.pt")
    world.barrier()
    pruned: list[Path] = []
    if world.is_main:
        weights = tmp / ("adapter" if _is_peft(model) else "model")
        model.save_pretrained(weights)
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)  # atomic: a crash leaves either the old set or the complete new checkpoint
        for _step, old in list_checkpoints(output)[:-keep_last]:
            shutil.rmtree(old)
            pruned.append(old)
    world.barrier()
    return final, pruned


def load_checkpoint(
    path: Path, world: World, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any
) -> TrainerState:
    """Restore everything save_checkpoint wrote, in place."""
    from safetensors.torch import load_file

    if _is_peft(model):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path / "adapter" / "adapter_model.safetensors")))
    else:
        weights = sorted((path / "model").glob("*.safetensors"))
        merged: dict[str, torch.Tensor] = {}
        for w in weights:
            merged.update(load_file(str(w)))
        missing, unexpected = model.load_state_dict(merged, strict=False)
        # Tied output heads are saved once; anything else missing means a different model.
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise RuntimeError(
                f"checkpoint {path} does not match the model: missing {missing}, unexpected {unexpected}"
            )
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=False))
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=False))
    rng = path / f"rng-rank{world.rank}.pt"
    if rng.is_file():  # absent when resuming with a different world size: data order is still exact
        _set_rng_state(torch.load(rng, weights_only=False))
    return TrainerState(**json.loads((path / STATE_FILE).read_text()))


def _is_peft(model: torch.nn.Module) -> bool:
    return hasattr(model, "peft_config")
