"""The cluster commands without a cluster: names and references, tables and colour, describe's rendering,
wait's rules, create --dry-run, plot, and errors as one line (e2e/test_tryout.py runs them on a cluster)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import ROOT, SOURCE_DIRS
from whetstone_cli import describe, get, logs, output, plot, wait
from whetstone_cli.kube import FINETUNEJOB, KINDS, CliError, age, kind_of, parse_refs
from whetstone_cli.main import main

EXAMPLES = ROOT / "manifests" / "examples" / "cluster"
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def stamp(seconds_ago: int) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def job(phase: str = "Running", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "whetstone.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "sft", "namespace": "ml", "creationTimestamp": stamp(300), "uid": "u"},
        "spec": {"method": "sft", "baseModel": {"uri": "whetstone://tiny"}, "lora": {"rank": 4}, "nodes": 2},
        "status": {
            "phase": phase,
            "progress": {"step": 40, "totalSteps": 120, "steps": "40/120", "loss": 1.23456, "etaSeconds": 95},
            "conditions": [
                {"type": "Running", "status": "True", "reason": "Running", "message": "all 2 pods run"},
                {"type": "Failed", "status": "False", "reason": "Running", "message": ""},
            ],
            **status,
        },
    }


# --- names --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("word", "kind"),
    [
        ("ftj", "FineTuneJob"),
        ("jobs", "FineTuneJob"),
        ("ckpt", "Checkpoint"),
        ("rg", "RewardGrader"),
        ("graders", "RewardGrader"),
        ("trainingsessions.whetstone.dev", "TrainingSession"),
        ("ts", "TrainingSession"),
    ],
)
def test_kinds_by_every_name_users_type(word: str, kind: str) -> None:
    assert kind_of(word).kind == kind


def test_references() -> None:
    assert parse_refs(["ftj", "a", "b"]) == (FINETUNEJOB, ["a", "b"])
    assert parse_refs(["ftj/a", "finetunejob/b"]) == (FINETUNEJOB, ["a", "b"])
    assert parse_refs(["my-job"], FINETUNEJOB) == (FINETUNEJOB, ["my-job"])
    with pytest.raises(CliError, match="unknown resource type 'pods'"):
        parse_refs(["pods"])
    with pytest.raises(CliError, match="one type at a time"):
        parse_refs(["ftj/a", "ckpt/b"])


@pytest.mark.parametrize(
    ("seconds", "text"), [(5, "5s"), (119, "119s"), (600, "10m"), (4 * 3600, "4h"), (3 * 86400, "3d")]
)
def test_age_like_kubectl(seconds: int, text: str) -> None:
    assert age(stamp(seconds), NOW) == text


# --- tables and colour --------------------------------------------------------------------------------------


def test_job_rows_and_wide_columns() -> None:
    headers, rows = get.rows_for(FINETUNEJOB, [job()], wide=True, all_namespaces=True)
    assert headers[:3] == ["NAMESPACE", "NAME", "PHASE"] and headers[-4:] == [
        "NODESxGPUS",
        "RESTARTS",
        "ETA",
        "CHECKPOINT",
    ]
    row = dict(zip(headers, rows[0], strict=True))
    assert (
        row["STEPS"] == "40/120"
        and row["LOSS"] == "1.235"
        and row["ETA"] == "1m35s"
        and row["NODESxGPUS"] == "2x0"
    )


def run_cli(code: str, env: dict[str, str]) -> str:
    """A fresh interpreter: rich decides about colour from the environment at start."""
    full = {"PYTHONPATH": os.pathsep.join(map(str, SOURCE_DIRS)), "PATH": os.environ["PATH"], **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full, check=True
    ).stdout


TABLE = (
    "from whetstone_cli import output; "
    "output.table(['NAME', 'PHASE'], [['a', 'Failed'], ['b', 'Succeeded']], ['PHASE'])"
)


def test_colour_on_a_terminal_only_and_never_with_no_color() -> None:
    plain = run_cli(TABLE, {})  # stdout is a pipe
    assert "\x1b[" not in plain and plain.splitlines() == [
        "NAME   PHASE",
        "a      Failed",
        "b      Succeeded",
    ]
    assert "\x1b[32m" in run_cli(TABLE, {"FORCE_COLOR": "1"})  # as on a terminal: Succeeded in green
    assert "\x1b[32m" not in run_cli(TABLE, {"FORCE_COLOR": "1", "NO_COLOR": "1"})


def test_a_pipe_gets_whole_lines_whatever_their_length() -> None:
    code = "from whetstone_cli import output; output.table(['NAME'], [['x' * 500]])"
    assert run_cli(code, {"COLUMNS": "40"}).splitlines()[1] == "x" * 500


# --- describe -----------------------------------------------------------------------------------------------


def test_describe_shows_progress_conditions_pods_report_rollouts_and_events(
    capsys: pytest.CaptureFixture[str],
) -> None:
    facts = {
        "object": job(),
        "events": [
            {
                "type": "Warning",
                "reason": "PodFailed",
                "message": "restart 1 of at most 3",
                "metadata": {"creationTimestamp": stamp(30)},
            }
        ],
        "pods": [
            {
                "metadata": {"name": "sft-node-0", "labels": {"whetstone.dev/attempt": "1"}},
                "spec": {"nodeName": "gpu-0"},
                "status": {"phase": "Running", "podIP": "10.0.0.5"},
            }
        ],
        "checkpoints": [
            {
                "metadata": {"name": "sft-step-00000040"},
                "spec": {"step": 40, "kind": "resumable", "metrics": {"loss": 1.5}},
                "status": {"phase": "Available"},
            }
        ],
        "trainer": {
            "pod": "sft-node-0",
            "report": {
                "phase": "Training",
                "step": 41,
                "totalSteps": 120,
                "latestRollouts": [{"prompt": "2+2?", "completion": "4", "reward": 1.0}],
            },
        },
    }
    output.print_lines(describe.render(FINETUNEJOB, facts))
    text = capsys.readouterr().out
    for expected in (
        "Method:",
        "sft (LoRA rank 4)",
        "Nodes:",
        "2 × 0 GPUs",
        "Step:",
        "40/120 (33%)",
        "Loss:",
        "1.235",
        "ETA:",
        "1m35s",
        "Conditions:",
        "all 2 pods run",
        "Checkpoints:",
        "loss=1.5",
        "sft-node-0",
        "gpu-0",
        "Trainer report (/status of sft-node-0):",
        "Training",
        "Latest rollouts:",
        "2+2?",
        "PodFailed",
        "restart 1 of at most 3",
    ):
        assert expected in text, expected


def test_describe_says_why_the_report_is_missing(capsys: pytest.CaptureFixture[str]) -> None:
    facts = {
        "object": job(),
        "events": [],
        "pods": [],
        "checkpoints": [],
        "trainer": {"pod": "sft-node-0", "error": "ServiceUnavailable: no endpoints"},
    }
    output.print_lines(describe.render(FINETUNEJOB, facts))
    assert "not reachable: ServiceUnavailable: no endpoints" in capsys.readouterr().out


# --- wait ---------------------------------------------------------------------------------------------------


def test_wait_rules() -> None:
    assert wait.parse_for("condition=Succeeded") == ("condition", "Succeeded", "True")
    assert wait.parse_for("condition=Suspended=False") == ("condition", "Suspended", "False")
    assert wait.parse_for("phase=Running") == ("phase", "Running", "")
    assert wait.duration("1h30m") == 5400 and wait.duration("90s") == 90
    with pytest.raises(CliError, match="--timeout 'soon'"):
        wait.duration("soon")
    assert wait.met(FINETUNEJOB, job(), ("condition", "Running", "True"))
    assert not wait.met(FINETUNEJOB, job(), ("condition", "Succeeded", "True"))
    failed = job(
        "Failed",
        conditions=[
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "backoffLimit (1) exceeded",
            }
        ],
    )
    with pytest.raises(CliError, match="finetunejob/sft failed: backoffLimit"):
        wait.met(FINETUNEJOB, failed, ("condition", "Succeeded", "True"))
    with pytest.raises(CliError, match="already Succeeded; it will not reach Running"):
        wait.met(FINETUNEJOB, job("Succeeded", conditions=[]), ("phase", "Running", ""))
    assert wait.met(FINETUNEJOB, None, ("delete", "", ""))


# --- create --dry-run, plot, errors -------------------------------------------------------------------------


def test_create_dry_run_prints_every_resource_resolved(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["create", "-f", str(EXAMPLES / "rft-graders-gpu.yaml"), "--dry-run"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [d["metadata"]["name"] for d in docs] == ["exact-answer", "answer-format", "math-rft"]
    spec = docs[2]["spec"]
    assert spec["backoffLimit"] == 3 and spec["hyperparameters"]["scheduler"] == "linear"  # defaults filled
    assert spec["rft"]["graders"][1] == {"name": "answer-format", "weight": 0.2}


def test_create_refuses_a_bad_file_whole(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "jobs.yaml"
    good = (EXAMPLES / "sft-tiny-reverse.yaml").read_text()
    bad.write_text(good + "---\n" + good.replace("maxSteps: 60", "maxSteps: -1"))
    assert main(["create", "-f", str(bad)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: nothing created:") and "spec.hyperparameters.maxSteps" in err
    assert f"{bad}:" in err and "Traceback" not in err


def write_metrics(folder: Path, rft: bool) -> None:
    folder.mkdir(parents=True)
    rows = []
    for step in range(1, 31):
        row: dict[str, Any] = {"step": step, "loss": 3.0 / step, "lr": 1e-3}
        if step % 10 == 0:
            row["eval_loss"] = 3.2 / step
        if rft:
            row.update(
                reward_mean=step / 30, reward_min=0.0, reward_max=1.0, pass_rate=step / 40, kl=0.01 * step
            )
        rows.append(row)
    (folder / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_plot_draws_what_the_metrics_hold(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_metrics(tmp_path / "sft", rft=False)
    write_metrics(tmp_path / "rft", rft=True)
    assert main(["plot", str(tmp_path / "sft"), "-o", str(tmp_path / "sft.png")]) == 0
    assert "(Loss, Learning rate; 30 steps" in capsys.readouterr().out
    drawn = plot.draw("rft", plot.read_rows(tmp_path / "rft" / "metrics.jsonl"), tmp_path / "rft.png")
    assert drawn == ["Loss", "Reward", "Pass rate", "KL", "Learning rate"]
    assert (tmp_path / "rft.png").read_bytes()[:4] == b"\x89PNG"


def test_plot_of_a_missing_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty").mkdir()
    assert main(["plot", str(tmp_path / "empty")]) == 1
    assert capsys.readouterr().err.startswith(f"error: no {tmp_path / 'empty' / 'metrics.jsonl'}")


def test_no_cluster_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    env = {
        "PYTHONPATH": os.pathsep.join(map(str, SOURCE_DIRS)),
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "KUBECONFIG": str(tmp_path / "missing"),
    }
    done = subprocess.run(
        [sys.executable, "-m", "whetstone_cli.main", "get", "ftj"], capture_output=True, text=True, env=env
    )
    assert done.returncode == 1 and done.stderr.startswith("error: no cluster"), done.stderr
    assert "Traceback" not in done.stderr


def test_logs_of_the_local_cluster_come_from_the_runner_files(tmp_path: Path) -> None:
    cluster = tmp_path / ".cluster"
    cluster.mkdir()
    (cluster / "kubeconfig").write_text("{}")
    (cluster / "state.json").write_text(
        json.dumps({"kubeconfig": str(cluster / "kubeconfig"), "state_dir": "/tmp/whetstone-e2e-x"})
    )
    path = logs.local_cluster_log(cluster / "kubeconfig", "ml", "sft-node-0", "trainer")
    assert path == Path("/tmp/whetstone-e2e-x/runner/logs/ml/sft-node-0/trainer.log")
    assert logs.local_cluster_log(tmp_path / "other-kubeconfig", "ml", "p", "c") is None
    assert logs.local_cluster_log(None, "ml", "p", "c") is None


def test_every_kind_has_columns_and_a_summary() -> None:
    assert set(get.COLUMNS) == set(describe.SUMMARY) == {k.kind for k in KINDS}
