"""The install paths, end to end, on one cluster: `./try-cluster.sh` run from a fresh copy of the repository
starts the local control plane, installs the chart (the operator runs as a pod of the pod runner, with its
ServiceAccount's token, so a missing RBAC verb fails here) and fine-tunes the example to Succeeded. On that
cluster, in order:

- the CLI on a running job: get, describe (with rank 0's /status through the API server's pod proxy), logs,
  wait, delete; create --dry-run (client and server); plot of the finished job's metrics;
- every object the chart and the kustomize folders render passes a server-side dry-run, with the Prometheus
  Operator's and Kueue's CRDs installed;
- `helm upgrade` (new values, the monitoring objects on) replaces the operator pod; `helm uninstall` removes
  the operator and keeps the CRDs, the jobs and the claim;
- `kubectl apply -k manifests/overlays/local` runs the operator again; a job with a missing dataset restarts
  once and fails, and `whetstone wait` says why;
- a tiny DPO job and a tiny RFT job (with a python RewardGrader) run to Succeeded under the chart's operator;
- a real Prometheus scraped the operators and the trainer pods all along: every query of the Grafana
  dashboard returns data, the DPO and RFT rows' from those two runs.

Prometheus Operator itself does not run here (file_sd gives the same targets and labels; see
deploy_tools.Prometheus), nor does Grafana (the test runs the dashboard's PromQL as Grafana would).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from deploy_tools import CHART, REPO, Json, Prometheus, Tools, has_data, helm_template, kill_trainer, run
from helpers import wait_for

NS = "whetstone-system"
JOB = "sft-tiny-reverse"
EXAMPLE = REPO / "manifests" / "examples" / "cluster" / f"{JOB}.yaml"
EXAMPLE_DATA = REPO / "manifests" / "examples" / "data"
TRYOUT_TIMEOUT = 1500  # a cold machine builds nothing here (CI built the tools), but trains on 2 busy cores


@pytest.fixture(scope="module")
def tools() -> Tools:
    return Tools.locate()


def fresh_copy(dest: Path) -> Path:
    """The repository as a fresh clone has it: tracked and new files, nothing ignored (no .cluster, no
    caches), the working tree's content (so uncommitted work is what runs)."""
    listed = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO).stdout.split("\0")
    for name in filter(None, listed):
        source = REPO / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


