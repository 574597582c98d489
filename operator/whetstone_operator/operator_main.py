"""`whetstone operator`: run the operator against the current kubeconfig (or in-cluster config).

One active replica: with leader election (the default) a replica first takes the Lease `lease_name` in
`lease_namespace` and only then starts watching and acting; the others wait (their /healthz answers). A
replica that loses the Lease stops and exits, so its Deployment restarts it as a standby.

The jobs and their children are listed and watched by the operator's own informers (informers.py); kopf runs
only the RewardGrader checks and the TrainingSessions (no peering, no Event posting, no namespace or CRD
scanning); the work queue, the resync and the status poller are the operator's own (handlers.py).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from whetstone_api.wire import MASTER_PORT, STATUS_PORT

from .children import DEFAULT_TRAINER_IMAGE, ChildSettings
from .config import OperatorConfig
from .events import EventRecorder

LOG = logging.getLogger("whetstone.operator")


def _api_client(config: OperatorConfig) -> Any:
    import kubernetes

    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    # The workers and the poller share the client; urllib3's default pool of 4 would serialise them.
    configuration.connection_pool_maxsize = max(64, config.workers * 2)
    # Resolve the proxy (from the kubeconfig, else the environment) once: left to the environment, the
    # client looks it up again on every request (a kubeconfig token's refresh hook sets the host each time),
    # a scan of os.environ that cost more CPU than the request's JSON.
    configuration.proxy = configuration.proxy
    return kubernetes.client.ApiClient(configuration)


def wait_for_crds(kube: Any, timeout: float = 120.0) -> None:
    """kopf looks its resources up once, at start (scanning is off, so RBAC needs no cluster-wide list of
    CRDs): an operator started before its CRDs (a first install, where the pod can win the race) would never
    serve them. Wait until the API serves every Whetstone kind; after `timeout`, exit so the pod restarts."""
    from whetstone_api import API_GROUP, API_VERSION, PLURALS

    wanted = set(PLURALS.values())
    deadline, said = time.monotonic() + timeout, False
    while missing := sorted(wanted - kube.served_resources(API_GROUP, API_VERSION)):
        if time.monotonic() > deadline:
            raise SystemExit(
                f"the CRDs of {', '.join(missing)}.{API_GROUP} are not installed: apply crds/ "
                "(kubectl apply --server-side -f crds/) or install the chart with crds.install=true"
            )
        if not said:
            LOG.info("waiting for the CRDs of %s", ", ".join(missing))
            said = True
        time.sleep(2)


# The longest the RewardGrader checks and TrainingSessions wait for the jobs' first passes after a start.
KOPF_START_DELAY = 20.0
KOPF_QUIET = 1.0


def run_operator(config: OperatorConfig) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kopf logs every watch event at DEBUG and handler runs at INFO; the story is told by whetstone.operator.
    logging.getLogger("kopf").setLevel(logging.WARNING)
    from .kube import Kube
    from .transport import Transport

    api = _api_client(config)
    kube = Kube(api, Transport.for_configuration(api.configuration))
    try:
        wait_for_crds(kube)
        config.kueue = kueue_served(kube)
        return asyncio.run(_run(config, kube))
    finally:
        if kube.transport is not None:
            kube.transport.close()


def kueue_served(kube: Any) -> bool:
    """Whether Kueue's Workload API is served: jobs labelled kueue.x-k8s.io/queue-name are then admitted
    through Kueue (their Workloads watched). Found once, like kopf's resources: installing Kueue later needs
    a restart of the operator (a queued job says so meanwhile)."""
    from .kueue import GROUP, VERSION, WORKLOADS

    served = WORKLOADS in kube.served_resources(GROUP, VERSION)
    if served:
        LOG.info("Kueue serves %s/%s: queued jobs wait for its admission", GROUP, WORKLOADS)
    else:
        LOG.info("no Kueue (%s/%s not served): queue labels are reported", GROUP, WORKLOADS)
    return served


async def _run(config: OperatorConfig, kube: Any) -> int:
    from .handlers import Reconciler, Resync, start_watches
    from .leader import LeaseElector
    from .metrics import OperatorMetrics, serve
    from .poller import StatusPoller
    from .store import Store
    from .workqueue import WorkQueue

    metrics = OperatorMetrics()
    kube.on_call = lambda resource, verb: metrics.api_calls.labels(resource, verb).inc()
    identity = config.identity or f"{socket.gethostname()}-{uuid.uuid4().hex[:6]}"
    http = serve(metrics, config.host, config.port)
    LOG.info("operator %s: /healthz and /metrics on %s:%d", identity, config.host, config.port)
    loop = asyncio.get_running_loop()
    stop = threading.Event()
    stop_flag = asyncio.Event()
    lost = threading.Event()
    elector = None
    queue: WorkQueue | None = None
    resync: Resync | None = None
    pool: ThreadPoolExecutor | None = None
    events: EventRecorder | None = None
    poller: StatusPoller | None = None
    try:
        if config.leader_election:
            elector = LeaseElector(
                kube,
                config.lease_namespace,
                config.lease_name,
                identity,
                duration=config.lease_seconds,
                renew_deadline=config.lease_seconds * 2 / 3,
                retry=max(config.lease_seconds / 7.5, 0.5),
            )
            acquire = loop.run_in_executor(None, elector.acquire, stop)
            try:
                if not await asyncio.shield(acquire):
                    return 0
            except asyncio.CancelledError:
                stop.set()
                raise

            def on_lost() -> None:
                lost.set()
                loop.call_soon_threadsafe(stop_flag.set)

            threading.Thread(target=elector.keep, args=(stop, on_lost), name="lease", daemon=True).start()

        store = Store()
        queue_ref: list[WorkQueue] = []
        poller = StatusPoller(
            threads=config.poll_threads,
            deadline=config.poll_deadline_seconds,
            on_done=lambda key: queue_ref[0].add(key[:2]),
        )
        # A pass's independent calls (a job's ConfigMap, Service and NetworkPolicy; its pods) run at once in
        # this pool, shared by the workers; its Events go to the recorder's one thread.
        pool = ThreadPoolExecutor(config.workers * 2, thread_name_prefix="create")
        events = EventRecorder(
            lambda obj, kind, etype, reason, message, when: kube.create_event(
                obj, kind, etype, reason, message, identity, when
            ),
            on_drop=metrics.events_dropped.inc,
        )
        reconciler = Reconciler(
            config,
            kube,
            store,
            metrics,
            poller,
            leading=(lambda: elector.leading) if elector else (lambda: True),
            identity=identity,
            pool=pool,
            events=events,
        )
        queue = WorkQueue(reconciler.reconcile, config.workers)
        queue_ref.append(queue)
        # The jobs and their children: listed, then watched, into the cache (informers.py). Jobs are worked on
        # once every watched resource was listed: a pass needs the whole cache.
        watches = start_watches(
            kube, config.namespaces, store, queue, metrics, reconciler.forget, stop, kueue_served=config.kueue
        )
        if not await loop.run_in_executor(
            None, _wait_listed, watches, lambda: stop.is_set() or lost.is_set()
        ):
            return 1 if lost.is_set() else 0
        queue.start()
        resync = Resync(store, queue, config.resync_seconds)  # started once every watch was listed
        resync.start()
        LOG.info("operator %s: watching %s", identity, ",".join(config.namespaces) or "all namespaces")
        # kopf runs the handlers that need its machinery (RewardGrader checks, TrainingSessions). Its import
        # and start-up take about half a CPU second, which the jobs' first passes need more: it starts once
        # they are done (at most KOPF_START_DELAY later). A grader keeps its Ready status meanwhile.
        if not await _first_passes_done(queue, stop_flag):
            return 1 if lost.is_set() else 0
        await _run_kopf(config, kube, elector, stop_flag)
    finally:
        stop.set()
        if resync is not None:
            resync.stopping.set()
        if queue is not None:
            queue.stop()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if poller is not None:
            poller.shutdown()
        if elector is not None:
            elector.release()
        if events is not None:  # after the lease is handed over: Events never delay the next leader
            events.close()
        http.shutdown()
        http.server_close()
    return 1 if lost.is_set() else 0


async def _first_passes_done(queue: Any, stop_flag: asyncio.Event) -> bool:
    """Until the work queue has been idle for KOPF_QUIET seconds (the start-up burst of passes is over: a
    job's pods going Running bring a second wave right after the first) or KOPF_START_DELAY passed; False
    when the operator stops first (a SIGTERM meanwhile releases the lease on the way out; kopf installs its
    own handlers once it runs)."""
    loop = asyncio.get_running_loop()
    with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread (tests)
        loop.add_signal_handler(signal.SIGTERM, stop_flag.set)
        loop.add_signal_handler(signal.SIGINT, stop_flag.set)
    deadline = time.monotonic() + KOPF_START_DELAY
    while not stop_flag.is_set() and time.monotonic() < deadline:
        idle = queue.idle_for()
        if idle >= KOPF_QUIET:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop_flag.wait(), max(0.1, KOPF_QUIET - idle))
    return not stop_flag.is_set()


def _wait_listed(watches: list[Any], stopping: Any) -> bool:
    """Until every informer delivered its first LIST; False when the operator stops first."""
    for watch in watches:
        while not watch.listed.wait(0.5):
            if stopping():
                return False
    return True


async def _run_kopf(config: OperatorConfig, kube: Any, elector: Any, stop_flag: asyncio.Event) -> None:
    import kopf

    from . import graders
    from .diffbase import ChangeDetectedOnly
    from .sessions import register as register_sessions

    registry = kopf.OperatorRegistry()
    # RewardGraders: their test cases run in sandbox processes and set their status, by the leader only.
    graders.register(
        registry,
        graders.GraderChecker(
            api=lambda: kube,
            leading=(lambda: elector.leading) if elector else (lambda: True),
        ),
    )
    register_sessions(registry, config, kube)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        # An own registry has no default login handlers: use the kubeconfig / in-cluster config.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.watching.server_timeout = 600
        settings.watching.client_timeout = 660
        settings.networking.error_backoffs = [1, 2, 5, 10, 20, 30]
        settings.execution.max_workers = 4
        # No essence (two deep copies of each body per event) for kinds only watched (diffbase.py).
        settings.persistence.diffbase_storage = ChangeDetectedOnly()
        settings.scanning.disabled = True
        settings.posting.enabled = False
        settings.peering.standalone = True

    await kopf.operator(
        registry=registry,
        standalone=True,
        clusterwide=not config.namespaces,
        namespaces=config.namespaces,
        stop_flag=stop_flag,
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable; default: all; give the RBAC of `python -m "
        "whetstone_operator.rbac --namespaces ...`)",
    )
    p.add_argument("--port", type=int, default=8080, help="port of /healthz and /metrics (default 8080)")
    p.add_argument("--host", default="0.0.0.0", help="address of /healthz and /metrics (default 0.0.0.0)")
    p.add_argument("--resync-seconds", type=float, default=10.0, help="level-based resync of every job")
    p.add_argument(
        "--progress-seconds", type=float, default=15.0, help="least time between reads of a trainer's /status"
    )
    p.add_argument("--trainer-image", default=DEFAULT_TRAINER_IMAGE, help="image of jobs without spec.image")
    p.add_argument(
        "--trainer-status-port",
        type=int,
        default=STATUS_PORT,
        help="port of the trainers' /healthz, /metrics, /status",
    )
    p.add_argument(
        "--master-port", type=int, default=MASTER_PORT, help="rendezvous port of rank 0 (MASTER_PORT)"
    )
    p.add_argument("--workers", type=int, default=16, help="reconcile worker threads")
    p.add_argument("--poll-threads", type=int, default=4, help="threads reading the trainers' /status")
    p.add_argument(
        "--poll-deadline-seconds", type=float, default=2.0, help="deadline of one whole /status read"
    )
    p.add_argument(
        "--termination-grace-seconds", type=int, default=30, help="grace period of the trainer pods"
    )
    p.add_argument(
        "--leader-elect",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="hold a Lease before acting, so one replica acts (default: on)",
    )
    p.add_argument(
        "--lease-namespace",
        default=os.environ.get("POD_NAMESPACE", "whetstone-system"),
        help="namespace of the Lease (default: $POD_NAMESPACE, else whetstone-system)",
    )
    p.add_argument("--lease-name", default="whetstone-operator", help="name of the Lease")
    p.add_argument("--lease-seconds", type=float, default=15.0, help="Lease duration (takeover after it)")
    p.add_argument(
        "--identity", default=os.environ.get("POD_NAME", ""), help="holder identity (default: $POD_NAME)"
    )
    p.add_argument(
        "--network-policy",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="give each job a NetworkPolicy: its ports reachable only from its own pods and the operator",
    )
    p.add_argument(
        "--operator-namespace",
        default=os.environ.get("POD_NAMESPACE", "whetstone-system"),
        help="namespace of the operator's pods (allowed to the trainers' status port)",
    )
    p.add_argument(
        "--operator-pod-label",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="label of the operator's pods (repeatable; default app.kubernetes.io/name=whetstone-operator)",
    )
    p.add_argument(
        "--trainer-node-selector",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        type=parse_node_selector,
        help="node selector of trainer pods whose job sets none (repeatable)",
    )
    p.add_argument(
        "--trainer-toleration",
        action="append",
        default=[],
        metavar="KEY[=VALUE][:EFFECT]",
        type=parse_toleration,
        help="toleration of trainer pods whose job sets none (repeatable; without =VALUE: operator Exists)",
    )
    p.add_argument(
        "--status-port-from-namespace",
        action="append",
        default=[],
        metavar="NAMESPACE",
        help="namespace whose pods may also reach the trainers' status port, e.g. monitoring (repeatable)",
    )


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    labels = tuple(tuple(item.split("=", 1)) for item in args.operator_pod_label if "=" in item)
    return OperatorConfig(
        namespaces=list(args.namespace),
        port=args.port,
        host=args.host,
        resync_seconds=args.resync_seconds,
        progress_seconds=args.progress_seconds,
        workers=args.workers,
        poll_threads=args.poll_threads,
        poll_deadline_seconds=args.poll_deadline_seconds,
        leader_election=args.leader_elect,
        lease_namespace=args.lease_namespace,
        lease_name=args.lease_name,
        lease_seconds=args.lease_seconds,
        identity=args.identity,
        children=ChildSettings(
            trainer_image=args.trainer_image,
            termination_grace_seconds=args.termination_grace_seconds,
            master_port=args.master_port,
            status_port=args.trainer_status_port,
            network_policy=args.network_policy,
            operator_namespace=args.operator_namespace,
            operator_pod_labels=labels or ChildSettings.operator_pod_labels,  # type: ignore[arg-type]
            status_port_namespaces=tuple(args.status_port_from_namespace),
            default_node_selector=tuple(args.trainer_node_selector),
            default_tolerations=tuple(args.trainer_toleration),
        ),
    )


def parse_node_selector(text: str) -> tuple[str, str]:
    """KEY=VALUE, as `kubectl label`."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE")
    return key, value


def parse_toleration(text: str) -> tuple[tuple[str, str], ...]:
    """KEY[=VALUE][:EFFECT], the spelling of `kubectl taint`; without a value the toleration uses Exists."""
    rest, _, effect = text.rpartition(":") if ":" in text else (text, "", "")
    key, sep, value = rest.partition("=")
    if effect and effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
        raise argparse.ArgumentTypeError(f"{text!r}: unknown effect {effect!r}")
    fields = {"key": key} if key else {}
    fields["operator"] = "Equal" if sep else "Exists"
    if sep:
        fields["value"] = value
    if effect:
        fields["effect"] = effect
    return tuple(fields.items())


def main(args: argparse.Namespace) -> int:
    return run_operator(config_from_args(args))
