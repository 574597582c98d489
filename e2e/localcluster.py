"""A real Kubernetes control plane on loopback, from binaries built by ``e2e/tools/build.sh``.

``LocalCluster.up()`` creates a PKI with openssl, starts etcd, kube-apiserver (RBAC, client-certificate
authentication), kube-controller-manager, kube-scheduler, kwok (fake GPU nodes) and the pod runner
(``e2e/pod_runner.py``), each in its own process group, on free ports of 127.0.0.1, and writes an admin
kubeconfig. ``down()`` stops them all and removes the state. The same code serves the ``e2e/cluster``
command (processes detached, so they outlive the command) and the pytest fixture (processes tied to pytest:
they get SIGKILL if pytest dies, through ``PR_SET_PDEATHSIG``).

Layout: ``<cluster_dir>/kubeconfig`` and ``<cluster_dir>/state.json`` (what ``down`` needs: pids, state dir);
everything else (etcd data, PKI, logs, pod volumes) lives under a temporary state dir, printed by ``up``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import json
import os
import random
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

E2E_DIR = Path(__file__).resolve().parent
REPO_ROOT = E2E_DIR.parent
# The project's source folders, as if the image had the project installed.
SOURCE_DIRS = [REPO_ROOT / d for d in ("api", "cli", "graders", "operator", "trainer-image")]
BUILD_SCRIPT = E2E_DIR / "tools" / "build.sh"
NODES_FILE = E2E_DIR / "kwok" / "nodes.yaml"
STAGES_FILE = E2E_DIR / "kwok" / "stages.yaml"
DEFAULT_CLUSTER_DIR = E2E_DIR / ".cluster"

RUNNER_NODE_LABEL = "whetstone.dev/e2e-runner"
SERVICE_CIDR = "10.96.0.0/16"
# The first address of the service range is the `kubernetes` Service's ClusterIP; the serving cert needs it.
KUBERNETES_SERVICE_IP = "10.96.0.1"
KWOK_POD_CIDR = "10.244.0.0/16"
STATE_DIR_PREFIX = "whetstone-e2e-"
POD_NETWORK_ADDRESS = "198.18.0.1/15"

# Order matters for `down`: stop the runner and the controllers before the API server, etcd last.
STOP_ORDER = [
    "pod-runner",
    "kueue",
    "kwok",
    "kube-scheduler",
    "kube-controller-manager",
    "kube-apiserver",
    "etcd",
]


class ClusterError(RuntimeError):
    pass


class _PortLost(ClusterError):
    """A component could not listen on the port chosen for it."""


def log(message: str) -> None:
    print(f"[cluster {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- binaries ---------------------------------------------------------------------------------------------


@dataclass
class Binaries:
    kube_dir: Path
    etcd_dir: Path
    kwok_dir: Path
    helm_dir: Path
    # Kueue (binary, CRDs, webhook list), built only when asked (`with_kueue`, `e2e/cluster up --kueue`).
    kueue_dir: Path = Path("/nonexistent")

    def path(self, name: str) -> Path:
        folder = {
            "etcd": self.etcd_dir,
            "kwok": self.kwok_dir,
            "helm": self.helm_dir,
            "kueue": self.kueue_dir,
        }.get(name, self.kube_dir)
        return folder / name

    def missing(self) -> list[str]:
        names = ["etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok"]
        return [n for n in names if not os.access(self.path(n), os.X_OK)]


def locate_binaries(build: bool = False, kueue: bool = False) -> Binaries:
    """Ask the build script where the binaries of the pinned versions live; build them if asked (Kueue too
    when `kueue`)."""
    args = ["bash", str(BUILD_SCRIPT)] + ([] if build else ["--print"])
    if build:
        # The control plane needs no helm; later issues build it explicitly.
        tools = os.environ.get("WHETSTONE_E2E_TOOLS", "kube etcd kwok")
        if kueue and "kueue" not in tools.split():
            tools += " kueue"
        env = {**os.environ, "WHETSTONE_E2E_TOOLS": tools}
    else:
        env = dict(os.environ)
    # Build progress goes to stderr (the terminal); the KEY=DIR lines come on stdout.
    out = subprocess.run(args, check=True, text=True, env=env, stdout=subprocess.PIPE)
    dirs = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return Binaries(
        *(Path(dirs[k]) for k in ("KUBE_BIN_DIR", "ETCD_BIN_DIR", "KWOK_BIN_DIR", "HELM_BIN_DIR")),
        kueue_dir=Path(dirs.get("KUEUE_BIN_DIR", "/nonexistent")),
    )


# --- PKI --------------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(pki: Path) -> None:
    """CA, API server serving cert, admin client cert (system:masters) and the service-account key pair."""
    pki.mkdir(parents=True, exist_ok=True)
    _openssl(
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
        "-days",
        "3650",
        "-subj",
        "/CN=whetstone-e2e-ca",
        cwd=pki,
    )
    sans = ",".join(
        [
            "IP:127.0.0.1",
            f"IP:{KUBERNETES_SERVICE_IP}",
            "DNS:localhost",
            "DNS:kubernetes",
            "DNS:kubernetes.default",
            "DNS:kubernetes.default.svc",
            "DNS:kubernetes.default.svc.cluster.local",
        ]
    )
    certs = {
        "apiserver": ("/CN=kube-apiserver", f"subjectAltName={sans}\nextendedKeyUsage=serverAuth\n"),
        "admin": ("/O=system:masters/CN=kube-admin", "extendedKeyUsage=clientAuth\n"),
    }
    for name, (subject, ext) in certs.items():
        (pki / f"{name}.ext").write_text("keyUsage=critical,digitalSignature,keyEncipherment\n" + ext)
        _openssl(
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{name}.key",
            "-out",
            f"{name}.csr",
            "-subj",
            subject,
            cwd=pki,
        )
        _openssl(
            "x509",
            "-req",
            "-in",
            f"{name}.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            f"{name}.crt",
            "-days",
            "3650",
            "-extfile",
            f"{name}.ext",
            cwd=pki,
        )
    _openssl("genrsa", "-out", "sa.key", "2048", cwd=pki)
    _openssl("rsa", "-in", "sa.key", "-pubout", "-out", "sa.pub", cwd=pki)


def write_kubeconfig(path: Path, server: str, pki: Path) -> None:
    import base64

    def b64(name: str) -> str:
        return base64.b64encode((pki / name).read_bytes()).decode()

    # Certificates are embedded so the file can be copied around and used by any client.
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "whetstone-e2e",
                "cluster": {"server": server, "certificate-authority-data": b64("ca.crt")},
            }
        ],
        "users": [
            {
                "name": "kube-admin",
                "user": {"client-certificate-data": b64("admin.crt"), "client-key-data": b64("admin.key")},
            }
        ],
        "contexts": [
            {"name": "whetstone-e2e", "context": {"cluster": "whetstone-e2e", "user": "kube-admin"}}
        ],
        "current-context": "whetstone-e2e",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    path.chmod(0o600)


# --- processes --------------------------------------------------------------------------------------------


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


_taken_ports: set[int] = set()


def free_port() -> int:
    """A port nobody listens on, below the kernel's ephemeral range.

    A port from ``bind(0)`` lies in the ephemeral range, where any outgoing connection (the API server's
    own connections to etcd) can take it between our check and the component's listen: CI lost
    kube-controller-manager's port that way. Ports below the range are only taken by listeners.
    """
    low, _ = _ephemeral_range()
    start = max(1024, low - 16384)
    for _ in range(1000):
        port = random.randrange(start, low)
        if port in _taken_ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken_ports.add(port)
        return port
    raise ClusterError(f"no free port in {start}..{low}")


def _die_with_parent() -> None:
    """Runs in the child between fork and exec: SIGKILL it when the process that started it dies."""
    libc = ctypes.CDLL(None, use_errno=True)
    pr_set_pdeathsig = 1
    libc.prctl(pr_set_pdeathsig, signal.SIGKILL)


def start_process(
    name: str, argv: Sequence[str], logs: Path, attached: bool, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    logs.mkdir(parents=True, exist_ok=True)
    out = open(logs / f"{name}.log", "ab")  # noqa: SIM115 - the child keeps the descriptor
    try:
        return subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
            preexec_fn=_die_with_parent if attached else None,
        )
    finally:
        out.close()


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child still "exists"; reap it if it is ours.
    with contextlib.suppress(ChildProcessError):
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done == pid:
            return False
    return True


def stop_process_group(pid: int, grace: float = 10.0) -> None:
    """SIGTERM the process group led by ``pid``, SIGKILL it after ``grace`` seconds."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.1)
    # The group may hold children that outlived the leader: kill whatever is left either way.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and pid_alive(pid):
        time.sleep(0.05)