class TryOut:
    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        self.kubeconfig = root / "e2e" / ".cluster" / "kubeconfig"
        self.proc: subprocess.Popen[bytes] | None = None
        self.started = time.time()
        self._api: kubernetes.client.ApiClient | None = None

    @property
    def api(self) -> kubernetes.client.ApiClient:
        if self._api is None:
            config = kubernetes.client.Configuration()
            kubernetes.config.load_kube_config(config_file=str(self.kubeconfig), client_configuration=config)
            self._api = kubernetes.client.ApiClient(config)
        return self._api

    @property
    def core(self) -> kubernetes.client.CoreV1Api:
        return kubernetes.client.CoreV1Api(self.api)

    @property
    def custom(self) -> kubernetes.client.CustomObjectsApi:
        return kubernetes.client.CustomObjectsApi(self.api)

    @property
    def state_dir(self) -> Path:
        return Path(json.loads((self.kubeconfig.parent / "state.json").read_text())["state_dir"])

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        return {**env, "KUBECONFIG": str(self.kubeconfig), "NO_COLOR": "1", "PYTHONPATH": python_path()}

    def whetstone(
        self, *args: str, check: bool = True, timeout: float = 300
    ) -> subprocess.CompletedProcess[str]:
        return run(
            [sys.executable, "-m", "whetstone_cli.main", *args], check=check, env=self.env(), timeout=timeout
        )

    def kubectl(self, *args: str | Path, check: bool = True, **kw: Any) -> subprocess.CompletedProcess[str]:
        return run([Path(sys.executable).parent / "kubectl", *args], check=check, env=self.env(), **kw)

    def job(self, name: str, namespace: str = "default") -> Json:
        return self.custom.get_namespaced_custom_object(
            "whetstone.dev", "v1alpha1", namespace, "finetunejobs", name
        )

    def pods(self, selector: str, namespace: str | None = None) -> list[Json]:
        listed = (
            self.core.list_namespaced_pod(namespace, label_selector=selector)
            if namespace
            else self.core.list_pod_for_all_namespaces(label_selector=selector)
        )
        return [self.api.sanitize_for_serialization(p) for p in listed.items]

    def targets(self) -> dict[str, list[Json]]:
        """What the ServiceMonitor and the PodMonitor would select, with the labels they would give."""
        if not self.kubeconfig.exists():
            return {}

        def groups(selector: str, job_of: Any) -> list[Json]:
            out = []
            for pod in self.pods(selector):
                status = pod.get("status") or {}
                ports = [
                    p["containerPort"]
                    for c in pod["spec"]["containers"]
                    for p in c.get("ports") or []
                    if p.get("name") == "metrics"
                ]
                if status.get("phase") == "Running" and status.get("podIP") and ports:
                    meta = pod["metadata"]
                    labels = {"job": job_of(meta), "namespace": meta["namespace"], "pod": meta["name"]}
                    out.append({"targets": [f"{status['podIP']}:{ports[0]}"], "labels": labels})
            return out

        return {
            "operator": groups(
                "app.kubernetes.io/name=whetstone,app.kubernetes.io/component=operator",
                lambda meta: "whetstone-operator",
            ),
            "trainers": groups("whetstone.dev/job", lambda meta: meta["labels"]["whetstone.dev/job"]),
        }


def python_path() -> str:
    # The checkout's own code first, as pytest itself runs it.
    return os.pathsep.join(str(REPO / d) for d in ("api", "cli", "operator", "trainer-image"))


@pytest.fixture(scope="module")
def prometheus_and_tryout(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Prometheus, TryOut]]:
    root = fresh_copy(tmp_path_factory.mktemp("fresh-clone"))
    tryout = TryOut(root, tmp_path_factory.mktemp("logs") / "try-cluster.log")
    prometheus = Prometheus(tmp_path_factory.mktemp("prometheus"), tryout.targets)
    prometheus.start()
    try:
        yield prometheus, tryout
    finally:
        if tryout.proc and tryout.proc.poll() is None:
            tryout.proc.kill()
        down = subprocess.run(["./try-cluster.sh", "down"], cwd=root, capture_output=True, text=True)
        print(f"try-cluster.sh down: {down.returncode} {down.stderr[-500:]}")
        prometheus.stop()
        # try-cluster.sh pointed the shared venv's editable install at the copy: point it back.
        subprocess.run([REPO / "scripts" / "bootstrap.sh"], capture_output=True)
        print(f"try-cluster log: {tryout.log}; prometheus: {prometheus.folder}")


@pytest.fixture(scope="module")
def tryout(prometheus_and_tryout: tuple[Prometheus, TryOut]) -> TryOut:
    return prometheus_and_tryout[1]


@pytest.fixture(scope="module")
def prometheus(prometheus_and_tryout: tuple[Prometheus, TryOut]) -> Prometheus:
    return prometheus_and_tryout[0]


# --- the one-command try-out --------------------------------------------------------------------------------


