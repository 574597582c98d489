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
    children: ChildSettings = field(default_factory=ChildSettings)