def choose_pod_network() -> str:
    """A /24 for this cluster's runner pods, from addresses that are local to this machine.

    198.18.0.0/15 (RFC 2544, benchmarking: never routed on real networks) is added to the loopback device,
    which makes the whole range local, like 127/8. Unlike 127/8, the API server accepts these addresses in
    Endpoints and EndpointSlices, so Services select runner pods as in a real cluster. Each cluster takes a
    random /24 so a developer's cluster and a test session do not hand out the same address. Without the
    rights to add the address (no CAP_NET_ADMIN), fall back to a random 127.X.0.0/16: pods still get their
    own addresses, but the endpoint controllers reject them.
    """
    octet = int.from_bytes(os.urandom(1), "big") % 254 + 1
    listing = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True)
    if POD_NETWORK_ADDRESS in listing.stdout:
        return f"198.18.{octet}.0/24"
    added = subprocess.run(
        ["ip", "addr", "add", POD_NETWORK_ADDRESS, "dev", "lo"], capture_output=True, text=True
    )
    if added.returncode == 0:
        return f"198.18.{octet}.0/24"
    log(f"cannot add {POD_NETWORK_ADDRESS} to lo ({added.stderr.strip()}); runner pods get 127.X addresses")
    return f"127.{octet}.0.0/16"


def remove_pod_addresses(network: str) -> None:
    """The /32s a dead pod runner left on the loopback device (a live one removes its own)."""
    net = ipaddress.ip_network(network)
    listing = subprocess.run(["ip", "-4", "-o", "addr", "show", "dev", "lo"], capture_output=True, text=True)
    for word in listing.stdout.split():
        if word.endswith("/32") and ipaddress.ip_address(word[:-3]) in net:
            subprocess.run(["ip", "addr", "del", word, "dev", "lo"], capture_output=True)


def release_pod_network(own_state_dir: str) -> None:
    """Take the pod range off the loopback device when no other cluster of this machine is running."""
    for d in Path(tempfile.gettempdir()).glob(f"{STATE_DIR_PREFIX}*"):
        if str(d) == own_state_dir:
            continue
        with contextlib.suppress(OSError, ValueError, KeyError):
            if any(pid_alive(p) for p in json.loads((d / "state.json").read_text())["pids"].values()):
                return
    subprocess.run(["ip", "addr", "del", POD_NETWORK_ADDRESS, "dev", "lo"], capture_output=True)


def remove_stale_state_dirs() -> None:
    """State dirs of clusters whose processes are all gone (e.g. pytest was SIGKILLed): remove them."""
    for d in Path(tempfile.gettempdir()).glob(f"{STATE_DIR_PREFIX}*"):
        try:
            pids = json.loads((d / "state.json").read_text())["pids"]
            if time.time() - (d / "state.json").stat().st_mtime < 600 and not pids:
                continue  # probably a cluster that is starting right now
        except (OSError, ValueError, KeyError):
            continue
        if not any(pid_alive(pid) for pid in pids.values()):
            kill_container_groups(d / "runner")
            remove_created_mountpoints(d / "runner")
            shutil.rmtree(d, ignore_errors=True)


def remove_created_mountpoints(runner_state: Path) -> None:
    """Empty mount-point folders the pod runner had to create on the host; a dead runner leaves them."""
    record = runner_state / "created-mountpoints"
    if not record.exists():
        return
    for path in sorted(set(record.read_text().split()), key=len, reverse=True):
        with contextlib.suppress(OSError):
            p = Path(path)
            if p.is_dir():
                p.rmdir()  # only if empty
            elif p.is_file() and p.stat().st_size == 0:
                p.unlink()
    record.unlink()


def kill_container_groups(runner_state: Path) -> None:
    """Containers are process groups of their own; SIGKILL any that a dead runner left behind."""
    folder = runner_state / "pgids"
    for f in folder.iterdir() if folder.exists() else []:
        with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
            os.killpg(int(f.name), signal.SIGKILL)