def test_try_cluster_from_a_fresh_copy_reaches_succeeded(tryout: TryOut) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("KUBECONFIG", "PYTHONPATH")}
    with tryout.log.open("wb") as out:
        tryout.proc = subprocess.Popen(
            ["./try-cluster.sh"],
            cwd=tryout.root,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**env, "NO_COLOR": "1"},
        )
        code = tryout.proc.wait(TRYOUT_TIMEOUT)
    text = tryout.log.read_text(errors="replace")
    assert code == 0, text[-5000:]
    # It ran the job to the end, following its log, and told the user how to look around and stop.
    assert f"finetunejob.whetstone.dev/{JOB} condition met" in text
    assert "status on port" in text  # rank 0's log, followed by `whetstone logs -f`
    for hint in ("export KUBECONFIG=", "kubectl get finetunejobs,checkpoints", "./try-cluster.sh down"):
        assert hint in text, text[-3000:]
    job = tryout.job(JOB)
    assert job["status"]["phase"] == "Succeeded"
    assert job["status"]["progress"]["step"] == 60
    # The operator ran as a pod of the release, on a runner node, with the chart's ServiceAccount.
    (operator,) = tryout.pods("app.kubernetes.io/component=operator", NS)
    assert operator["spec"]["serviceAccountName"] == "whetstone-operator"
    assert operator["spec"]["nodeName"].startswith("runner-")
    # The trainer pod got the operator's defaults (the local profile's runner placement).
    (trainer,) = tryout.pods(f"whetstone.dev/job={JOB}", "default")
    assert trainer["spec"]["nodeSelector"] == {"whetstone.dev/e2e-runner": "true"}
    checkpoints = tryout.custom.list_namespaced_custom_object(
        "whetstone.dev", "v1alpha1", "default", "checkpoints", label_selector=f"whetstone.dev/job={JOB}"
    )["items"]
    assert {c["spec"]["kind"] for c in checkpoints} == {"resumable", "export"}


# --- the CLI ------------------------------------------------------------------------------------------------


def long_job(name: str) -> Json:
    body = yaml.safe_load(EXAMPLE.read_text())
    body["metadata"]["name"] = name
    body["spec"]["hyperparameters"]["maxSteps"] = 5000
    body["spec"]["output"]["uri"] = f"pvc://work/out/{name}"
    return body


def test_cli_on_a_running_job(tryout: TryOut, prometheus: Prometheus, tmp_path: Path) -> None:
    name = "long-reverse"
    manifest = tmp_path / "long.yaml"
    manifest.write_text(yaml.safe_dump(long_job(name)))
    created = tryout.whetstone("create", "-f", str(manifest))
    assert created.stdout.strip() == f"finetunejob.whetstone.dev/{name} created"
    tryout.whetstone("wait", f"ftj/{name}", "--for=condition=Running", "--timeout=5m", timeout=330)
    wait_for(
        lambda: (tryout.job(name).get("status") or {}).get("progress", {}).get("step", 0) > 0,
        180,
        "the first reported step",
    )

    table = tryout.whetstone("get", "ftj").stdout
    header, *rows = table.splitlines()
    assert header.split() == ["NAME", "PHASE", "METHOD", "MODEL", "STEPS", "LOSS", "REWARD", "AGE"]
    row = next(r.split() for r in rows if r.startswith(name + " "))
    assert row[1:4] == ["Running", "sft", "whetstone://tiny"] and row[4].endswith("/5000")
    assert "\x1b[" not in table  # NO_COLOR and a pipe: no escape codes
    as_json = json.loads(tryout.whetstone("get", "ftj", name, "-o", "json").stdout)
    assert as_json["kind"] == "FineTuneJob" and as_json["status"]["phase"] == "Running"
    listed = yaml.safe_load(tryout.whetstone("get", "ftj", "-A", "-o", "yaml").stdout)
    assert listed["kind"] == "List" and {i["metadata"]["name"] for i in listed["items"]} >= {JOB, name}

    described = tryout.whetstone("describe", "ftj", name).stdout
    for expected in (
        "Phase:",
        "Running",
        "Progress:",
        "Step:",
        "Conditions:",
        "Pods:",
        f"{name}-node-0",
        f"Trainer report (/status of {name}-node-0):",
        "Training",
        "Events:",
    ):
        assert expected in described, described
    facts = json.loads(tryout.whetstone("describe", "ftj", name, "-o", "json").stdout)
    assert facts["trainer"]["report"]["phase"] == "Training", facts["trainer"]
    assert facts["trainer"]["report"]["job"] == name

    # The local cluster's API server has no kubelet to ask for logs: the CLI reads the pod runner's files.
    log = tryout.whetstone("logs", name).stdout
    assert f"{name}: status on port" in log
    assert len(tryout.whetstone("logs", name, "--tail", "2").stdout.splitlines()) <= 2

    # Prometheus scrapes the trainer pod while it trains.
    wait_for(
        lambda: has_data(
            prometheus.query(f'whetstone_trainer_step{{job="{name}", namespace="default"}} > 0', time.time())
        ),
        120,
        "Prometheus to scrape the trainer",
    )

    deleted = tryout.whetstone("delete", "ftj", name, "--wait")
    assert deleted.stdout.strip() == f'finetunejob.whetstone.dev "{name}" deleted'
    missing = tryout.whetstone("get", "ftj", name, check=False)
    assert missing.returncode == 1
    assert (
        missing.stderr.strip() == f'error: finetunejobs.whetstone.dev "{name}" not found in namespace default'
    )
    # Following a finished job prints its log and returns.
    followed = tryout.whetstone("logs", JOB, "-f", timeout=60)
    assert f"{JOB}: status on port" in followed.stdout


