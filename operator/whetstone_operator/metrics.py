"""The operator's own Prometheus metrics and its /healthz + /metrics endpoint.

Names and labels are defined here and only here (documented in the README's operator section). Label
cardinality is bounded: kind, result, phase, namespace, resource; no job names, steps or losses.
"""

from __future__ import annotations

import threading
from collections import Counter as Tally
from collections.abc import Iterator

from aiohttp import web
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
            "Watch events seen, by resource (finetunejobs, pods, checkpoints)",
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
        self.jobs = JobPhases()
        r.register(self.jobs)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


async def serve(metrics: OperatorMetrics, host: str, port: int) -> web.AppRunner:
    """/healthz and /metrics on the operator's event loop."""

    async def healthz(_: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def exposition(_: web.Request) -> web.Response:
        body = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", exposition)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
