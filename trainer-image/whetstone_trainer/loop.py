"""What every training method shares, so that methods/sft.py, dpo.py and rft.py are each one loop read top to
bottom: the observer that hears about the run, the process group and precision, LoRA or full-parameter set-up,
the model being trained under DDP or DeepSpeed ZeRO (`Trainee`), log-probs of target tokens (the one forward
every loss starts from), the SFT eval loss, metrics.jsonl, checkpoint save/resume and the output folder.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from whetstone_api.finetunejob import FineTuneJobSpec, Hyperparameters

from . import distributed
from .checkpoints import (
    CheckpointMismatch,
    TrainerState,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .data.formats import DatasetError, TokenizedExample
from .data.packing import Batch, Row, collate, collate_shared_prompts, shared_prompt_layout
from .methods.losses import chunked_token_logprobs
from .models import shared_prompt_attention
from .models.activations import (
    enable_gradient_checkpointing,
    head_passes_hidden_states,
    hf_model,
    output_head,
)
from .models.host_memory import LayerTrim, keep_heap_top, return_large_frees_to_os, trim_between_layers
from .optim import build_optimizer, build_scheduler
from .zero import DEEPSPEED_DIR, ZeroModel, even_micro_batches


class Observer(Protocol):
    """Who hears about the run: a progress bar locally, the /status endpoint in a pod."""

    def on_start(self, start_step: int, total_steps: int) -> None: ...
    def on_step(self, metrics: dict[str, Any]) -> None: ...
    def on_grades(self, latencies: dict[str, list[float]], errors: dict[tuple[str, str], int]) -> None: ...
    def on_checkpoint(self, step: int, path: Path, pruned: list[Path]) -> None: ...
    def on_finish(self, summary: dict[str, Any]) -> None: ...


class SilentObserver:
    def on_start(self, start_step: int, total_steps: int) -> None:
        pass

    def on_step(self, metrics: dict[str, Any]) -> None:
        pass

    def on_grades(self, latencies: dict[str, list[float]], errors: dict[tuple[str, str], int]) -> None:
        pass

    def on_checkpoint(self, step: int, path: Path, pruned: list[Path]) -> None:
        pass

    def on_finish(self, summary: dict[str, Any]) -> None:
        pass


# --- process, device, precision -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Runtime:
    """Where this process trains: its rank in the group, its device and the autocast dtype (None: fp32)."""

    world: distributed.World
    device: torch.device
    dtype: torch.dtype | None

    def autocast(self) -> torch.autocast:
        """Mixed precision in `dtype`, or a no-op for plain fp32."""
        return torch.autocast(
            self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None
        )


def start(spec: FineTuneJobSpec) -> Runtime:
    """Join the process group (torchrun's env), pick the device, seed python and torch, choose precision; on
    the CPU, how the process returns freed memory (hyperparameters.hostMemory)."""
    world = distributed.join()
    device = torch.device(
        world.device if world.distributed else ("cuda" if torch.cuda.is_available() else "cpu")
    )
    host_memory = spec.hyperparameters.host_memory if device.type == "cpu" else None
    if host_memory == "release":
        # Activations live in host memory: have glibc return a freed tensor's pages rather than keep them
        # in a fragmenting heap (a checkpointed step's resident memory halves; models/host_memory.py). Not
        # the default: the page faults slow every step.
        return_large_frees_to_os()
    elif host_memory == "trim":
        # The default: a step's memory stays for the next step (no page faults) up to a bound; the budget
        # trim that keeps the holes bounded is set up with the model (prepare_trainee).
        keep_heap_top()
    random.seed(spec.hyperparameters.seed)
    torch.manual_seed(spec.hyperparameters.seed)
    wanted = spec.hyperparameters.precision
    dtype = torch.bfloat16 if wanted == "bf16" or (wanted == "auto" and device.type == "cuda") else None
    return Runtime(world, device, dtype)


# --- model -------------------------------------------------------------------------------------------------


def load_model(model_folder: Path) -> tuple[Any, Any]:
    """The base model (fp32) and its tokenizer from the folder the entry gate materialised."""
    from .models.sources import load_model_and_tokenizer

    return load_model_and_tokenizer(str(model_folder))


def load_tokenizer(model_folder: Path) -> Any:
    """The tokenizer alone: a loop tokenizes its data and plans its steps before the model loads (ZeRO-3
    loads the model already partitioned, under a config that needs the number of steps)."""
    from .models.sources import load_tokenizer

    return load_tokenizer(str(model_folder))


def apply_tuning(model: torch.nn.Module, spec: FineTuneJobSpec) -> torch.nn.Module:
    """LoRA adapters (the base stays frozen) or every weight trainable; the layers checkpointed when
    spec.gradient_checkpointing (here, so that every method's model set-up gets it)."""
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(model)
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


def wrap_for_training(model: torch.nn.Module, rt: Runtime) -> torch.nn.Module:
    """DistributedDataParallel across ranks; the model itself on one process."""
    if rt.world.distributed:
        return torch.nn.parallel.DistributedDataParallel(model)
    return model


@dataclass
class Trainee:
    """The model a method trains and how it takes a step, so that one loop serves both data-parallel
    strategies: PyTorch DDP (or one plain process) with the optimizer and schedule here, or DeepSpeed ZeRO
    (spec.distributed.strategy zero2 / zero3), where the engine shards and steps them (zero.py).

    `model` is what the forward runs on (the DDP wrapper, the ZeRO engine, or the model itself)."""

    model: Any
    rt: Runtime
    max_grad_norm: float
    trained: torch.nn.Module | None = None  # DDP: the unwrapped model, saved and clipped
    optimizer: torch.optim.Optimizer | None = None
    scheduler: Any = None
    zero: ZeroModel | None = None
    host_trim: LayerTrim | None = None  # hostMemory: trim on the CPU (models/host_memory.py)

    @property
    def module(self) -> Any:
        """What forwards without gradient run on (eval, reference log-probs): the model itself under DDP,
        the engine under ZeRO (ZeRO-3 gathers the sharded weights in its forward)."""
        return self.trained if self.zero is None else self.model

    def micro_batches(self, rows: list[Any], micro: int) -> list[list[Any]]:
        """This rank's share of a step's rows in micro-batches, the same count on every rank (the last ones
        may be empty: the loop runs those with weight 0, since every backward synchronises the ranks)."""
        return even_micro_batches(rows, self.rt.world, micro)

    def accumulating(self, last: bool) -> contextlib.AbstractContextManager[Any]:
        """Around a micro-batch's forward and backward: DDP skips the gradient all-reduce until the last
        one. ZeRO reduces in every backward (stage 2 and 3 partition the gradients as they come)."""
        if self.zero is None and self.rt.world.distributed and not last:
            return self.model.no_sync()
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of `loss`, already scaled by the loop."""
        if self.zero is not None:
            self.zero.backward(loss)
        else:
            loss.backward()

    def step(self) -> tuple[float, float]:
        """Clip, update, advance the schedule. Returns the gradient norm and the step's learning rate."""
        if self.zero is not None:
            lr = self.zero.lr
            return self.zero.step(), lr
        assert self.trained is not None and self.optimizer is not None
        return clip_and_step(self.trained, self.optimizer, self.scheduler, self.max_grad_norm)

    @property
    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        if self.zero is not None:
            return self.zero.lr
        return float(self.scheduler.get_last_lr()[0])

    def generating(self) -> contextlib.AbstractContextManager[Any]:
        """Around a call of the sampler (RFT rollouts, reward evals): the model with all its weights as a
        plain module. Every rank enters it, with prompts of its own or not (ZeRO-3 gathers the weights, see
        ZeroModel.generating)."""
        if self.zero is not None:
            return self.zero.generating()
        return contextlib.nullcontext(self.trained)

    def frozen_reference(self, model_folder: Path) -> Any:
        """A frozen copy of the base weights (a full-parameter KL term), made before the first step: under DDP
        a copy of the model, under ZeRO the base loaded again (ZeroModel.frozen_reference)."""
        if self.zero is not None:
            return self.zero.frozen_reference(lambda: load_model(model_folder))
        assert self.trained is not None
        return copy.deepcopy(self.trained).eval().requires_grad_(False)

    def checkpoints(self, output: Path, fingerprint: str, keep_last: int, observer: Observer) -> Checkpoints:
        return Checkpoints(
            output,
            self.rt,
            self.trained,
            self.optimizer,
            self.scheduler,
            fingerprint,
            keep_last,
            observer,
            zero=self.zero,
        )

    def save_final(self, output: Path, tokenizer: Any, spec: FineTuneJobSpec) -> Path:
        """The HF-loadable result (every rank calls it: ZeRO-3 gathers the weights collectively)."""
        if self.zero is None:
            assert self.trained is not None
            return save_final(output, self.rt, self.trained, tokenizer, spec)
        final = output / "final"
        self.zero.export(final, tokenizer)
        return final


def prepare_trainee(
    spec: FineTuneJobSpec, rt: Runtime, model_folder: Path, total_steps: int, micro: int
) -> Trainee:
    """Load the base model and make it trainable under the job's strategy: LoRA or full-parameter wrapped in
    DDP (`ddp`), or full-parameter under DeepSpeed ZeRO (`zero2` / `zero3`, which the API allows only with
    fullParameter). `micro` rows per micro-batch on each rank; `total_steps` optimizer steps in the
    schedule."""
    hp = spec.hyperparameters
    if spec.distributed.zero_stage is not None:
        zero, _tokenizer = ZeroModel.build(
            spec,
            rt.world,
            total_steps,
            micro,
            hp.gradient_accumulation_steps,
            lambda: load_model(model_folder),
            bf16=rt.dtype == torch.bfloat16,
        )
        return Trainee(
            zero.engine, rt, hp.max_grad_norm, zero=zero, host_trim=host_trim(zero.engine, spec, rt)
        )
    model, _tokenizer = load_model(model_folder)
    model = apply_tuning(model, spec).to(rt.device)
    model.train()
    optimizer = build_optimizer(model, hp)
    scheduler = build_scheduler(optimizer, total_steps, hp)
    return Trainee(
        wrap_for_training(model, rt),
        rt,
        hp.max_grad_norm,
        model,
        optimizer,
        scheduler,
        host_trim=host_trim(model, spec, rt),
    )


def host_trim(model: torch.nn.Module, spec: FineTuneJobSpec, rt: Runtime) -> LayerTrim | None:
    """hostMemory: trim (the default) on the CPU: each decoder layer's forward checks whether the resident
    heap has grown by more than a budget since the last trim and only then hands its free pages back, so a
    long-context step's glibc holes stay bounded and a small model never trims (models/host_memory.py).
    Nothing on a GPU, where activations never touch malloc."""
    if rt.device.type != "cpu" or spec.hyperparameters.host_memory != "trim":
        return None
    return trim_between_layers(model)


# --- the forward every loss starts from ---------------------------------------------------------------------


@dataclass
class TargetLogprobs:
    """log p of every *target* token of a batch (a token whose weight is not 0), flattened in row-major order,
    with the row it belongs to and its weight; `entropy` of the predicted distribution there when asked."""

    logprobs: torch.Tensor  # [N]
    weights: torch.Tensor  # [N]
    rows: torch.Tensor  # [N] long
    num_rows: int
    entropy: torch.Tensor | None = None  # [N], no gradient

    def per_row_sum(self, values: torch.Tensor | None = None) -> torch.Tensor:
        """Σ over each row's targets of `values` (default: the log-probs): [B]."""
        v = self.logprobs if values is None else values
        return v.new_zeros(self.num_rows).index_add(0, self.rows, v)

    def per_row_count(self) -> torch.Tensor:
        return self.weights.new_zeros(self.num_rows).index_add(0, self.rows, torch.ones_like(self.weights))

    def padded(self, values: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The targets as [B, L] (L = most targets in a row), left-aligned, and their mask."""
        v = self.logprobs if values is None else values
        counts = self.per_row_count().long()
        width = int(counts.max()) if counts.numel() else 0
        mask = torch.arange(width, device=v.device)[None, :] < counts[:, None]
        return v.new_zeros((self.num_rows, width)).masked_scatter(mask, v), mask


def target_logprobs(
    model: torch.nn.Module,
    batch: Batch,
    device: torch.device,
    with_entropy: bool = False,
    temperature: float = 1.0,
) -> TargetLogprobs:
    """One forward over the batch; only positions whose next token is a target go through the output head
    (`logits_to_keep` as a mask): with prompts masked that is most of the sequence, and the vocabulary
    projection is the widest matmul there is. The [B, T, V] logits never exist, and neither do the targets'
    [N, V] ones: the model hands back the kept hidden states and the head runs over them a chunk at a time
    (losses.chunked_token_logprobs), unless ZeRO-3 holds the head's weight (then it runs inside the model).
    `temperature` divides the logits first (RFT: the distribution the sampler drew from)."""
    ids = batch.input_ids.to(device)
    weights = batch.weights.to(device)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[:, :-1] = weights[:, 1:] != 0  # position t predicts token t + 1
    targets = ids[:, 1:][keep[:, :-1]]
    inputs = {"input_ids": ids, "position_ids": batch.position_ids.to(device), "use_cache": False}
    if batch.attention_mask is not None:
        inputs["attention_mask"] = batch.attention_mask.to(device)
    if batch.shared_prompt is not None and shared_prompt_attention.supported(
        getattr(hf_model(model), "config", None)
    ):
        shared_prompt_attention.install()
        inputs[shared_prompt_attention.SHARED_PROMPT_KWARG] = batch.shared_prompt
    head = output_head(model)
    passes = head_passes_hidden_states(head) if head is not None else contextlib.nullcontext()
    with passes:  # with a head of our own, the model's `.logits` are the kept hidden states
        out = model(**inputs, logits_to_keep=keep).logits
    if out.dim() == 3:  # a model that ignores mask-shaped logits_to_keep
        out = out[keep]
    if head is None:
        # The logits exist whole here; chunking still keeps their fp32 log-softmax to a chunk at a time.
        head, vocab = torch.nn.Identity(), out.shape[-1]
    else:
        vocab = _vocab_size(head)
    logprobs, entropy = chunked_token_logprobs(out, targets, head, vocab, temperature, with_entropy)
    result = TargetLogprobs(
        logprobs=logprobs,
        weights=weights[:, 1:][keep[:, :-1]],
        rows=keep.nonzero()[:, 0],
        num_rows=ids.shape[0],
        entropy=entropy,
    )
    if batch.example_ids is None:
        return result
    # Rows that hold several examples (collate_shared_prompts): each target belongs to its example, and the
    # targets go in example order, as if each example had had a row of its own.
    examples = batch.example_ids.to(device)[:, 1:][keep[:, :-1]]
    order = torch.argsort(examples, stable=True)
    return TargetLogprobs(
        logprobs=result.logprobs[order],
        weights=result.weights[order],
        rows=examples[order],
        num_rows=int(batch.num_examples or 0),
        entropy=None if result.entropy is None else result.entropy[order],
    )


def answers_batch(
    model: torch.nn.Module, examples: list[TokenizedExample], prompt_lens: list[int], pad_id: int
) -> Batch:
    """Answers after prompts, several answers per prompt (an RFT group), in the cheaper of two layouts: one
    row per answer, or one row per prompt with its answers side by side (collate_shared_prompts: the prompt
    runs once). The second needs an attention that takes any mask (sdpa's does; flash-attention's and eager's
    masks are of other kinds). A model's own sizes say which way the sum goes (multiply-adds per layer: the
    projections per token, q.k and p.v per query-key pair); with models/shared_prompt_attention.py an answer
    pays for its prompt's keys and its own, otherwise for the whole row. The logits are the same either
    way."""
    config = getattr(hf_model(model), "config", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or len(examples) < 2:
        return collate([Row((e,)) for e in examples], pad_id)
    d = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 1) or 1)
    head_dim = int(getattr(config, "head_dim", None) or d // heads)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    ff = int(getattr(config, "intermediate_size", None) or 4 * d)
    per_token = 2 * d * heads * head_dim + 2 * d * kv_heads * head_dim + 3 * d * ff
    per_pair = 2 * heads * head_dim

    width = max(len(e) for e in examples)  # one row per answer: rows padded to the longest
    rows_cost = len(examples) * width * (per_token + width * per_pair)
    # Decided from the lengths alone: the shared layout's [B, 1, T, T] mask is built only when it is taken.
    groups, (p, s, w) = shared_prompt_layout(examples, prompt_lens)
    tree = shared_prompt_attention.supported(config)
    pairs = p * p + s * w * (p + w) if tree else (p + s * w) ** 2
    if len(groups) * ((p + s * w) * per_token + pairs * per_pair) < rows_cost:
        return collate_shared_prompts(examples, prompt_lens, pad_id, full_mask=not tree)
    return collate([Row((e,)) for e in examples], pad_id)


def _vocab_size(head: torch.nn.Module) -> int:
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 1


def token_nll_sum(model: torch.nn.Module, batch: Batch, device: torch.device) -> tuple[torch.Tensor, float]:
    """Σ over target tokens of weight × NLL, and Σ weights (the SFT loss before its normaliser)."""
    t = target_logprobs(model, batch, device)
    return -(t.logprobs * t.weights).sum(), float(t.weights.sum())


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module, rows: list[Row], micro_batch: int, pad_id: int, rt: Runtime
) -> float | None:
    """Mean weighted token NLL over `rows`, each rank taking its share."""
    if not rows:
        return None
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0.0
    # The same number of forwards on every rank: ZeRO-3 gathers weights in each (DDP may sync buffers); a
    # rank with no rows left runs one on any row and drops it.
    for part in even_micro_batches(rows, rt.world, micro_batch):
        with rt.autocast():
            s, w = token_nll_sum(model, collate(part or rows[:1], pad_id), rt.device)
        if part:
            total += float(s)
            weight += w
    model.train(was_training)
    total, weight = rt.world.sum(total), rt.world.sum(weight)
    return total / weight if weight else None


# --- steps, metrics, checkpoints, output --------------------------------------------------------------------


def plan_steps(items: int, batch_size: int, hp: Hyperparameters) -> tuple[int, int]:
    """(steps per epoch, total steps): maxSteps, else epochs (default 1) over `items` in batches."""
    steps_per_epoch = max(1, math.ceil(items / batch_size))
    total = hp.max_steps or max(1, math.ceil((hp.epochs or 1.0) * steps_per_epoch))
    return steps_per_epoch, total


class MetricsLog:
    """metrics.jsonl (or another JSON-lines file with a "step" in every line), written by rank 0. A resumed
    run first drops the lines logged after its checkpoint, so every step appears once."""

    def __init__(
        self, output: Path, world: distributed.World, start_step: int, name: str = "metrics.jsonl"
    ) -> None:
        self.path = output / name
        self.world = world
        if not world.is_main:
            return
        if start_step == 0 or not self.path.is_file():
            self.path.write_text("")
            return
        kept = [
            ln
            for ln in self.path.read_text().splitlines()
            if ln.strip() and json.loads(ln)["step"] <= start_step
        ]
        self.path.write_text("".join(ln + "\n" for ln in kept))

    def write(self, metrics: dict[str, Any]) -> None:
        if self.world.is_main:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")


class Checkpoints:
    """Save and resume everything a run needs to continue as if never stopped: weights, optimizer, scheduler,
    RNG (python, torch) and the data cursor."""

    def __init__(
        self,
        output: Path,
        rt: Runtime,
        model: torch.nn.Module | None,
        optimizer: torch.optim.Optimizer | None,
        scheduler: Any,
        fingerprint: str,
        keep_last: int,
        observer: Observer,
        zero: ZeroModel | None = None,
    ) -> None:
        self.output, self.rt, self.model = output, rt, model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.fingerprint, self.keep_last, self.observer = fingerprint, keep_last, observer
        self.zero = zero  # ZeRO: DeepSpeed's sharded checkpoints instead of model/optimizer/scheduler

    def resume(self) -> TrainerState | None:
        """Load the latest checkpoint into the model, optimizer and scheduler; None on a fresh start. Refuses
        (DatasetError) a checkpoint written for other training data."""
        path = latest_checkpoint(self.output)
        if path is None:
            return None
        if self.zero is not None:
            state = self.zero.load_checkpoint(path)
        elif (path / DEEPSPEED_DIR).is_dir():
            raise CheckpointMismatch(
                f"{path} was written under DeepSpeed ZeRO; this run has spec.distributed.strategy ddp. A "
                "checkpoint resumes only under the strategy that wrote it; use that, or a new output folder"
            )
        else:
            assert self.model is not None and self.optimizer is not None
            state = load_checkpoint(path, self.rt.world, self.model, self.optimizer, self.scheduler)
        if state.dataset_fingerprint != self.fingerprint:
            raise DatasetError(
                f"{path}: the checkpoint was written for different training data "
                f"(fingerprint {state.dataset_fingerprint}, now {self.fingerprint}); use a new output folder"
            )
        return state

    def save(
        self, step: int, total_steps: int, metrics: dict[str, Any], cursor: dict[str, Any] | None = None
    ) -> None:
        state = TrainerState(
            step=step,
            epoch=0,
            batch_in_epoch=0,
            total_steps=total_steps,
            dataset_fingerprint=self.fingerprint,
            metrics={
                k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)
            },
            cursor=cursor or {},
        )
        if self.zero is not None:
            path, pruned = self.zero.save_checkpoint(self.output, state, self.keep_last)
        else:
            assert self.model is not None and self.optimizer is not None
            path, pruned = save_checkpoint(
                self.output,
                self.rt.world,
                self.model,
                self.optimizer,
                self.scheduler,
                state,
                self.keep_last,
            )
        self.observer.on_checkpoint(step, path, pruned)


def save_final(
    output: Path, rt: Runtime, model: torch.nn.Module, tokenizer: Any, spec: FineTuneJobSpec
) -> Path:
    """The HF-loadable result: the adapter (with BASE_MODEL naming its base) or the whole model."""
    final = output / "final"
    if rt.world.is_main:
        model.save_pretrained(final)
        tokenizer.save_pretrained(final)
        if spec.lora is not None:
            (final / "BASE_MODEL").write_text(spec.base_model.uri + "\n")
    return final


def finish(output: Path, rt: Runtime, summary: dict[str, Any], observer: Observer) -> dict[str, Any]:
    """Write summary.json, tell the observer, leave the process group."""
    if rt.world.is_main:
        (output / "summary.json").write_text(json.dumps(summary, indent=2))
    observer.on_finish(summary)
    distributed.leave(rt.world)
    return summary


def stop_early(rt: Runtime, done: int) -> dict[str, Any]:
    """End the process as if killed right after step `done` (tests of resumption)."""
    distributed.leave(rt.world)
    return {"stopped_at_step": done}


def clip_and_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, max_grad_norm: float
) -> tuple[float, float]:
    """Clip the gradient by global norm (0: off), step the optimizer and the schedule. Returns the norm and
    the learning rate the step used."""
    grad_norm = (
        float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm))
        if max_grad_norm > 0
        else float("nan")
    )
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, lr
