"""Helpers for the e2e tests: a connected cluster handle, polling, pod builders."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import kubernetes
from localcluster import RUNNER_NODE_LABEL, ClusterState
from pod_runner import container_log_path

T = TypeVar("T")
Json = dict[str, Any]

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
RUNNER_TOLERATION = {"key": RUNNER_NODE_LABEL, "operator": "Exists", "effect": "NoSchedule"}


def wait_for(probe: Callable[[], T], timeout: float, what: str, interval: float = 0.5) -> T:
    """Poll until ``probe`` returns something truthy; convergence on 2 shared cores can take a while."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = probe()
            if value:
                return value
        except kubernetes.client.ApiException as e:
            last_error = e
        if time.monotonic() > deadline:
            raise AssertionError(
                f"timed out after {timeout:.0f} s waiting for {what} (last error: {last_error})"
            )
        time.sleep(interval)


@dataclass
class Cluster:
    state: ClusterState
    api: kubernetes.client.ApiClient

    @classmethod
    def connect(cls, state: ClusterState) -> Cluster:
        config = kubernetes.client.Configuration()
        kubernetes.config.load_kube_config(config_file=state.kubeconfig, client_configuration=config)
        return cls(state, kubernetes.client.ApiClient(config))

    @property
    def kubeconfig(self) -> Path:
        return Path(self.state.kubeconfig)

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api)

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.api)

    @property
    def extensions(self) -> kubernetes.client.ApiextensionsV1Api:
        return kubernetes.client.ApiextensionsV1Api(self.api)

    def pod(self, namespace: str, name: str) -> Json:
        return self.api.sanitize_for_serialization(self.core.read_namespaced_pod(name, namespace))

    def wait_pod_phase(
        self, namespace: str, name: str, phases: tuple[str, ...], timeout: float = 120
    ) -> Json:
        def probe() -> Json | None:
            pod = self.pod(namespace, name)
            return pod if pod.get("status", {}).get("phase") in phases else None

        return wait_for(probe, timeout, f"pod {namespace}/{name} in phase {phases}")

    def wait_pod_gone(self, namespace: str, name: str, timeout: float = 120) -> None:
        def probe() -> bool:
            try:
                self.core.read_namespaced_pod(name, namespace)
                return False
            except kubernetes.client.ApiException as e:
                return e.status == 404

        wait_for(probe, timeout, f"pod {namespace}/{name} to be gone")

    def container_log(self, namespace: str, pod: str, container: str = "main") -> str:
        path = container_log_path(Path(self.state.state_dir) / "runner", namespace, pod, container)
        return path.read_text() if path.exists() else ""


def runner_pod(name: str, command: list[str], *, env: list[Json] | None = None, **spec: Any) -> Json:
    """A pod for the pod runner: it must select a runner node and tolerate its taint."""
    container: Json = {"name": "main", "image": "whetstone/e2e-local", "command": command}
    if env:
        container["env"] = env
    for key in ("volumeMounts", "workingDir", "args", "envFrom", "resources"):
        if key in spec:
            container[key] = spec.pop(key)
    metadata = {"name": name, "labels": spec.pop("labels", {}), "annotations": spec.pop("annotations", {})}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": metadata,
        "spec": {
            "restartPolicy": "Never",
            "nodeSelector": {RUNNER_NODE_LABEL: "true"},
            "tolerations": [RUNNER_TOLERATION],
            "terminationGracePeriodSeconds": 5,
            "containers": [container],
            **spec,
        },
    }


def field_env(name: str, path: str) -> Json:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}