def wait_until(
    what: str,
    probe: Callable[[], bool],
    timeout: float,
    check_alive: Callable[[], None] | None = None,
    interval: float = 0.25,
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if check_alive:
            check_alive()
        try:
            if probe():
                return
        except Exception:  # noqa: BLE001 - a probe that raises simply means "not yet"
            pass
        if time.monotonic() > deadline:
            raise ClusterError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


# --- the cluster ------------------------------------------------------------------------------------------


@dataclass
class ClusterState:
    cluster_dir: str
    state_dir: str
    kubeconfig: str
    api_server: str
    ports: dict[str, int] = field(default_factory=dict)
    pids: dict[str, int] = field(default_factory=dict)
    pod_network: str = ""
    runner_nodes: list[str] = field(default_factory=list)
    attached: bool = False

    @classmethod
    def load(cls, cluster_dir: Path) -> ClusterState | None:
        path = cluster_dir / "state.json"
        if not path.exists():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self) -> None:
        text = json.dumps(asdict(self), indent=2) + "\n"
        path = Path(self.cluster_dir) / "state.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        # A copy in the state dir lets a later `up` recognise the folder as stale once its processes are gone.
        if Path(self.state_dir).is_dir():
            (Path(self.state_dir) / "state.json").write_text(text)

    @property
    def logs_dir(self) -> Path:
        return Path(self.state_dir) / "logs"