def test_cli_dry_run_and_plot(tryout: TryOut, tmp_path: Path) -> None:
    rft = REPO / "manifests" / "examples" / "cluster" / "rft-graders-gpu.yaml"
    resolved = list(yaml.safe_load_all(tryout.whetstone("create", "-f", str(rft), "--dry-run").stdout))
    assert [d["kind"] for d in resolved] == ["RewardGrader", "RewardGrader", "FineTuneJob"]
    job = resolved[2]["spec"]
    # Defaults the file leaves out, filled in by the API models.
    assert job["backoffLimit"] == 3 and job["hyperparameters"]["scheduler"] == "linear"
    assert resolved[0]["spec"]["onError"] == "zero"
    server = tryout.whetstone("create", "-f", str(rft), "--dry-run=server", "-o", "name").stdout.split()
    assert server == [
        "rewardgrader.whetstone.dev/exact-answer",
        "rewardgrader.whetstone.dev/answer-format",
        "finetunejob.whetstone.dev/math-rft",
    ]
    assert tryout.whetstone("get", "rg", "-o", "name").stdout == ""  # a dry run created nothing

    bad = tmp_path / "bad.yaml"
    bad.write_text(EXAMPLE.read_text().replace("learningRate:", "learningrate:"))
    refused = tryout.whetstone("create", "-f", str(bad), check=False)
    assert refused.returncode == 1
    assert "spec.hyperparameters.learningrate" in refused.stderr and "unknown field" in refused.stderr
    assert f"{bad}:" in refused.stderr and "Traceback" not in refused.stderr

    png = tmp_path / "curves.png"
    pvc_root = tryout.state_dir / "runner" / "pvc" / "default"
    plotted = tryout.whetstone("plot", JOB, "--pvc-root", str(pvc_root), "-o", str(png)).stdout
    assert plotted.startswith(f"wrote {png} (Loss") and "60 steps" in plotted
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# --- DPO and RFT under the chart's operator -----------------------------------------------------------------

