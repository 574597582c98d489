"""What each endpoint does, without HTTP: check ownership and input, then queue the work (ordered for a
training model) and answer with a future, or answer at once. app.py maps requests to these methods."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from . import protocol as p
from .checkpoints import CheckpointStore, now_iso, public_checkpoint
from .engine import Engine, LoraShape, Snapshot
from .protocol import NotFound, UserError
from .sessions import Future, Futures, Ordering, Sampler, Session, TrainingModel

LOG = logging.getLogger("whetstone.service")


@dataclass(frozen=True)
class Limits:
    """What one session (and the service) may hold, so no client can exhaust the process."""

    max_training_clients: int = 4  # per session
    max_sampler_snapshots: int = 16  # ephemeral snapshots per tenant, oldest evicted
    max_sessions: int = 64
    max_request_bytes: int = 64 << 20
    max_sample_tokens: int = 8192  # max_tokens of one sample request
    max_num_samples: int = 128
    idle_timeout_seconds: float = 1800.0
    long_poll_seconds: float = 25.0


class TrainingService:
    def __init__(
        self,
        engine: Engine,
        store: CheckpointStore,
        model_name: str,
        limits: Limits | None = None,
    ) -> None:
        self.engine = engine
        self.store = store
        self.model_name = model_name
        self.names = {model_name, engine.base_model_uri}
        self.named = model_name != engine.base_model_uri and ":" not in model_name
        self.limits = limits or Limits()
        self.futures = Futures()
        self.ordering = Ordering(self.futures)
        self.sessions: dict[str, Session] = {}
        self.models: dict[str, TrainingModel] = {}
        self.samplers: dict[str, Sampler] = {}
        self.snapshots: dict[
            str, OrderedDict[str, Snapshot]
        ] = {}  # tenant -> ephemeral snapshots by sampler id
        self.named_snapshots: OrderedDict[tuple[str, str], Snapshot] = OrderedDict()  # (tenant, path) cache
        self.last_request_time: str | None = None

    # --- lookups --------

    def touch(self) -> None:
        self.last_request_time = now_iso()

    def session(self, tenant: str, session_id: str) -> Session:
        s = self.sessions.get(session_id)
        if s is None or s.tenant != tenant:
            raise NotFound(f"session {session_id!r}")
        s.last_seen = time.monotonic()
        return s

    def model(self, tenant: str, model_id: str) -> TrainingModel:
        m = self.models.get(model_id)
        if m is None or m.tenant != tenant:
            raise NotFound(f"model {model_id!r}")
        s = self.sessions.get(m.session_id)
        if s is not None:
            s.last_seen = time.monotonic()
        return m

    def sampler(self, tenant: str, sampler_id: str) -> Sampler:
        s = self.samplers.get(sampler_id)
        if s is None or s.tenant != tenant:
            raise NotFound(f"sampler {sampler_id!r}")
        return s

    def _check_base_model(self, name: str | None) -> None:
        if name is not None and name not in self.names:
            raise UserError(f"this service serves {self.model_name!r}, not {name!r}")

    # --- sessions --------

    def create_session(self, tenant: str, req: p.CreateSession) -> dict[str, Any]:
        live = [s for s in self.sessions.values() if not s.finished]
        if len(live) >= self.limits.max_sessions:
            raise UserError(
                f"the service holds its maximum of {self.limits.max_sessions} sessions; close one first"
            )
        session = Session(f"s{secrets.token_hex(8)}", tenant, user_metadata=req.user_metadata)
        self.sessions[session.session_id] = session
        LOG.info("session %s created", session.session_id)
        return {"session_id": session.session_id, "type": "create_session"}

    def heartbeat(self, tenant: str, session_id: str) -> bool:
        """False when the session is gone (the client stops its heartbeat on 410)."""
        s = self.sessions.get(session_id)
        # A heartbeat says the client process lives, not that it works: it does not keep an idle session's
        # models in memory (they are released after idle_timeout_seconds without requests).
        return s is not None and s.tenant == tenant and not s.finished

    async def finish_session(self, tenant: str, session_id: str, why: str) -> None:
        s = self.session(tenant, session_id)
        await self._release(s, why)

    async def _release(self, s: Session, why: str) -> None:
        s.finished = True
        for model_id in list(s.model_ids):
            self.models.pop(model_id, None)
            await self.futures.call(lambda m=model_id: self.engine.release_client(m))
        for sampler_id in list(s.sampler_ids):
            sampler = self.samplers.pop(sampler_id, None)
            if sampler is not None and sampler.ephemeral and sampler.snapshot is not None:
                self.snapshots.get(s.tenant, OrderedDict()).pop(sampler_id, None)
                snap = sampler.snapshot
                await self.futures.call(lambda sn=snap: self.engine.forget_snapshot(sn))
        LOG.info(
            "session %s released (%s): %d training clients, %d samplers; checkpoints kept",
            s.session_id,
            why,
            len(s.model_ids),
            len(s.sampler_ids),
        )
        s.model_ids.clear()
        s.sampler_ids.clear()

    async def release_idle(self) -> None:
        cutoff = time.monotonic() - self.limits.idle_timeout_seconds
        for s in list(self.sessions.values()):
            if s.finished:
                if s.last_seen < cutoff - self.limits.idle_timeout_seconds:
                    del self.sessions[s.session_id]
                continue
            busy = any(m.pending for m in (self.models.get(i) for i in s.model_ids) if m is not None)
            if s.last_seen < cutoff and not busy:
                await self._release(s, f"idle for more than {self.limits.idle_timeout_seconds:.0f} s")

    # --- training models --------

    def _new_model(
        self,
        tenant: str,
        session: Session,
        model_seq_id: int,
        base_model: str,
        shape: LoraShape,
        user_metadata: dict[str, Any] | None,
    ) -> TrainingModel:
        live = [m for m in session.model_ids if m in self.models]
        if len(live) >= self.limits.max_training_clients:
            raise UserError(
                f"session {session.session_id} holds its maximum of {self.limits.max_training_clients} "
                "training clients"
            )
        model_id = p.training_model_id(session.session_id, model_seq_id)
        if model_id in self.models:
            raise UserError(f"{model_id} exists already (model_seq_id {model_seq_id} was used)")
        model = TrainingModel(model_id, tenant, session.session_id, base_model, shape, user_metadata)
        self.models[model_id] = model
        session.model_ids.add(model_id)
        self.store.write_run(tenant, model_id, self._run_record(model))
        return model

    def _run_record(self, m: TrainingModel) -> dict[str, Any]:
        return {
            "training_run_id": m.model_id,
            "base_model": m.base_model,
            "is_lora": not m.shape.full,
            "lora_rank": m.shape.rank or None,
            "train_mlp": m.shape.train_mlp,
            "train_attn": m.shape.train_attn,
            "train_unembed": m.shape.train_unembed,
            "user_metadata": m.user_metadata,
            "created": now_iso(),
        }

    def create_model(self, tenant: str, req: p.CreateModel) -> Future:
        session = self.session(tenant, req.session_id)
        if req.model_seq_id in session.created_models:
            return self.futures.get(tenant, session.created_models[req.model_seq_id])
        self._check_base_model(req.base_model)
        if req.optimizer_config.type != "adamw":
            raise UserError(f"optimizer {req.optimizer_config.type!r} is not supported (adamw is)")
        lora = req.lora_config or p.LoraConfig()
        shape = LoraShape(lora.rank, lora.train_mlp, lora.train_attn, lora.train_unembed)
        model = self._new_model(tenant, session, req.model_seq_id, self.model_name, shape, req.user_metadata)
        future = self.futures.new(tenant, model.model_id)
        session.created_models[req.model_seq_id] = future.request_id

        def work() -> dict[str, Any]:
            self.engine.create_client(model.model_id, shape, lora.seed)
            return {"model_id": model.model_id, "type": "create_model"}

        self.futures.run(future, work)
        self.ordering.mark_ready(model)
        return future

    def get_info(self, tenant: str, model_id: str) -> dict[str, Any]:
        m = self.model(tenant, model_id)
        return {
            "type": "get_info",
            "model_id": m.model_id,
            "model_data": {
                "arch": self.engine.arch,
                "model_name": self.model_name,
                # A model served under a hub name (--model-name Qwen/...): that name, which clients resolve in
                # their own cache. Otherwise the model's local folder (no ':', the client cuts ids there): it
                # loads offline on the service's machine.
                "tokenizer_id": self.model_name if self.named else str(self.engine.folder),
            },
            "is_lora": not m.shape.full,
            "lora_rank": m.shape.rank or None,
            "model_name": self.model_name,
        }

    def _work(self, model: TrainingModel, fn: Any) -> Any:
        def work() -> Any:
            if model.model_id not in self.engine.clients:
                raise UserError(f"{model.model_id} is not loaded (its creation failed or it was released)")
            return fn()

        return work

    def forward_backward(self, tenant: str, call: p.ForwardBackwardCall) -> Future:
        model = self.model(tenant, call.model_id)

        def fn() -> bytes:
            result = self.engine.forward_backward(
                model.model_id, call.loss_fn, call.config, call.data, call.forward_only
            )
            return p.encode_forward_backward_output(result.outputs, result.metrics)

        return self.ordering.submit(model, call.seq_id, self._work(model, fn))

    def optim_step(self, tenant: str, req: p.OptimStep) -> Future:
        model = self.model(tenant, req.model_id)
        if req.optimizer_params is not None and req.adam_params is None:
            kind = req.optimizer_params.get("type")
            raise UserError(f"optimizer {kind!r} is not supported: send adam_params (AdamW)")
        adam = req.adam_params or p.AdamParams()

        def fn() -> dict[str, Any]:
            return {"metrics": self.engine.optim_step(model.model_id, adam)}

        return self.ordering.submit(model, req.seq_id, self._work(model, fn))

    def save_state(self, tenant: str, req: p.SaveWeights) -> Future:
        model = self.model(tenant, req.model_id)
        name = p.check_name(req.path or f"step-{int(time.time())}")
        path = p.TinkerPath(model.model_id, "weights", name)

        def fn() -> dict[str, Any]:
            state = self.engine.clients[model.model_id]
            meta = self._checkpoint_meta(model, state.steps, req.ttl_seconds, req.user_metadata)
            self.store.save(
                tenant,
                path,
                self.engine.weights(model.model_id),
                self.engine.optimizer_state(model.model_id),
                meta,
                req.overwrite,
            )
            LOG.info("%s: saved state %s", model.model_id, path)
            return {"path": str(path), "type": "save_weights"}

        return self.ordering.submit(model, req.seq_id, self._work(model, fn))

    def _checkpoint_meta(
        self, m: TrainingModel, step: int, ttl: int | None, meta: dict[str, Any] | None
    ) -> dict[str, Any]:
        return {
            "base_model": m.base_model,
            "is_lora": not m.shape.full,
            "lora_rank": m.shape.rank,
            "train_mlp": m.shape.train_mlp,
            "train_attn": m.shape.train_attn,
            "train_unembed": m.shape.train_unembed,
            "step": step,
            "ttl_seconds": ttl,
            "user_metadata": meta,
        }

    def save_for_sampler(self, tenant: str, req: p.SaveWeightsForSampler) -> Future:
        model = self.model(tenant, req.model_id)
        session = self.session(tenant, model.session_id)
        if req.path is not None:
            name = p.check_name(req.path)
            path = p.TinkerPath(model.model_id, "sampler_weights", name)

            def named() -> dict[str, Any]:
                snap = self.engine.snapshot(model.model_id)
                meta = self._checkpoint_meta(model, snap.step, req.ttl_seconds, req.user_metadata)
                self.store.save(tenant, path, snap.weights, None, meta, overwrite=True)
                self.named_snapshots[(tenant, str(path))] = snap
                self._trim_named()
                LOG.info("%s: saved sampler weights %s", model.model_id, path)
                return {"path": str(path), "type": "save_weights_for_sampler"}

            return self.ordering.submit(model, req.seq_id, self._work(model, named))
        if req.sampling_session_seq_id is None:
            raise UserError(
                "save_weights_for_sampler needs a path (named) or a sampling_session_seq_id (ephemeral)"
            )
        sampler_id = p.sampler_id(session.session_id, req.sampling_session_seq_id)

        def ephemeral() -> dict[str, Any]:
            existing = self.samplers.get(sampler_id)
            if existing is None:
                snap = self.engine.snapshot(model.model_id)
                self._add_sampler(
                    Sampler(sampler_id, tenant, self.model_name, None, snap, ephemeral=True), session
                )
            return {"sampling_session_id": sampler_id, "type": "save_weights_for_sampler"}

        return self.ordering.submit(model, req.seq_id, self._work(model, ephemeral))

    def _add_sampler(self, sampler: Sampler, session: Session) -> None:
        self.samplers[sampler.sampler_id] = sampler
        session.sampler_ids.add(sampler.sampler_id)
        if not sampler.ephemeral:
            return
        mine = self.snapshots.setdefault(sampler.tenant, OrderedDict())
        mine[sampler.sampler_id] = sampler.snapshot  # type: ignore[assignment]
        while len(mine) > self.limits.max_sampler_snapshots:
            old_id, old = mine.popitem(last=False)
            evicted = self.samplers.get(old_id)
            if evicted is not None:
                evicted.snapshot = None
            self.engine.forget_snapshot(old)
            LOG.info(
                "sampler %s: snapshot evicted (more than %d per key)",
                old_id,
                self.limits.max_sampler_snapshots,
            )

    def _trim_named(self) -> None:
        while len(self.named_snapshots) > self.limits.max_sampler_snapshots:
            _, old = self.named_snapshots.popitem(last=False)
            self.engine.forget_snapshot(old)

    def load_weights(self, tenant: str, req: p.LoadWeights) -> Future:
        path = p.parse_tinker_path(req.path)
        meta = self.store.meta(tenant, path)  # NotFound for another tenant's path
        if req.model_id is not None:  # legacy load_state on an existing client
            model = self.model(tenant, req.model_id)

            def legacy() -> dict[str, Any]:
                _, weights, opt = self.store.load(tenant, path, req.optimizer)
                self.engine.load_weights(model.model_id, weights, opt)
                return {"path": str(path), "type": "load_weights"}

            return self.ordering.submit(model, req.seq_id, self._work(model, legacy))
        if req.session_id is None or req.model_seq_id is None:
            raise UserError(
                "load_weights needs model_id (load into a client) or session_id + model_seq_id (create)"
            )
        session = self.session(tenant, req.session_id)
        if req.model_seq_id in session.created_models:
            return self.futures.get(tenant, session.created_models[req.model_seq_id])
        self._check_base_model(req.base_model)
        shape = LoraShape(
            int(meta.get("lora_rank") or 0) if meta.get("is_lora") else 0,
            bool(meta.get("train_mlp", True)),
            bool(meta.get("train_attn", True)),
            bool(meta.get("train_unembed", True)),
        )
        model = self._new_model(
            tenant,
            session,
            req.model_seq_id,
            self.model_name,
            shape,
            req.user_metadata if req.user_metadata is not None else meta.get("user_metadata"),
        )
        future = self.futures.new(tenant, model.model_id)
        session.created_models[req.model_seq_id] = future.request_id

        def work() -> dict[str, Any]:
            _, weights, opt = self.store.load(tenant, path, req.optimizer)
            self.engine.create_client(model.model_id, shape)
            self.engine.load_weights(model.model_id, weights, opt)
            self.engine.clients[model.model_id].steps = int(meta.get("step") or 0)
            LOG.info(
                "%s: created from %s%s",
                model.model_id,
                path,
                " with optimizer state" if req.optimizer else "",
            )
            return {"path": str(path), "model_id": model.model_id, "type": "load_weights"}

        self.futures.run(future, work)
        self.ordering.mark_ready(model)
        return future

    # --- samplers --------

    async def create_sampling_session(self, tenant: str, req: p.CreateSamplingSession) -> dict[str, Any]:
        session = self.session(tenant, req.session_id)
        sampler_id = p.sampler_id(session.session_id, req.sampling_session_seq_id)
        existing = self.samplers.get(sampler_id)
        if existing is not None:
            if existing.tenant != tenant:
                raise NotFound(sampler_id)
            return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}
        snapshot = None
        if req.model_path is not None:
            snapshot = await self._named_snapshot(tenant, req.model_path)
        else:
            self._check_base_model(req.base_model)
        self._add_sampler(Sampler(sampler_id, tenant, self.model_name, req.model_path, snapshot), session)
        return {"sampling_session_id": sampler_id, "type": "create_sampling_session"}

    async def _named_snapshot(self, tenant: str, model_path: str) -> Snapshot:
        path = p.parse_tinker_path(model_path)
        cached = self.named_snapshots.get((tenant, str(path)))
        if cached is not None:
            self.named_snapshots.move_to_end((tenant, str(path)))
            return cached
        meta = self.store.meta(tenant, path)
        shape = LoraShape(
            int(meta.get("lora_rank") or 0) if meta.get("is_lora") else 0,
            bool(meta.get("train_mlp", True)),
            bool(meta.get("train_attn", True)),
            bool(meta.get("train_unembed", True)),
        )

        def load() -> Snapshot:
            _, weights, _ = self.store.load(tenant, path, optimizer=False)
            return Snapshot(
                shape, {k: v.to(self.engine.device) for k, v in weights.items()}, int(meta.get("step") or 0)
            )

        snap = await self.futures.call(load)
        self.named_snapshots[(tenant, str(path))] = snap
        self._trim_named()
        return snap

    def get_sampler(self, tenant: str, sampler_id: str) -> dict[str, Any]:
        s = self.sampler(tenant, sampler_id)
        out: dict[str, Any] = {"sampler_id": s.sampler_id, "base_model": s.base_model}
        if s.model_path:
            out["model_path"] = s.model_path
        return out

    async def sample(self, tenant: str, req: p.SampleRequest) -> Future:
        lim = self.limits
        if req.sampling_session_id is not None:
            sampler = self.sampler(tenant, req.sampling_session_id)
            if req.seq_id is not None and req.seq_id in sampler.by_seq:
                return sampler.by_seq[req.seq_id]
            if sampler.ephemeral and sampler.snapshot is None:
                raise UserError(
                    f"sampler {sampler.sampler_id}'s snapshot was evicted (each key keeps its "
                    f"{lim.max_sampler_snapshots} newest); save weights for sampling again"
                )
            snapshot = sampler.snapshot
        elif req.model_path is not None:
            sampler, snapshot = None, await self._named_snapshot(tenant, req.model_path)
        else:
            self._check_base_model(req.base_model)
            sampler, snapshot = None, None
        prompt = req.prompt.tokens()
        sp = req.sampling_params
        max_tokens = sp.max_tokens or min(lim.max_sample_tokens, 512)
        if max_tokens > lim.max_sample_tokens:
            raise UserError(
                f"max_tokens {max_tokens} exceeds this service's limit of {lim.max_sample_tokens}"
            )
        if req.num_samples > lim.max_num_samples:
            raise UserError(
                f"num_samples {req.num_samples} exceeds this service's limit of {lim.max_num_samples}"
            )
        unsupported = [
            k
            for k in ("topk_prompt_logprobs", "topk_sample_logprobs", "prompt_alt_tokens_k")
            if getattr(req, k)
        ]
        if req.target_prompt_logprobs is not None:
            unsupported.append("target_prompt_logprobs")
        if req.prompt_logprobs_last_n is not None:
            unsupported.append("prompt_logprobs_last_n")
        if unsupported:
            raise UserError(f"not supported by this service: {', '.join(unsupported)}")
        want_routing = bool(req.record_stability_info) and self.engine.is_moe
        future = self.futures.new(tenant)
        future.sample_sequence_ids = [f"{future.request_id}:{i}" for i in range(req.num_samples)]
        if sampler is not None and req.seq_id is not None:
            sampler.by_seq[req.seq_id] = future
            while len(sampler.by_seq) > 4096:
                sampler.by_seq.popitem(last=False)

        def work() -> bytes:
            seqs, prompt_lps, prompt_topk = self.engine.sample(
                snapshot,
                prompt,
                max_tokens,
                req.num_samples,
                sp.temperature,
                sp.top_k,
                sp.top_p,
                sp.stop,
                sp.seed,
                bool(req.prompt_logprobs),
                want_routing,
            )
            return p.encode_sample_response(seqs, prompt_lps, prompt_topk)

        self.futures.run(future, work)
        return future

    # --- futures --------

    async def retrieve(self, tenant: str, req: p.RetrieveFuture) -> Future | None:
        """The finished future, or None when it is still running after the long-poll."""
        future = self.futures.get(tenant, req.request_id)
        if not future.done.is_set():
            try:
                await asyncio.wait_for(future.done.wait(), self.limits.long_poll_seconds)
            except TimeoutError:
                return None
        return future

    # --- REST: runs and checkpoints --------

    def training_run(self, tenant: str, run_id: str) -> dict[str, Any]:
        run = self.store.read_run(tenant, run_id)
        checkpoints = self.store.list(tenant, run_id)

        def last(kind: str) -> dict[str, Any] | None:
            return next(
                (public_checkpoint(c) for c in reversed(checkpoints) if c["checkpoint_type"] == kind), None
            )

        live = self.models.get(run_id)
        last_request = (
            datetime.fromtimestamp(live.last_request, UTC).isoformat()
            if live and live.tenant == tenant
            else run.get("created")
        )
        meta = run.get("user_metadata")
        return {
            "training_run_id": run_id,
            "base_model": run["base_model"],
            "model_owner": tenant,
            "is_lora": run["is_lora"],
            "corrupted": False,
            "lora_rank": run.get("lora_rank"),
            "last_request_time": last_request,
            "last_checkpoint": last("training"),
            "last_sampler_checkpoint": last("sampler"),
            "user_metadata": {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else None,
        }

    def training_runs(self, tenant: str, limit: int, offset: int) -> dict[str, Any]:
        runs = self.store.runs(tenant)
        page = runs[offset : offset + limit]
        return {
            "training_runs": [self.training_run(tenant, r) for r in page],
            "cursor": {"offset": offset, "limit": limit, "total_count": len(runs)},
        }

    def list_checkpoints(self, tenant: str, run_id: str) -> dict[str, Any]:
        self.store.read_run(tenant, run_id)
        return {
            "checkpoints": [public_checkpoint(c) for c in self.store.list(tenant, run_id)],
            "cursor": None,
        }

    def delete_checkpoint(self, tenant: str, run_id: str, kind: str, name: str) -> None:
        path = p.parse_tinker_path(f"{p.TINKER_SCHEME}{run_id}/{kind}/{name}")
        self.store.delete(tenant, path)
        snap = self.named_snapshots.pop((tenant, str(path)), None)
        if snap is not None:
            self.engine.forget_snapshot(snap)

    def weights_info(self, tenant: str, tinker_path: str) -> dict[str, Any]:
        meta = self.store.meta(tenant, p.parse_tinker_path(tinker_path))
        return {
            "base_model": meta["base_model"],
            "is_lora": meta["is_lora"],
            "lora_rank": meta.get("lora_rank") or None,
            "train_unembed": meta.get("train_unembed"),
            "train_mlp": meta.get("train_mlp"),
            "train_attn": meta.get("train_attn"),
        }

    # --- the service's own status, for the operator --------

    def status(self, checkpoint_limit: int = 500) -> dict[str, Any]:
        live = [m for m in self.models.values()]
        return {
            "baseModel": self.engine.base_model_uri,
            "modelName": self.model_name,
            "sessions": sum(1 for s in self.sessions.values() if not s.finished),
            "trainingClients": len(live),
            "samplers": len(self.samplers),
            "models": [
                {
                    "modelId": m.model_id,
                    "lora": not m.shape.full,
                    "rank": m.shape.rank,
                    "step": self.engine.clients[m.model_id].steps if m.model_id in self.engine.clients else 0,
                }
                for m in live[:256]
            ],
            "lastRequestTime": self.last_request_time,
            "checkpoints": [
                {
                    "tinkerPath": c["tinker_path"],
                    "kind": c["checkpoint_type"],
                    "step": int(c.get("step") or 0),
                    "folder": c["folder"],
                    "time": c["time"],
                }
                for c in self.store.everything(checkpoint_limit)
            ],
        }


def checkpoint_dir_default() -> Path:
    return Path.home() / ".cache" / "whetstone" / "service"