class LocalCluster:
    """One control plane. ``attached=True`` ties its processes to the current process (pytest)."""

    def __init__(
        self,
        cluster_dir: Path = DEFAULT_CLUSTER_DIR,
        attached: bool = False,
        python: str | None = None,
        with_runner: bool = True,
        audit_log: Path | None = None,
        audit_users: Sequence[str] = (),
        with_kueue: bool = False,
    ) -> None:
        self.cluster_dir = Path(cluster_dir).resolve()
        self.attached = attached
        self.python = python or sys.executable
        self.with_runner = with_runner
        # Optional: the API server writes one JSON line per request there (bench/operator_scale.py counts
        # an operator's calls by its user).
        self.audit_log = audit_log
        self.audit_users = list(audit_users)  # only these users' requests (all when empty)
        self.with_kueue = with_kueue
        self.state: ClusterState | None = None
        self._procs: dict[str, subprocess.Popen[bytes]] = {}

    @property
    def kubeconfig(self) -> Path:
        return self.cluster_dir / "kubeconfig"

    # -- up --

    def up(self, build: bool = True, timeout: float = 180.0) -> ClusterState:
        existing = ClusterState.load(self.cluster_dir)
        if existing and any(pid_alive(p) for p in existing.pids.values()):
            raise ClusterError(
                f"a cluster is already running from {self.cluster_dir} (kubeconfig {existing.kubeconfig}); "
                "run `e2e/cluster down` first"
            )
        if existing:
            self._remove_state(existing)
        if shutil.which("openssl") is None:
            raise ClusterError("openssl is not installed (apt-get install -y openssl)")
        bins = locate_binaries(build=build, kueue=self.with_kueue)
        if missing := bins.missing():
            raise ClusterError(f"missing binaries {missing}; run e2e/tools/build.sh")

        remove_stale_state_dirs()
        for attempt in range(1, 4):
            try:
                return self._up_once(bins, timeout)
            except _PortLost as e:
                # Another process may still win a port between our check and the listen; new ports then.
                if attempt == 3:
                    raise ClusterError(str(e)) from e
                log(f"a component lost its port ({e}); starting again on other ports")
        raise AssertionError("unreachable")

    def _up_once(self, bins: Binaries, timeout: float) -> ClusterState:
        state_dir = Path(tempfile.mkdtemp(prefix=STATE_DIR_PREFIX))
        ports = {name: free_port() for name in ("etcd", "etcd-peer", "apiserver", "kcm", "scheduler")}
        server = f"https://127.0.0.1:{ports['apiserver']}"
        pod_network = choose_pod_network()
        nodes = list(yaml.safe_load_all(NODES_FILE.read_text()))
        runner_nodes = [
            n["metadata"]["name"]
            for n in nodes
            if n["metadata"].get("labels", {}).get(RUNNER_NODE_LABEL) == "true"
        ]
        self.state = ClusterState(
            cluster_dir=str(self.cluster_dir),
            state_dir=str(state_dir),
            kubeconfig=str(self.kubeconfig),
            api_server=server,
            ports=ports,
            pod_network=pod_network,
            runner_nodes=runner_nodes,
            attached=self.attached,
        )
        self.state.save()
        try:
            self._start_all(bins, nodes, timeout)
        except BaseException as e:
            log(f"start failed; logs are in {self.state.logs_dir}")
            self._print_log_tails()
            lost_port = isinstance(e, ClusterError) and any(
                "address already in use" in f.read_text(errors="replace")
                for f in self.state.logs_dir.glob("*.log")
            )
            self.down(keep_logs=True)
            if lost_port:
                raise _PortLost(str(e)) from e
            raise
        return self.state

    def _start_all(self, bins: Binaries, nodes: list[dict[str, Any]], timeout: float) -> None:
        assert self.state is not None
        st, d = self.state, Path(self.state.state_dir)
        pki, p = d / "pki", st.ports
        make_pki(pki)
        # The components read an on-disk kubeconfig; the admin one is fine for them in a test cluster.
        admin_kc = d / "admin.kubeconfig"
        write_kubeconfig(admin_kc, st.api_server, pki)

        self._spawn(
            "etcd",
            [
                str(bins.path("etcd")),
                "--name=e2e",
                f"--data-dir={d / 'etcd'}",
                f"--listen-client-urls=http://127.0.0.1:{p['etcd']}",
                f"--advertise-client-urls=http://127.0.0.1:{p['etcd']}",
                f"--listen-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
                f"--initial-advertise-peer-urls=http://127.0.0.1:{p['etcd-peer']}",
                f"--initial-cluster=e2e=http://127.0.0.1:{p['etcd-peer']}",
                # Test data: durability is worth nothing here and fsync costs seconds on a shared disk.
                "--unsafe-no-fsync",
                "--auto-compaction-retention=1",
                "--quota-backend-bytes=2147483648",
                "--log-level=warn",
            ],
        )
        wait_until(
            "etcd",
            lambda: b"true" in _http_get(f"http://127.0.0.1:{p['etcd']}/health"),
            timeout,
            self._check_alive,
        )

        self._spawn(
            "kube-apiserver",
            [
                str(bins.path("kube-apiserver")),
                f"--etcd-servers=http://127.0.0.1:{p['etcd']}",
                "--etcd-prefix=/registry",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={p['apiserver']}",
                f"--tls-cert-file={pki / 'apiserver.crt'}",
                f"--tls-private-key-file={pki / 'apiserver.key'}",
                f"--client-ca-file={pki / 'ca.crt'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                f"--service-account-key-file={pki / 'sa.pub'}",
                f"--service-account-signing-key-file={pki / 'sa.key'}",
                "--api-audiences=https://kubernetes.default.svc.cluster.local",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--authorization-mode=RBAC",
                "--allow-privileged=true",
                "--enable-admission-plugins=NamespaceLifecycle,LimitRanger,ServiceAccount,DefaultStorageClass,"
                "ResourceQuota,Priority,DefaultTolerationSeconds,MutatingAdmissionWebhook,"
                "ValidatingAdmissionWebhook,ValidatingAdmissionPolicy",
                # A 127.0.0.1 endpoint for the `kubernetes` Service fails validation; nothing routes there.
                "--endpoint-reconciler-type=none",
                "--enable-priority-and-fairness=false",
                "--profiling=false",
                "--v=1",
                *self._audit_flags(d),
            ],
        )
        ctx = self.ssl_context()
        wait_until(
            "kube-apiserver /readyz",
            lambda: _http_get(f"{st.api_server}/readyz", ctx) == b"ok",
            timeout,
            self._check_alive,
            interval=0.5,
        )

        auth = [
            f"--kubeconfig={admin_kc}",
            f"--authentication-kubeconfig={admin_kc}",
            f"--authorization-kubeconfig={admin_kc}",
            "--bind-address=127.0.0.1",
            "--leader-elect=false",
        ]
        self._spawn(
            "kube-controller-manager",
            [
                str(bins.path("kube-controller-manager")),
                *auth,
                f"--secure-port={p['kcm']}",
                f"--root-ca-file={pki / 'ca.crt'}",
                f"--service-account-private-key-file={pki / 'sa.key'}",
                "--use-service-account-credentials=false",
                "--controllers=*,-nodeipam",
                "--kube-api-qps=100",
                "--kube-api-burst=200",
            ],
        )
        self._spawn(
            "kube-scheduler", [str(bins.path("kube-scheduler")), *auth, f"--secure-port={p['scheduler']}"]
        )
        insecure = ssl._create_unverified_context()  # their serving certs are self-signed
        for name, port in (("kube-controller-manager", p["kcm"]), ("kube-scheduler", p["scheduler"])):
            wait_until(
                f"{name} /healthz",
                lambda port=port: _http_get(f"https://127.0.0.1:{port}/healthz", insecure) == b"ok",
                timeout,
                self._check_alive,
            )

        api = self.api_client()
        self._create_nodes(api, nodes)
        self._spawn(
            "kwok",
            [
                str(bins.path("kwok")),
                f"--kubeconfig={admin_kc}",
                f"--config={STAGES_FILE}",
                "--manage-all-nodes=false",
                "--manage-nodes-with-annotation-selector=kwok.x-k8s.io/node=fake",
                f"--cidr={KWOK_POD_CIDR}",
                "--node-ip=127.0.0.1",
                "--node-lease-duration-seconds=40",
            ],
        )
        if self.with_runner:
            self._spawn(
                "pod-runner",
                [
                    self.python,
                    str(E2E_DIR / "pod_runner.py"),
                    f"--kubeconfig={admin_kc}",
                    f"--state-dir={d / 'runner'}",
                    f"--nodes={','.join(st.runner_nodes)}",
                    f"--pod-network={st.pod_network}",
                    # As if the image had the project installed: its packages import from the sources.
                    f"--pythonpath={os.pathsep.join(map(str, SOURCE_DIRS))}",
                ],
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        wanted = [
            n["metadata"]["name"]
            for n in nodes
            if self.with_runner or n["metadata"]["name"] not in st.runner_nodes
        ]
        wait_until(
            f"nodes {wanted} Ready",
            lambda: all(_node_ready(api, n) for n in wanted),
            timeout,
            self._check_alive,
            interval=0.5,
        )
        # Pods are rejected until the ServiceAccount admission plugin finds the namespace's default SA.
        wait_until(
            "the default ServiceAccount",
            lambda: _exists(api, "/api/v1/namespaces/default/serviceaccounts/default"),
            timeout,
            self._check_alive,
        )
        if self.with_kueue:
            # Imported here: kueue_local builds on this module's helpers.
            from kueue_local import start_kueue

            self._procs["kueue"] = start_kueue(st, bins, api, self.attached, timeout)
        write_kubeconfig(self.kubeconfig, st.api_server, pki)

    def _audit_flags(self, state_dir: Path) -> list[str]:
        if self.audit_log is None:
            return []
        policy = state_dir / "audit-policy.yaml"
        rule: dict[str, Any] = {"level": "Metadata"}
        if self.audit_users:
            rule["users"] = self.audit_users
        body = {
            "apiVersion": "audit.k8s.io/v1",
            "kind": "Policy",
            "omitStages": ["RequestReceived", "ResponseStarted"],
            "rules": [rule, {"level": "None"}],
        }
        policy.write_text(yaml.safe_dump(body))
        return [
            f"--audit-policy-file={policy}",
            f"--audit-log-path={self.audit_log}",
            "--audit-log-format=json",
            "--audit-log-mode=batch",
            "--audit-log-batch-max-wait=1s",
        ]

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> None:
        assert self.state is not None
        proc = start_process(name, argv, self.state.logs_dir, self.attached, env)
        self._procs[name] = proc
        self.state.pids[name] = proc.pid
        self.state.save()

    def _check_alive(self) -> None:
        for name, proc in self._procs.items():
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with code {proc.returncode}")

    def _print_log_tails(self) -> None:
        assert self.state is not None
        for name in self._procs:
            path = self.state.logs_dir / f"{name}.log"
            if path.exists():
                tail = path.read_text(errors="replace").splitlines()[-15:]
                log(f"--- {path} (last lines) ---\n" + "\n".join(tail))

    def _create_nodes(self, api: ApiClient, nodes: list[dict[str, Any]]) -> None:
        for node in nodes:
            body = {k: v for k, v in node.items() if k != "status"}
            api.request("POST", "/api/v1/nodes", body)
            # Status is a subresource: set capacity there, so it is kept whatever create does with it.
            api.request(
                "PATCH",
                f"/api/v1/nodes/{node['metadata']['name']}/status",
                {"status": node.get("status", {})},
                content_type="application/merge-patch+json",
            )

    # -- clients --

    def ssl_context(self) -> ssl.SSLContext:
        assert self.state is not None
        pki = Path(self.state.state_dir) / "pki"
        ctx = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        ctx.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))
        return ctx

    def api_client(self) -> ApiClient:
        assert self.state is not None
        return ApiClient(self.state.api_server, self.ssl_context())

    # -- down --

    def down(self, keep_logs: bool = False) -> None:
        state = self.state or ClusterState.load(self.cluster_dir)
        if state is None:
            return
        for name in STOP_ORDER:
            pid = state.pids.get(name)
            if pid and pid_alive(pid):
                stop_process_group(pid, grace=15.0 if name == "pod-runner" else 10.0)
            if name == "pod-runner":
                kill_container_groups(Path(state.state_dir) / "runner")
                remove_created_mountpoints(Path(state.state_dir) / "runner")
        for proc in self._procs.values():
            with contextlib.suppress(Exception):
                proc.wait(timeout=1)
        self._procs.clear()
        if keep_logs:
            for child in Path(state.state_dir).iterdir() if Path(state.state_dir).exists() else []:
                if child.name != "logs":
                    shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink()
            for name in ("state.json", "kubeconfig"):
                (Path(state.cluster_dir) / name).unlink(missing_ok=True)
        else:
            self._remove_state(state)
        if state.pod_network.startswith("198.18."):
            remove_pod_addresses(state.pod_network)
            release_pod_network(state.state_dir)
        self.state = None

    @staticmethod
    def _remove_state(state: ClusterState) -> None:
        shutil.rmtree(state.state_dir, ignore_errors=True)
        for name in ("state.json", "kubeconfig"):
            (Path(state.cluster_dir) / name).unlink(missing_ok=True)


