"""A tiny kubelet for the e2e cluster: runs the containers of pods bound to chosen nodes as local processes.

Test infrastructure, not a product. ``e2e/cluster up`` (and the pytest fixture) start it for the nodes
labelled ``whetstone.dev/e2e-runner=true`` (``runner-0``, ``runner-1``); kwok drives every other node.

What it does, as a kubelet would:

- keeps its nodes Ready (node lease in ``kube-node-lease`` and the node's Ready condition);
- for each pod bound to one of its nodes: prepares the volumes, runs the init containers one after the other,
  then starts every container as a local process: ``command`` + ``args`` with ``$(VAR)`` expansion, the
  container's ``env`` / ``envFrom`` (values, ConfigMap and Secret keys, the downward API: ``metadata.name``,
  ``metadata.namespace``, ``metadata.uid``, ``metadata.labels['k']``, ``metadata.annotations['k']``,
  ``spec.nodeName``, ``spec.serviceAccountName``, ``status.podIP(s)``, ``status.hostIP(s)``, and
  ``resourceFieldRef``), ``KUBERNETES_SERVICE_HOST/PORT`` pointing at the API server, and ``workingDir``;
- volumes are local folders, bind-mounted at each ``mountPath`` (``subPath`` and ``readOnly`` honoured):
  ``emptyDir`` is a folder per pod, ``hostPath`` the path itself, a ``persistentVolumeClaim`` a folder per
  claim under the runner's state dir (shared by the pods that use the claim, kept until the cluster goes
  down); ``configMap``, ``secret``, ``downwardAPI`` and ``projected`` volumes (including the service-account
  token, minted with the TokenRequest API, so in-cluster clients work) are written as files when the pod
  starts;
- gives each pod its own address, reported as ``status.podIP``, so several pods can listen on the same port as
  long as they bind their pod IP: ``198.18.X.Y`` from a /24 per cluster, a range that ``e2e/cluster up``
  makes local by adding 198.18.0.1/15 to the loopback device (see ``localcluster.choose_pod_network``), so
  that EndpointSlices accept them; ``127.X.Y.Z`` where that is not allowed (then Services get no endpoints:
  the API server rejects loopback endpoint addresses);
- names: each pod gets its own ``/etc/hosts`` (bind-mounted in a private mount namespace) with its own
  hostname and, for every headless Service, the records cluster DNS would serve: ``<hostname>.<subdomain>``
  (and ``.<ns>``, ``.<ns>.svc``, ``.<ns>.svc.cluster.local``) for pods whose ``spec.subdomain`` names the
  Service, and the Service name itself for the pods it selects. The files are rewritten in place as pods come
  and go, so a torchrun rendezvous across pods of a job works. The hostname (UTS namespace) is the pod's
  hostname;
- reports status through ``pods/status`` like a kubelet: Pending → Running → Succeeded / Failed, conditions
  (PodReadyToStartContainers, Initialized, ContainersReady, Ready), pod IP, host IP, start time, container
  statuses with ``state`` / ``lastState`` / ``restartCount`` / exit codes; ``restartPolicy`` Always /
  OnFailure / Never with a capped back-off (1 s doubling to 10 s, CrashLoopBackOff while waiting) and
  ``activeDeadlineSeconds`` (Failed, reason DeadlineExceeded); termination messages: a per-container file
  is bind-mounted at ``terminationMessagePath`` (default ``/dev/termination-log``; with mount namespaces only)
  and what the container wrote there (at most 4096 bytes) becomes ``state.terminated.message``, or with
  ``terminationMessagePolicy: FallbackToLogsOnError`` and a failure, the log's last 80 lines / 2048 bytes;
- deletion: when a pod gets a deletionTimestamp its processes get SIGTERM, then SIGKILL after the pod's grace
  period, and the runner finalises the deletion (delete with gracePeriodSeconds=0, uid precondition).
  Each container is its own process group: the signals reach the processes it started too.

What it does NOT emulate (say so in any test that relies on the runner):

- images: ``image`` is ignored; the command runs in the runner's own environment (its Python venv first on
  ``PATH``, the runner's environment as the base env; ``KUBECONFIG`` removed; ``--pythonpath`` folders, the
  project's sources with ``e2e/cluster``, first on ``PYTHONPATH``; ``/`` as the default working dir, as in
  most images). A container without ``command`` cannot run (there is no image entrypoint) and waits with
  CreateContainerConfigError;
- isolation and resources: no cgroups (``resources`` are not enforced), no user or PID isolation
  (``securityContext`` is ignored, processes run as the runner's user), no network namespace (a process that
  binds 0.0.0.0 takes the port for every pod), no NetworkPolicy, no Service ClusterIP routing (only headless
  names resolve), no Service environment variables other than KUBERNETES_*, no cluster DNS beyond the hosts
  file (no search path: use the dotted names above);
- probes (liveness, readiness, startup): ignored; a running container is Ready. No lifecycle hooks,
  no ``kubectl logs`` / ``exec`` / ``port-forward`` (logs are files under the
  runner's state dir: ``logs/<namespace>/<pod>/<container>.log``, see ``container_log_path``);
- ConfigMap / Secret volumes are written once at pod start, not refreshed; ``emptyDir.medium: Memory`` and
  ``sizeLimit`` are plain folders; mount points that do not exist on the host are created there (empty) and
  removed when the runner stops; without root (CAP_SYS_ADMIN) there are no mount or UTS namespaces, so volumes
  are not mounted at their mountPath and names do not resolve (the runner logs a warning at start);
- sidecar containers (init containers with ``restartPolicy: Always``), ephemeral containers, pod overhead,
  image pulls, node pressure eviction.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import decimal
import ipaddress
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes
from kubernetes.client.rest import ApiException
from localcluster import remove_created_mountpoints

LOG = logging.getLogger("pod-runner")
HERE = Path(__file__).resolve().parent
LAUNCHER = HERE / "pod_exec.py"
CLUSTER_DOMAIN = "cluster.local"
TERMINAL = ("Succeeded", "Failed")
BACKOFF_MAX = 10.0

Json = dict[str, Any]


def now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def container_log_path(state_dir: Path | str, namespace: str, pod: str, container: str) -> Path:
    return Path(state_dir) / "logs" / namespace / pod / f"{container}.log"


# --- small Kubernetes semantics -----------------------------------------------------------------------------

_VAR = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes ``$(VAR)`` expansion: known names are replaced, ``$$`` escapes, unknown refs stay."""

    def repl(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _VAR.sub(repl, value)


_SUFFIX = {
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": decimal.Decimal("1e-9"),
    "u": decimal.Decimal("1e-6"),
    "m": decimal.Decimal("1e-3"),
    "k": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "P": 10**15,
    "E": 10**18,
}


def parse_quantity(q: str | int | float) -> decimal.Decimal:
    s = str(q).strip()
    for suffix in sorted(_SUFFIX, key=len, reverse=True):
        if s.endswith(suffix):
            return decimal.Decimal(s[: -len(suffix)]) * decimal.Decimal(_SUFFIX[suffix])
    return decimal.Decimal(s)


def field_value(pod: Json, path: str) -> str:
    """The downward API's fieldRef paths."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
    if m := re.fullmatch(r"metadata\.(labels|annotations)\['([^']*)'\]", path):
        return (meta.get(m.group(1)) or {}).get(m.group(2), "")
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f'{k}="{v}"' for k, v in items)
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": status.get("podIP", ""),
        "status.hostIP": status.get("hostIP", ""),
        "status.podIPs": ",".join(i["ip"] for i in status.get("podIPs") or []),
        "status.hostIPs": ",".join(i["ip"] for i in status.get("hostIPs") or []),
    }
    if path not in simple:
        raise ConfigError(f"fieldRef {path!r} is not supported")
    return simple[path]


def resource_value(pod: Json, ref: Json, default_container: str, node_allocatable: Json) -> str:
    name = ref.get("containerName") or default_container
    container = next(
        c for c in pod["spec"]["containers"] + pod["spec"].get("initContainers", []) if c["name"] == name
    )
    kind, res = ref["resource"].split(".", 1)
    value = (container.get("resources", {}).get(kind) or {}).get(res)
    if value is None and kind == "requests":
        value = (container.get("resources", {}).get("limits") or {}).get(res)
    if value is None:
        value = node_allocatable.get(res, "0")
    divisor = parse_quantity(ref.get("divisor", "1"))
    return str(math.ceil(parse_quantity(value) / divisor))


class ConfigError(Exception):
    """The pod cannot start, yet or at all (a missing ConfigMap...): CreateContainerConfigError."""


# --- the runner -----------------------------------------------------------------------------------------


class IpPool:
    """Pod addresses. Outside 127/8 each one is also put on the loopback device as a /32: the range is already
    local (``e2e/cluster up`` routes it to lo), but some programs look for the interface that carries their
    exact address (gloo does, for torch.distributed) and find one only this way."""

    def __init__(self, network: str) -> None:
        net = ipaddress.ip_network(network)
        # The first address is left out, as a CNI keeps it for the gateway.
        self.addresses = [str(a) for a in list(net.hosts())[1:]]
        self.on_loopback_device = not net.is_loopback
        self._used: set[str] = set()
        self._lock = threading.Lock()

    def allocate(self) -> str:
        with self._lock:
            for address in self.addresses:
                if address not in self._used:
                    self._used.add(address)
                    break
            else:
                raise RuntimeError("pod IP pool exhausted")
        if self.on_loopback_device:
            subprocess.run(["ip", "addr", "replace", f"{address}/32", "dev", "lo"], capture_output=True)
        return address

    def release(self, ip: str) -> None:
        with self._lock:
            if ip not in self._used:
                return
            self._used.discard(ip)
        if self.on_loopback_device:
            subprocess.run(["ip", "addr", "del", f"{ip}/32", "dev", "lo"], capture_output=True)

    def release_all(self) -> None:
        with self._lock:
            used = list(self._used)
        for ip in used:
            self.release(ip)


@dataclass
class HostsEntry:
    namespace: str
    name: str
    hostname: str
    subdomain: str
    ip: str
    labels: dict[str, str]
    hosts_file: Path


class HostsManager:
    """Keeps every running pod's /etc/hosts file current with the headless Service records."""

    def __init__(self, core: kubernetes.client.CoreV1Api) -> None:
        self.core = core
        self.entries: dict[str, HostsEntry] = {}
        self._lock = threading.RLock()

    def register(self, uid: str, entry: HostsEntry) -> None:
        with self._lock:
            self.entries[uid] = entry
            entry.hosts_file.touch()
        self.refresh()

    def unregister(self, uid: str) -> None:
        with self._lock:
            self.entries.pop(uid, None)
        self.refresh()

    def refresh(self) -> None:
        with self._lock:
            if not self.entries:
                return
            try:
                services = self.core.list_service_for_all_namespaces().items
            except Exception:  # noqa: BLE001 - keep the last good files while the API server blinks
                LOG.exception("listing services")
                return
            headless = [s for s in services if s.spec.cluster_ip == "None"]
            records: list[tuple[str, str, list[str]]] = []  # (namespace, ip, names)
            for e in self.entries.values():
                if e.subdomain and any(
                    s.metadata.name == e.subdomain and s.metadata.namespace == e.namespace for s in headless
                ):
                    base = f"{e.hostname}.{e.subdomain}.{e.namespace}"
                    records.append(
                        (
                            e.namespace,
                            e.ip,
                            [
                                f"{base}.svc.{CLUSTER_DOMAIN}",
                                f"{base}.svc",
                                base,
                                f"{e.hostname}.{e.subdomain}",
                            ],
                        )
                    )
            for s in headless:
                selector = s.spec.selector or {}
                if not selector:
                    continue
                ns, name = s.metadata.namespace, s.metadata.name
                for e in self.entries.values():
                    if e.namespace == ns and all(e.labels.get(k) == v for k, v in selector.items()):
                        records.append(
                            (
                                ns,
                                e.ip,
                                [
                                    f"{name}.{ns}.svc.{CLUSTER_DOMAIN}",
                                    f"{name}.{ns}.svc",
                                    f"{name}.{ns}",
                                    name,
                                ],
                            )
                        )
            for e in self.entries.values():
                lines = [
                    "# Kubernetes-managed hosts file (whetstone e2e pod runner).",
                    "127.0.0.1\tlocalhost",
                    "::1\tlocalhost ip6-localhost ip6-loopback",
                ]
                own = [e.hostname]
                if e.subdomain:
                    own.insert(0, f"{e.hostname}.{e.subdomain}.{e.namespace}.svc.{CLUSTER_DOMAIN}")
                lines.append(f"{e.ip}\t{' '.join(own)}")
                for ns, ip, names in records:
                    # Short names resolve only in the pod's own namespace, like the DNS search path.
                    visible = names if ns == e.namespace else names[:3]
                    lines.append(f"{ip}\t{' '.join(visible)}")
                text = "\n".join(lines) + "\n"
                with contextlib.suppress(FileNotFoundError):
                    if e.hosts_file.read_text() != text:
                        # In place (same inode): the file is bind-mounted into running processes.
                        with open(e.hosts_file, "r+") as f:
                            f.write(text)
                            f.truncate()


@dataclass
class ContainerRun:
    spec: Json
    init: bool
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restart_count: int = 0
    started_at: str | None = None
    state: Json = field(default_factory=lambda: {"waiting": {"reason": "ContainerCreating"}})
    last_state: Json = field(default_factory=dict)
    next_start: float = 0.0
    backoff: float = 1.0
    done: bool = False  # terminated and will not be restarted
    termination_file: Path | None = None

    @property
    def name(self) -> str:
        return str(self.spec["name"])

    def status(self) -> Json:
        running = "running" in self.state
        full_state = {k: self.state.get(k) for k in ("waiting", "running", "terminated")}
        last = {k: self.last_state.get(k) for k in ("waiting", "running", "terminated")}
        return {
            "name": self.name,
            "image": self.spec.get("image", ""),
            "imageID": "",
            "containerID": f"pod-runner://{self.proc.pid}" if self.proc else None,
            "ready": running and not self.init,
            "started": running,
            "restartCount": self.restart_count,
            "state": full_state,
            "lastState": last,
        }


def termination_message(c: ContainerRun, exit_code: int) -> Json:
    """``state.terminated.message`` as a kubelet fills it: the termination-message file (4096 bytes at
    most), or with FallbackToLogsOnError and a failure, the end of the log (80 lines, 2048 bytes)."""
    text = ""
    if c.termination_file is not None and c.termination_file.exists():
        text = c.termination_file.read_bytes()[:4096].decode(errors="replace")
    if (
        not text.strip()
        and exit_code != 0
        and c.spec.get("terminationMessagePolicy") == "FallbackToLogsOnError"
    ):
        lines = c.log_path.read_bytes().splitlines()[-80:] if c.log_path.exists() else []
        text = b"\n".join(lines)[-2048:].decode(errors="replace")
    return {"message": text} if text.strip() else {}


class PodWorker(threading.Thread):
    """Owns one pod: its processes, volumes, address and status."""

    def __init__(self, runner: PodRunner, pod: Json) -> None:
        meta = pod["metadata"]
        super().__init__(name=f"pod-{meta['namespace']}/{meta['name']}", daemon=True)
        self.runner = runner
        self.pod = pod
        self.uid: str = meta["uid"]
        self.ns: str = meta["namespace"]
        self.pod_name: str = meta["name"]
        self.wake = threading.Event()
        self.gone = False  # the pod object no longer exists (force deletion)
        self.finished = False
        self.ip: str | None = None
        self.dir = runner.state_dir / "pods" / f"{self.ns}_{self.pod_name}_{self.uid[:8]}"
        self.conditions: dict[str, Json] = {}
        self.start_time: str | None = None
        self.phase = "Pending"
        self.reason: str | None = None
        self.message: str | None = None
        self.inits: list[ContainerRun] = []
        self.containers: list[ContainerRun] = []
        self._last_status: str = ""

    # -- events from the watch --

    def update(self, pod: Json) -> None:
        self.pod = pod
        self.wake.set()

    def deleted(self) -> None:
        self.gone = True
        self.wake.set()

    # -- main loop --

    def run(self) -> None:
        try:
            self._run()
        except Exception:
            LOG.exception("pod %s/%s: worker crashed", self.ns, self.pod_name)
            self._kill_all(grace=0)
        finally:
            self._release()

    def _deleting(self) -> bool:
        return (
            self.gone or bool(self.pod["metadata"].get("deletionTimestamp")) or self.runner.stopping.is_set()
        )

    def _run(self) -> None:
        spec = self.pod["spec"]
        logs = self.runner.state_dir / "logs" / self.ns / self.pod_name
        logs.mkdir(parents=True, exist_ok=True)
        self.inits = [
            ContainerRun(c, True, logs / f"{c['name']}.log") for c in spec.get("initContainers", [])
        ]
        self.containers = [ContainerRun(c, False, logs / f"{c['name']}.log") for c in spec["containers"]]
        if self.pod.get("status", {}).get("phase") in TERMINAL:
            self.finished = True
            self._wait_for_deletion()
            return
        self.ip = self.runner.host_ip if spec.get("hostNetwork") else self.runner.ips.allocate()
        self.start_time = now()
        self._set_condition("PodReadyToStartContainers", "True")
        self._set_condition(
            "Initialized",
            "False" if self.inits else "True",
            "ContainersNotInitialized" if self.inits else None,
        )
        self._set_condition("ContainersReady", "False", "ContainersNotReady")
        self._set_condition("Ready", "False", "ContainersNotReady")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.runner.hosts.register(
            self.uid,
            HostsEntry(
                self.ns,
                self.pod_name,
                self._hostname(),
                spec.get("subdomain", ""),
                self.ip,
                self.pod["metadata"].get("labels") or {},
                self.dir / "hosts",
            ),
        )
        self._report()

        mounts: dict[str, Path] | None = None
        while mounts is None and not self._deleting():
            try:
                mounts = self._prepare_volumes()
            except ConfigError as e:
                self._waiting_all("CreateContainerConfigError", str(e))
                self.wake.wait(2)
                self.wake.clear()
        deadline = spec.get("activeDeadlineSeconds")
        started = time.monotonic()
        while not self._deleting():
            if deadline is not None and time.monotonic() - started > deadline:
                self._kill_all(grace=0)
                self.phase, self.reason = "Failed", "DeadlineExceeded"
                self.message = f"Pod was active on the node longer than the specified deadline ({deadline} s)"
                self._report()
                break
            assert mounts is not None
            self._step(mounts)
            self._report()
            if self.phase in TERMINAL:
                break
            self.wake.wait(0.2)
            self.wake.clear()
        if self.phase in TERMINAL and not self._deleting():
            self.finished = True
            self._free_address()
            self._wait_for_deletion()
            return
        self._stop_for_deletion()

    def _hostname(self) -> str:
        return str(self.pod["spec"].get("hostname") or self.pod_name)[:63]

    # -- containers --

    def _step(self, mounts: dict[str, Path]) -> None:
        policy = self.pod["spec"].get("restartPolicy", "Always")
        pending_init = next((c for c in self.inits if not c.done), None)
        if pending_init is not None:
            self._drive(pending_init, mounts, "OnFailure" if policy == "Always" else policy)
            if pending_init.done and pending_init.state.get("terminated", {}).get("exitCode") != 0:
                self.phase = "Failed"
            if all(c.done for c in self.inits):
                self._set_condition("Initialized", "True")
            return
        for c in self.containers:
            self._drive(c, mounts, policy)
        running = [c for c in self.containers if "running" in c.state]
        if running:
            self.phase = "Running"
        all_ready = len(running) == len(self.containers)
        self._set_condition(
            "ContainersReady", "True" if all_ready else "False", None if all_ready else "ContainersNotReady"
        )
        self._set_condition(
            "Ready", "True" if all_ready else "False", None if all_ready else "ContainersNotReady"
        )
        if all(c.done for c in self.containers):
            codes = [c.state["terminated"]["exitCode"] for c in self.containers]
            self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
            self._set_condition("ContainersReady", "False", "PodCompleted")
            self._set_condition("Ready", "False", "PodCompleted")

    def _drive(self, c: ContainerRun, mounts: dict[str, Path], policy: str) -> None:
        if c.done:
            return
        if c.proc is None:
            if time.monotonic() >= c.next_start:
                self._start(c, mounts)
            return
        code = c.proc.poll()
        if code is None:
            return
        # The main process is gone; anything it left in its process group goes too, as with a container.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(c.proc.pid, signal.SIGKILL)
        exit_code = code if code >= 0 else 128 - code
        c.state = {
            "terminated": {
                "exitCode": exit_code,
                "reason": "Completed" if exit_code == 0 else "Error",
                "startedAt": c.started_at,
                "finishedAt": now(),
                "containerID": f"pod-runner://{c.proc.pid}",
                **termination_message(c, exit_code),
            }
        }
        c.proc = None
        restart = policy == "Always" or (policy == "OnFailure" and exit_code != 0)
        if not restart:
            c.done = True
            return
        c.last_state = c.state
        c.restart_count += 1
        c.next_start = time.monotonic() + c.backoff
        c.state = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {c.backoff:.0f}s restarting failed container={c.name}",
            }
        }
        c.backoff = min(c.backoff * 2, BACKOFF_MAX)

    def _start(self, c: ContainerRun, mounts: dict[str, Path]) -> None:
        try:
            argv, env = self._command(c)
        except ConfigError as e:
            c.state = {"waiting": {"reason": "CreateContainerConfigError", "message": str(e)}}
            c.next_start = time.monotonic() + 2
            return
        volume_mounts = []
        for m in c.spec.get("volumeMounts", []):
            source = mounts[m["name"]]
            if m.get("subPath"):
                source = source / expand(m["subPath"], env)
                if not source.exists():
                    source.mkdir(parents=True)
            volume_mounts.append(
                {"source": str(source), "target": m["mountPath"], "read_only": bool(m.get("readOnly"))}
            )
        # The termination-message file: one per container start, where the container expects it.
        c.termination_file = self.dir / f"{c.name}.termination-log"
        c.termination_file.write_bytes(b"")
        if self.runner.namespaces:
            target = c.spec.get("terminationMessagePath") or "/dev/termination-log"
            volume_mounts.append({"source": str(c.termination_file), "target": target, "read_only": False})
        spec = {
            "runner_pid": os.getpid(),
            "namespaces": self.runner.namespaces,
            "mounts": volume_mounts,
            "hosts": str(self.dir / "hosts"),
            "hostname": self._hostname(),
            "cwd": c.spec.get("workingDir") or str(self.runner.workdir),
            "argv": argv,
            "env": env,
            "created_log": str(self.runner.state_dir / "created-mountpoints"),
        }
        spec_path = self.dir / f"{c.name}.spec.json"
        spec_path.write_text(json.dumps(spec))
        with open(c.log_path, "ab") as out:
            out.write(f"--- pod-runner: start #{c.restart_count} at {now()}: {argv}\n".encode())
            out.flush()
            c.proc = subprocess.Popen(
                [sys.executable, "-S", "-E", str(LAUNCHER), str(spec_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        (self.runner.state_dir / "pgids").mkdir(exist_ok=True)
        (self.runner.state_dir / "pgids" / str(c.proc.pid)).touch()
        c.started_at = now()
        c.state = {"running": {"startedAt": c.started_at}}
        LOG.info("pod %s/%s: started %s (pid %d, ip %s)", self.ns, self.pod_name, c.name, c.proc.pid, self.ip)

    def _command(self, c: ContainerRun) -> tuple[list[str], dict[str, str]]:
        if not c.spec.get("command"):
            raise ConfigError("the e2e pod runner ignores images: the container needs an explicit command")
        env = self._env(c)
        argv = [expand(a, env) for a in c.spec["command"] + c.spec.get("args", [])]
        return argv, env

    def _env(self, c: ContainerRun) -> dict[str, str]:
        pod = json.loads(json.dumps(self.pod))
        pod.setdefault("status", {}).update(
            {
                "podIP": self.ip,
                "podIPs": [{"ip": self.ip}],
                "hostIP": self.runner.host_ip,
                "hostIPs": [{"ip": self.runner.host_ip}],
            }
        )
        base = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "PYTHONUNBUFFERED")}
        base["PATH"] = f"{Path(sys.executable).parent}:{base.get('PATH', '/usr/bin:/bin')}"
        if self.runner.pythonpath:
            base["PYTHONPATH"] = ":".join(p for p in (self.runner.pythonpath, base.get("PYTHONPATH")) if p)
        base["HOSTNAME"] = self._hostname()
        host, port = self.runner.api_host, self.runner.api_port
        base.update(
            {
                "KUBERNETES_SERVICE_HOST": host,
                "KUBERNETES_SERVICE_PORT": port,
                "KUBERNETES_SERVICE_PORT_HTTPS": port,
                "KUBERNETES_PORT": f"tcp://{host}:{port}",
            }
        )
        env: dict[str, str] = {}
        for src in c.spec.get("envFrom", []):
            prefix = src.get("prefix", "")
            if ref := src.get("configMapRef"):
                data = self._configmap(ref["name"], bool(ref.get("optional")))
                env.update({prefix + k: v for k, v in (data.get("data") or {}).items()})
            if ref := src.get("secretRef"):
                data = self._secret(ref["name"], bool(ref.get("optional")))
                env.update(
                    {prefix + k: base64.b64decode(v).decode() for k, v in (data.get("data") or {}).items()}
                )
        for e in c.spec.get("env", []):
            name = e["name"]
            if "valueFrom" not in e:
                env[name] = expand(e.get("value", ""), {**base, **env})
                continue
            vf = e["valueFrom"]
            if ref := vf.get("fieldRef"):
                env[name] = field_value(pod, ref["fieldPath"])
            elif ref := vf.get("resourceFieldRef"):
                env[name] = resource_value(pod, ref, c.name, self.runner.allocatable)
            elif ref := vf.get("configMapKeyRef"):
                value = (self._configmap(ref["name"], bool(ref.get("optional"))).get("data") or {}).get(
                    ref["key"]
                )
                if value is None and not ref.get("optional"):
                    raise ConfigError(f"couldn't find key {ref['key']} in ConfigMap {self.ns}/{ref['name']}")
                if value is not None:
                    env[name] = value
            elif ref := vf.get("secretKeyRef"):
                value = (self._secret(ref["name"], bool(ref.get("optional"))).get("data") or {}).get(
                    ref["key"]
                )
                if value is None and not ref.get("optional"):
                    raise ConfigError(f"couldn't find key {ref['key']} in Secret {self.ns}/{ref['name']}")
                if value is not None:
                    env[name] = base64.b64decode(value).decode()
        return {**base, **env}

    def _configmap(self, name: str, optional: bool) -> Json:
        return self._get("read_namespaced_config_map", "ConfigMap", name, optional)

    def _secret(self, name: str, optional: bool) -> Json:
        return self._get("read_namespaced_secret", "Secret", name, optional)

    def _get(self, method: str, kind: str, name: str, optional: bool) -> Json:
        try:
            obj = getattr(self.runner.core, method)(name, self.ns)
        except ApiException as e:
            if e.status == 404:
                if optional:
                    return {}
                raise ConfigError(f'{kind.lower()} "{name}" not found') from e
            raise
        return self.runner.api.sanitize_for_serialization(obj)

    # -- volumes --

    def _prepare_volumes(self) -> dict[str, Path]:
        paths: dict[str, Path] = {}
        for v in self.pod["spec"].get("volumes", []):
            name, target = v["name"], self.dir / "volumes" / v["name"]
            if "emptyDir" in v:
                target.mkdir(parents=True, exist_ok=True)
            elif hp := v.get("hostPath"):
                target = Path(hp["path"])
                kind = hp.get("type", "")
                if kind == "DirectoryOrCreate":
                    target.mkdir(parents=True, exist_ok=True)
                elif kind == "FileOrCreate" and not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.touch()
                elif not target.exists():
                    raise ConfigError(f"hostPath {target} does not exist")
            elif pvc := v.get("persistentVolumeClaim"):
                target = self.runner.state_dir / "pvc" / self.ns / pvc["claimName"]
                target.mkdir(parents=True, exist_ok=True)
            elif "configMap" in v or "secret" in v or "downwardAPI" in v or "projected" in v:
                sources = v["projected"].get("sources", []) if "projected" in v else [v]
                mode = (v.get("projected") or {}).get("defaultMode")
                files: dict[str, tuple[bytes, int | None]] = {}
                for src in sources:
                    files.update(self._volume_files(src, mode))
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                for rel, (data, file_mode) in files.items():
                    path = target / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(data)
                    path.chmod(file_mode if file_mode is not None else 0o644)
            else:
                kinds = sorted(k for k in v if k != "name")
                raise ConfigError(f"volume {name}: type {kinds} is not emulated by the e2e pod runner")
            paths[name] = target
        return paths

    def _volume_files(self, src: Json, projected_mode: int | None) -> dict[str, tuple[bytes, int | None]]:
        out: dict[str, tuple[bytes, int | None]] = {}

        def keyed(data: dict[str, bytes], cfg: Json) -> None:
            mode = cfg.get("defaultMode", projected_mode)
            items = cfg.get("items")
            if items:
                for it in items:
                    if it["key"] not in data:
                        if cfg.get("optional"):
                            continue
                        raise ConfigError(f"configmap/secret {cfg.get('name')}: no key {it['key']}")
                    out[it["path"]] = (data[it["key"]], it.get("mode", mode))
            else:
                out.update({k: (d, mode) for k, d in data.items()})

        if cfg := src.get("configMap"):
            cm = self._configmap(cfg["name"], bool(cfg.get("optional")))
            data = {k: v.encode() for k, v in (cm.get("data") or {}).items()}
            data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
            keyed(data, cfg)
        if cfg := src.get("secret"):
            name = cfg.get("secretName") or cfg.get("name")
            sec = self._secret(name, bool(cfg.get("optional")))
            keyed({k: base64.b64decode(v) for k, v in (sec.get("data") or {}).items()}, {**cfg, "name": name})
        if cfg := src.get("downwardAPI"):
            pod = json.loads(json.dumps(self.pod))
            pod.setdefault("status", {}).update({"podIP": self.ip, "hostIP": self.runner.host_ip})
            for it in cfg.get("items", []):
                if ref := it.get("fieldRef"):
                    value = field_value(pod, ref["fieldPath"])
                else:
                    value = resource_value(
                        pod,
                        it["resourceFieldRef"],
                        pod["spec"]["containers"][0]["name"],
                        self.runner.allocatable,
                    )
                out[it["path"]] = (value.encode(), it.get("mode", cfg.get("defaultMode", projected_mode)))
        if cfg := src.get("serviceAccountToken"):
            out[cfg["path"]] = (self._token(cfg).encode(), projected_mode)
        return out

    def _token(self, cfg: Json) -> str:
        sa = self.pod["spec"].get("serviceAccountName") or "default"
        body = {
            "spec": {
                "expirationSeconds": cfg.get("expirationSeconds", 3607),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": self.pod_name, "uid": self.uid},
            }
        }
        if cfg.get("audience"):
            body["spec"]["audiences"] = [cfg["audience"]]
        try:
            result = self.runner.core.create_namespaced_service_account_token(sa, self.ns, body)
        except ApiException as e:
            raise ConfigError(f"token for serviceaccount {self.ns}/{sa}: {e.reason}") from e
        return str(result.status.token)

    # -- status --

    def _set_condition(self, kind: str, status: str, reason: str | None = None) -> None:
        old = self.conditions.get(kind)
        if old and old["status"] == status and old.get("reason") == reason:
            return
        self.conditions[kind] = {
            "type": kind,
            "status": status,
            "reason": reason,
            "lastProbeTime": None,
            "lastTransitionTime": now(),
        }

    def _waiting_all(self, reason: str, message: str) -> None:
        for c in self.inits + self.containers:
            c.state = {"waiting": {"reason": reason, "message": message}}
        self._report()

    def _report(self) -> None:
        status: Json = {
            "phase": self.phase,
            "conditions": list(self.conditions.values()),
            "hostIP": self.runner.host_ip,
            "hostIPs": [{"ip": self.runner.host_ip}],
            "startTime": self.start_time,
            "reason": self.reason,
            "message": self.message,
            "containerStatuses": [c.status() for c in self.containers],
        }
        if self.ip:
            status.update({"podIP": self.ip, "podIPs": [{"ip": self.ip}]})
        if self.inits:
            status["initContainerStatuses"] = [c.status() for c in self.inits]
        text = json.dumps(status, sort_keys=True)
        if text == self._last_status or self.gone:
            return
        try:
            # Strategic merge: conditions merge by type and container statuses by name; the explicit nulls in
            # `state` drop the previous state's key.
            self.runner.core.patch_namespaced_pod_status(self.pod_name, self.ns, {"status": status})
            self._last_status = text
        except ApiException as e:
            if e.status == 404:
                self.gone = True
            else:
                LOG.warning("pod %s/%s: status update failed: %s", self.ns, self.pod_name, e.reason)

    # -- stop and delete --

    def _kill_all(self, grace: float) -> None:
        procs = [c for c in self.inits + self.containers if c.proc is not None]
        for c in procs:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, signal.SIGTERM)  # type: ignore[union-attr]
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(c.proc.poll() is None for c in procs):  # type: ignore[union-attr]
            time.sleep(0.1)
        for c in procs:
            assert c.proc is not None
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(c.proc.pid, signal.SIGKILL)
            code = c.proc.wait()
            exit_code = code if code >= 0 else 128 - code
            c.state = {
                "terminated": {
                    "exitCode": exit_code,
                    "reason": "Error" if exit_code else "Completed",
                    "startedAt": c.started_at,
                    "finishedAt": now(),
                    "containerID": f"pod-runner://{c.proc.pid}",
                    **termination_message(c, exit_code),
                }
            }
            (self.runner.state_dir / "pgids" / str(c.proc.pid)).unlink(missing_ok=True)
            c.proc = None
            c.done = True

    def _stop_for_deletion(self) -> None:
        meta = self.pod["metadata"]
        grace = 0.0 if self.gone else float(meta.get("deletionGracePeriodSeconds") or 0)
        if self.runner.stopping.is_set():
            grace = min(grace, 5.0)
        self._kill_all(grace)
        if self.gone or self.runner.stopping.is_set():
            return
        self._set_condition("ContainersReady", "False", "PodCompleted")
        self._set_condition("Ready", "False", "PodCompleted")
        if self.phase not in TERMINAL:
            codes = [c.state.get("terminated", {}).get("exitCode", 0) for c in self.containers]
            self.phase = "Succeeded" if all(code == 0 for code in codes) else "Failed"
        self._report()
        self._finalize()

    def _wait_for_deletion(self) -> None:
        while not self._deleting():
            self.wake.wait(5)
            self.wake.clear()
        if not self.gone and not self.runner.stopping.is_set():
            self._finalize()

    def _finalize(self) -> None:
        body = kubernetes.client.V1DeleteOptions(
            grace_period_seconds=0, preconditions=kubernetes.client.V1Preconditions(uid=self.uid)
        )
        try:
            self.runner.core.delete_namespaced_pod(self.pod_name, self.ns, body=body, grace_period_seconds=0)
        except ApiException as e:
            if e.status not in (404, 409):
                LOG.warning("pod %s/%s: final delete failed: %s", self.ns, self.pod_name, e.reason)

    def _free_address(self) -> None:
        self.runner.hosts.unregister(self.uid)
        if self.ip and self.ip != self.runner.host_ip:
            self.runner.ips.release(self.ip)
        # The status keeps the last podIP (a strategic merge never drops it), as with a kubelet.
        self.ip = None

    def _release(self) -> None:
        self._free_address()
        shutil.rmtree(self.dir, ignore_errors=True)
        self.runner.forget(self.uid, self)