# Each method on the bundled tiny model, long enough for every series of the dashboard's DPO and RFT rows:
# Prometheus (1 s scrapes) needs several scrapes while the trainer trains (rate() over the panels' 10 s window
# needs two). A tiny-model DPO step takes 0.03-0.3 s depending on the machine (30 steps were scraped 3 times
# here; after the optimizer got faster, 120 steps were scraped only 4 times on CI), so DPO runs 400 steps:
# 10 s or more of training wherever it runs; RFT, whose steps also got faster, 120. The eval series are
# written on eval steps, so evalEverySteps puts them on /metrics while training goes on. One job at a time:
# the local profile's trainers share host ports.
DPO_JOB = """
apiVersion: whetstone.dev/v1alpha1
kind: FineTuneJob
metadata: {name: dpo-tiny-add}
spec:
  method: dpo
  baseModel: {uri: whetstone://tiny}
  dataset: {uri: /data/add-preferences-train.jsonl, maxExamples: 64}
  evalDataset: {uri: /data/add-preferences-eval.jsonl, maxExamples: 16}
  dpo: {beta: 0.5}
  fullParameter: {}
  hyperparameters:
    {maxSteps: 400, learningRate: 2.0e-3, batchSize: 8, maxSeqLen: 64, evalEverySteps: 20, seed: 7}
  output: {uri: pvc://work/out/dpo-tiny-add}
  volumes:
  - {name: data, mountPath: /data, readOnly: true, configMap: {name: whetstone-method-data}}
  resources:
    requests: {cpu: "1", memory: 2Gi}
"""
# The raw tiny model answers at random. Rows marked fixed score 1 whatever the answer: zero-variance groups,
# so `refill` samples more prompts (refill_rounds); the others score the parity of the answer's length, and
# the grader raises on lengths 2 mod 3, which onError: skip leaves out of the update (skipped_samples,
# grader_errors_total). klBeta > 0: the KL series.
RFT_JOB = """
apiVersion: whetstone.dev/v1alpha1
kind: RewardGrader
metadata: {name: length-parity}
spec:
  python:
    source: |
      def grade(sample, item):
          text = sample["output_text"]
          if item["fixed"]:
              return 1.0
          if len(text) % 3 == 2:
              raise ValueError("an answer this long is not graded")
          return float(len(text) % 2)
  onError: skip
  testCases:
  - {sample: "abc", item: {fixed: false}, expectedScore: 1}
  - {sample: "abcd", item: {fixed: false}, expectedScore: 0}
  - {sample: "ab", item: {fixed: true}, expectedScore: 1}
---
apiVersion: whetstone.dev/v1alpha1
kind: FineTuneJob
metadata: {name: rft-tiny-length}
spec:
  method: rft
  baseModel: {uri: whetstone://tiny}
  dataset: {uri: /data/length-train.jsonl}
  evalDataset: {uri: /data/length-eval.jsonl}
  rft:
    algorithm: grpo
    graders: [{name: length-parity}]
    samplesPerPrompt: 4
    maxCompletionTokens: 3
    klBeta: 0.05
    zeroVarianceGroups: refill
  fullParameter: {}
  hyperparameters:
    {maxSteps: 120, learningRate: 1.0e-3, batchSize: 4, maxSeqLen: 64, evalEverySteps: 10, seed: 3}
  output: {uri: pvc://work/out/rft-tiny-length}
  volumes:
  - {name: data, mountPath: /data, readOnly: true, configMap: {name: whetstone-method-data}}
  resources:
    requests: {cpu: "1", memory: 2Gi}
"""


