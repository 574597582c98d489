"""The operator's defaults for trainer pods (--trainer-node-selector, --trainer-toleration, the Helm values
trainer.nodeSelector / trainer.tolerations): they place jobs that say nothing, a job's own win whole."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml
from whetstone_operator import children
from whetstone_operator.operator_main import add_arguments, config_from_args, parse_toleration

EXAMPLE = (
    Path(__file__).resolve().parent.parent / "manifests" / "examples" / "cluster" / "sft-tiny-reverse.yaml"
)


def job(**spec: object) -> dict:
    doc = yaml.safe_load(EXAMPLE.read_text())
    doc["metadata"].update(namespace="ns", uid="u-1")
    doc["spec"].update(spec)
    return doc


def settings(*flags: str) -> children.ChildSettings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return config_from_args(parser.parse_args(list(flags))).children


@pytest.mark.parametrize(
    ("flag", "toleration"),
    [
        (
            "nvidia.com/gpu:NoSchedule",
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},
        ),
        (
            "dedicated=training:NoExecute",
            {"key": "dedicated", "operator": "Equal", "value": "training", "effect": "NoExecute"},
        ),
        ("pool=a", {"key": "pool", "operator": "Equal", "value": "a"}),
        ("", {"operator": "Exists"}),
    ],
)
def test_toleration_flags_in_kubectl_taint_spelling(flag: str, toleration: dict) -> None:
    assert dict(parse_toleration(flag)) == toleration


def test_a_bad_flag_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--trainer-toleration", "gpu:NoSchedul"])
    assert "unknown effect 'NoSchedul'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parser.parse_args(["--trainer-node-selector", "pool"])


def test_defaults_place_a_job_that_says_nothing_and_a_jobs_own_win() -> None:
    defaults = settings(
        "--trainer-node-selector", "pool=gpu", "--trainer-toleration", "nvidia.com/gpu:NoSchedule"
    )
    plain = children.trainer_pod(job(), 0, 0, defaults)["spec"]
    assert plain["nodeSelector"] == {"pool": "gpu"}
    assert plain["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    own = children.trainer_pod(
        job(nodeSelector={"pool": "cpu"}, tolerations=[{"key": "x", "operator": "Exists"}]), 0, 0, defaults
    )["spec"]
    assert own["nodeSelector"] == {"pool": "cpu"} and own["tolerations"] == [
        {"key": "x", "operator": "Exists"}
    ]
    bare = children.trainer_pod(job(), 0, 0, settings())["spec"]
    assert "nodeSelector" not in bare and "tolerations" not in bare