# --- a minimal REST client (the control plane code does not depend on the kubernetes package) ----------


class ApiClient:
    def __init__(self, server: str, ctx: ssl.SSLContext) -> None:
        self.server, self.ctx = server, ctx

    def request(
        self, method: str, path: str, body: Any = None, content_type: str = "application/json"
    ) -> dict[str, Any]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            self.server + path,
            data=data,
            method=method,
            headers={"Content-Type": content_type, "Accept": "application/json"},
        )
        with urllib.request.urlopen(req, context=self.ctx, timeout=30) as resp:
            return json.loads(resp.read() or b"{}")


def _http_get(url: str, ctx: ssl.SSLContext | None = None) -> bytes:
    with urllib.request.urlopen(url, context=ctx, timeout=5) as resp:
        return resp.read().strip()


def _exists(api: ApiClient, path: str) -> bool:
    try:
        api.request("GET", path)
        return True
    except urllib.error.HTTPError as e:
        if e.code == 404:
            return False
        raise


def _node_ready(api: ApiClient, name: str) -> bool:
    node = api.request("GET", f"/api/v1/nodes/{name}")
    conds = node.get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conds)


# --- command line -----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="e2e/cluster", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start the cluster; prints the kubeconfig path")
    up.add_argument("--no-build", action="store_true", help="fail instead of building missing binaries")
    up.add_argument("--no-runner", action="store_true", help="do not start the pod runner")
    up.add_argument(
        "--kueue", action="store_true", help="also install and start Kueue (built on first use, cached)"
    )
    sub.add_parser("down", help="stop everything and remove the state")
    sub.add_parser("status", help="print the state (ports, pids, logs folder)")
    parser.add_argument("--cluster-dir", type=Path, default=DEFAULT_CLUSTER_DIR)
    args = parser.parse_args(argv)

    cluster = LocalCluster(args.cluster_dir)
    if args.command == "up":
        started = time.monotonic()
        cluster.with_runner = not args.no_runner
        cluster.with_kueue = args.kueue
        state = cluster.up(build=not args.no_build)
        log(
            f"up in {time.monotonic() - started:.1f} s; API server {state.api_server}; "
            f"logs in {state.logs_dir}"
        )
        log(f"use it with: export KUBECONFIG={state.kubeconfig}")
        print(state.kubeconfig)
    elif args.command == "down":
        state = ClusterState.load(args.cluster_dir)
        cluster.down()
        log("stopped" if state else "no cluster was running")
    else:
        state = ClusterState.load(args.cluster_dir)
        if state is None:
            print("no cluster")
            return 1
        alive = {name: pid_alive(pid) for name, pid in state.pids.items()}
        print(json.dumps({**asdict(state), "alive": alive}, indent=2))
        return 0 if all(alive.values()) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
