"""The operator's own Prometheus metrics and its /healthz + /metrics endpoint.

Names and labels are defined here and only here (documented in the README's operator section). Label
cardinality is bounded: kind, result, phase, namespace, resource; per-job series (step, loss, reward, label
`job`) exist only while the job exists and are removed when it is deleted.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections import Counter as Tally
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from whetstone_api.reasons import JOB_PHASES

PHASES = JOB_PHASES


class JobPhases(Collector):
    """whetstone_jobs{namespace,phase}: computed at scrape time from what the reconciles last saw."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._phase: dict[tuple[str, str], str] = {}

    def set(self, namespace: str, name: str, phase: str) -> None:
        with self._lock:
            self._phase[(namespace, name)] = phase

    def forget(self, namespace: str, name: str) -> None:
        with self._lock:
            self._phase.pop((namespace, name), None)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        with self._lock:
            tally = Tally((ns, phase) for (ns, _), phase in self._phase.items())
        family = GaugeMetricFamily(
            "whetstone_jobs", "FineTuneJobs by namespace and phase", labels=["namespace", "phase"]
        )
        namespaces = sorted({ns for ns, _ in tally})
        for ns in namespaces:
            for phase in PHASES:
                family.add_metric([ns, phase], tally.get((ns, phase), 0))
        yield family


class OperatorMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.reconciles = Counter(
            "whetstone_operator_reconciles",
            "Reconciles by kind of resource and result (ok or error)",
            ["kind", "result"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "whetstone_operator_reconcile_duration_seconds",
            "Time one reconcile took, API calls included",
            ["kind"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.watch_events = Counter(
            "whetstone_operator_watch_events",
            "Watch events seen, by resource (finetunejobs, pods, checkpoints, ...)",
            ["resource"],
            registry=r,
        )
        self.last_watch_event = Gauge(
            "whetstone_operator_last_watch_event_timestamp_seconds",
            "Unix time of the latest watch event, by resource (a stalled watch stops moving it)",
            ["resource"],
            registry=r,
        )
        self.time_to_running = Histogram(
            "whetstone_job_time_to_running_seconds",
            "Time from a FineTuneJob's creation to all its pods running (first attempt)",
            ["namespace"],
            buckets=(1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
            registry=r,
        )
        self.restarts = Counter(
            "whetstone_job_restarts",
            "Whole-group restarts of FineTuneJobs after a pod failure",
            ["namespace"],
            registry=r,
        )
        self.transitions = Counter(
            "whetstone_job_transitions",
            "FineTuneJob phase changes, by the phase entered",
            ["namespace", "phase"],
            registry=r,
        )
        self.checkpoints = Counter(
            "whetstone_checkpoints_created",
            "Checkpoint resources created from what the trainers reported",
            ["namespace"],
            registry=r,
        )
        self.disruptions = Counter(
            "whetstone_job_disruptions",
            "Whole-group restarts of FineTuneJobs after a disruption (not counted against backoffLimit)",
            ["namespace"],
            registry=r,
        )
        self.api_calls = Counter(
            "whetstone_operator_api_calls",
            "API server calls the operator made, by resource and verb (watches excluded)",
            ["resource", "verb"],
            registry=r,
        )
        self.events_dropped = Counter(
            "whetstone_operator_events_dropped",
            "Events not posted because the background queue was full (the API server fell behind)",
            registry=r,
        )
        self.job_step = Gauge(
            "whetstone_job_step", "Optimizer steps done, per FineTuneJob", ["namespace", "job"], registry=r
        )
        self.job_loss = Gauge(
            "whetstone_job_loss", "Latest training loss, per FineTuneJob", ["namespace", "job"], registry=r
        )
        self.job_reward = Gauge(
            "whetstone_job_reward",
            "Latest mean RFT reward, per FineTuneJob",
            ["namespace", "job"],
            registry=r,
        )
        self.jobs = JobPhases()
        r.register(self.jobs)

    def set_progress(self, namespace: str, job: str, progress: dict[str, object]) -> None:
        for gauge, key in ((self.job_step, "step"), (self.job_loss, "loss"), (self.job_reward, "reward")):
            value = progress.get(key)
            if isinstance(value, int | float):
                gauge.labels(namespace, job).set(value)

    def forget_job(self, namespace: str, job: str) -> None:
        """A deleted job leaves no series behind."""
        self.jobs.forget(namespace, job)
        for gauge in (self.job_step, self.job_loss, self.job_reward):
            with contextlib.suppress(KeyError):
                gauge.remove(namespace, job)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def serve(metrics: OperatorMetrics, host: str, port: int) -> ThreadingHTTPServer:
    """/healthz and /metrics, answered by a thread of the standard library's HTTP server (aiohttp's took
    a few tenths of a second to import before the operator could act); `shutdown()` stops it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the name http.server calls
            self._answer(with_body=True)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(with_body=False)

        def _answer(self, with_body: bool) -> None:
            path = urlsplit(self.path).path
            if path == "/healthz":
                body, content_type = b"ok\n", "text/plain; charset=utf-8"
            elif path == "/metrics":
                body, content_type = metrics.exposition(), CONTENT_TYPE_LATEST
            else:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - no access log
            pass

    class Server(ThreadingHTTPServer):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        daemon_threads = True

    server = Server((host, port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics", daemon=True).start()
    return server
