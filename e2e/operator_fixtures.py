"""Fixtures for the operator's e2e tests: the CRDs, the operator as a separate process running with a token of
its own ServiceAccount (the RBAC of manifests/base/rbac.yaml, so a missing verb fails a test), a claim whose
folder the pod runner shares between a job's pods, job shapes (`tiny_job`: a real SFT run on the runner nodes;
`kwok_job`: pods on the KWOK GPU pool that need not train), and helpers to follow a FineTuneJob.

Import with `from operator_fixtures import *` in a test module.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from helpers import GPU_TOLERATION, RUNNER_TOLERATION, Cluster, wait_for
from localcluster import RUNNER_NODE_LABEL, SOURCE_DIRS, free_port

REPO = Path(__file__).resolve().parent.parent
Json = dict[str, Any]
GROUP, VERSION = "whetstone.dev", "v1alpha1"
OPERATOR_NS = "whetstone-system"
OPERATOR_SA = "whetstone-operator"
CLAIM = "work"

__all__ = [
    "OperatorProcess",
    "crds_applied",
    "operator",
    "work_claim",
    "JobWatch",
    "tiny_job",
    "kwok_job",
    "free_port",
]
OPERATOR_IDENTITY = "e2e-operator"
# Images the KWOK GPU nodes treat specially (e2e/kwok/stages.yaml); anything else runs until deleted.
UNPULLABLE_IMAGE = "unpullable.e2e.invalid/trainer:none"
EXIT_0_IMAGE = "exit-0.e2e.invalid/trainer:1"
EXIT_1_IMAGE = "exit-1.e2e.invalid/trainer:1"


@pytest.fixture(scope="session")
def crds_applied(cluster: Cluster) -> list[str]:
    return apply_crds(cluster)


def apply_crds(cluster: Cluster, folder: Path = REPO / "crds") -> list[str]:
    names = []
    for path in sorted(folder.glob("*.yaml")):
        body = yaml.safe_load(path.read_text())
        names.append(body["metadata"]["name"])
        try:
            cluster.extensions.create_custom_resource_definition(body)
        except kubernetes.client.ApiException as e:
            if e.status != 409:
                raise
            current = cluster.extensions.read_custom_resource_definition(body["metadata"]["name"])
            body["metadata"]["resourceVersion"] = current.metadata.resource_version
            cluster.extensions.replace_custom_resource_definition(body["metadata"]["name"], body)

    def established(name: str) -> bool:
        crd = cluster.extensions.read_custom_resource_definition(name)
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    for name in names:
        wait_for(lambda name=name: established(name), 60, f"CRD {name} established")
    return names


def apply_rbac(cluster: Cluster, docs: list[Json] | None = None) -> None:
    """The operator's ServiceAccount and RBAC: manifests/base/rbac.yaml, or the given objects (namespaced)."""
    with contextlib.suppress(kubernetes.client.ApiException):
        cluster.core.create_namespace({"metadata": {"name": OPERATOR_NS}})
    rbac = kubernetes.client.RbacAuthorizationV1Api(cluster.api)
    if docs is None:
        docs = list(yaml.safe_load_all((REPO / "manifests" / "base" / "rbac.yaml").read_text()))
    for doc in docs:
        try:
            _create_rbac(cluster, rbac, doc)
        except kubernetes.client.ApiException as e:
            if e.status != 409:
                raise
            name, ns = doc["metadata"]["name"], doc["metadata"].get("namespace")
            if doc["kind"] == "ClusterRole":
                rbac.replace_cluster_role(name, doc)
            elif doc["kind"] == "Role":
                rbac.replace_namespaced_role(name, ns, doc)


def _create_rbac(cluster: Cluster, rbac: kubernetes.client.RbacAuthorizationV1Api, doc: Json) -> None:
    kind, ns = doc["kind"], doc["metadata"].get("namespace")
    if kind == "ServiceAccount":
        cluster.core.create_namespaced_service_account(ns, doc)
    elif kind == "ClusterRole":
        rbac.create_cluster_role(doc)
    elif kind == "ClusterRoleBinding":
        rbac.create_cluster_role_binding(doc)
    elif kind == "Role":
        rbac.create_namespaced_role(ns, doc)
    elif kind == "RoleBinding":
        rbac.create_namespaced_role_binding(ns, doc)