def jsonl(rows: list[Json]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def test_dpo_and_rft_jobs_succeed_under_the_chart(
    tryout: TryOut, prometheus: Prometheus, tmp_path: Path
) -> None:
    rows = [
        {"messages": [{"role": "user", "content": f"Say something about {i}"}], "fixed": i % 2 == 0}
        for i in range(32)
    ]
    data = {
        name: (EXAMPLE_DATA / name).read_text()
        for name in ("add-preferences-train.jsonl", "add-preferences-eval.jsonl")
    }
    data |= {"length-train.jsonl": jsonl(rows), "length-eval.jsonl": jsonl(rows[:4])}
    tryout.core.create_namespaced_config_map(
        "default", {"metadata": {"name": "whetstone-method-data"}, "data": data}
    )
    outputs = tryout.state_dir / "runner" / "pvc" / "default" / "work" / "out"
    for name, text in (("dpo-tiny-add", DPO_JOB), ("rft-tiny-length", RFT_JOB)):
        manifest = tmp_path / f"{name}.yaml"
        manifest.write_text(text)
        created = time.time()
        tryout.whetstone("create", "-f", str(manifest))
        if name.startswith("rft"):
            tryout.whetstone("wait", "rg/length-parity", "--for=phase=Ready", "--timeout=3m", timeout=200)
        waited = tryout.whetstone(
            "wait", f"ftj/{name}", "--for=condition=Succeeded", "--timeout=10m", check=False, timeout=630
        )
        assert waited.returncode == 0, (waited.stderr, tryout.job(name).get("status"))
        # Prometheus scraped the trainer pod several times while it trained (the dashboard test reads every
        # series, some through rate()); too few scrapes: the job trains too briefly for this machine.
        window = f"{int(time.time() - created) + 10}s"
        scrapes = prometheus.query(
            f'count_over_time(whetstone_trainer_step{{job="{name}"}}[{window}])', time.time()
        )
        assert scrapes and float(scrapes[0]["value"][1]) >= 5, (name, scrapes, tryout.job(name).get("status"))
    dpo = [json.loads(ln) for ln in (outputs / "dpo-tiny-add" / "metrics.jsonl").read_text().splitlines()]
    assert "eval_choice_accuracy" in dpo[19] and "eval_dpo_reward_margin" in dpo[19]
    rft = [json.loads(ln) for ln in (outputs / "rft-tiny-length" / "metrics.jsonl").read_text().splitlines()]
    # What the settings are for: each conditional series of the RFT row has values.
    assert all(m["kl"] is not None for m in rft) and "eval_pass_rate" in rft[9]
    assert any(m["refill_rounds"] > 0 for m in rft), rft
    assert any(m["skipped_samples"] > 0 for m in rft), rft
    assert any(m["grader_errors"].get("length-parity") for m in rft), rft


# --- every rendered object against the real API server ------------------------------------------------------


@pytest.fixture(scope="module")
def other_crds(tryout: TryOut, tools: Tools) -> None:
    """The Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule...) and Kueue's, from
    their Go modules; no controller of theirs runs."""
    for crds in (tools.prometheus_crds, tools.kueue_crds):
        tryout.kubectl("apply", "--server-side", "-f", crds)
    tryout.kubectl("wait", "--for=condition=Established", "crd", "--all", "--timeout=60s")


def test_every_rendered_object_passes_a_server_side_dry_run(
    tryout: TryOut, tools: Tools, other_crds: None, tmp_path: Path
) -> None:
    # Namespaces the renders put objects in (the kueue overlay's, the namespaced values' watched ones): a dry
    # run of a namespace does not make what goes into it valid.
    for namespace in ("ml-team", "team-a", "team-b"):
        tryout.kubectl("create", "namespace", namespace)
    renders = {
        "chart defaults": helm_template(tools),
        **{
            f"chart with {v.name}": helm_template(tools, v)
            for v in (*sorted((CHART / "ci").glob("*.yaml")), CHART / "values-local.yaml")
        },
        **{
            f"kustomize {k}": tryout.kubectl("kustomize", REPO / "manifests" / k).stdout
            for k in ("base", "overlays/prometheus", "overlays/kueue", "overlays/local")
        },
    }
    examples = sorted((REPO / "manifests" / "examples" / "cluster").glob("*.yaml"))
    examples.append(REPO / "manifests" / "overlays" / "kueue" / "example-job.yaml")
    for name, text in [*renders.items(), *((p.name, p.read_text()) for p in examples)]:
        path = tmp_path / "render.yaml"
        path.write_text(text)
        kinds = {d["kind"] for d in yaml.safe_load_all(text) if d}
        done = tryout.kubectl(
            "apply",
            "--dry-run=server",
            "--server-side",
            "--force-conflicts",
            "--field-manager=dry-run-check",
            "-f",
            path,
            check=False,
        )
        assert done.returncode == 0, f"{name}: {done.stderr}"
        assert done.stdout.count("(server dry run)") == sum(1 for d in yaml.safe_load_all(text) if d), name
        if name == "chart with monitoring-values.yaml":
            assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"} <= kinds


# --- helm upgrade and uninstall, then the kustomize overlay -------------------------------------------------


def test_helm_upgrade_replaces_the_operator_and_uninstall_keeps_the_data(
    tryout: TryOut, tools: Tools, prometheus: Prometheus, other_crds: None
) -> None:
    (before,) = tryout.pods("app.kubernetes.io/component=operator", NS)
    run(
        [
            tools.helm,
            "upgrade",
            "whetstone",
            CHART,
            "--namespace",
            NS,
            "--reuse-values",
            "--values",
            CHART / "ci" / "monitoring-values.yaml",
            "--set",
            "operator.resyncSeconds=3",
            "--wait",
            "--timeout",
            "3m",
        ],
        env=tryout.env(),
    )
    deployment = kubernetes.client.AppsV1Api(tryout.api).read_namespaced_deployment("whetstone-operator", NS)
    assert "--resync-seconds=3" in deployment.spec.template.spec.containers[0].args
    assert deployment.spec.strategy.type == "Recreate" and deployment.spec.replicas == 1

    def replaced() -> str | None:
        pods = tryout.pods("app.kubernetes.io/component=operator", NS)
        running = [p for p in pods if p["status"].get("phase") == "Running"]
        names = {p["metadata"]["name"] for p in running}
        return names.pop() if len(pods) == 1 and names and before["metadata"]["name"] not in names else None

    new = wait_for(replaced, 180, "the upgraded operator pod")
    # The new operator works: Prometheus scrapes it healthy.
    wait_for(
        lambda: has_data(prometheus.query(f'up{{job="whetstone-operator", pod="{new}"}} == 1', time.time())),
        120,
        "Prometheus to scrape the upgraded operator",
    )
    monitoring = kubernetes.client.CustomObjectsApi(tryout.api)
    for plural in ("servicemonitors", "podmonitors", "prometheusrules"):
        items = monitoring.list_namespaced_custom_object("monitoring.coreos.com", "v1", NS, plural)["items"]
        assert len(items) == 1, plural
    assert tryout.core.read_namespaced_config_map("whetstone-dashboards", NS).data["whetstone.json"]

    run(
        [tools.helm, "uninstall", "whetstone", "--namespace", NS, "--wait", "--timeout", "3m"],
        env=tryout.env(),
    )
    wait_for(
        lambda: not tryout.pods("app.kubernetes.io/component=operator", NS), 120, "the operator pod to go"
    )
    rbac = kubernetes.client.RbacAuthorizationV1Api(tryout.api)
    assert "whetstone-operator" not in {r.metadata.name for r in rbac.list_cluster_role().items}
    # Kept: the CRDs (and so the jobs and checkpoints), and the claim with their files.
    crds = kubernetes.client.ApiextensionsV1Api(tryout.api).list_custom_resource_definition().items
    assert {c.metadata.name for c in crds} >= {"finetunejobs.whetstone.dev", "checkpoints.whetstone.dev"}
    assert tryout.job(JOB)["status"]["phase"] == "Succeeded"
    assert tryout.core.read_namespaced_persistent_volume_claim("work", "default").status.phase == "Bound"


def test_kustomize_overlay_runs_the_operator_and_wait_reports_a_failure(tryout: TryOut) -> None:
    applied = tryout.kubectl("apply", "-k", REPO / "manifests" / "overlays" / "local").stdout
    assert "deployment.apps/whetstone-operator created" in applied
    wait_for(
        lambda: [
            p
            for p in tryout.pods("app.kubernetes.io/component=operator", NS)
            if p["status"].get("phase") == "Running"
        ],
        180,
        "the operator pod of the kustomize install",
    )
    # The operator of the kustomize install runs a job, and restarts its group when the trainer dies.
    name = "crash-reverse"
    tryout.custom.create_namespaced_custom_object(
        "whetstone.dev", "v1alpha1", "default", "finetunejobs", long_job(name)
    )
    wait_for(
        lambda: (tryout.job(name).get("status") or {}).get("progress", {}).get("step", 0) > 0, 300, "training"
    )
    kill_trainer(tryout.state_dir / "runner", name)
    wait_for(lambda: tryout.job(name)["status"].get("restartCount", 0) == 1, 180, "a group restart")
    tryout.whetstone("wait", name, "--for=phase=Running", "--timeout=5m", timeout=330)
    # An eviction is a disruption: the group restarts without counting against backoffLimit.
    eviction = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": f"{name}-node-0", "namespace": "default"},
    }
    tryout.core.create_namespaced_pod_eviction(f"{name}-node-0", "default", eviction)
    wait_for(lambda: tryout.job(name)["status"].get("disruptionCount", 0) == 1, 180, "a disruption restart")
    tryout.whetstone("wait", name, "--for=phase=Running", "--timeout=5m", timeout=330)
    assert tryout.job(name)["status"]["restartCount"] == 1
    tryout.whetstone("delete", "ftj", name, "--wait")

    # A job that cannot succeed: `whetstone wait` stops when it fails and says why.
    body = long_job("broken")
    body["spec"]["dataset"]["uri"] = "/data/no-such-file.jsonl"
    body["spec"]["backoffLimit"] = 0
    tryout.custom.create_namespaced_custom_object(
        "whetstone.dev", "v1alpha1", "default", "finetunejobs", body
    )
    waited = tryout.whetstone(
        "wait", "broken", "--for=condition=Succeeded", "--timeout=10m", check=False, timeout=660
    )
    assert waited.returncode == 1
    assert waited.stderr.startswith("error: finetunejob/broken failed: "), waited.stderr
    assert tryout.job("broken")["status"]["phase"] == "Failed"


