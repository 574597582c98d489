"""The contract between operator and trainer (whetstone_api.uris and .wire): URIs parsed once, the report
parsed strictly."""

from __future__ import annotations

import json
import re

import pytest
from whetstone_api.uris import URIError, claim_volume_name, claims_of, is_within, parse_uri, uri_of_pod_path
from whetstone_api.wire import (
    MAX_REPORT_BYTES,
    ReportError,
    TrainerReport,
    checkpoint_folder,
    checkpoint_resource_name,
    step_of_folder,
)

DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


@pytest.mark.parametrize(
    ("uri", "scheme", "host", "path"),
    [
        ("data/train.jsonl", "path", "", "data/train.jsonl"),
        ("file:///abs/x.jsonl", "path", "", "/abs/x.jsonl"),
        ("pvc://data/sets/a.jsonl", "pvc", "data", "sets/a.jsonl"),
        ("pvc://data.v2/./sets//a.jsonl", "pvc", "data.v2", "sets/a.jsonl"),
        ("pvc://models", "pvc", "models", ""),
        ("hf://org/name", "hf", "org/name", ""),
        ("s3://bucket/key/x", "s3", "bucket", "key/x"),
        ("whetstone://Tiny", "whetstone", "tiny", ""),
    ],
)
def test_forms(uri: str, scheme: str, host: str, path: str) -> None:
    parsed = parse_uri(uri)
    assert (parsed.scheme, parsed.host, parsed.path) == (scheme, host, path)


@pytest.mark.parametrize(
    "uri",
    ["", "pvc://", "pvc://Bad_Claim/x", "pvc://c/../etc", "s3://B/x", "hf://a/b/c", "ftp://x/y", "a\x00b"],
)
def test_malformed_uris_name_themselves(uri: str) -> None:
    with pytest.raises(URIError) as info:
        parse_uri(uri)
    assert repr(uri) in str(info.value)


def test_pod_paths_and_claims() -> None:
    assert parse_uri("pvc://work/out").pod_path == "/mnt/pvc/work/out"
    assert (
        uri_of_pod_path("/mnt/pvc/work/out/checkpoints/step-00000010")
        == "pvc://work/out/checkpoints/step-00000010"
    )
    assert claims_of(["pvc://a/x", "pvc://b/y", "pvc://a/z", "file:///x", "pvc://Bad/x"]) == ["a", "b"]


@pytest.mark.parametrize("claim", ["data", "data.v2", "a" * 63, "a.b." * 60 + "c", "x-" * 100 + "y"])
def test_claim_volume_names_are_dns_labels_and_distinct(claim: str) -> None:
    name = claim_volume_name(claim)
    assert len(name) <= 63 and DNS_LABEL.match(name)
    assert claim_volume_name("data-v2") != claim_volume_name("data.v2")


@pytest.mark.parametrize(
    ("uri", "folder", "inside"),
    [
        ("pvc://work/out/checkpoints/step-00000010", "pvc://work/out", True),
        ("pvc://work/out", "pvc://work/out", True),
        ("pvc://work/outside/x", "pvc://work/out", False),
        ("pvc://work/out/../etc", "pvc://work/out", False),
        ("pvc://other/out/x", "pvc://work/out", False),
        ("/data/out/x", "/data/out", True),
        ("/data/x", "/data/out", False),
        ("s3://b/out/x", "pvc://b/out", False),
    ],
)
def test_is_within(uri: str, folder: str, inside: bool) -> None:
    assert is_within(uri, folder) is inside


def test_checkpoint_naming() -> None:
    assert checkpoint_folder(40) == "step-00000040" and step_of_folder("step-00000040") == 40
    assert step_of_folder("step-40") is None and step_of_folder("final") is None
    assert checkpoint_resource_name("j", 40) == "j-step-00000040"
    assert checkpoint_resource_name("j", 40, "export") == "j-final"


GOOD = {"job": "j", "phase": "Training", "step": 3, "totalSteps": 10, "loss": 1.5}


def test_report_round_trip() -> None:
    report = TrainerReport.parse(json.dumps(GOOD).encode())
    assert TrainerReport.parse(report.to_json().encode()) == report


@pytest.mark.parametrize(
    "body",
    [
        {**GOOD, "step": "latest"},
        {**GOOD, "step": -1},
        {**GOOD, "phase": "Exploding"},
        {**GOOD, "checkpoints": [{"step": "1", "uri": "x"}]},
        {**GOOD, "checkpoints": [{"step": 1, "uri": "x", "metrics": {"loss": "low"}}]},
        {"phase": "Training"},
        [1, 2],
    ],
)
def test_malformed_reports_are_refused(body: object) -> None:
    with pytest.raises(ReportError):
        TrainerReport.parse(json.dumps(body).encode())


@pytest.mark.parametrize(
    "raw", [b"{" * 100_000, b"[" * 100_000, b"not json", b'{"job": "j", "phase": 1e999}']
)
def test_deep_nesting_and_garbage_are_refused(raw: bytes) -> None:
    with pytest.raises(ReportError):
        TrainerReport.parse(raw)


def test_a_diverged_metric_is_reported_missing_not_written() -> None:
    raw = (
        b'{"job": "j", "phase": "Training", "step": 7, "loss": NaN, "evalLoss": Infinity,'
        b' "reward": -Infinity,'
        b' "checkpoints": [{"step": 5, "uri": "/o/c", "metrics": {"loss": NaN, "evalLoss": 1.5}}]}'
    )
    report = TrainerReport.parse(raw)
    assert report.step == 7 and report.loss is None and report.eval_loss is None and report.reward is None
    assert report.checkpoints[0].metrics == {"evalLoss": 1.5}
    assert "NaN" not in report.to_json() and "Infinity" not in report.to_json()


def test_oversized_reports_are_refused_before_parsing() -> None:
    with pytest.raises(ReportError, match="bytes"):
        TrainerReport.parse(b" " * (MAX_REPORT_BYTES + 1))


def test_the_final_report_round_trips_through_a_termination_message_and_refuses_junk() -> None:
    from whetstone_api.wire import (
        MAX_TERMINATION_MESSAGE,
        ReportedCheckpoint,
        TrainerReport,
        final_report_message,
        final_report_of,
    )

    many = [ReportedCheckpoint(step=i, uri=f"pvc://work/out/checkpoints/step-{i:08d}") for i in range(200)]
    report = TrainerReport(
        job="j", phase="Finished", step=30, totalSteps=30, loss=0.25, reward=0.875, checkpoints=many
    )
    message = final_report_message(report)
    assert len(message.encode()) <= MAX_TERMINATION_MESSAGE  # checkpoints left out: they would not fit
    back = final_report_of(message)
    assert back is not None and (back.step, back.reward, back.loss) == (30, 0.875, 0.25)
    assert back.checkpoints == []
    # What a user's image could write instead: none of it becomes a report.
    for junk in (
        None,
        "",
        "Traceback (most recent call last): ...",
        "whetstone: final report: {not json",
        'whetstone: final report: {"job": "j", "phase": "Finished", "step": "latest"}',
        "whetstone: final report: " + "x" * 5000,
    ):
        assert final_report_of(junk) is None
