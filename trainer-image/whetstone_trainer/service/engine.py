"""The torch side of the training service: one frozen base model, many training clients on it, sampler
snapshots, and the work each endpoint asks for (forward/backward, optimizer step, sampling, state).

- LoRA training clients are peft adapters of one PeftModel around the shared base weights, any rank each
  (`lora_config.rank`), alpha fixed at 32 (the wire carries no alpha) with LoRA's alpha/rank scaling.
- `lora_config.rank == 0` is Whetstone's full-parameter extension: the client gets its own full copy of the
  model, every weight trainable (memory: one model plus AdamW's two moments per client).
- A sampler snapshot is a frozen copy of a client's trainable weights (for LoRA: the adapter, a few MB).
  Sampling from a snapshot copies it into a sampling slot adapter (one per LoRA shape) and runs the shared
  base; saving a new snapshot is all a "hotload" takes, in the same process, without a restart.

Every method here runs on the service's single worker thread, one call at a time, so the active adapter and
the gradients of a client never interleave with another call.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..methods import losses
from ..models.sources import load_model_and_tokenizer, materialise, parse_model_uri
from . import moe
from .objectives import check_call, request_stats
from .protocol import AdamParams, Datum, SampledSequence, UserError

LOG = logging.getLogger("whetstone.service")
LORA_ALPHA = 32
# Logits of one micro-batch are at most this many floats (fp32: 256 MiB), so a 150k vocabulary and a 2k one
# both fit; a datum longer than that runs alone.
LOGIT_BUDGET = 1 << 26


@dataclass(frozen=True)
class LoraShape:
    """What decides which modules an adapter touches and how big it is; snapshots of equal shape share a
    sampling slot."""

    rank: int
    train_mlp: bool = True
    train_attn: bool = True
    train_unembed: bool = True

    @property
    def full(self) -> bool:
        return self.rank == 0

    def slot_name(self) -> str:
        return f"sampler-r{self.rank}-{int(self.train_mlp)}{int(self.train_attn)}{int(self.train_unembed)}"


@dataclass
class TrainingState:
    """One training client's weights and optimizer (owned by the worker thread)."""

    name: str  # adapter name, or the model id for full-parameter clients
    shape: LoraShape
    params: dict[str, torch.nn.Parameter]  # sorted by name: the optimizer's parameter order
    optimizer: torch.optim.AdamW
    model: torch.nn.Module | None = None  # full-parameter clients only
    steps: int = 0
    has_grad: bool = False


@dataclass
class Snapshot:
    """Frozen trainable weights for sampling (and what they apply to)."""

    shape: LoraShape
    weights: dict[str, torch.Tensor]
    step: int = 0
    size_bytes: int = field(default=0)

    def __post_init__(self) -> None:
        self.size_bytes = sum(t.numel() * t.element_size() for t in self.weights.values())


@dataclass
class ForwardResult:
    outputs: list[dict[str, np.ndarray]]
    metrics: dict[str, float]


def linear_leaf_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if type(m) is torch.nn.Linear}


def _lora_targets(present: set[str], shape: LoraShape) -> list[str]:
    """Leaf module names (suffixes) an adapter of this shape wraps: attention and/or MLP projections, and the
    output head. MoE experts are not wrapped (their weights are fused 3-D tensors); the router is frozen."""
    attn = {"q_proj", "k_proj", "v_proj", "o_proj"}
    mlp = {"gate_proj", "up_proj", "down_proj"}
    wanted: set[str] = set()
    if shape.train_attn:
        wanted |= attn
    if shape.train_mlp:
        wanted |= mlp
    if shape.train_unembed:
        wanted.add("lm_head")
    targets = sorted(wanted & present)
    if not targets:
        raise UserError("lora_config trains nothing: set train_attn, train_mlp or train_unembed")
    return targets


