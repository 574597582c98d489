"""The trainer's HTTP face in a pod: /healthz, /metrics (Prometheus) and /status (JSON).

The trainer needs no Kubernetes credentials: the operator polls rank 0's /status and turns it into the
FineTuneJob's status and Checkpoint resources. /status is whetstone_api.wire.TrainerReport as JSON.

Metric names (prefix whetstone_trainer_) are defined in metrics.py and only there.
"""

from __future__ import annotations

import json
import math
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from whetstone_api.wire import TrainerReport

from .checkpoints import STATE_FILE, list_checkpoints
from .metrics import EVAL_LOSS, LOSS, REWARD_MEAN, TOKENS_PER_SECOND, TrainerMetrics


class TrainerStatus:
    """Observer of the training loop that keeps what /status and /metrics serve. Thread-safe."""

    def __init__(self, job: str, output: Path, rank: int = 0, world_size: int = 1) -> None:
        self._lock = threading.Lock()
        self.metrics = TrainerMetrics(job)
        self.output = output
        self.state: dict[str, Any] = {
            "job": job,
            "rank": rank,
            "worldSize": world_size,
            "phase": "Starting",
            "step": 0,
            "totalSteps": None,
            "epoch": None,
            "loss": None,
            "evalLoss": None,
            "reward": None,
            "tokensPerSecond": None,
            "etaSeconds": None,
            "startedAt": datetime.now(UTC).isoformat(timespec="seconds"),
            "checkpoints": [],
            "output": None,
            "message": None,
        }
        self._started = time.monotonic()
        self._first_step: int | None = None

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return json.loads(json.dumps(self.state))

    def report(self) -> TrainerReport:
        """What /status serves: the state as the contract's typed report."""
        return TrainerReport.model_validate(self.snapshot(), strict=False)

    # --- Observer
    def on_start(self, start_step: int, total_steps: int) -> None:
        with self._lock:
            self.state.update(phase="Training", step=start_step, totalSteps=total_steps)
            self.state["checkpoints"] = _kept_checkpoints(self.output)
            self._first_step, self._started = start_step, time.monotonic()
        self.metrics.set_progress(start_step, total_steps)

    def on_step(self, m: dict[str, Any]) -> None:
        done_here = m["step"] - (self._first_step or 0)
        elapsed = time.monotonic() - self._started
        eta = int(elapsed / done_here * (m["total_steps"] - m["step"])) if done_here > 0 else None
        with self._lock:
            self.state.update(
                step=m["step"],
                totalSteps=m["total_steps"],
                epoch=m.get("epoch"),
                loss=_finite(m.get(LOSS.key)),
                tokensPerSecond=_finite(m.get(TOKENS_PER_SECOND.key)),
                etaSeconds=eta,
            )
            if m.get(EVAL_LOSS.key) is not None:
                self.state["evalLoss"] = _finite(m[EVAL_LOSS.key])
            if m.get(REWARD_MEAN.key) is not None:
                self.state["reward"] = _finite(m[REWARD_MEAN.key])
        self.metrics.record_step({k: v for k, v in m.items() if not isinstance(v, float) or math.isfinite(v)})

    def on_grades(self, latencies: dict[str, list[float]], errors: dict[tuple[str, str], int]) -> None:
        self.metrics.record_grades(latencies, errors)

    def on_checkpoint(self, step: int, path: Path, pruned: list[Path]) -> None:
        with self._lock:
            self.state["checkpoints"] = _kept_checkpoints(self.output)
        self.metrics.record_checkpoint(len(pruned))

    def on_finish(self, summary: dict[str, Any]) -> None:
        with self._lock:
            self.state.update(phase="Finished", output=summary.get("output"), etaSeconds=0)

    def fail(self, message: str) -> None:
        with self._lock:
            self.state.update(phase="Failed", message=message)


def _finite(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None


def _kept_checkpoints(output: Path) -> list[dict[str, Any]]:
    kept = []
    for step, path in list_checkpoints(output):
        state = json.loads((path / STATE_FILE).read_text())
        kept.append(
            {"step": step, "uri": str(path), "kind": "resumable", "metrics": state.get("metrics", {})}
        )
    return kept


def serve(status: TrainerStatus, port: int, host: str = "0.0.0.0") -> ThreadingHTTPServer:
    """Start the endpoints on a daemon thread; returns the server (its port, when 0 was asked)."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (the http.server API)
            if self.path == "/healthz":
                self._send(200, b"ok\n", "text/plain")
            elif self.path == "/status":
                self._send(200, status.report().to_json().encode(), "application/json")
            elif self.path == "/metrics":
                self._send(200, generate_latest(status.metrics.registry), CONTENT_TYPE_LATEST)
            else:
                self._send(404, b"not found\n", "text/plain")

        def _send(self, code: int, body: bytes, content_type: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # polled every few seconds; access logs would drown the training log

    server = ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="status-server", daemon=True).start()
    return server
