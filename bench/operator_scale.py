"""The operator at scale, side by side on one loopback control plane (e2e/localcluster.py, KWOK nodes only):

1. Start-up of N jobs: N jobs are created while the operator is stopped, then it starts; the time until all
   N pods exist (and until every job says Running), the operator's CPU seconds and peak memory (VmHWM).
   Each job asks for one GPU on a pool of fake 8-GPU KWOK nodes (the GPU path: quantities, scheduling).
2. Steady state: with N Running jobs and the default 10 s resync, the operator's API calls per second per 100
   Running jobs over a window, counted from the API server's audit log by the operator's user (watches
   excluded: one long request each).

Operators compared, one at a time:
- whetstone before: the operator of an earlier commit (--before, default the base of issue 7), from `git
  archive`, with that commit's own RBAC;
- whetstone after: this checkout's operator;
- kubeflow: the Kubeflow training-operator's PyTorchJob controller built from its Go module
  (e2e/tools/kubeflow.sh; PyTorchJobs with one Master replica), at controller-runtime's default client QPS
  (20, burst 30) and with raised QPS (--kubeflow-qps).

    python bench/operator_scale.py [--sizes 100 500] [--window 60] [--before 9dc7cd4] [--skip-kubeflow]
                                   [--rounds 5]

Prints a table and writes the figures as JSON (--json). Never a timed test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import re
import signal
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import kubernetes
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "e2e"))

from helpers import GPU_TOLERATION, Cluster, wait_for  # noqa: E402
from localcluster import LocalCluster  # noqa: E402
from operator_fixtures import (  # noqa: E402
    GROUP,
    OPERATOR_NS,
    OPERATOR_SA,
    VERSION,
    apply_crds,
    apply_rbac,
    free_port,
    token_kubeconfig,
)

Json = dict[str, Any]
BASE_OF_ISSUE_7 = "9dc7cd4"
POOL_LABEL = "whetstone.dev/bench-pool"
NODE_PODS, NODE_GPUS = 110, 8
CLK_TCK = os.sysconf("SC_CLK_TCK")
KUBEFLOW_SA = "kubeflow-bench"
STALL_SECONDS = 120


# --- the cluster --------------------------------------------------------------------------------------------


def add_gpu_nodes(cluster: Cluster, count: int) -> None:
    """Fake 8-GPU nodes for KWOK (annotation kwok.x-k8s.io/node=fake), enough for every bench pod."""

    def one(i: int) -> None:
        name = f"bench-gpu-{i}"
        body = {
            "metadata": {
                "name": name,
                "annotations": {"kwok.x-k8s.io/node": "fake"},
                "labels": {"kubernetes.io/hostname": name, "type": "kwok", POOL_LABEL: "gpu"},
            },
            "spec": {"taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}]},
        }
        cluster.core.create_node(body)
        capacity = {"cpu": "192", "memory": "2Ti", "pods": str(NODE_PODS), "nvidia.com/gpu": str(NODE_GPUS)}
        cluster.core.patch_node_status(name, {"status": {"capacity": capacity, "allocatable": capacity}})

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(count)))

    def ready() -> bool:
        nodes = cluster.core.list_node(label_selector=f"{POOL_LABEL}=gpu").items
        return len(nodes) == count and all(
            any(c.type == "Ready" and c.status == "True" for c in n.status.conditions or []) for n in nodes
        )

    wait_for(ready, 300, "the bench GPU nodes to be Ready")


def apply_pytorchjob_crd(cluster: Cluster) -> None:
    mod = Path.home() / "go" / "pkg" / "mod" / "github.com" / "kubeflow" / "training-operator@v1.8.1"
    body = yaml.safe_load((mod / "manifests" / "base" / "crds" / "kubeflow.org_pytorchjobs.yaml").read_text())
    try:
        cluster.extensions.create_custom_resource_definition(body)
    except kubernetes.client.ApiException as e:
        if e.status != 409:
            raise

    def established() -> bool:
        crd = cluster.extensions.read_custom_resource_definition(body["metadata"]["name"])
        return any(c.type == "Established" and c.status == "True" for c in crd.status.conditions or [])

    wait_for(established, 60, "the PyTorchJob CRD")


def admin_token_kubeconfig(cluster: Cluster, folder: Path) -> Path:
    """A ServiceAccount with cluster-admin for the peer: its calls get a user of their own in the audit."""
    rbac = kubernetes.client.RbacAuthorizationV1Api(cluster.api)
    cluster.core.create_namespaced_service_account(OPERATOR_NS, {"metadata": {"name": KUBEFLOW_SA}})
    rbac.create_cluster_role_binding(
        {
            "metadata": {"name": KUBEFLOW_SA},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "cluster-admin",
            },
            "subjects": [{"kind": "ServiceAccount", "name": KUBEFLOW_SA, "namespace": OPERATOR_NS}],
        }
    )
    return token_kubeconfig(cluster, folder, KUBEFLOW_SA)


# --- the jobs -----------------------------------------------------------------------------------------------


def finetunejob(name: str, gpus: int = 1) -> Json:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "method": "sft",
            "baseModel": {"uri": "hf://Qwen/Qwen3-8B"},
            "dataset": {"uri": "s3://bench/train.jsonl"},
            "lora": {},
            "output": {"uri": f"s3://bench/out/{name}"},
            "gpusPerNode": gpus,
            "nodeSelector": {POOL_LABEL: "gpu"},
            "tolerations": [GPU_TOLERATION],
        },
    }


def pytorchjob(name: str) -> Json:
    container = {
        "name": "pytorch",
        "image": "ghcr.io/whetstone-dev/whetstone-trainer:0.1.0",
        "command": ["torchrun", "-m", "whetstone_trainer"],
        "resources": {"limits": {"nvidia.com/gpu": "1"}, "requests": {"nvidia.com/gpu": "1"}},
    }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name},
        "spec": {
            "pytorchReplicaSpecs": {
                "Master": {
                    "replicas": 1,
                    "restartPolicy": "OnFailure",
                    "template": {
                        "spec": {
                            "containers": [container],
                            "nodeSelector": {POOL_LABEL: "gpu"},
                            "tolerations": [GPU_TOLERATION],
                        }
                    },
                }
            }
        },
    }


def create_jobs(cluster: Cluster, namespace: str, kind: str, n: int) -> None:
    plural, group, version = (
        ("pytorchjobs", "kubeflow.org", "v1") if kind == "PyTorchJob" else ("finetunejobs", GROUP, VERSION)
    )
    # The operator before issue 7 could not create a pod asking for a GPU (an int quantity the client
    # refuses): its jobs ask for none, so that its API calls can be measured at all.
    builders = {"FineTuneJob": finetunejob, "FineTuneJob-cpu": lambda name: finetunejob(name, 0)}
    build = builders.get(kind, pytorchjob)

    def one(i: int) -> None:
        cluster.custom.create_namespaced_custom_object(
            group, version, namespace, plural, build(f"job-{i:04d}")
        )

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(one, range(n)))


def running_jobs(cluster: Cluster, namespace: str, kind: str) -> int:
    if kind.startswith("FineTuneJob"):
        items = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs")[
            "items"
        ]
        return sum((j.get("status") or {}).get("phase") == "Running" for j in items)
    items = cluster.custom.list_namespaced_custom_object("kubeflow.org", "v1", namespace, "pytorchjobs")[
        "items"
    ]
    return sum(
        any(
            c.get("type") == "Running" and c.get("status") == "True"
            for c in (j.get("status") or {}).get("conditions") or []
        )
        for j in items
    )


# --- the operators ------------------------------------------------------------------------------------------


class Process:
    """An operator process, with its CPU time and peak memory read from /proc."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        self.argv, self.env, self.log, self.cwd = argv, env, log, cwd
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd
            )

    def cpu_seconds(self) -> float:
        assert self.proc is not None
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / CLK_TCK

    def peak_rss_mib(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        return math.nan

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def whetstone(tree: Path, kubeconfig: Path, log: Path, namespace: str) -> Process:
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), PYTHONUNBUFFERED="1")
    # graders: the operator checks RewardGraders with it; never left to whichever checkout the venv points at.
    folders = ("api", "cli", "operator", "trainer-image", "graders")
    env["PYTHONPATH"] = os.pathsep.join(str(tree / d) for d in folders if (tree / d).is_dir())
    argv = [
        sys.executable,
        "-m",
        "whetstone_cli.main",
        "operator",
        "--host",
        "127.0.0.1",
        "--port",
        str(free_port()),
    ]
    argv += ["-n", namespace]
    if (tree / "operator" / "whetstone_operator" / "leader.py").exists():
        argv += ["--lease-namespace", OPERATOR_NS]
    return Process(argv, env, log, tree)