def token_kubeconfig(cluster: Cluster, folder: Path, account: str = OPERATOR_SA) -> Path:
    """A kubeconfig that authenticates as the operator's ServiceAccount (a minted token)."""
    request = {"spec": {"expirationSeconds": 6 * 3600}}
    token = cluster.core.create_namespaced_service_account_token(account, OPERATOR_NS, request).status.token
    admin = yaml.safe_load(cluster.kubeconfig.read_text())
    server_cluster = admin["clusters"][0]["cluster"]
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "e2e", "cluster": server_cluster}],
        "users": [{"name": account, "user": {"token": token}}],
        "contexts": [{"name": "operator", "context": {"cluster": "e2e", "user": account}}],
        "current-context": "operator",
    }
    path = folder / f"{account}.kubeconfig"
    path.write_text(yaml.safe_dump(config))
    return path


class OperatorProcess:
    """`whetstone operator` as a child process, so tests can kill and restart it like a pod."""

    def __init__(self, kubeconfig: Path, log: Path, args: list[str]) -> None:
        self.kubeconfig, self.log, self.args = kubeconfig, log, args
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = dict(os.environ, KUBECONFIG=str(self.kubeconfig), PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join([*map(str, SOURCE_DIRS), env.get("PYTHONPATH", "")])
        command = [sys.executable, "-m", "whetstone_cli.main", "operator", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), *self.args]
        with self.log.open("ab") as out:
            out.write(f"\n=== start {' '.join(command)}\n".encode())
            self.proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)
        wait_for(self.healthy, 60, "the operator's /healthz")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=2) as r:
                return r.status == 200
        except OSError:
            assert self.proc is not None and self.proc.poll() is None, self.log_text()[-3000:]
            return False

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as r:
            return r.read().decode()

    def kill(self) -> None:
        """SIGKILL: an operator pod evicted without a chance to clean up."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()

    def ensure_running(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.start()

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def peak_rss_mib(self) -> float:
        """VmHWM of the operator process (peak resident memory)."""
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def operator_args(identity: str = OPERATOR_IDENTITY) -> list[str]:
    # Ports of this session's own: the pod runner has no network namespaces, and another cluster's trainers
    # (a concurrent e2e session) may hold the default 8080 and 29500 on this host. One identity for the
    # session's operator: restarted after a kill, it takes its Lease back at once, as a pod of a Deployment
    # with strategy Recreate would wait out the Lease instead.
    return (
        ["--resync-seconds", "2", "--progress-seconds", "2", "--termination-grace-seconds", "5"]
        + ["--trainer-status-port", str(PORTS[0]), "--master-port", str(PORTS[1])]
        + ["--identity", identity, "--lease-namespace", OPERATOR_NS]
    )


PORTS = (free_port(), free_port())


# The session's one operator. The fixtures below are star-imported into every operator test module, which
# makes each module's copy a fixture of its own: without this, two session operators would run (and act).
_SESSION: dict[str, OperatorProcess] = {}


@pytest.fixture(scope="session")
def operator(
    cluster: Cluster, crds_applied: list[str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    if "operator" in _SESSION:
        yield _SESSION["operator"]
        return
    folder = tmp_path_factory.mktemp("operator")
    apply_rbac(cluster)
    proc = OperatorProcess(
        token_kubeconfig(cluster, folder),
        folder / "operator.log",
        operator_args(),
    )
    proc.start()
    _SESSION["operator"] = proc
    yield proc
    proc.stop()
    _SESSION.pop("operator", None)
    print(f"operator log: {proc.log}")


@pytest.fixture
def work_claim(cluster: Cluster, namespace: str) -> Path:
    """A bound claim `work` in the namespace, with the example datasets; returns its folder on this host."""
    pv = f"pv-{namespace}"[:63]
    cluster.core.create_persistent_volume(
        {
            "metadata": {"name": pv},
            "spec": {
                "capacity": {"storage": "1Gi"},
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "hostPath": {"path": f"/tmp/{pv}"},
                "claimRef": {"namespace": namespace, "name": CLAIM},
            },
        }
    )
    cluster.core.create_namespaced_persistent_volume_claim(
        namespace,
        {
            "metadata": {"name": CLAIM},
            "spec": {
                "accessModes": ["ReadWriteMany"],
                "storageClassName": "",
                "volumeName": pv,
                "resources": {"requests": {"storage": "1Gi"}},
            },
        },
    )
    folder = Path(cluster.state.state_dir) / "runner" / "pvc" / namespace / CLAIM
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("reverse-train.jsonl", "reverse-eval.jsonl", "parity-prompts-train.jsonl"):
        shutil.copy(REPO / "manifests" / "examples" / "data" / name, folder / name)
    wait_for(
        lambda: (
            cluster.core.read_namespaced_persistent_volume_claim(CLAIM, namespace).status.phase == "Bound"
        ),
        60,
        "the claim to be bound",
    )
    return folder


def tiny_job(name: str, *, steps: int = 24, every: int = 8, **spec: Any) -> Json:
    """A LoRA SFT job on the bundled tiny model that the pod runner really runs (runner nodes). It asks for
    a GPU, as production jobs do: the runner nodes advertise fake ones, and the trainer falls back to the
    CPU."""
    body: Json = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "method": "sft",
            "baseModel": {"uri": "whetstone://tiny"},
            "dataset": {"uri": f"pvc://{CLAIM}/reverse-train.jsonl", "maxExamples": 256},
            "evalDataset": {"uri": f"pvc://{CLAIM}/reverse-eval.jsonl", "maxExamples": 16},
            "lora": {"rank": 4, "alpha": 8},
            "hyperparameters": {
                "maxSteps": steps,
                "learningRate": 3.0e-3,
                "batchSize": 4,
                "maxSeqLen": 128,
                "seed": 7,
            },
            "checkpointing": {"everySteps": every, "keepLast": 2},
            "output": {"uri": f"pvc://{CLAIM}/out/{name}"},
            "nodeSelector": {RUNNER_NODE_LABEL: "true"},
            "tolerations": [RUNNER_TOLERATION],
            "gpusPerNode": 1,
            "backoffLimit": 2,
        },
    }
    body["spec"].update(spec)
    return body


def kwok_job(name: str, *, nodes: int = 1, gpus: int = 8, image: str | None = None, **spec: Any) -> Json:
    """A job whose pods land on the KWOK GPU pool (8 x H100 per node): the scheduler places them by their
    GPU requests, KWOK runs them (Running until deleted, or as the image name says, see stages.yaml)."""
    body: Json = {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "method": "sft",
            "baseModel": {"uri": "hf://Qwen/Qwen3-8B"},
            "dataset": {"uri": "s3://e2e-data/train.jsonl"},
            "lora": {"rank": 16},
            "output": {"uri": f"s3://e2e-out/{name}"},
            "nodes": nodes,
            "gpusPerNode": gpus,
            "nodeSelector": {"whetstone.dev/e2e-pool": "gpu"},
            "tolerations": [GPU_TOLERATION],
            "backoffLimit": 2,
        },
    }
    if image:
        body["spec"]["image"] = image
    body["spec"].update(spec)
    return body


class JobWatch:
    """Read and wait on one FineTuneJob and its children."""

    def __init__(self, cluster: Cluster, namespace: str, name: str) -> None:
        self.cluster, self.namespace, self.name = cluster, namespace, name
        self.phases_seen: list[str] = []

    def create(self, body: Json) -> None:
        self.cluster.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "finetunejobs", body
        )

    def get(self) -> Json:
        job = self.cluster.custom.get_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "finetunejobs", self.name
        )
        phase = (job.get("status") or {}).get("phase")
        if phase and (not self.phases_seen or self.phases_seen[-1] != phase):
            self.phases_seen.append(phase)
        return job

    def status(self) -> Json:
        return self.get().get("status") or {}

    def patch_spec(self, spec: Json) -> None:
        self.cluster.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "finetunejobs", self.name, {"spec": spec}
        )

    def wait_phase(self, *phases: str, timeout: float = 600) -> Json:
        return wait_for(
            lambda: (s := self.status()).get("phase") in phases and s, timeout, f"{self.name} in {phases}", 1
        )

    def wait(self, probe: Any, what: str, timeout: float = 600) -> Any:
        return wait_for(lambda: probe(self.status()), timeout, f"{self.name}: {what}", 1)

    def pods(self) -> list[Json]:
        pods = self.cluster.core.list_namespaced_pod(
            self.namespace, label_selector=f"whetstone.dev/job={self.name}"
        )
        return [self.cluster.api.sanitize_for_serialization(p) for p in pods.items]

    def checkpoints(self) -> list[Json]:
        listed = self.cluster.custom.list_namespaced_custom_object(
            GROUP, VERSION, self.namespace, "checkpoints", label_selector=f"whetstone.dev/job={self.name}"
        )
        return listed["items"]

    def events(self) -> list[Json]:
        listed = self.cluster.core.list_namespaced_event(
            self.namespace, field_selector=f"involvedObject.name={self.name},involvedObject.kind=FineTuneJob"
        )
        return [self.cluster.api.sanitize_for_serialization(e) for e in listed.items]

    def log(self, rank: int = 0) -> str:
        return self.cluster.container_log(self.namespace, f"{self.name}-node-{rank}", "trainer")

    def delete(self) -> None:
        with contextlib.suppress(kubernetes.client.ApiException):
            self.cluster.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.namespace, "finetunejobs", self.name
            )


def sleep(seconds: float) -> None:
    time.sleep(seconds)
