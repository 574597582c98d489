"""Who owns what, and in which order work runs: sessions, training models, samplers, futures.

- Every object belongs to the tenant (API key digest) that created it; looking up another tenant's object is
  a NotFound, indistinguishable from a missing one.
- A training model's stateful calls run strictly in `seq_id` order (1, 2, ... after create = 0), waiting for
  missing ones: the client sends the chunks of one forward_backward concurrently, first chunk last.
- A resent call (same model and seq_id, same sampler and seq_id, or the same X-Idempotency-Key) gets the
  future of the first one: one effect, the same answer.
- All torch work runs on one worker thread, in submission order (`Futures.run`), so two calls never touch
  the model at once; the asyncio loop only parses, orders and answers.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .engine import LoraShape, Snapshot
from .protocol import NotFound, UserError, error_body

LOG = logging.getLogger("whetstone.service")
Result = bytes | dict[str, Any]
FUTURE_TTL_SECONDS = 3600.0
MAX_FUTURES = 20_000
MAX_REMEMBERED_SEQ = 4096


@dataclass(eq=False)
class Future:
    request_id: str
    tenant: str
    created: float = field(default_factory=time.monotonic)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    result: Result | None = None
    model_id: str | None = None
    sample_sequence_ids: list[str] | None = None

    def finish(self, result: Result) -> None:
        self.result = result
        self.done.set()

    def promise(self) -> dict[str, Any]:
        """The UntypedAPIFuture the submission answers with."""
        out: dict[str, Any] = {"request_id": self.request_id, "model_id": self.model_id}
        if self.sample_sequence_ids is not None:
            out["sample_sequence_ids"] = self.sample_sequence_ids
        return out


@dataclass(eq=False)
class Session:
    session_id: str
    tenant: str
    last_seen: float = field(default_factory=time.monotonic)
    model_ids: set[str] = field(default_factory=set)
    sampler_ids: set[str] = field(default_factory=set)
    created_models: dict[int, str] = field(default_factory=dict)  # model_seq_id -> request_id
    finished: bool = False
    user_metadata: dict[str, Any] | None = None


@dataclass(eq=False)
class TrainingModel:
    model_id: str
    tenant: str
    session_id: str
    base_model: str
    shape: LoraShape
    user_metadata: dict[str, Any] | None
    next_seq: int = 1
    pending: dict[int, tuple[Future, Callable[[], Result]]] = field(default_factory=dict)
    by_seq: OrderedDict[int, Future] = field(default_factory=OrderedDict)
    last_request: float = field(default_factory=time.time)
    ready: bool = False


@dataclass(eq=False)
class Sampler:
    sampler_id: str
    tenant: str
    base_model: str
    model_path: str | None
    snapshot: Snapshot | None
    ephemeral: bool = False
    by_seq: OrderedDict[int, Future] = field(default_factory=OrderedDict)


class Futures:
    """Request ids, results, long-poll, and the worker thread that computes them."""

    def __init__(self) -> None:
        self._futures: OrderedDict[str, Future] = OrderedDict()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="whetstone-worker")
        self._idempotent: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self.in_flight = 0

    def new(self, tenant: str, model_id: str | None = None) -> Future:
        self._expire()
        future = Future(f"req-{secrets.token_hex(12)}", tenant, model_id=model_id)
        self._futures[future.request_id] = future
        return future

    def failed(self, tenant: str, message: str, model_id: str | None = None) -> Future:
        future = self.new(tenant, model_id)
        future.finish(error_body(message))
        return future

    def get(self, tenant: str, request_id: str) -> Future:
        future = self._futures.get(request_id)
        if future is None or future.tenant != tenant:
            raise NotFound(f"future {request_id!r}")
        return future

    def remembered(self, tenant: str, key: str | None) -> Future | None:
        return self._idempotent.get((tenant, key)) if key else None

    def remember(self, tenant: str, key: str | None, future: Future) -> None:
        if key:
            self._idempotent[(tenant, key)] = future
            while len(self._idempotent) > MAX_FUTURES:
                self._idempotent.popitem(last=False)

    def run(self, future: Future, work: Callable[[], Result]) -> None:
        """Queue `work` on the worker thread now; its result (or its error as the client's error body)
        completes `future`."""
        loop = asyncio.get_running_loop()
        self.in_flight += 1
        job = loop.run_in_executor(self._executor, _guarded, work)

        def done(task: asyncio.Future[Result]) -> None:
            self.in_flight -= 1
            future.finish(task.result())

        job.add_done_callback(done)

    async def call(self, work: Callable[[], Any]) -> Any:
        """Run `work` on the worker thread and wait for it (plain, non-future endpoints)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work)

    def _expire(self) -> None:
        cutoff = time.monotonic() - FUTURE_TTL_SECONDS
        while self._futures:
            oldest = next(iter(self._futures.values()))
            if len(self._futures) < MAX_FUTURES and (oldest.created > cutoff or not oldest.done.is_set()):
                break
            self._futures.popitem(last=False)

    def forget_tenant_session(self, predicate: Callable[[Future], bool]) -> None:
        for rid in [r for r, f in self._futures.items() if predicate(f)]:
            del self._futures[rid]

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


def _guarded(work: Callable[[], Result]) -> Result:
    """Errors become the body the client raises cleanly: user mistakes as 'user', bugs as 'server'."""
    try:
        return work()
    except UserError as e:
        return error_body(str(e), "user")
    except NotFound as e:
        return error_body(f"not found: {e}", "user")
    except Exception as e:  # a bug or an exhausted resource: report it, keep serving the others
        LOG.exception("request failed")
        return error_body(f"{type(e).__name__}: {e}", "server")


class Ordering:
    """Strict seq_id order per training model, de-duplicated by (model, seq_id)."""

    def __init__(self, futures: Futures) -> None:
        self.futures = futures

    def submit(self, model: TrainingModel, seq_id: int | None, work: Callable[[], Result]) -> Future:
        if seq_id is None:
            seq_id = max([model.next_seq - 1, *model.pending]) + 1
        known = model.by_seq.get(seq_id)
        if known is not None:
            return known  # a resend: the same future, no second effect
        if seq_id < model.next_seq:
            return self.futures.failed(
                model.tenant,
                f"seq_id {seq_id} of {model.model_id} was already processed and is forgotten",
                model.model_id,
            )
        if seq_id - model.next_seq > 100_000:
            return self.futures.failed(
                model.tenant, f"seq_id {seq_id} is far ahead of {model.next_seq}", model.model_id
            )
        future = self.futures.new(model.tenant, model.model_id)
        model.by_seq[seq_id] = future
        while len(model.by_seq) > MAX_REMEMBERED_SEQ:
            model.by_seq.popitem(last=False)
        model.pending[seq_id] = (future, work)
        model.last_request = time.time()
        self._pump(model)
        return future

    def _pump(self, model: TrainingModel) -> None:
        while model.ready and model.next_seq in model.pending:
            future, work = model.pending.pop(model.next_seq)
            model.next_seq += 1
            self.futures.run(future, work)

    def mark_ready(self, model: TrainingModel) -> None:
        model.ready = True
        self._pump(model)
