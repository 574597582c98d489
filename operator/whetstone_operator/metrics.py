"""The operator's own Prometheus metrics and its /healthz + /metrics endpoint.

Names and labels are defined here and only here (documented in the README's operator section). Label
cardinality is bounded: kind, result, phase, namespace, resource; per-job series (step, loss, reward, label
`job`) exist only while the job exists and are removed when it is deleted.
"""

from __future__ import annotations

import contextlib
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
