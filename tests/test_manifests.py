"""Manifest validation: each broken FineTuneJob is rejected with the field (and line) named."""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EXAMPLES, valid_job
from whetstone_api import FineTuneJob
from whetstone_api.manifests import ManifestError, load_resource
from whetstone_cli.main import main

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value

    return mutate


def _delete(path: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node = doc
        for p in parents:
            node = node[p]
        del node[last]

    return mutate


# (case id, mutation, the field the error must name, a fragment of the reason)
BROKEN_JOBS: list[tuple[str, Mutation, str, str]] = [
    ("unknown-method", _set("spec.method", "ppo"), "spec.method", "'sft', 'dpo' or 'rft'"),
    ("no-method", _delete("spec.method"), "spec.method", "Field required"),
    ("no-base-model", _delete("spec.baseModel"), "spec.baseModel", "Field required"),
    ("empty-model-uri", _set("spec.baseModel.uri", ""), "spec.baseModel.uri", "at least 1 character"),
    ("no-dataset", _delete("spec.dataset"), "spec.dataset", "Field required"),
    ("no-output", _delete("spec.output"), "spec.output", "Field required"),
    (
        "negative-lr",
        _set("spec.hyperparameters.learningRate", -0.1),
        "spec.hyperparameters.learningRate",
        "greater than 0",
    ),
    (
        "zero-batch",
        _set("spec.hyperparameters.batchSize", 0),
        "spec.hyperparameters.batchSize",
        "greater than or equal to 1",
    ),
    (
        "string-steps",
        _set("spec.hyperparameters.maxSteps", "many"),
        "spec.hyperparameters.maxSteps",
        "valid integer",
    ),
    (
        "bad-scheduler",
        _set("spec.hyperparameters.scheduler", "step"),
        "spec.hyperparameters.scheduler",
        "'constant', 'linear' or 'cosine'",
    ),
    (
        "accumulation-not-dividing",
        _set("spec.hyperparameters.gradientAccumulationSteps", 3),
        "spec.hyperparameters",
        "must divide batchSize",
    ),
    (
        "typo-field",
        _set("spec.hyperparameters.learningrate", 0.1),
        "spec.hyperparameters.learningrate",
        "unknown field",
    ),
    (
        "lora-and-full",
        _set("spec.lora", {"rank": 8}),
        "spec",
        "exactly one of spec.lora or spec.fullParameter",
    ),
    (
        "neither-lora-nor-full",
        _delete("spec.fullParameter"),
        "spec",
        "exactly one of spec.lora or spec.fullParameter",
    ),
    (
        "lora-rank-zero",
        lambda d: (d["spec"].pop("fullParameter"), d["spec"].update(lora={"rank": 0})),
        "spec.lora.rank",
        "greater than or equal to 1",
    ),
    (
        "lora-dropout-one",
        lambda d: (d["spec"].pop("fullParameter"), d["spec"].update(lora={"dropout": 1.0})),
        "spec.lora.dropout",
        "less than 1",
    ),
    ("dpo-without-section", _set("spec.method", "dpo"), "spec", "spec.dpo is required when method is dpo"),
    (
        "sft-section-on-rft",
        lambda d: d["spec"].update(method="rft", sft={}, rft={"graders": [{"name": "g"}]}),
        "spec",
        "spec.sft is only allowed when method is sft",
    ),
    (
        "rft-no-graders",
        lambda d: d["spec"].update(method="rft", rft={"graders": []}),
        "spec.rft.graders",
        "at least 1 item",
    ),
    (
        "dapo-with-kl",
        lambda d: d["spec"].update(
            method="rft", rft={"algorithm": "dapo", "klBeta": 0.1, "graders": [{"name": "g"}]}
        ),
        "spec.rft",
        "klBeta must be 0 unless algorithm is grpo",
    ),
    ("zero-nodes", _set("spec.nodes", 0), "spec.nodes", "greater than or equal to 1"),
    ("negative-backoff", _set("spec.backoffLimit", -1), "spec.backoffLimit", "greater than or equal to 0"),
    (
        "zero-deadline",
        _set("spec.activeDeadlineSeconds", 0),
        "spec.activeDeadlineSeconds",
        "greater than or equal to 1",
    ),
    (
        "bad-toleration-effect",
        _set("spec.tolerations", [{"key": "gpu", "effect": "Sometimes"}]),
        "spec.tolerations[0].effect",
        "'NoSchedule'",
    ),
    ("name-not-dns", _set("metadata.name", "My_Job"), "metadata.name", "should match pattern"),
    (
        "keep-last-zero",
        _set("spec.checkpointing.keepLast", 0),
        "spec.checkpointing.keepLast",
        "greater than or equal to 1",
    ),
    (
        "wrong-api-version",
        _set("apiVersion", "whetstone.dev/v1"),
        "apiVersion",
        "expected whetstone.dev/v1alpha1",
    ),
    ("unknown-kind", _set("kind", "FineTuningJob"), "kind", "unknown kind"),
]


@pytest.mark.parametrize(
    ("mutation", "field", "reason"), [c[1:] for c in BROKEN_JOBS], ids=[c[0] for c in BROKEN_JOBS]
)
def test_broken_job_is_rejected_naming_the_field(
    tmp_path: Path, mutation: Mutation, field: str, reason: str
) -> None:
    doc = valid_job()
    mutation(doc)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    with pytest.raises(ManifestError) as err:
        load_resource(path)
    lines = str(err.value).splitlines()
    named = [ln for ln in lines if re.search(rf":\d+: {re.escape(field)}: ", ln) or f": {field}: " in ln]
    assert named, f"no error names {field!r}: {lines}"
    assert any(reason in ln for ln in named), f"{reason!r} not in {named}"
    # Errors point into the file with a line number wherever the YAML has the field or its parent.
    assert all(re.match(rf"{re.escape(str(path))}:\d+: ", ln) for ln in named), named


def test_catalogue_is_large_enough() -> None:
    assert len(BROKEN_JOBS) >= 15


def test_unknown_field_points_at_its_line(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    text = (
        (EXAMPLES / "sft-tiny-reverse.yaml")
        .read_text()
        .replace("    seed: 7\n", "    seed: 7\n    sead: 8\n")
    )
    path.write_text(text)
    with pytest.raises(ManifestError) as err:
        load_resource(path)
    line = text.splitlines().index("    sead: 8") + 1
    assert str(err.value) == f"{path}:{line}: spec.hyperparameters.sead: unknown field"


def test_examples_are_valid() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        job = load_resource(path)
        assert isinstance(job, FineTuneJob), path


def test_defaults_fill_in() -> None:
    doc = valid_job()
    del doc["spec"]["checkpointing"]
    job = FineTuneJob.model_validate(doc)
    assert job.spec.checkpointing.keep_last == 3
    assert job.spec.sft_settings.packing is True
    assert job.spec.backoff_limit == 3 and job.spec.suspend is False


def test_validate_cli_reports_every_problem_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = valid_job()
    doc["spec"]["hyperparameters"]["learningRate"] = 0
    doc["spec"]["nodes"] = 0
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "spec.hyperparameters.learningRate" in err and "spec.nodes" in err
