"""Settings of one operator process (`whetstone operator --help`); no kopf here, so the CLI builds its
parser without importing the operator's dependencies."""

from __future__ import annotations

from dataclasses import dataclass, field

from .children import ChildSettings


@dataclass
class OperatorConfig:
    """Settings of one operator process (`whetstone operator --help`)."""

    namespaces: list[str] = field(default_factory=list)  # empty: all namespaces
    port: int = 8080  # /healthz and /metrics
    host: str = "0.0.0.0"
    resync_seconds: float = 10.0
    progress_seconds: float = 15.0
    workers: int = 16
    # Reads of the trainers' /status: threads, and the deadline of one whole read.
    poll_threads: int = 4
    poll_deadline_seconds: float = 2.0
    # Leader election: one replica acts, the others wait for the Lease.
    leader_election: bool = True
    lease_namespace: str = "whetstone-system"
    lease_name: str = "whetstone-operator"
    lease_seconds: float = 15.0
    identity: str = ""  # default: the host name and a random suffix
    # Whether the cluster serves Kueue's Workload API (found at start): jobs labelled
    # kueue.x-k8s.io/queue-name are then admitted through Kueue, else reported (KueueUnavailable).
    kueue: bool = False
    children: ChildSettings = field(default_factory=ChildSettings)
