"""DeepSpeed ZeRO for full-parameter training (spec.distributed.strategy zero2 / zero3), for the method loops.

A loop that trains with ZeRO does what its DDP version does, with this module's `ZeroModel` in place of the
DDP-wrapped model:

    zm = ZeroModel.build(spec, world, total_steps, micro_steps, base_dir)   # before anything else loads it
    for each step:
        for rows in even_micro_batches(step_rows, world, micro):            # the same count on every rank
            loss_sum, _ = <the method's summed loss of `rows`, computed with zm.engine(...)>
            zm.backward(loss_sum * world.size / step_weight)               # weight-0 batch if `rows` is empty
        grad_norm = zm.step()                                               # clip, update, schedule
    zm.save_checkpoint(output, state, keep_last) / zm.load_checkpoint(path) / zm.export(folder, tokenizer)

What DeepSpeed does and what stays ours:
- ZeRO stage 2 shards the optimizer state and the gradients over the processes; stage 3 shards the weights
  too. The loss scale is the loop's, exactly as under DDP: gradients are averaged over the processes, so the
  loop multiplies by the world size to optimise sum / step weight. Accumulation is unmanaged
  (`managed_gradient_accumulation: false`): the loop calls `backward` once per micro-batch and `step` once
  per optimizer step, so the step boundary is the loop's, not a DeepSpeed counter's.
- Stage 2 and 3 reduce gradients in every backward and stage 3 gathers weights in every forward: these are
  collective, so every rank runs the same number of forwards and backwards (`even_micro_batches` pads with
  empty micro-batches; the loop runs those on any row with weight 0).
- The optimizer is torch's AdamW (optim.build_optimizer, so weight decay and groups are the same as under
  DDP) passed to DeepSpeed as a client optimizer, and the scheduler is optim.build_scheduler; DeepSpeed steps
  both. DeepSpeed's fused CPU Adam (`cpu_adam`, a C++ extension compiled on first use, ~1 min) is used only
  when the optimizer state is offloaded from GPUs, where it is many times faster than torch's; without GPUs
  (CI, tests) torch's AdamW needs no compiler.
- ZeRO-3 must partition the model while transformers loads it: `HfDeepSpeedConfig` is created before
  `from_pretrained` and kept alive as long as the model (transformers holds only a weak reference to it).
- Checkpoints: `checkpoints/step-<8 digits>/` holds DeepSpeed's own shards (`deepspeed/`: each rank's slice of
  weights and optimizer state, the scheduler), every rank's RNG state and, written last, trainer_state.json
  (the data cursor), like the DDP checkpoints of checkpoints.py. They resume at the same number of processes
  only (DeepSpeed's shard layout depends on it); another world size is refused with a clear error.
- Export: the weights gathered on rank 0 (ZeRO-3: one layer at a time) and saved as an ordinary Hugging Face
  folder that `from_pretrained` loads without DeepSpeed.
- RFT (methods/rft.py) also samples from the model being trained (`ZeroModel.generating`: the module itself
  under ZeRO-2, the whole model gathered once per sampling call under ZeRO-3) and takes its KL to a frozen
  copy of the base (`ZeroModel.frozen_reference`: a plain copy under ZeRO-2, a partitioned one under ZeRO-3).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import torch
from whetstone_api.finetunejob import FineTuneJobSpec

from .checkpoints import (
    STATE_FILE,
    CheckpointMismatch,
    TrainerState,
    _rng_state,
    _set_rng_state,
    checkpoint_dir,
    list_checkpoints,
)
from .distributed import World
from .models.activations import enable_gradient_checkpointing
from .optim import build_optimizer, build_scheduler

T = TypeVar("T")

DEEPSPEED_DIR = "deepspeed"
"""Sub-folder of a checkpoint with DeepSpeed's shards (its checkpoint tag)."""
LAYOUT_FILE = "layout.json"
"""World size and stage of the shards, checked before loading."""


def deepspeed_config(
    spec: FineTuneJobSpec, world_size: int, micro_batch: int, micro_steps: int, bf16: bool
) -> dict[str, Any]:
    """The DeepSpeed config of a ZeRO job. `micro_batch` rows per micro-batch and `micro_steps` micro-batches
    per optimizer step on each rank: DeepSpeed checks them against the global batch, but the loop decides."""
    dist = spec.distributed
    stage = dist.zero_stage
    if stage is None:
        raise ValueError("spec.distributed.strategy is ddp: DeepSpeed is only used for zero2 and zero3")
    zero: dict[str, Any] = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True}
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if dist.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": micro_steps,
        "train_batch_size": micro_batch * micro_steps * world_size,
        "managed_gradient_accumulation": False,
        # 0 disables clipping, as in the DDP loop.
        "gradient_clipping": spec.hyperparameters.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        # torch's AdamW as the client optimizer, also when its state is offloaded to the CPU without GPUs.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def even_micro_batches(rows: Sequence[T], world: World, micro: int) -> list[list[T]]:
    """This rank's share of a step's rows (rank r takes rows r, r + size, ...), cut into micro-batches of at
    most `micro`, padded with empty micro-batches to the count of the rank with the most rows. Every rank
    knows the whole step, so the count needs no communication."""
    mine = list(rows[world.rank :: world.size])
    largest = -(-len(rows) // world.size)
    count = max(1, -(-largest // micro))
    return [mine[i * micro : (i + 1) * micro] for i in range(count)]


class ZeroModel:
    """A model trained under DeepSpeed ZeRO: the engine, its optimizer and scheduler, checkpoints, export."""

    def __init__(
        self,
        engine: Any,
        world: World,
        stage: int,
        hf_config: Any = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.engine = engine
        self.world = world
        self.stage = stage
        self.config = config or {}  # the DeepSpeed config the engine was built with
        # ZeRO-3: transformers holds the HfDeepSpeedConfig weakly; it must live as long as the model.
        self._hf_config = hf_config

    @classmethod
    def build(
        cls,
        spec: FineTuneJobSpec,
        world: World,
        total_steps: int,
        micro_batch: int,
        micro_steps: int,
        load_model: Callable[[], tuple[torch.nn.Module, Any]],
        bf16: bool = False,
    ) -> tuple[ZeroModel, Any]:
        """Load the model (with `load_model`, e.g. models.sources.load_model_and_tokenizer) under ZeRO and
        wrap it with the optimizer and scheduler. Returns the ZeroModel and the tokenizer."""
        import deepspeed

        config = deepspeed_config(spec, world.size, micro_batch, micro_steps, bf16)
        # DeepSpeed's communication layer over the process group distributed.join() made; zero.Init (ZeRO-3
        # loading) reads the world size from it. One process without torchrun (`whetstone run`) gets a
        # group of one, on the env torchrun would have set (DeepSpeed would otherwise look for MPI).
        if not world.distributed:
            for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(name, value)
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
        hf_config = None
        if config["zero_optimization"]["stage"] == 3:
            from transformers.integrations import HfDeepSpeedConfig

            hf_config = HfDeepSpeedConfig(config)  # before from_pretrained: the model loads partitioned
        model, tokenizer = load_model()
        if spec.full_parameter is None:
            raise ValueError("ZeRO trains all weights: spec.fullParameter must be set")
        if spec.full_parameter.freeze_embeddings:
            model.get_input_embeddings().requires_grad_(False)
        if spec.gradient_checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        hp = spec.hyperparameters
        optimizer: torch.optim.Optimizer = build_optimizer(model, hp)
        if spec.distributed.offload_optimizer and torch.cuda.is_available():
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            # The same parameter groups (decay on matrices only), stepped by DeepSpeed's fused CPU Adam.
            groups = [
                {"params": g["params"], "weight_decay": g["weight_decay"]} for g in optimizer.param_groups
            ]
            optimizer = DeepSpeedCPUAdam(groups, lr=hp.learning_rate, adamw_mode=True)
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: build_scheduler(opt, total_steps, hp),
            config=config,
        )
        stage = config["zero_optimization"]["stage"]
        return cls(engine, world, stage, hf_config, config), tokenizer

    # --- the step

    def __call__(self, **inputs: Any) -> Any:
        """The forward pass (ZeRO-3 gathers each layer's weights on the way)."""
        return self.engine(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of `loss` (already scaled by the loop; no division by micro-steps)."""
        self.engine.backward(loss, scale_wrt_gas=False)

    def step(self) -> float:
        """Clip, update, advance the schedule; returns the gradient norm before clipping (nan if unknown)."""
        self.engine.step()
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        return float(self.engine.lr_scheduler.get_last_lr()[0])

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    # --- sampling and a frozen reference (RFT)

    @contextlib.contextmanager
    def generating(self) -> Iterator[torch.nn.Module]:
        """The model with all its weights as a plain module, for the KV-cache sampler. Every rank must enter
        it, with or without prompts of its own (ZeRO-3 gathers the weights collectively).

        ZeRO-2 keeps every weight on every rank: the module itself. ZeRO-3 partitions them, and its hooked
        forward all-gathers each layer in every forward: the sampler forwards once per generated token, so
        that would be one all-gather per layer and token, and a collective in every decode step, while each
        rank samples its own prompts and stops after its own number of steps (a rank that finishes first
        leaves the others waiting in an all-gather: a hang). Instead the whole model is gathered once per
        sampling call and ZeRO-3's hooks are lifted for its duration (DeepSpeed's
        `unwrap_model_for_generation`, what TRL does for generation under ZeRO-3): decoding then runs at
        the plain model's speed without communication. The price is the whole model in each rank's memory
        while it samples (released when the call ends); a model whose weights do not fit on one GPU at all
        would need a separate inference engine."""
        if self.stage != 3:
            yield self.engine.module
            return
        from deepspeed.runtime.zero import unwrap_model_for_generation

        with unwrap_model_for_generation(self.engine):
            yield self.engine.module

    def frozen_reference(self, load_model: Callable[[], tuple[torch.nn.Module, Any]]) -> Any:
        """The base model again, frozen, for a KL term: load it before the first step or after (it comes from
        the model folder, not from the trained weights). ZeRO-2: a plain copy on every rank, in the dtype of
        the trained module (as ZeRO-2 keeps the trained weights whole too). ZeRO-3: loaded partitioned (the
        HfDeepSpeedConfig is still alive) and wrapped in an engine of its own without optimizer, whose
        forward gathers each layer as the trained engine's does: the same number of forwards on every rank."""
        model, _tokenizer = load_model()
        model.requires_grad_(False)
        model.eval()
        if self.stage != 3:
            like = next(self.engine.module.parameters())
            return model.to(like.device, like.dtype)
        import deepspeed

        config = {k: v for k, v in self.config.items() if k != "gradient_clipping"}
        config["zero_optimization"] = {
            k: v for k, v in self.config["zero_optimization"].items() if k != "offload_optimizer"
        }
        engine, _, _, _ = deepspeed.initialize(model=model, config=config)
        engine.eval()
        return engine

    # --- checkpoints

    def save_checkpoint(self, output: Path, state: TrainerState, keep_last: int) -> tuple[Path, list[Path]]:
        """Every rank writes its shards and RNG state; rank 0 writes the cursor last, renames the folder into
        place and prunes. Returns the checkpoint folder and the folders pruned."""
        world = self.world
        final = checkpoint_dir(output, state.step)
        tmp = final.with_name(final.name + ".partial")
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        world.barrier()
        self.engine.save_checkpoint(str(tmp), tag=DEEPSPEED_DIR, save_latest=False)
        torch.save(_rng_state(), tmp / f"rng-rank{world.rank}.pt")
        world.barrier()
        pruned: list[Path] = []
        if world.is_main:
            layout = {"world_size": world.size, "stage": self.stage}
            (tmp / DEEPSPEED_DIR / LAYOUT_FILE).write_text(json.dumps(layout))
            (tmp / STATE_FILE).write_text(json.dumps(asdict(state), indent=2))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)  # atomic: a crash leaves the old set or the complete new checkpoint
            for _step, old in list_checkpoints(output)[:-keep_last]:
                shutil.rmtree(old)
                pruned.append(old)
        world.barrier()
        return final, pruned

    def load_checkpoint(self, path: Path) -> TrainerState:
        """Restore weights, optimizer, scheduler, this rank's RNG state; return the data cursor."""
        layout_file = path / DEEPSPEED_DIR / LAYOUT_FILE
        if not layout_file.is_file():
            raise CheckpointMismatch(
                f"{path} is not a DeepSpeed checkpoint (no {DEEPSPEED_DIR}/{LAYOUT_FILE}): it was written "
                "with another spec.distributed.strategy; use a new output folder"
            )
        layout = json.loads(layout_file.read_text())
        if layout["world_size"] != self.world.size or layout["stage"] != self.stage:
            raise CheckpointMismatch(
                f"{path} was written by {layout['world_size']} processes under ZeRO-{layout['stage']}; this "
                f"run has {self.world.size} under ZeRO-{self.stage}. A ZeRO checkpoint resumes only with the "
                "same nodes x gpusPerNode and strategy; use those, or a new output folder"
            )
        loaded, _ = self.engine.load_checkpoint(
            str(path), tag=DEEPSPEED_DIR, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if loaded is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {path / DEEPSPEED_DIR}")
        _set_rng_state(torch.load(path / f"rng-rank{self.world.rank}.pt", weights_only=False))
        return TrainerState(**json.loads((path / STATE_FILE).read_text()))

    # --- export

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """All weights, gathered on rank 0 (None on the other ranks). Every rank must call it."""
        if self.stage == 3:
            # The consolidation transformers' and accelerate's DeepSpeed integrations use: one layer at a
            # time, so rank 0 never holds more than the finished part plus one layer.
            return self.engine._zero3_consolidated_16bit_state_dict()
        return self.engine.module.state_dict() if self.world.is_main else None

    def export(self, folder: Path, tokenizer: Any) -> None:
        """An ordinary Hugging Face folder (safetensors, config, tokenizer) on rank 0. Every rank must call
        it (ZeRO-3 gathers the weights collectively)."""
        state_dict = self.full_state_dict()
        if self.world.is_main:
            assert state_dict is not None
            module = self.engine.module
            # The config of a model loaded under ZeRO-3 is the same as without; the tensors come from the
            # gathered state dict, never from the (partitioned) parameters.
            module.save_pretrained(folder, state_dict=state_dict)
            tokenizer.save_pretrained(folder)
        self.world.barrier()
