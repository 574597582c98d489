"""`whetstone logs JOB [-f]`: the log of a FineTuneJob's rank-0 trainer (or --rank N), through the API
(`kubectl logs` of pod <job>-node-<rank>, container trainer). With -f it follows the job, not one pod: after
a group restart it goes on with the new pod, and it ends when the job succeeds or fails.

The repository's local cluster (e2e/cluster up) has no kubelets, so the API server cannot serve pod logs
there; for that cluster only, the log is read from the pod runner's files (its state dir is next to the
kubeconfig), which hold every attempt of the pod one after the other.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from .kube import FINETUNEJOB, TRAINER_CONTAINER, CliError, Cluster, Json, add_cluster_arguments, command

TERMINAL = ("Succeeded", "Failed", "Deleted")
POLL_SECONDS = 1.0


def register(sub: Any) -> None:
    p = sub.add_parser("logs", help="print (or follow) the log of a job's rank-0 trainer")
    p.add_argument("job", help="FineTuneJob name (or ftj/NAME)")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the job succeeds or fails")
    p.add_argument("--rank", type=int, default=0, help="node rank whose pod to read (default 0)")
    p.add_argument("--tail", type=int, help="only the last N lines (before following)")
    add_cluster_arguments(p)
    p.set_defaults(func=run)


@command
def run(args: argparse.Namespace) -> int:
    name = args.job.split("/", 1)[1] if "/" in args.job else args.job
    cluster = Cluster(args)
    cluster.get(FINETUNEJOB, name)  # a clear "not found" before anything else
    pod = f"{name}-node-{args.rank}"
    source = LogSource(cluster, cluster.namespace, name, pod)
    source.print(args.follow, args.tail)
    return 0


def local_cluster_log(kubeconfig: Path | None, namespace: str, pod: str, container: str) -> Path | None:
    """The pod runner's log file when the kubeconfig is the one `e2e/cluster up` wrote (state.json beside
    it names the cluster's state dir); None for any other cluster."""
    if kubeconfig is None:
        return None
    try:
        state = json.loads((kubeconfig.parent / "state.json").read_text())
        if Path(state["kubeconfig"]).resolve() != kubeconfig.resolve():
            return None
        return Path(state["state_dir"]) / "runner" / "logs" / namespace / pod / f"{container}.log"
    except (OSError, ValueError, KeyError):
        return None


class LogSource:
    def __init__(self, cluster: Cluster, namespace: str, job: str, pod: str) -> None:
        self.cluster, self.namespace, self.job, self.pod = cluster, namespace, job, pod

    def job_phase(self) -> str | None:
        try:
            return (self.cluster.get(FINETUNEJOB, self.job).get("status") or {}).get("phase")
        except CliError:  # deleted while we follow it: nothing more will come
            return "Deleted"

    def wait_for_pod(self, follow: bool, seen_uid: str | None = None) -> Json | None:
        """The pod once it has started (or ended); a new one after a restart. None when the job ended."""
        while True:
            pod = self.cluster.pod(self.namespace, self.pod)
            phase = (pod or {}).get("status", {}).get("phase")
            if pod and pod["metadata"]["uid"] != seen_uid and phase in ("Running", "Succeeded", "Failed"):
                return pod
            job_phase = self.job_phase()
            if not follow or job_phase in TERMINAL:
                if seen_uid is not None or pod is not None:
                    return None
                raise CliError(f"pod {self.pod} has no log yet (job phase {job_phase or 'unknown'}); try -f")
            time.sleep(POLL_SECONDS)

    def print(self, follow: bool, tail: int | None) -> None:
        pod = self.wait_for_pod(follow)
        if pod is None:
            return
        try:
            self._from_api(pod, follow, tail)
        except CliError:
            raise
        except Exception as e:  # noqa: BLE001 - API errors decide between the fallback and a message
            if not self.cluster.is_api_error(e):
                raise
            path = local_cluster_log(self.cluster.kubeconfig, self.namespace, self.pod, TRAINER_CONTAINER)
            if path is None or not path.exists():
                from .kube import api_message

                raise CliError(f"cannot read the log of pod {self.pod}: {api_message(e)}") from None
            self._from_file(path, follow, tail)

    def _from_api(self, pod: Json, follow: bool, tail: int | None) -> None:
        while pod is not None:
            stream = self.cluster.pod_log_stream(self.namespace, self.pod, TRAINER_CONTAINER, follow, tail)
            for chunk in stream.stream(4096):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
            if not follow:
                return
            uid = pod["metadata"]["uid"]
            pod = self.wait_for_pod(follow, seen_uid=uid)
            if pod is not None:
                attempt = pod["metadata"].get("labels", {}).get("whetstone.dev/attempt", "?")
                print(f"--- {self.pod} restarted (attempt {attempt}) ---", file=sys.stderr, flush=True)
                tail = None

    def _from_file(self, path: Path, follow: bool, tail: int | None) -> None:
        data = path.read_bytes()
        if tail is not None:
            data = b"".join(data.splitlines(keepends=True)[-tail:]) if tail > 0 else b""
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        if not follow:
            return
        offset = path.stat().st_size
        while True:
            ended = self.job_phase() in TERMINAL
            size = path.stat().st_size
            if size > offset:
                with path.open("rb") as f:
                    f.seek(offset)
                    sys.stdout.buffer.write(f.read(size - offset))
                    sys.stdout.flush()
                offset = size
            elif ended:
                return
            time.sleep(POLL_SECONDS)
