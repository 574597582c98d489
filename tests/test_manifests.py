"""Manifest validation: every case of the catalogue of nasty manifests gets a message with the file, the
line and the field from `whetstone validate`, never a traceback; the edge cases the API server accepts are
accepted; every accepted FineTuneJob makes children the API server accepts."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import EXAMPLES, valid_job
from manifest_catalogue import CATALOGUE, NAME_53, Case, dump
from whetstone_api import FineTuneJob, k8s, yamlload
from whetstone_api.finetunejob import MAX_NODES, max_job_name_length, pod_name
from whetstone_api.manifests import ManifestError, load_resource, load_resources
from whetstone_cli.main import main
from whetstone_operator import children
from whetstone_operator.rendezvous import pod_name as operator_pod_name

# Files that have no line to point at.
_NO_LINE = {"yaml-empty-file", "yaml-too-large"}


def _write(tmp_path: Path, case: Case) -> Path:
    path = tmp_path / f"{case.id}.yaml"
    path.write_bytes(case.text.encode("utf-8", "surrogateescape"))
    return path


def _expected_line(text: str, field: str) -> int:
    """The line the field's problem should point at, found with PyYAML's own node tree: the key of the
    deepest field along the path that exists, or the list item (in the last document)."""
    node = list(yaml.compose_all(text))[-1]
    line = node.start_mark.line + 1
    for part in re.findall(r"[^.\[\]]+", field):
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == part), None)
            if match is None:
                break
            line, node = match[0].start_mark.line + 1, match[1]
        elif isinstance(node, yaml.SequenceNode) and part.isdigit() and int(part) < len(node.value):
            node = node.value[int(part)]
            line = node.start_mark.line + 1
        else:
            break
    return line


@pytest.mark.parametrize("case", CATALOGUE, ids=[c.id for c in CATALOGUE])
def test_catalogue_case(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: Case) -> None:
    path = _write(tmp_path, case)
    code = main(["validate", "--schema-only", str(path)])
    out, err = capsys.readouterr()
    if case.valid:
        assert code == 0, err
        assert "is valid" in out
        return
    assert code == 1, out
    lines = err.splitlines()
    where = re.escape(str(path))
    if case.field is None:
        pattern = (
            rf"^{where}(:\d+)?: .*{re.escape(case.reason)}" if case.id in _NO_LINE else rf"^{where}:\d+: "
        )
        matching = [ln for ln in lines if re.match(pattern, ln) and case.reason in ln]
        assert matching, f"no line-numbered message with {case.reason!r}: {lines}"
        return
    named = [ln for ln in lines if re.match(rf"^{where}:\d+: {re.escape(case.field)}: ", ln)]
    assert named, f"no message names {case.field!r}: {lines}"
    assert any(case.reason in ln for ln in named), f"{case.reason!r} not in {named}"
    line = int(named[0][len(str(path)) + 1 :].split(":", 1)[0])
    assert line == _expected_line(case.text, case.field), named[0]


def test_yaml_problems_name_their_line(tmp_path: Path) -> None:
    text = dump(valid_job())
    lines = text.splitlines()
    method_line = next(i for i, ln in enumerate(lines, 1) if ln.strip().startswith("method:"))
    cases = {
        "duplicate": text.replace("  method: sft\n", "  method: sft\n  method: dpo\n"),
        "nan": text.replace("  method: sft\n", "  method: sft\n  nodes: .nan\n"),
        "tab": text.replace("  method: sft\n", "  method: sft\n\tnodes: 2\n"),
        "tag": text.replace("  method: sft\n", "  method: sft\n  nodes: !!python/int 2\n"),
    }
    for name, broken in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(broken)
        with pytest.raises(ManifestError) as err:
            load_resource(path)
        assert err.value.problems[0].line == method_line + 1, (name, str(err.value))


def test_duplicate_key_names_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(
        dump(valid_job()).replace("    seed: 7\n", "    seed: 7\n    precision: fp32\n    seed: 8\n")
    )
    with pytest.raises(ManifestError) as err:
        load_resource(path)
    text = path.read_text().splitlines()
    first, second = [i for i, ln in enumerate(text, 1) if ln.strip().startswith("seed:")]
    assert str(err.value) == f"{path}:{second}: duplicate key 'seed' (first at line {first})"


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
    assert str(err.value) == f"{path}:{line}: spec.hyperparameters.sead: unknown field; did you mean seed?"


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    doc = valid_job()
    doc["spec"]["hyperparameters"].update(learningRate="0.1", batchSize=0, sheduler="cosine")
    doc["spec"]["nodes"] = 0
    path = tmp_path / "job.yaml"
    path.write_text(dump(doc))
    with pytest.raises(ManifestError) as err:
        load_resource(path)
    fields = {p.field for p in err.value.problems}
    assert fields == {
        "spec.hyperparameters.learningRate",
        "spec.hyperparameters.batchSize",
        "spec.hyperparameters.sheduler",
        "spec.nodes",
    }


def test_examples_are_valid() -> None:
    for path in sorted(EXAMPLES.glob("*.yaml")):
        resources = load_resources(path)
        assert any(isinstance(r, FineTuneJob) for r in resources), path


def test_cluster_examples_are_valid() -> None:
    """The examples a cluster user applies as they are (every kind), checked as the API server would."""
    paths = sorted((EXAMPLES / "cluster").glob("*.yaml"))
    assert paths
    for path in paths:
        assert load_resources(path), path


def test_defaults_fill_in() -> None:
    doc = valid_job()
    del doc["spec"]["checkpointing"]
    job = FineTuneJob.model_validate(doc)
    assert job.spec.checkpointing.keep_last == 3
    assert job.spec.sft_settings.packing is True
    assert job.spec.backoff_limit == 3 and job.spec.suspend is False


def test_typed_affinity_reaches_the_pod_as_written() -> None:
    doc = valid_job()
    affinity = {
        "nodeAffinity": {
            "preferredDuringSchedulingIgnoredDuringExecution": [
                {
                    "weight": 10,
                    "preference": {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a"]}]},
                }
            ]
        }
    }
    doc["spec"]["affinity"] = affinity
    job = FineTuneJob.model_validate(doc)
    assert job.spec.affinity == affinity


def test_job_name_budget_follows_the_pod_names() -> None:
    # The operator names pods with rendezvous.pod_name; the API's budget must use the same names.
    assert pod_name("job", MAX_NODES - 1) == operator_pod_name("job", MAX_NODES - 1)
    assert (
        max_job_name_length(1) == 56
        and max_job_name_length(11) == 55
        and max_job_name_length(MAX_NODES) == 53
    )


def _child_names_problems(job: dict[str, Any]) -> list[str]:
    """Names in the children the operator builds for `job` that the API server would refuse."""
    job = {**job, "metadata": {**job["metadata"], "namespace": "team-a", "uid": "u-1"}}
    spec = FineTuneJob.model_validate(job).spec
    settings = children.ChildSettings()
    problems = []
    problems.append(k8s.dns_subdomain_problem(children.config_map(job)["metadata"]["name"]))
    problems.append(k8s.dns_1035_problem(children.headless_service(job, settings)["metadata"]["name"]))
    for rank in {0, spec.nodes - 1}:
        pod = children.trainer_pod(job, rank, 0, settings)
        problems.append(k8s.dns_label_problem(pod["metadata"]["name"]))
        problems.append(k8s.dns_label_problem(pod["spec"]["hostname"]))
        names = [v["name"] for v in pod["spec"]["volumes"]]
        problems += [k8s.dns_label_problem(n, "volume") for n in names]
        if len(set(names)) != len(names):
            problems.append(f"two pod volumes share a name: {names}")
        paths = [m["mountPath"] for m in pod["spec"]["containers"][0]["volumeMounts"]]
        if len(set(paths)) != len(paths):
            problems.append(f"two mounts share a path: {paths}")
        for key, value in pod["metadata"]["labels"].items():
            problems.append(k8s.qualified_name_problem(key) or k8s.label_value_problem(value))
    ckpt = children.checkpoint_resource(job, 10**8 - 1, "pvc://runs/x", "resumable")
    problems.append(k8s.dns_subdomain_problem(ckpt["metadata"]["name"]))
    return [p for p in problems if p]


@pytest.mark.parametrize(
    "case",
    [c for c in CATALOGUE if c.valid and "kind: FineTuneJob" in c.text],
    ids=lambda c: c.id,
)
def test_accepted_jobs_make_children_the_server_accepts(case: Case) -> None:
    for doc in yamlload.load(case.text):
        if doc.value.get("kind") == "FineTuneJob":
            job = FineTuneJob.model_validate(doc.value).to_wire()
            assert _child_names_problems(job) == []


def test_longest_names_and_most_claims_make_valid_children() -> None:
    doc = valid_job()
    doc["metadata"]["name"] = NAME_53
    doc["spec"].update(nodes=MAX_NODES, gpusPerNode=8)
    doc["spec"]["dataset"]["uri"] = "pvc://" + "d" * 120 + ".v2/train.jsonl"
    doc["spec"]["output"]["uri"] = "pvc://" + "o" * 253 + "/run"
    doc["spec"]["volumes"] = [{"name": "v" * 58, "mountPath": "/" + "m" * 200, "emptyDir": {}}]
    job = FineTuneJob.model_validate(doc).to_wire()
    assert _child_names_problems(job) == []


def test_validate_cli_reports_every_problem_and_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = valid_job()
    doc["spec"]["hyperparameters"]["learningRate"] = 0
    doc["spec"]["nodes"] = 0
    path = tmp_path / "job.yaml"
    path.write_text(dump(doc))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "spec.hyperparameters.learningRate" in err and "spec.nodes" in err


@pytest.mark.parametrize("case", [c for c in CATALOGUE if not c.valid], ids=lambda c: c.id)
def test_run_refuses_with_a_message(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: Case) -> None:
    path = _write(tmp_path, case)
    assert main(["run", str(path)]) == 1
    err = capsys.readouterr().err
    assert str(path) in err and "Traceback" not in err


def test_dump_writes_what_kubectl_reads_back() -> None:
    # PyYAML leaves y, n, 1e3 and 08 unquoted; Go's rules (kubectl, the trainer's loader) read them as a
    # boolean and numbers. Manifests written by Whetstone must survive the round trip.
    tricky = [
        "y",
        "n",
        "N",
        "on",
        "1e3",
        "08",
        "0x1F",
        "1_000",
        ".5",
        "+5",
        "1:30",
        "2024-01-01",
        " pad",
        "~",
        "",
    ]
    doc = {"spec": {"nodeSelector": {f"k{i}": v for i, v in enumerate(tricky)}, "n": 1.0e-4, "m": 3}}
    (back,) = yamlload.load(yamlload.dump(doc))
    assert back.value == doc
    naive = yamlload.load(yaml.safe_dump(doc))[0].value["spec"]["nodeSelector"]
    assert naive["k0"] is True and naive["k4"] == 1000  # what the naive dump would have sent