class Engine:
    """The base model and everything trained or sampled on it."""

    def __init__(self, base_model_uri: str, device: str | None = None, cache_dir: Path | None = None) -> None:
        self.base_model_uri = base_model_uri
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.folder = materialise(parse_model_uri(base_model_uri), cache_dir)
        model, tokenizer = load_model_and_tokenizer(str(self.folder))
        model.requires_grad_(False)
        model.eval()
        self.model: Any = model.to(self.device)
        self.tokenizer = tokenizer
        self._linear_names = linear_leaf_names(model)  # before peft wraps them
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self.max_length = int(getattr(model.config, "max_position_embeddings", 0) or 0) or None
        self.arch = str(getattr(model.config, "model_type", "") or type(model).__name__)
        self.is_moe = moe.is_moe(model)
        self.routing_width = moe.routing_width(model) if self.is_moe else 0
        self.clients: dict[str, TrainingState] = {}
        self._slot_loaded: dict[str, int] = {}  # slot adapter -> id() of the snapshot it holds
        self._full_sampler: torch.nn.Module | None = None
        self._full_sampler_holds: int | None = None

    # --- training clients --------

    def _fresh_full_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.folder, dtype=torch.float32).to(self.device)
        model.eval()
        return model

    def _add_adapter(self, name: str, shape: LoraShape, seed: int | None) -> None:
        from peft import LoraConfig, PeftModel, get_peft_model

        config = LoraConfig(
            r=shape.rank,
            lora_alpha=LORA_ALPHA,
            lora_dropout=0.0,
            target_modules=_lora_targets(self._linear_names, shape),
            bias="none",
        )
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if seed is not None:
                torch.manual_seed(seed)
            if isinstance(self.model, PeftModel):
                self.model.add_adapter(name, config)
            else:
                self.model = get_peft_model(self.model, config, adapter_name=name)
        self.model.to(self.device)

    def _base_module(self) -> torch.nn.Module:
        from peft import PeftModel

        return self.model.get_base_model() if isinstance(self.model, PeftModel) else self.model

    def _adapter_params(self, name: str) -> dict[str, torch.nn.Parameter]:
        marker = f".{name}."
        params = {n: p for n, p in self.model.named_parameters() if marker in n or n.endswith(f".{name}")}
        return dict(sorted(params.items()))

    def create_client(self, model_id: str, shape: LoraShape, seed: int | None = None) -> None:
        if shape.full:
            model = self._fresh_full_model()
            model.requires_grad_(True)
            params = dict(sorted(model.named_parameters()))
            state = TrainingState(
                model_id, shape, params, torch.optim.AdamW(list(params.values())), model=model
            )
        else:
            name = _adapter_name(model_id)
            self._add_adapter(name, shape, seed)
            params = self._adapter_params(name)
            for p in params.values():
                p.requires_grad_(True)
            state = TrainingState(name, shape, params, torch.optim.AdamW(list(params.values())))
        self.clients[model_id] = state
        LOG.info(
            "training client %s created (%s)",
            model_id,
            "full-parameter" if shape.full else f"LoRA rank {shape.rank}",
        )

    def release_client(self, model_id: str) -> None:
        state = self.clients.pop(model_id, None)
        if state is None or state.shape.full:
            return
        self.model.delete_adapter(state.name)
        remaining = self._adapter_names()
        if remaining:
            # peft keeps pointing at the deleted adapter otherwise.
            self.model.base_model.set_adapter(sorted(remaining)[0])
        else:
            self.model = self.model.unload()  # no adapter left: back to the bare base model
            self._slot_loaded.clear()
        LOG.info("training client %s released", model_id)

    @contextmanager
    def _active(self, state: TrainingState | None) -> Iterator[torch.nn.Module]:
        """The model to run for a client (None: the bare base model)."""
        if state is not None and state.shape.full:
            yield state.model  # type: ignore[misc]
            return
        from peft import PeftModel

        if not isinstance(self.model, PeftModel):
            yield self.model
            return
        if state is None:
            with self.model.disable_adapter():
                yield self.model
            return
        self.model.base_model.set_adapter(state.name)  # the layers' active adapter, without touching grads
        yield self.model

    # --- forward / backward --------

    def _tensors(self, datum: Datum) -> dict[str, torch.Tensor]:
        out = {}
        for name, arr in datum.inputs.items():
            t = torch.from_numpy(np.array(arr, copy=True))
            out[name] = t.to(
                self.device, torch.long if name in ("target_tokens", "routing") else torch.float32
            )
        return out

    def _check_datum(self, i: int, datum: Datum, tensors: dict[str, torch.Tensor], two_d: bool) -> None:
        n = int(datum.tokens.size)
        if datum.tokens.min() < 0 or datum.tokens.max() >= self.vocab_size:
            raise UserError(
                f"data[{i}]: a model input token is outside the vocabulary [0, {self.vocab_size})"
            )
        if self.max_length and n > self.max_length:
            raise UserError(
                f"data[{i}]: {n} input tokens, more than the model's context of {self.max_length}"
            )
        targets = tensors.get("target_tokens")
        if targets is None:
            return
        if targets.dim() == 2 and not two_d:
            raise UserError(f"data[{i}]: 2-D target_tokens are only taken by cross_entropy")
        if targets.dim() > 2:
            raise UserError(f"data[{i}]: target_tokens must be [N] or [N, K]")
        if targets.numel() and (int(targets.min()) < 0 or int(targets.max()) >= self.vocab_size):
            raise UserError(f"data[{i}]: a target token is outside the vocabulary [0, {self.vocab_size})")
        routing = tensors.get("routing")
        if routing is not None:
            if not self.is_moe:
                raise UserError(
                    f"data[{i}]: loss_fn_inputs['routing'] given, but the base model has no experts"
                )
            moe.check_routing(self._base_module(), routing, f"data[{i}].loss_fn_inputs['routing']")

    def forward_backward(
        self,
        model_id: str,
        loss_fn: str,
        config: dict[str, float | str],
        data: list[Datum],
        forward_only: bool,
    ) -> ForwardResult:
        state = self.clients[model_id]
        obj = check_call(loss_fn, [d.inputs for d in data], config)
        tensors = [self._tensors(d) for d in data]
        for i, (d, t) in enumerate(zip(data, tensors, strict=True)):
            self._check_datum(i, d, t, obj.two_d_targets)
        stats = request_stats([t.get("sequence_ratio_mask") for t in tensors])
        outputs: list[dict[str, np.ndarray]] = [{} for _ in data]
        total = 0.0
        with self._active(state) as model:
            for batch in _micro_batches([int(d.tokens.size) for d in data], self.vocab_size):
                ids, mask = _right_padded([data[i].tokens for i in batch], self.device)
                routing = [tensors[i].get("routing") for i in batch]
                with (
                    torch.set_grad_enabled(not forward_only),
                    moe.session(model, routing, tuple(ids.shape)) as routes,
                ):
                    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
                    batch_loss = logits.new_zeros((), dtype=torch.float32)
                    for row, i in enumerate(batch):
                        n = int(data[i].tokens.size)
                        lp = _target_logprobs(logits[row, :n], tensors[i]["target_tokens"])
                        batch_loss = batch_loss + obj.datum_loss(lp, tensors[i], config, stats)
                        outputs[i]["logprobs"] = lp.detach().float().cpu().numpy()
                    if not forward_only:
                        batch_loss.backward()
                total += float(batch_loss.detach())
                if routes is not None:
                    for row, i in enumerate(batch):
                        outputs[i]["routing"] = routes[row, : int(data[i].tokens.size)].cpu().numpy()
        if not math.isfinite(total):
            LOG.warning("training client %s: %s loss is %s", model_id, loss_fn, total)
        if not forward_only:
            state.has_grad = True
        return ForwardResult(outputs, {"loss:sum": total})

    def optim_step(self, model_id: str, adam: AdamParams) -> dict[str, float]:
        state = self.clients[model_id]
        for group in state.optimizer.param_groups:
            group.update(
                lr=adam.learning_rate,
                betas=(adam.beta1, adam.beta2),
                eps=adam.eps,
                weight_decay=adam.weight_decay,
            )
        params = [p for p in state.params.values() if p.grad is not None]
        metrics: dict[str, float] = {}
        if params:
            norm = torch.nn.utils.clip_grad_norm_(params, adam.grad_clip_norm or float("inf"))
            metrics["grad_norm:mean"] = float(norm)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.steps += 1
        state.has_grad = False
        return metrics

    # --- state --------

    def weights(self, model_id: str) -> dict[str, torch.Tensor]:
        """The client's trainable weights under names independent of its adapter name."""
        state = self.clients[model_id]
        if state.shape.full:
            return {n: p.detach().clone() for n, p in state.params.items()}
        return {_portable(n, state.name): p.detach().clone() for n, p in state.params.items()}

    def snapshot(self, model_id: str) -> Snapshot:
        state = self.clients[model_id]
        return Snapshot(state.shape, self.weights(model_id), state.steps)

    def optimizer_state(self, model_id: str) -> dict[str, Any]:
        return copy.deepcopy(self.clients[model_id].optimizer.state_dict())

    def load_weights(
        self, model_id: str, weights: dict[str, torch.Tensor], optimizer: dict[str, Any] | None
    ) -> None:
        state = self.clients[model_id]
        names = {(_portable(n, state.name) if not state.shape.full else n): n for n in state.params}
        if set(names) != set(weights):
            raise UserError(
                "the checkpoint's weights do not fit this model (saved from another base model or LoRA shape)"
            )
        with torch.no_grad():
            for portable, name in names.items():
                state.params[name].copy_(weights[portable].to(self.device))
        if optimizer is not None:
            state.optimizer.load_state_dict(optimizer)

    # --- sampling --------

    @contextmanager
    def _sampling_model(self, snapshot: Snapshot | None) -> Iterator[torch.nn.Module]:
        if snapshot is None:
            with self._active(None) as model:
                yield model
            return
        if snapshot.shape.full:
            if self._full_sampler is None:
                self._full_sampler = self._fresh_full_model()
                self._full_sampler.requires_grad_(False)
            if self._full_sampler_holds != id(snapshot):
                result = self._full_sampler.load_state_dict(snapshot.weights, strict=False)
                # A snapshot holds the named parameters: tied weights (lm_head = embeddings) appear once.
                owned = {n for n, _ in self._full_sampler.named_parameters()}
                if result.unexpected_keys or any(k in owned for k in result.missing_keys):
                    raise RuntimeError(f"snapshot does not fit the model: {result}")
                self._full_sampler_holds = id(snapshot)
            yield self._full_sampler
            return
        slot = snapshot.shape.slot_name()
        if slot not in self._adapter_names():
            self._add_adapter(slot, snapshot.shape, seed=0)
            for p in self._adapter_params(slot).values():
                p.requires_grad_(False)
        if self._slot_loaded.get(slot) != id(snapshot):
            params = self._adapter_params(slot)
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(snapshot.weights[_portable(name, slot)])
            self._slot_loaded[slot] = id(snapshot)
        self.model.base_model.set_adapter(slot)
        yield self.model

    def forget_snapshot(self, snapshot: Snapshot) -> None:
        for slot, held in list(self._slot_loaded.items()):
            if held == id(snapshot):
                del self._slot_loaded[slot]
        if self._full_sampler_holds == id(snapshot):
            self._full_sampler_holds = None

    def _adapter_names(self) -> set[str]:
        from peft import PeftModel

        return set(self.model.peft_config) if isinstance(self.model, PeftModel) else set()

    def sample(
        self,
        snapshot: Snapshot | None,
        prompt: list[int],
        max_tokens: int,
        num_samples: int,
        temperature: float,
        top_k: int,
        top_p: float,
        stop: str | list[str] | list[int] | None,
        seed: int | None,
        want_prompt_logprobs: bool,
        want_routing: bool,
    ) -> tuple[list[SampledSequence], list[float | None] | None, tuple[np.ndarray, np.ndarray] | None]:
        from ..sampling import SamplingParams, default_stop_token_ids, prompt_logprobs, sample

        if not prompt:
            raise UserError("the prompt is empty")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise UserError(f"a prompt token is outside the vocabulary [0, {self.vocab_size})")
        if self.max_length and len(prompt) + max_tokens > self.max_length:
            raise UserError(
                f"prompt ({len(prompt)} tokens) + max_tokens ({max_tokens}) exceed the model's context "
                f"of {self.max_length}"
            )
        stop_ids: tuple[int, ...] = ()
        stop_strings: tuple[str, ...] = ()
        if stop is None:
            stop_ids = tuple(default_stop_token_ids(self.tokenizer))
        elif isinstance(stop, str):
            stop_strings = (stop,)
        elif all(isinstance(s, str) for s in stop):
            stop_strings = tuple(stop)  # type: ignore[arg-type]
        else:
            stop_ids = tuple(int(s) for s in stop)  # type: ignore[arg-type]
        try:
            params = SamplingParams(
                max_tokens=max_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                stop_token_ids=stop_ids,
                stop_strings=stop_strings,
                seed=seed,
                include_stop_in_output=True,
            )
        except ValueError as e:
            raise UserError(f"sampling_params: {e}") from None
        with self._sampling_model(snapshot) as model, torch.no_grad():
            completions = sample(model, [prompt], params, n=num_samples, tokenizer=self.tokenizer)[0]
            prompt_lps = prompt_logprobs(model, prompt) if want_prompt_logprobs else None
            routing = None
            if want_routing and self.is_moe:
                # The experts of exactly the tokens a training datum feeds, under the sampler's weights:
                # one prefill pass over each sampled sequence (what a KV-cache sampler's prefill computes).
                routing = [moe.route_tokens(model, prompt + c.tokens) for c in completions]
        sequences = []
        for j, c in enumerate(completions):
            topk = None
            if routing is not None:
                experts, weights = routing[j]
                topk = (experts[len(prompt) :], weights[len(prompt) :])
            sequences.append(SampledSequence(c.tokens, c.logprobs, c.finish_reason == "stop", topk))
        prompt_topk = (routing[0][0][: len(prompt)], routing[0][1][: len(prompt)]) if routing else None
        return sequences, prompt_lps, prompt_topk


def _adapter_name(model_id: str) -> str:
    # peft adapter names become attribute keys: no ':' or '.'.
    return "client-" + "".join(ch if ch.isalnum() else "-" for ch in model_id)


def _portable(param_name: str, adapter: str) -> str:
    return param_name.replace(f".{adapter}.", ".ADAPTER.").removesuffix(f".{adapter}")


def _micro_batches(lengths: Sequence[int], vocab: int) -> list[list[int]]:
    """Consecutive datums whose padded logits stay under LOGIT_BUDGET floats."""
    budget = max(1, LOGIT_BUDGET // max(vocab, 1))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i, n in enumerate(lengths):
        if current and max(longest, n) * (len(current) + 1) > budget:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, n)
    if current:
        batches.append(current)
    return batches


def _right_padded(rows: list[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(int(r.size) for r in rows)
    ids = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : r.size] = torch.from_numpy(r)
        mask[i, : r.size] = 1
    return ids.to(device), mask.to(device)


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) per position: [N] targets → [N]; [N, K] targets → [N, K] (top-k distillation)."""
    if targets.dim() == 1:
        return losses.token_logprobs(logits, targets)
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, targets)


ProgressFn = Callable[[], None]
