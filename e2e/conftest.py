"""Session fixtures for the e2e tier: one loopback control plane for the whole session.

Teardown is guaranteed four ways: the fixture's finalizer, an atexit hook, SIGTERM/SIGHUP turned into
KeyboardInterrupt (so pytest unwinds and runs finalizers), and PR_SET_PDEATHSIG on every component (the kernel
kills them if pytest itself is SIGKILLed). Set WHETSTONE_E2E_REUSE=1 to run against a cluster started with
`e2e/cluster up` instead (it is left running).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import kubernetes
import pytest
from helpers import Cluster, wait_for
from localcluster import DEFAULT_CLUSTER_DIR, ClusterState, LocalCluster


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        item.add_marker(pytest.mark.e2e)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    if os.environ.get("WHETSTONE_E2E_REUSE") == "1":
        state = ClusterState.load(DEFAULT_CLUSTER_DIR)
        if state is None:
            pytest.exit("WHETSTONE_E2E_REUSE=1 but no cluster is up (run e2e/cluster up)", returncode=2)
        yield Cluster.connect(state)
        return

    local = LocalCluster(tmp_path_factory.mktemp("cluster"), attached=True)
    atexit.register(local.down)
    previous = {s: signal.signal(s, _interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        state = local.up(build=os.environ.get("WHETSTONE_E2E_NO_BUILD") != "1")
        yield Cluster.connect(state)
    finally:
        local.down()
        for s, handler in previous.items():
            signal.signal(s, handler)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, ready for pods (its default ServiceAccount exists)."""
    base = request.node.name.lower().replace("_", "-")
    name = f"{''.join(ch for ch in base if ch.isalnum() or ch == '-')[:40].strip('-')}-{uuid.uuid4().hex[:5]}"
    cluster.core.create_namespace({"metadata": {"name": name, "labels": {"whetstone.dev/e2e": "true"}}})

    def has_default_sa() -> bool:
        try:
            cluster.core.read_namespaced_service_account("default", name)
            return True
        except kubernetes.client.ApiException:
            return False

    wait_for(has_default_sa, 60, f"default ServiceAccount in {name}")
    yield name
    with contextlib.suppress(kubernetes.client.ApiException):
        cluster.core.delete_namespace(name)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent
