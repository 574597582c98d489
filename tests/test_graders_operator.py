"""The operator's RewardGrader check, without a cluster: what it decides for each kind of grader, the status
and Events it writes, when it checks again (spec changes and children, not resyncs), and that user code does
not run in the operator's process."""

from __future__ import annotations

import os
from datetime import UTC, datetime
from typing import Any

from whetstone_api import reasons as R
from whetstone_operator import graders as op
from whetstone_operator.graders import GraderChecker, Verdict

Json = dict[str, Any]
NS = "team"


def grader(name: str, spec: Json, generation: int = 1, status: Json | None = None) -> Json:
    obj: Json = {
        "apiVersion": "whetstone.dev/v1alpha1",
        "kind": "RewardGrader",
        "metadata": {"name": name, "namespace": NS, "generation": generation, "uid": f"uid-{name}"},
        "spec": spec,
    }
    if status is not None:
        obj["status"] = status
    return obj


EXACT = {
    "stringCheck": {"reference": "{{ item.answer }}"},
    "testCases": [
        {"sample": "42", "item": {"answer": "42"}, "expectedScore": 1},
        {"sample": "41", "item": {"answer": "42"}, "expectedScore": 0},
    ],
}
WRONG = {
    "stringCheck": {"reference": "{{ item.answer }}"},
    "testCases": [{"sample": "41", "item": {"answer": "42"}, "expectedScore": 1}],
}


def test_verdicts_for_each_kind_of_grader() -> None:
    good = op.verdict(grader("exact", EXACT), {})
    assert good == Verdict(R.READY, R.REASON_TEST_CASES_PASSED, "2/2 test cases passed", 2, 2)
    bad = op.verdict(grader("wrong", WRONG), {})
    assert (bad.phase, bad.reason, bad.passed) == ("Failed", R.REASON_TEST_CASE_FAILED, 0)
    assert bad.message == "test case 0 expected 1, got 0"
    none = op.verdict(grader("bare", {"regex": {"pattern": "x"}}), {})
    assert (none.phase, none.reason, none.total) == ("Ready", R.REASON_NO_TEST_CASES, 0)


def test_invalid_specs_fail_naming_the_field_or_the_code() -> None:
    two_types = op.verdict(grader("g", {"regex": {"pattern": "x"}, "stringCheck": {"reference": "y"}}), {})
    assert (two_types.phase, two_types.reason) == ("Failed", R.REASON_INVALID_SPEC)
    assert "exactly one grader type must be set" in two_types.message
    bad_pattern = op.verdict(grader("g", {"regex": {"pattern": "(x"}}), {})
    assert bad_pattern.message.startswith("spec.regex.pattern: the pattern does not compile")
    syntax = op.verdict(grader("g", {"python": {"source": "def grade(s, i) return 1"}}), {})
    assert (syntax.phase, syntax.reason) == ("Failed", R.REASON_INVALID_SPEC)
    assert "does not load" in syntax.message and "SyntaxError" in syntax.message
    template = op.verdict(grader("g", {"stringCheck": {"reference": "{{ item.a + 1 }}"}}), {})
    assert (template.reason, "is not a template path" in template.message) == (R.REASON_INVALID_SPEC, True)


def test_weighted_graders_wait_for_children_and_refuse_cycles() -> None:
    mix = grader(
        "mix",
        {
            "weighted": {"graders": {"exact": 1}},
            "testCases": [{"sample": "7", "item": {"answer": "7"}, "expectedScore": 1}],
        },
    )
    waiting = op.verdict(mix, {})
    assert (waiting.phase, waiting.reason) == ("Pending", R.REASON_CHILD_MISSING)
    assert "names child 'exact', which does not exist" in waiting.message
    assert op.verdict(mix, {"exact": grader("exact", EXACT)}).reason == R.REASON_TEST_CASES_PASSED
    a, b = grader("a", {"weighted": {"graders": {"b": 1}}}), grader("b", {"weighted": {"graders": {"a": 1}}})
    cycle = op.verdict(a, {"a": a, "b": b})
    assert (cycle.phase, cycle.reason) == ("Failed", R.REASON_INVALID_SPEC) and "a -> b -> a" in cycle.message
    broken_child = op.verdict(mix, {"exact": grader("exact", {"regex": {}})})
    assert broken_child.message.startswith("child exact is invalid: spec.regex.pattern")


def test_remote_graders_are_ready_without_calling_anything() -> None:
    http = grader(
        "svc",
        {"http": {"url": "http://10.0.0.1:9/score"}, "testCases": [{"sample": "x", "expectedScore": 1}]},
    )
    v = op.verdict(http, {})
    assert (v.phase, v.reason, v.passed, v.total) == ("Ready", R.REASON_REMOTE_UNTESTED, None, 1)
    parent = grader("p", {"weighted": {"graders": {"svc": 1}}})
    assert op.verdict(parent, {"svc": http}).reason == R.REASON_REMOTE_UNTESTED


