"""The HTTP face of the training service (aiohttp): the endpoints the official `tinker` 0.38 client calls,
under /api/v1, plus the service's own /whetstone/status for the operator.

Conventions kept here (tinker-protocol.md §1-§4):
- every /api/v1 request carries X-API-Key; a missing or unknown key gets 401 with a JSON body;
- another key's objects are 404, exactly like missing ones;
- a failed *operation* is HTTP 200 {"error", "category"} from retrieve_future (the client raises
  RequestFailedError); a bad plain request is 400 with a JSON body (never empty: the client retries bare
  400s as proxy resets); 402 is never sent;
- a resent non-GET request with the same X-Idempotency-Key gets the answer of the first;
- results of forward_backward and sample are protobuf; everything else JSON.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web

from . import protocol as p
from .operations import TrainingService
from .protocol import NotFound, UserError

LOG = logging.getLogger("whetstone.service")
PROTOBUF = "application/x-protobuf"
TENANT = web.AppKey("tenant", str)
SERVICE = web.AppKey("service", TrainingService)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def tenant_of(key: str) -> str:
    """The owner of everything a key creates: a digest, so keys never appear in paths, logs or status."""
    return "t" + hashlib.sha256(key.encode()).hexdigest()[:16]


class Keys:
    """Accepted API keys. Empty: any key is accepted (local use), each still its own tenant."""

    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = {hashlib.sha256(k.encode()).digest() for k in keys if k}

    @property
    def open(self) -> bool:
        return not self._digests

    def accepts(self, key: str) -> bool:
        if not key:
            return False
        if self.open:
            return True
        digest = hashlib.sha256(key.encode()).digest()
        return any(hmac.compare_digest(digest, d) for d in self._digests)


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, default=str))


def _error(status: int, message: str, category: str = "user") -> web.Response:
    return _json({"error": message, "category": category, "detail": message}, status=status)


async def _body(request: web.Request) -> Any:
    try:
        return await request.json(loads=json.loads)
    except (ValueError, UnicodeDecodeError):
        raise UserError("the request body is not valid JSON") from None


def build_app(service: TrainingService, keys: Keys) -> web.Application:
    @web.middleware
    async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        if path.startswith("/api/v1/") and path != "/api/v1/healthz":
            key = request.headers.get("X-API-Key", "")
            if not keys.accepts(key):
                return _error(401, "invalid or missing API key (send it as X-API-Key)")
            request[TENANT] = tenant_of(key)
            service.touch()
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status >= 400 and not e.text:
                return _error(e.status, e.reason)
            if e.status >= 400 and (e.content_type or "").startswith("text/"):
                return _error(e.status, e.text or e.reason)
            raise
        except UserError as e:
            return _error(400, str(e))
        except NotFound as e:
            return _error(404, f"not found: {e}")
        except Exception as e:  # a bug: answer, log, keep serving
            LOG.exception("%s %s failed", request.method, path)
            return _error(500, f"internal error: {type(e).__name__}: {e}", "server")

    app = web.Application(middlewares=[guard], client_max_size=service.limits.max_request_bytes)
    app[SERVICE] = service
    r = app.router

    def future_endpoint(
        submit: Callable[[str, Any], Any], parse: Callable[[web.Request], Awaitable[Any]]
    ) -> Handler:
        """Submission of a → future call: idempotent by X-Idempotency-Key; a bad request fails the future."""

        async def handle(request: web.Request) -> web.Response:
            tenant = request[TENANT]
            key = request.headers.get("X-Idempotency-Key")
            seen = service.futures.remembered(tenant, key)
            if seen is not None:
                return _json(seen.promise())
            try:
                body = await parse(request)
                future = submit(tenant, body)
                if asyncio.iscoroutine(future):
                    future = await future
            except UserError as e:
                future = service.futures.failed(tenant, str(e))
            service.futures.remember(tenant, key, future)
            return _json(future.promise())

        return handle

    def json_of(model: type[p.Request]) -> Callable[[web.Request], Awaitable[Any]]:
        async def parse(request: web.Request) -> Any:
            return p.parse_json(model, await _body(request))

        return parse

    async def proto_body(request: web.Request) -> p.ForwardBackwardCall:
        if request.headers.get("Content-Encoding", "identity") not in ("identity", ""):
            raise UserError("compressed bodies are not accepted (proto_compress_fwdbwd is off)")
        return p.decode_forward_backward(await request.read())

    # --- handshake and session --------

    async def client_config(request: web.Request) -> web.Response:
        return _json(
            {
                "pjwt_auth_enabled": False,
                "proto_compress_fwdbwd": False,
                "parallel_fwdbwd_chunks": True,
                "sample_use_retrieve_futures": False,
                "custom_loss_server_side": False,
                "sample_join_sampling_session": False,
            }
        )

    async def dynamic_config(request: web.Request) -> web.Response:
        return _json({"sample_cancel_enabled": False})

    async def create_session(request: web.Request) -> web.Response:
        return _json(
            service.create_session(request[TENANT], p.parse_json(p.CreateSession, await _body(request)))
        )

    async def heartbeat(request: web.Request) -> web.Response:
        req = p.parse_json(p.SessionRef, await _body(request))
        if not service.heartbeat(request[TENANT], req.session_id):
            return _error(410, f"session {req.session_id} is finished or was released")
        return _json({"type": "session_heartbeat"})

    async def finish(request: web.Request) -> web.Response:
        body = await _body(request)
        reason = (body.get("reason") or {}).get("type", "success") if isinstance(body, dict) else "success"
        await service.finish_session(
            request[TENANT], request.match_info["session_id"], f"client closed: {reason}"
        )
        return _json({})

    async def telemetry(request: web.Request) -> web.Response:
        return _json({"status": "accepted"})

    async def capabilities(request: web.Request) -> web.Response:
        return _json(
            {
                "supported_models": [
                    {
                        "model_name": service.model_name,
                        "max_context_length": service.engine.max_length,
                        "trainable": True,
                        "sampleable": True,
                    }
                ]
            }
        )

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    # --- training --------

    async def get_info(request: web.Request) -> web.Response:
        req = p.parse_json(p.ModelRef, await _body(request))
        return _json(service.get_info(request[TENANT], req.model_id))

    async def create_sampling_session(request: web.Request) -> web.Response:
        req = p.parse_json(p.CreateSamplingSession, await _body(request))
        return _json(await service.create_sampling_session(request[TENANT], req))

    async def get_sampler(request: web.Request) -> web.Response:
        return _json(service.get_sampler(request[TENANT], request.match_info["sampler_id"]))

    async def retrieve(request: web.Request) -> web.StreamResponse:
        req = p.parse_json(p.RetrieveFuture, await _body(request))
        future = await service.retrieve(request[TENANT], req)
        if future is None:
            return _json({"type": "try_again", "request_id": req.request_id, "queue_state": "active"})
        result = future.result
        if isinstance(result, bytes):
            return web.Response(body=result, content_type=PROTOBUF)
        return _json(result)

    # --- REST --------

    async def training_run(request: web.Request) -> web.Response:
        return _json(service.training_run(request[TENANT], request.match_info["run_id"]))

    async def training_runs(request: web.Request) -> web.Response:
        try:
            limit = min(max(int(request.query.get("limit", 20)), 1), 1000)
            offset = max(int(request.query.get("offset", 0)), 0)
        except ValueError:
            raise UserError("limit and offset must be integers") from None
        return _json(service.training_runs(request[TENANT], limit, offset))

    async def checkpoints(request: web.Request) -> web.Response:
        return _json(service.list_checkpoints(request[TENANT], request.match_info["run_id"]))

    async def delete_checkpoint(request: web.Request) -> web.Response:
        m = request.match_info
        service.delete_checkpoint(request[TENANT], m["run_id"], m["kind"], m["name"])
        return _json({})

    async def weights_info(request: web.Request) -> web.Response:
        req = p.parse_json(p.WeightsInfo, await _body(request))
        return _json(service.weights_info(request[TENANT], req.tinker_path))

    async def whetstone_status(request: web.Request) -> web.Response:
        return _json(service.status())

    v1 = "/api/v1"
    r.add_post(f"{v1}/client/config", client_config)
    r.add_post(f"{v1}/client/dynamic_config", dynamic_config)
    r.add_post(f"{v1}/create_session", create_session)
    r.add_post(f"{v1}/session_heartbeat", heartbeat)
    r.add_post(f"{v1}/sessions/{{session_id}}/finish", finish)
    r.add_post(f"{v1}/telemetry", telemetry)
    r.add_get(f"{v1}/get_server_capabilities", capabilities)
    r.add_get(f"{v1}/healthz", healthz)
    r.add_post(f"{v1}/create_model", future_endpoint(service.create_model, json_of(p.CreateModel)))
    r.add_post(f"{v1}/get_info", get_info)
    r.add_post(f"{v1}/forward_backward", future_endpoint(service.forward_backward, proto_body))
    r.add_post(f"{v1}/optim_step", future_endpoint(service.optim_step, json_of(p.OptimStep)))
    r.add_post(f"{v1}/save_weights", future_endpoint(service.save_state, json_of(p.SaveWeights)))
    r.add_post(
        f"{v1}/save_weights_for_sampler",
        future_endpoint(service.save_for_sampler, json_of(p.SaveWeightsForSampler)),
    )
    r.add_post(f"{v1}/load_weights", future_endpoint(service.load_weights, json_of(p.LoadWeights)))
    r.add_post(f"{v1}/create_sampling_session", create_sampling_session)
    r.add_get(f"{v1}/samplers/{{sampler_id}}", get_sampler)
    r.add_post(f"{v1}/asample", future_endpoint(service.sample, json_of(p.SampleRequest)))
    r.add_post(f"{v1}/retrieve_future", retrieve)
    r.add_get(f"{v1}/training_runs", training_runs)
    r.add_get(f"{v1}/training_runs/{{run_id}}", training_run)
    r.add_get(f"{v1}/training_runs/{{run_id}}/checkpoints", checkpoints)
    r.add_delete(f"{v1}/training_runs/{{run_id}}/checkpoints/{{kind}}/{{name}}", delete_checkpoint)
    r.add_post(f"{v1}/weights_info", weights_info)
    r.add_get("/whetstone/status", whetstone_status)
    r.add_get("/healthz", healthz)

    async def idle_reaper(app: web.Application) -> Any:
        async def loop() -> None:
            while True:
                await asyncio.sleep(min(30.0, service.limits.idle_timeout_seconds / 4))
                try:
                    await service.release_idle()
                except Exception:
                    LOG.exception("releasing idle sessions failed")

        task = asyncio.create_task(loop())
        yield
        task.cancel()
        service.futures.shutdown()

    app.cleanup_ctx.append(idle_reaper)
    return app


def serve(service: TrainingService, keys: Keys, host: str, port: int) -> None:
    """Run until interrupted. One process, one base model."""
    app = build_app(service, keys)
    LOG.info(
        "serving %s as %r on http://%s:%d (%s)",
        service.engine.base_model_uri,
        service.model_name,
        host,
        port,
        "any API key, one tenant per key" if keys.open else "API keys required",
    )
    # A long-polling client must not hold a shutdown for the default 60 s.
    web.run_app(
        app, host=host, port=port, print=None, access_log=None, handle_signals=True, shutdown_timeout=5
    )
