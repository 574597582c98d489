"""RewardGraders on the real control plane: the operator (with its own ServiceAccount's RBAC) checks each one
and marks it Ready or Failed as its test cases say, with an Event per change; a weighted grader waits for its
child; an edited spec is checked again; hostile grader code fails its grader, not the operator; the API
server's CEL rules reject what the Python models reject."""

from __future__ import annotations

import json
from typing import Any

import kubernetes
import pytest
from helpers import Cluster, wait_for
from operator_fixtures import *  # noqa: F403
from operator_fixtures import GROUP, VERSION, OperatorProcess

Json = dict[str, Any]
PLURAL = "rewardgraders"


def body(name: str, spec: Json) -> Json:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "RewardGrader",
        "metadata": {"name": name},
        "spec": spec,
    }


def create(cluster: Cluster, namespace: str, name: str, spec: Json) -> None:
    cluster.custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body(name, spec))


def settled(cluster: Cluster, namespace: str, name: str, phase: str, generation: int = 1) -> Json:
    def probe() -> Json | None:
        obj = cluster.custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status = obj.get("status") or {}
        if status.get("observedGeneration") == generation and status.get("phase") == phase:
            return status
        return None

    return wait_for(probe, 90, f"RewardGrader {name} to be {phase} at generation {generation}")


def case(sample: str, expected: float, **item: Any) -> Json:
    return {"sample": sample, "item": item, "expectedScore": expected}


EXACT = {"stringCheck": {"reference": "{{ item.answer }}"}, "testCases": [case("42", 1, answer="42")]}
PY_SOURCE = (
    "def grade(sample, item):\n"
    "    return float(sample['output_text'].strip() == str(item['a'] + item['b']))\n"
)


def test_rewardgraders_become_ready_or_failed_as_their_tests_say(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    create(cluster, namespace, "exact", EXACT)
    create(cluster, namespace, "exact-wrong", {**EXACT, "testCases": [case("41", 1, answer="42")]})
    create(cluster, namespace, "digits", {"regex": {"pattern": r"\d+", "mode": "fullmatch"},
                                          "testCases": [case("42", 1), case("4 2", 0)]})  # fmt: skip
    create(
        cluster, namespace, "sum", {"python": {"source": PY_SOURCE}, "testCases": [case("5", 1, a=2, b=3)]}
    )
    create(
        cluster,
        namespace,
        "sum-wrong",
        {"python": {"source": PY_SOURCE}, "testCases": [case("6", 1, a=2, b=3)]},
    )
    hostile = "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\ndef grade(s, i):\n    return 1.0\n"
    create(cluster, namespace, "hostile", {"python": {"source": hostile}, "testCases": [case("x", 1)]})

    status = settled(cluster, namespace, "exact", "Ready")
    assert (status["testCasesPassed"], status["testCasesTotal"]) == (1, 1)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("True", "TestCasesPassed", 1)
    failed = settled(cluster, namespace, "exact-wrong", "Failed")
    assert failed["message"] == "test case 0 expected 1, got 0"
    assert settled(cluster, namespace, "digits", "Ready")["testCasesPassed"] == 2
    assert settled(cluster, namespace, "sum", "Ready")["testCasesPassed"] == 1
    assert settled(cluster, namespace, "sum-wrong", "Failed")["message"] == "test case 0 expected 1, got 0"
    refused = settled(cluster, namespace, "hostile", "Failed")
    assert "sandbox refused signalling another process" in refused["message"]
    assert operator.healthy()  # the operator survived its grader's attempt on it

    events = cluster.core.list_namespaced_event(namespace).items
    by_object = {
        (e.involved_object.name, e.reason, e.type) for e in events if e.involved_object.kind == "RewardGrader"
    }
    assert ("exact", "TestCasesPassed", "Normal") in by_object
    assert ("exact-wrong", "TestCaseFailed", "Warning") in by_object


def test_a_weighted_grader_waits_for_its_child_and_edits_are_checked_again(
    cluster: Cluster, operator: OperatorProcess, namespace: str
) -> None:
    mix = {
        "weighted": {"graders": {"exact": 3, "digits": 1}},
        "testCases": [case("42", 1, answer="42"), case("41", 0.25, answer="42")],
    }
    create(cluster, namespace, "mix", mix)
    pending = settled(cluster, namespace, "mix", "Pending")
    assert pending["conditions"][0]["reason"] == "ChildMissing"
    create(cluster, namespace, "exact", EXACT)
    create(cluster, namespace, "digits", {"regex": {"pattern": r"\d+", "mode": "fullmatch"}})
    assert settled(cluster, namespace, "mix", "Ready")["testCasesPassed"] == 2

    # An edit is a new generation, checked again: now its second case expects what it does not get.
    patch = {"spec": {"testCases": [case("42", 1, answer="42"), case("41", 1, answer="42")]}}
    cluster.custom.patch_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "mix", patch)
    failed = settled(cluster, namespace, "mix", "Failed", generation=2)
    assert failed["message"] == "test case 1 expected 1, got 0.25"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            {"regex": {"pattern": "x"}, "stringCheck": {"reference": "y"}},
            "exactly one grader type must be set",
        ),
        ({"weighted": {"graders": {"a": 0}}}, "at least one weight must be above 0"),
        (
            {"modelJudge": {"endpoint": "http://j/v1", "model": "m", "prompt": "p", "range": [5, 1]}},
            "low < high",
        ),
    ],
)
def test_the_api_server_rejects_what_the_models_reject(
    cluster: Cluster, crds_applied: list[str], namespace: str, spec: Json, message: str
) -> None:
    with pytest.raises(kubernetes.client.ApiException) as e:
        create(cluster, namespace, "bad", spec)
    assert e.value.status == 422 and message in json.loads(e.value.body)["message"]