def test_user_code_never_runs_in_the_operators_process(tmp_path: Any) -> None:
    marker = tmp_path / "ran-here"
    source = (
        "import os\nos.environ['WHETSTONE_PWNED'] = '1'\n"
        f"open({str(marker)!r}, 'w').write('x')\n"
        "def grade(s, i):\n    return 1.0"
    )
    v = op.verdict(grader("evil", {"python": {"source": source}}), {})
    assert "WHETSTONE_PWNED" not in os.environ and not marker.exists()
    assert (v.phase, v.reason) == ("Failed", R.REASON_INVALID_SPEC)
    assert "ran-here" in v.message  # refused, or absent: in the sandbox /tmp is its own scratch folder


def test_status_and_events() -> None:
    now = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    ready = Verdict(R.READY, R.REASON_TEST_CASES_PASSED, "2/2 test cases passed", 2, 2)
    status = op.status_of(ready, 3, None, now)
    assert status["phase"] == "Ready" and status["observedGeneration"] == 3 and status["message"] is None
    assert status["conditions"] == [
        {
            "type": "Ready",
            "status": "True",
            "reason": "TestCasesPassed",
            "message": "2/2 test cases passed",
            "lastTransitionTime": "2026-01-02T03:04:05Z",
            "observedGeneration": 3,
        }
    ]
    assert op.event_of(None, ready) == ("Normal", "TestCasesPassed", "2/2 test cases passed")
    assert op.event_of(status, ready) is None  # nothing changed: no Event
    later = datetime(2026, 1, 3, tzinfo=UTC)
    same = op.status_of(Verdict(R.READY, R.REASON_NO_TEST_CASES, "x", 0, 0), 4, status, later)
    assert same["conditions"][0]["lastTransitionTime"] == "2026-01-02T03:04:05Z"  # still True
    failed = Verdict("Failed", R.REASON_TEST_CASE_FAILED, "test case 0 expected 1, got 0", 0, 1)
    flipped = op.status_of(failed, 5, status, later)
    assert flipped["conditions"][0]["lastTransitionTime"] == "2026-01-03T00:00:00Z"
    assert flipped["message"] == "test case 0 expected 1, got 0"
    assert op.event_of(status, failed) == ("Warning", "TestCaseFailed", "test case 0 expected 1, got 0")


class Recorder(GraderChecker):
    """The checker with its API calls recorded instead of sent (no API server here)."""

    def __init__(self) -> None:
        super().__init__(api=lambda: None, check=self.counted)
        self.checked: list[str] = []
        self.statuses: list[tuple[str, Json]] = []
        self.events: list[tuple[str, str, str]] = []

    def counted(self, obj: Json, graders: Any) -> Verdict:
        self.checked.append(obj["metadata"]["name"])
        return op.verdict(obj, graders)

    def _enqueue(self, key: tuple[str, str], force: bool) -> None:  # synchronous, for the test
        self.check_one(key, force)

    def _write_status(self, key: tuple[str, str], status: Json) -> Json:
        self.statuses.append((key[1], status))
        return status

    def _post_event(self, obj: Json, event_type: str, reason: str, message: str) -> None:
        self.events.append((obj["metadata"]["name"], event_type, reason))


def test_the_checker_runs_on_spec_changes_not_on_resyncs() -> None:
    checker = Recorder()
    checker.observe(None, grader("exact", EXACT))  # the initial listing
    assert checker.checked == ["exact"] and checker.events == [("exact", "Normal", "TestCasesPassed")]
    written = checker.statuses[-1][1]
    # The watch shows our own status write, then resyncs and label changes: nothing to check.
    for _ in range(3):
        checker.observe("MODIFIED", grader("exact", EXACT, status=written))
    assert checker.checked == ["exact"]
    # A new spec (generation 2) is checked, and its failure is an Event.
    checker.observe("MODIFIED", grader("exact", WRONG, generation=2, status=written))
    assert checker.checked == ["exact", "exact"]
    assert checker.statuses[-1][1]["phase"] == "Failed" and checker.statuses[-1][1]["observedGeneration"] == 2
    assert checker.events[-1] == ("exact", "Warning", "TestCaseFailed")


def test_a_weighted_grader_is_checked_again_when_its_children_come_and_change() -> None:
    checker = Recorder()
    mix_spec = {
        "weighted": {"graders": {"exact": 1}},
        "testCases": [{"sample": "7", "item": {"answer": "7"}, "expectedScore": 1}],
    }
    checker.observe(None, grader("mix", mix_spec))
    assert checker.statuses[-1][0] == "mix" and checker.statuses[-1][1]["phase"] == "Pending"
    checker.observe("ADDED", grader("exact", EXACT))
    assert {name: s["phase"] for name, s in checker.statuses[-2:]} == {"exact": "Ready", "mix": "Ready"}
    mix_status = checker.statuses[-1][1]
    # The child's spec changes so that the parent's test case no longer passes.
    checker.observe("MODIFIED", grader("exact", {"stringCheck": {"reference": "never"}}, generation=2))
    assert checker.statuses[-1][0] == "mix" and checker.statuses[-1][1]["phase"] == "Failed"
    assert checker.statuses[-1][1]["observedGeneration"] == 1  # the parent's own spec did not change
    assert mix_status["phase"] == "Ready"
    checker.observe("DELETED", grader("exact", EXACT, generation=2))
    assert checker.statuses[-1][0] == "mix" and checker.statuses[-1][1]["phase"] == "Pending"