# --- the dashboard against what Prometheus scraped ----------------------------------------------------------


def test_every_dashboard_query_returns_data(tryout: TryOut, prometheus: Prometheus) -> None:
    dashboard = json.loads((CHART / "files" / "dashboards" / "whetstone.json").read_text())
    start, end = tryout.started, time.time()
    window = f"{int(end - start) + 60}s"
    row, empty, checked = "", [], 0
    for panel in dashboard["panels"]:
        if panel["type"] == "row":
            row = panel["title"]
            continue
        for target in panel["targets"]:
            # Grafana's variables, as with "All" selected; $__rate_interval for a 1 s scrape interval.
            expr = (
                target["expr"]
                .replace("$namespace", ".*")
                .replace("$job", ".*")
                .replace("$__rate_interval", "10s")
                .replace("$__range", window)
            )
            if target.get("instant"):
                result = prometheus.query(expr, end)
            else:
                result = prometheus.query_range(expr, start, end)
            checked += 1
            if not has_data(result):
                empty.append(f"{row} / {panel['title']}: {target['expr']}")
    # Every row, the DPO and RFT ones included (test_dpo_and_rft_jobs_succeed_under_the_chart ran them).
    assert {p["title"] for p in dashboard["panels"] if p["type"] == "row"} >= {"DPO", "RFT"}
    assert checked == sum(len(p.get("targets", [])) for p in dashboard["panels"] if p["type"] != "row")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)
    assert prometheus.seen["operator"] and prometheus.seen["trainers"]


def test_stop_removes_the_cluster(tryout: TryOut) -> None:
    state_dir = tryout.state_dir
    done = run(["./try-cluster.sh", "down"], cwd=tryout.root)
    assert "stopped" in done.stderr
    assert not state_dir.exists() and not tryout.kubeconfig.exists()
    with contextlib.suppress(FileNotFoundError):
        assert not list((tryout.root / "e2e" / ".cluster").iterdir())