class PodRunner:
    def __init__(
        self,
        api: kubernetes.client.ApiClient,
        nodes: list[str],
        state_dir: Path,
        pod_network: str,
        workdir: Path,
    ) -> None:
        self.api = api
        self.core = kubernetes.client.CoreV1Api(api)
        self.coordination = kubernetes.client.CoordinationV1Api(api)
        self.nodes = nodes
        self.state_dir = state_dir
        self.workdir = workdir
        self.pythonpath = ""
        self.ips = IpPool(pod_network)
        self.hosts = HostsManager(self.core)
        self.stopping = threading.Event()
        self.host_ip = "127.0.0.1"
        url = urlparse(api.configuration.host)
        self.api_host, self.api_port = url.hostname or "127.0.0.1", str(url.port or 443)
        self.allocatable: Json = {}
        self.workers: dict[str, PodWorker] = {}
        self._lock = threading.Lock()
        self.namespaces = self._probe_namespaces()

    def _probe_namespaces(self) -> bool:
        """Whether the launcher can create mount and UTS namespaces here (root or CAP_SYS_ADMIN)."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=self.state_dir) as tmp:
            hosts = Path(tmp) / "hosts"
            hosts.write_text("127.0.0.1 localhost\n")
            spec = {
                "runner_pid": os.getpid(),
                "namespaces": True,
                "mounts": [],
                "hosts": str(hosts),
                "hostname": "probe",
                "cwd": "/",
                "argv": ["true"],
                "env": {"PATH": os.environ["PATH"]},
                "created_log": str(Path(tmp) / "created"),
            }
            (Path(tmp) / "spec.json").write_text(json.dumps(spec))
            result = subprocess.run(
                [sys.executable, "-S", "-E", str(LAUNCHER), str(Path(tmp) / "spec.json")],
                capture_output=True,
                text=True,
            )
        if result.returncode != 0:
            LOG.warning(
                "no mount/UTS namespaces (%s): volumes are not mounted at their mountPath and pod names "
                "do not resolve",
                result.stderr.strip(),
            )
        return result.returncode == 0

    # -- nodes --

    def heartbeat_forever(self) -> None:
        last_status = 0.0
        while not self.stopping.is_set():
            for node in self.nodes:
                try:
                    self._renew_lease(node)
                    if time.monotonic() - last_status > 30:
                        self._node_status(node)
                except Exception:  # noqa: BLE001 - retried on the next beat
                    LOG.exception("heartbeat for node %s", node)
            if time.monotonic() - last_status > 30:
                last_status = time.monotonic()
            self.stopping.wait(10)

    def _renew_lease(self, node: str) -> None:
        renew = dt.datetime.now(dt.UTC)
        body = {
            "metadata": {"name": node, "namespace": "kube-node-lease"},
            "spec": {
                "holderIdentity": node,
                "leaseDurationSeconds": 40,
                "renewTime": renew.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            },
        }
        try:
            self.coordination.patch_namespaced_lease(node, "kube-node-lease", body)
        except ApiException as e:
            if e.status != 404:
                raise
            n = self.core.read_node(node)
            body["metadata"]["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Node", "name": node, "uid": n.metadata.uid}
            ]
            self.coordination.create_namespaced_lease("kube-node-lease", body)

    def _node_status(self, node: str) -> None:
        t = now()
        conditions = [
            ("Ready", "True", "KubeletReady", "e2e pod runner is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure"),
            ("NetworkUnavailable", "False", "RouteCreated", "loopback"),
        ]
        current = self.core.read_node(node)
        self.allocatable = dict(current.status.allocatable or {})
        previous = {c.type: c for c in current.status.conditions or []}
        body = {
            "status": {
                "conditions": [
                    {
                        "type": k,
                        "status": s,
                        "reason": r,
                        "message": m,
                        "lastHeartbeatTime": t,
                        "lastTransitionTime": previous[k].last_transition_time.strftime("%Y-%m-%dT%H:%M:%SZ")
                        if k in previous and previous[k].status == s
                        else t,
                    }
                    for k, s, r, m in conditions
                ],
                "addresses": [
                    {"type": "InternalIP", "address": self.host_ip},
                    {"type": "Hostname", "address": node},
                ],
                "nodeInfo": {
                    "architecture": "amd64",
                    "operatingSystem": "linux",
                    "kubeletVersion": "e2e-pod-runner",
                    "kubeProxyVersion": "",
                    "containerRuntimeVersion": "pod-runner://local",
                    "kernelVersion": os.uname().release,
                    "osImage": "local processes",
                    "machineID": "",
                    "systemUUID": "",
                    "bootID": "",
                },
            }
        }
        self.core.patch_node_status(node, body)

    # -- pods --

    def forget(self, uid: str, worker: PodWorker) -> None:
        with self._lock:
            if self.workers.get(uid) is worker:
                del self.workers[uid]

    def _dispatch(self, kind: str, pod: Json) -> None:
        if pod["spec"].get("nodeName") not in self.nodes:
            return
        uid = pod["metadata"]["uid"]
        with self._lock:
            worker = self.workers.get(uid)
            if kind == "DELETED":
                if worker:
                    worker.deleted()
                return
            if worker is None:
                if (
                    pod["metadata"].get("deletionTimestamp")
                    and pod.get("status", {}).get("phase") in TERMINAL
                ):
                    return
                worker = PodWorker(self, pod)
                self.workers[uid] = worker
                worker.start()
            else:
                worker.update(pod)

    def watch_forever(self) -> None:
        while not self.stopping.is_set():
            try:
                listing = self.core.list_pod_for_all_namespaces()
                seen = set()
                for item in listing.items:
                    pod = self.api.sanitize_for_serialization(item)
                    seen.add(pod["metadata"]["uid"])
                    self._dispatch("MODIFIED", pod)
                with self._lock:
                    vanished = [w for uid, w in self.workers.items() if uid not in seen]
                for w in vanished:
                    w.deleted()
                w = kubernetes.watch.Watch()
                self._watch = w
                for event in w.stream(
                    self.core.list_pod_for_all_namespaces,
                    resource_version=listing.metadata.resource_version,
                    timeout_seconds=120,
                ):
                    if self.stopping.is_set():
                        break
                    if event["type"] == "ERROR":
                        break
                    self._dispatch(event["type"], self.api.sanitize_for_serialization(event["object"]))
            except Exception as e:  # noqa: BLE001 - relist after any watch failure
                if self.stopping.is_set():
                    break
                LOG.warning("pod watch: %s; relisting", e)
                time.sleep(1)

    def refresh_hosts_forever(self) -> None:
        # Services created after a pod started must still show up in its hosts file.
        while not self.stopping.wait(1):
            self.hosts.refresh()

    def stop(self) -> None:
        self.stopping.set()
        with self._lock:
            workers = list(self.workers.values())
        for w in workers:
            w.wake.set()
        for w in workers:
            w.join(timeout=10)
        self.ips.release_all()
        remove_created_mountpoints(self.state_dir)


def main() -> int:
    parser = argparse.ArgumentParser(description="Run the containers of pods bound to the given nodes.")
    parser.add_argument("--kubeconfig", required=True)
    parser.add_argument("--state-dir", required=True, type=Path)
    parser.add_argument("--nodes", required=True, help="comma-separated node names")
    parser.add_argument("--pod-network", default="127.1.0.0/16", help="the CIDR the pod IPs come from")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path("/"),
        help="working dir of containers that do not set workingDir (an image's default is /)",
    )
    parser.add_argument(
        "--pythonpath",
        default="",
        help="folders put first on the containers' PYTHONPATH (what the image would have installed)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(threadName)s %(message)s")

    config = kubernetes.client.Configuration()
    kubernetes.config.load_kube_config(config_file=args.kubeconfig, client_configuration=config)
    config.connection_pool_maxsize = 32
    api = kubernetes.client.ApiClient(config)
    runner = PodRunner(
        api, args.nodes.split(","), args.state_dir.resolve(), args.pod_network, args.workdir.resolve()
    )
    runner.pythonpath = args.pythonpath

    def on_signal(signum: int, _frame: object) -> None:
        LOG.info("signal %d: stopping", signum)
        runner.stopping.set()
        watch = getattr(runner, "_watch", None)
        if watch is not None:
            watch.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    threading.Thread(target=runner.heartbeat_forever, name="heartbeat", daemon=True).start()
    threading.Thread(target=runner.refresh_hosts_forever, name="hosts", daemon=True).start()
    watcher = threading.Thread(target=runner.watch_forever, name="watch", daemon=True)
    watcher.start()
    LOG.info("running pods for nodes %s (namespaces: %s)", runner.nodes, runner.namespaces)
    while not runner.stopping.wait(0.5):
        pass
    runner.stop()
    LOG.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