def kubeflow(binary: Path, kubeconfig: Path, log: Path, qps: float, burst: int) -> Process:
    env = dict(os.environ, KUBECONFIG=str(kubeconfig))
    argv = [str(binary), f"--kube-api-qps={qps}", f"--kube-api-burst={burst}"]
    return Process(argv, env, log, log.parent)


def checkout(ref: str, folder: Path) -> Path:
    """The tree of commit `ref`, unpacked (git archive)."""
    target = folder / f"tree-{ref}"
    target.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", ref], cwd=REPO, check=True, capture_output=True).stdout
    tar = folder / f"{ref}.tar"
    tar.write_bytes(archive)
    with tarfile.open(tar) as t:
        t.extractall(target, filter="data")
    return target


# --- measuring ----------------------------------------------------------------------------------------------


class Audit:
    """API requests of one user, from the audit log (JSON lines), between two offsets."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def offset(self) -> int:
        return self.path.stat().st_size if self.path.exists() else 0

    def calls(self, user: str, start: int, end: int) -> Counter[tuple[str, str]]:
        out: Counter[tuple[str, str]] = Counter()
        with self.path.open("rb") as f:
            f.seek(start)
            for line in f.read(end - start).splitlines():
                try:
                    event = json.loads(line)
                except ValueError:
                    continue
                if event.get("user", {}).get("username") != user or event.get("verb") == "watch":
                    continue
                ref = event.get("objectRef") or {}
                resource = ref.get("resource", "?") + (
                    f"/{ref['subresource']}" if ref.get("subresource") else ""
                )
                out[(event.get("verb", "?"), resource)] += 1
        return out


def measure(
    cluster: Cluster,
    label: str,
    kind: str,
    n: int,
    setup: Any,
    make: Any,
    audit: Audit,
    user: str,
    window: float,
    timeout: float,
) -> Json:
    slug = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
    namespace = f"bench-{slug[:45].strip('-')}-{n}"
    cluster.core.create_namespace({"metadata": {"name": namespace}})
    wait_for(lambda: cluster.core.read_namespaced_service_account("default", namespace), 60, "default SA")
    setup()
    wait_listable(cluster, namespace)
    create_jobs(cluster, namespace, kind, n)
    proc: Process = make(namespace)
    started = time.monotonic()
    proc.start()
    pods_at = running_at = None
    seen, progress_at = 0, started
    try:
        while time.monotonic() - started < timeout and proc.alive():
            if pods_at is None:
                pods = cluster.core.list_namespaced_pod(namespace, _preload_content=False)
                count = len(json.loads(pods.data)["items"])
                if count > seen:
                    seen, progress_at = count, time.monotonic()
                elif time.monotonic() - progress_at > STALL_SECONDS:
                    print(
                        f"[bench] {label}: no new pod for {STALL_SECONDS} s ({seen} of {n}); giving up",
                        file=sys.stderr,
                    )
                    break
                if count >= n:
                    pods_at = time.monotonic() - started
            if pods_at is not None and running_jobs(cluster, namespace, kind) >= n:
                running_at = time.monotonic() - started
                break
            time.sleep(0.25)
        cpu_startup = proc.cpu_seconds() if proc.alive() else math.nan
        steady: Json = {}
        if running_at is not None and window > 0:
            time.sleep(5)  # let the start-up settle
            before, cpu0, t0 = audit.offset(), proc.cpu_seconds(), time.monotonic()
            time.sleep(window)
            time.sleep(2)  # the audit batch (max wait 1 s) reaches the file
            calls = audit.calls(user, before, audit.offset())
            elapsed = time.monotonic() - t0 - 2
            total = sum(calls.values())
            steady = {
                "calls_per_second": total / elapsed,
                "calls_per_second_per_100_running": total / elapsed * 100 / n,
                "cpu_seconds_per_minute": (proc.cpu_seconds() - cpu0) / elapsed * 60,
                "by_call": {f"{v} {r}": c for (v, r), c in calls.most_common()},
            }
        peak = proc.peak_rss_mib() if proc.alive() else math.nan
    finally:
        proc.stop()
        drop_finalizers(cluster, namespace)
        with contextlib.suppress(kubernetes.client.ApiException):
            cluster.core.delete_namespace(namespace)
        # The next operator starts on a quiet cluster (a namespace held by finalizers is left behind).
        with contextlib.suppress(AssertionError):
            wait_for(lambda: not namespace_exists(cluster, namespace), 120, f"namespace {namespace} gone")
    return {
        "operator": label,
        "jobs": n,
        "all_pods_created_seconds": pods_at,
        "all_running_seconds": running_at,
        "startup_cpu_seconds": cpu_startup,
        "peak_rss_mib": peak,
        **steady,
    }


def wait_listable(cluster: Cluster, namespace: str) -> None:
    """Until the API server lists the Whetstone kinds again: a replaced CRD (each variant applies its own)
    re-initialises its watch cache for a moment ('storage is (re)initializing', 429), which an operator
    started then would spend on its retry back-off, not on its work."""

    def listable() -> bool:
        for plural in ("finetunejobs", "checkpoints", "rewardgraders", "trainingsessions"):
            try:
                cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, plural, limit=1)
            except kubernetes.client.ApiException as e:
                if e.status != 404:  # 404: a kind the 'before' commit did not have
                    return False
        return True

    wait_for(listable, 60, "the Whetstone kinds listable")


def drop_finalizers(cluster: Cluster, namespace: str) -> None:
    """The operator before issue 7 left a finalizer on every job; without it running, the namespace could
    never go."""
    items = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs")["items"]
    for job in items:
        if job["metadata"].get("finalizers"):
            patch = {"metadata": {"finalizers": None}}
            with contextlib.suppress(kubernetes.client.ApiException):
                cluster.custom.patch_namespaced_custom_object(
                    GROUP, VERSION, namespace, "finetunejobs", job["metadata"]["name"], patch
                )


def namespace_exists(cluster: Cluster, name: str) -> bool:
    try:
        cluster.core.read_namespace(name)
        return True
    except kubernetes.client.ApiException as e:
        if e.status == 404:
            return False
        raise


def _interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # run the finally blocks: stop the operators, the cluster


def fmt(value: Any, spec: str = ".1f") -> str:
    return "—" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--window", type=float, default=60.0, help="seconds of steady state counted")
    parser.add_argument("--before", default=BASE_OF_ISSUE_7, help="commit of the 'before' operator")
    parser.add_argument("--skip-kubeflow", action="store_true")
    parser.add_argument("--skip-before", action="store_true")
    parser.add_argument("--kubeflow-qps", type=float, default=500.0, help="raised client QPS of the peer")
    parser.add_argument("--timeout", type=float, default=900.0, help="most seconds one start-up may take")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every operator this many times, in a rotated order each round; medians are reported",
    )
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    folder = Path(tempfile.mkdtemp(prefix="whetstone-bench-"))
    audit_path = folder / "audit.log"
    binary = None
    if not args.skip_kubeflow:
        built = subprocess.run(
            [str(REPO / "e2e" / "tools" / "kubeflow.sh")], check=True, capture_output=True, text=True
        )
        binary = Path(built.stdout.strip().splitlines()[-1])
    before_tree = None if args.skip_before else checkout(args.before, folder)
    operator_user = f"system:serviceaccount:{OPERATOR_NS}:{OPERATOR_SA}"
    kf_user = f"system:serviceaccount:{OPERATOR_NS}:{KUBEFLOW_SA}"
    local = LocalCluster(
        folder / "cluster",
        attached=True,
        with_runner=False,
        audit_log=audit_path,
        audit_users=[operator_user, kf_user],
    )
    signal.signal(signal.SIGTERM, _interrupt)
    state = local.up(build=False)
    results: list[Json] = []
    try:
        cluster = Cluster.connect(state)
        add_gpu_nodes(cluster, math.ceil(max(args.sizes) / NODE_GPUS) + 2)
        apply_crds(cluster)
        apply_rbac(cluster)
        audit = Audit(audit_path)
        variants: list[tuple[str, str, Any, Any, str]] = []
        if before_tree is not None:

            def before_setup(tree: Path = before_tree) -> None:
                # That commit's own CRDs (its models refuse fields added since) and RBAC.
                apply_crds(cluster, tree / "crds")
                apply_rbac(cluster, list(yaml.safe_load_all((tree / "manifests/base/rbac.yaml").read_text())))

            def before(ns: str, tree: Path = before_tree) -> Process:
                return whetstone(tree, token_kubeconfig(cluster, folder), folder / "before.log", ns)

            # The base of issue 7 could not create GPU pods (see create_jobs); later commits run the same jobs
            if args.before == BASE_OF_ISSUE_7:
                label, kind = f"whetstone before ({args.before}), jobs without GPU", "FineTuneJob-cpu"
            else:
                label, kind = f"whetstone before ({args.before})", "FineTuneJob"
            variants.append((label, kind, before_setup, before, operator_user))

        def after_setup() -> None:
            apply_crds(cluster)
            apply_rbac(cluster)

        def after(ns: str) -> Process:
            return whetstone(REPO, token_kubeconfig(cluster, folder), folder / "after.log", ns)

        variants.append(("whetstone after", "FineTuneJob", after_setup, after, operator_user))
        if binary is not None:
            apply_pytorchjob_crd(cluster)
            kc_kf = admin_token_kubeconfig(cluster, folder)
            for qps, burst in ((20.0, 30), (args.kubeflow_qps, int(args.kubeflow_qps * 2))):
                variants.append(
                    (
                        f"kubeflow (QPS {qps:g})",
                        "PyTorchJob",
                        lambda: None,
                        lambda ns, q=qps, b=burst: kubeflow(
                            binary, kc_kf, folder / f"kubeflow-{q:g}.log", q, b
                        ),
                        kf_user,
                    )
                )
        for r in range(args.rounds):
            # Rotated, so that no operator always runs first on a fresh cluster or right after another.
            k = r % len(variants)
            for label, kind, setup, make, user in variants[k:] + variants[:k]:
                for n in args.sizes:
                    print(f"[bench] round {r + 1}: {label}: N={n}", file=sys.stderr, flush=True)
                    window = args.window if n == min(args.sizes) and r == 0 else 0.0
                    results.append(
                        measure(cluster, label, kind, n, setup, make, audit, user, window, args.timeout)
                    )
    finally:
        local.down()

    print(f"\nOperator scale, loopback control plane, {len(results)} runs; logs in {folder}\n")
    print("| operator | N | all pods exist | all jobs Running | CPU s (start-up) | peak RSS MiB |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        print(
            f"| {r['operator']} | {r['jobs']} | {fmt(r['all_pods_created_seconds'])} s | "
            f"{fmt(r['all_running_seconds'])} s | {fmt(r['startup_cpu_seconds'])} | "
            f"{fmt(r['peak_rss_mib'], '.0f')} |"
        )
    if args.rounds > 1:
        print(f"\nMedians over {args.rounds} rounds (each run's figure in brackets):\n")
        print("| operator | N | all pods exist | all jobs Running | CPU s (start-up) |")
        print("| --- | ---: | ---: | ---: | ---: |")
        groups: dict[tuple[str, int], list[Json]] = {}
        for r in results:
            groups.setdefault((r["operator"], r["jobs"]), []).append(r)
        for (label, n), runs in groups.items():
            cells = []
            for key in ("all_pods_created_seconds", "all_running_seconds", "startup_cpu_seconds"):
                values = [v for v in (run[key] for run in runs) if v is not None and not math.isnan(v)]
                each = ", ".join(fmt(v) for v in values)
                cells.append(f"{fmt(statistics.median(values)) if values else '-'} ({each})")
            print(f"| {label} | {n} | {cells[0]} | {cells[1]} | {cells[2]} |")
    print("\nSteady state (default resync), API calls per second per 100 Running jobs:\n")
    for r in results:
        if "calls_per_second_per_100_running" in r:
            top = ", ".join(f"{k} {v}" for k, v in list(r["by_call"].items())[:6])
            print(
                f"- {r['operator']} (N={r['jobs']}): {r['calls_per_second_per_100_running']:.2f} calls/s "
                f"per 100 jobs; {r['cpu_seconds_per_minute']:.1f} CPU s/min; calls in the window: "
                f"{top or 'none'}"
            )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
