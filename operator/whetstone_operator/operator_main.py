"""`whetstone operator`: run the kopf operator against the current kubeconfig (or in-cluster config).

kopf's own state goes to annotations with the whetstone.dev prefix (never into status, where structural
schema pruning would drop it); no peering (one replica, `strategy: Recreate`); no namespace or CRD scanning,
so RBAC needs no cluster-wide list of namespaces or CRDs.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from typing import Any

from whetstone_api.wire import MASTER_PORT, STATUS_PORT

from .children import DEFAULT_TRAINER_IMAGE, ChildSettings
from .config import OperatorConfig


def _api_client() -> Any:
    import kubernetes

    configuration = kubernetes.client.Configuration()
    try:
        kubernetes.config.load_incluster_config(client_configuration=configuration)
    except kubernetes.config.ConfigException:
        kubernetes.config.load_kube_config(client_configuration=configuration)
    # Many sync handlers share the client; urllib3's default pool of 4 would serialise them.
    configuration.connection_pool_maxsize = 64
    return kubernetes.client.ApiClient(configuration)


def wait_for_crds(api_client: Any, timeout: float = 120.0) -> None:
    """kopf looks its resources up once, at start (scanning is off, so RBAC needs no cluster-wide list of
    CRDs): an operator started before its CRDs (a first install, where the pod can win the race) would never
    serve them. Wait until the API serves every Whetstone kind; after `timeout`, exit so the pod restarts."""
    import kubernetes
    from whetstone_api import API_GROUP, API_VERSION
    from whetstone_api.crd import KINDS

    wanted = {k.plural for k in KINDS}
    custom = kubernetes.client.CustomObjectsApi(api_client)
    deadline, said = time.monotonic() + timeout, False
    while True:
        try:
            served = {r.name for r in custom.get_api_resources(API_GROUP, API_VERSION).resources}
        except kubernetes.client.ApiException as e:
            if e.status != 404:
                raise
            served = set()
        missing = sorted(wanted - served)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise SystemExit(
                f"the CRDs of {', '.join(missing)}.{API_GROUP} are not installed: apply crds/ "
                "(kubectl apply --server-side -f crds/) or install the chart with crds.install=true"
            )
        if not said:
            logging.getLogger("whetstone.operator").info("waiting for the CRDs of %s", ", ".join(missing))
            said = True
        time.sleep(2)


def run_operator(config: OperatorConfig) -> None:
    import kopf

    from .handlers import Reconciler, register
    from .metrics import OperatorMetrics, serve

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kopf logs every handler call at INFO; the story is told by whetstone.operator's lines.
    logging.getLogger("kopf").setLevel(logging.WARNING)
    wait_for_crds(_api_client())
    registry = kopf.OperatorRegistry()
    metrics = OperatorMetrics()
    state: dict[str, Any] = {"metrics": metrics}
    register(registry, config, state)

    @kopf.on.login(registry=registry)
    def login(**kwargs: Any) -> Any:
        # An own registry has none of kopf's default login handlers: use the kubeconfig / in-cluster config.
        return kopf.login_via_client(**kwargs)

    @kopf.on.startup(registry=registry)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.persistence.finalizer = "whetstone.dev/finalizer"
        settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="whetstone.dev")
        settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
            prefix="whetstone.dev", key="last-handled-configuration"
        )
        settings.watching.server_timeout = 600
        settings.watching.client_timeout = 660
        settings.networking.error_backoffs = [1, 2, 5, 10, 20, 30]
        settings.execution.max_workers = config.workers
        settings.scanning.disabled = True
        settings.posting.level = logging.INFO
        state["reconciler"] = Reconciler(config, _api_client(), metrics)
        state["http"] = await serve(metrics, config.host, config.port)
        logging.getLogger("whetstone.operator").info(
            "operator started: /healthz and /metrics on %s:%d, namespaces %s",
            config.host,
            config.port,
            ",".join(config.namespaces) or "all",
        )

    @kopf.on.cleanup(registry=registry)
    async def cleanup(**_: Any) -> None:
        if "http" in state:
            await state["http"].cleanup()

    asyncio.run(
        kopf.operator(
            registry=registry,
            standalone=True,
            clusterwide=not config.namespaces,
            namespaces=config.namespaces,
        )
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "-n",
        "--namespace",
        action="append",
        default=[],
        help="watch this namespace (repeatable; default: all)",
    )
    p.add_argument("--port", type=int, default=8080, help="port of /healthz and /metrics (default 8080)")
    p.add_argument("--host", default="0.0.0.0", help="address of /healthz and /metrics (default 0.0.0.0)")
    p.add_argument("--resync-seconds", type=float, default=10.0, help="level-based resync of every job")
    p.add_argument(
        "--progress-seconds", type=float, default=15.0, help="least time between status.progress writes"
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
    p.add_argument("--workers", type=int, default=16, help="threads running handlers")
    p.add_argument(
        "--termination-grace-seconds", type=int, default=30, help="grace period of the trainer pods"
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


def config_from_args(args: argparse.Namespace) -> OperatorConfig:
    return OperatorConfig(
        namespaces=list(args.namespace),
        port=args.port,
        host=args.host,
        resync_seconds=args.resync_seconds,
        progress_seconds=args.progress_seconds,
        workers=args.workers,
        children=ChildSettings(
            trainer_image=args.trainer_image,
            termination_grace_seconds=args.termination_grace_seconds,
            master_port=args.master_port,
            status_port=args.trainer_status_port,
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
    run_operator(config_from_args(args))
    return 0
