"""Every RewardGrader type behind grade(sample, item), templates, onError, weighted combinations and the
test-case runner. Sandboxed types (regex, similarity, python) really run in sandbox workers here."""

from __future__ import annotations

import math
from typing import Any

import pytest
from whetstone_api.rewardgrader import RewardGraderSpec
from whetstone_graders import GraderConfigError, GraderFailed, GraderSet, Sample, run_test_cases, templates
from whetstone_graders.types import GradingError


def spec(**body: Any) -> RewardGraderSpec:
    return RewardGraderSpec.model_validate(body)


def scores(grader: RewardGraderSpec, pairs: list[tuple[str, dict[str, Any]]]) -> list[float | None]:
    with GraderSet([("g", 1.0)], {"g": grader}) as graders:
        rewards = graders.grade([Sample(s) for s, _ in pairs], [i for _, i in pairs])
    return [r.grades["g"].score for r in rewards]


# --- templates ----------------------------------------------------------------------------------------


def test_templates_read_sample_json_and_nested_item_fields() -> None:
    sample = Sample('{"answer": {"value": 7}, "steps": ["a", "b"]}')
    item = {"q": {"parts": [{"text": "x"}]}, "n": 3}
    assert templates.render("{{ sample.output_json.answer.value }}", sample, item) == "7"
    assert templates.render("{{sample.output_json.steps.1}}/{{ item.q.parts.0.text }}", sample, item) == "b/x"
    assert (
        templates.render("n={{ item.n }} obj={{ item.q }}", sample, item)
        == 'n=3 obj={"parts": [{"text": "x"}]}'
    )


def test_a_missing_field_names_the_field_and_what_is_there() -> None:
    with pytest.raises(GradingError) as e:
        templates.render("{{ item.answer }}", Sample("x"), {"question": "q", "solution": "s"})
    assert e.value.reason == "template"
    assert "item has no field 'answer' (fields: question, solution)" in e.value.message
    with pytest.raises(GradingError, match="sample.output_json is null"):
        templates.render("{{ sample.output_json.a }}", Sample("not json"), {})
    with pytest.raises(templates.TemplateSyntaxError):
        templates.check("{{ item.a + 1 }}")


# --- stringCheck, regex, python --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("operation", "expected"),
    [("eq", [1.0, 0.0, 0.0]), ("ne", [0.0, 1.0, 1.0]), ("like", [1.0, 1.0, 0.0]), ("ilike", [1.0, 1.0, 1.0])],
)
def test_string_check_operations(operation: str, expected: list[float]) -> None:
    grader = spec(stringCheck={"reference": "{{ item.answer }}", "operation": operation})
    pairs = [
        ("Paris", {"answer": "Paris"}),
        ("It is Paris.", {"answer": "Paris"}),
        ("PARIS", {"answer": "Paris"}),
    ]
    assert scores(grader, pairs) == expected


def test_regex_modes_flags_and_scores() -> None:
    base = {"pattern": r"answer: \d+", "scoreOnMatch": 2.0, "scoreOnNoMatch": -1.0}
    pairs = [("answer: 42", {}), ("so the answer: 42", {}), ("ANSWER: 42", {}), ("answer: 42 done", {})]
    assert scores(spec(regex={**base, "mode": "search"}), pairs) == [2.0, 2.0, -1.0, 2.0]
    assert scores(spec(regex={**base, "mode": "match"}), pairs) == [2.0, -1.0, -1.0, 2.0]
    assert scores(spec(regex={**base, "mode": "fullmatch"}), pairs) == [2.0, -1.0, -1.0, -1.0]
    assert scores(spec(regex={**base, "flags": ["ignoreCase"]}), pairs) == [2.0, 2.0, 2.0, 2.0]
    multiline = spec(regex={"pattern": "^b$", "flags": ["multiline"]})
    assert scores(multiline, [("a\nb\nc", {})]) == [1.0]


def test_a_regex_that_does_not_compile_is_rejected_by_the_schema() -> None:
    with pytest.raises(ValueError, match="the pattern does not compile"):
        spec(regex={"pattern": "(unclosed"})


def test_python_grader_sees_sample_and_item() -> None:
    source = (
        "def grade(sample, item):\n"
        "    data = sample['output_json'] or {}\n"
        "    return float(data.get('sum') == item['a'] + item['b'])\n"
    )
    pairs = [('{"sum": 5}', {"a": 2, "b": 3}), ('{"sum": 6}', {"a": 2, "b": 3}), ("five", {"a": 2, "b": 3})]
    assert scores(spec(python={"source": source}), pairs) == [1.0, 0.0, 0.0]


# --- onError ---------------------------------------------------------------------------------------------

RAISES = (
    "def grade(sample, item):\n"
    "    if sample['output_text'] == 'bad':\n"
    "        raise ValueError('no')\n"
    "    return 1.0"
)


def test_on_error_zero_skip_and_fail_and_errors_are_counted() -> None:
    samples, items = [Sample("ok"), Sample("bad")], [{}, {}]
    with GraderSet([("g", 1.0)], {"g": spec(python={"source": RAISES}, onError="zero")}) as graders:
        ok, bad = graders.grade(samples, items)
        assert (ok.total, bad.total) == (1.0, 0.0)
        assert bad.grades["g"].error == "exception" and "ValueError: no" in (bad.grades["g"].message or "")
        assert graders.stats().errors == {("g", "exception"): 1}
        assert graders.stats().calls == {"g": 2}
    with GraderSet([("g", 1.0)], {"g": spec(python={"source": RAISES}, onError="skip")}) as graders:
        ok, bad = graders.grade(samples, items)
        assert (ok.total, bad.total, bad.grades["g"].score) == (1.0, None, None)
    with GraderSet([("g", 1.0)], {"g": spec(python={"source": RAISES}, onError="fail")}) as graders:
        with pytest.raises(GraderFailed) as e:
            graders.grade(samples, items)
        assert (e.value.grader, e.value.reason) == ("g", "exception")
        assert graders.stats().errors == {("g", "exception"): 1}


def test_a_template_error_is_a_grading_error_not_an_exception() -> None:
    grader = spec(stringCheck={"reference": "{{ item.answer }}"})
    with GraderSet([("g", 1.0)], {"g": grader}) as graders:
        (reward,) = graders.grade([Sample("x")], [{"solution": "x"}])
        assert reward.grades["g"].score == 0.0 and reward.grades["g"].error == "template"
        assert graders.stats().errors == {("g", "template"): 1}


# --- weighted -------------------------------------------------------------------------------------------


def test_weighted_children_by_name_and_the_jobs_weighted_sum() -> None:
    specs = {
        "exact": spec(stringCheck={"reference": "{{ item.answer }}"}),
        "digits": spec(regex={"pattern": r"\d+", "mode": "fullmatch"}),
        "mix": spec(weighted={"graders": {"exact": 3, "digits": 1}}),
        "sum": spec(weighted={"graders": {"exact": 3, "digits": 1}, "normalize": False}),
    }
    with GraderSet([("mix", 1.0), ("exact", 0.5), ("sum", 0.0)], specs) as graders:
        r42, r41, rx = graders.grade([Sample("42"), Sample("41"), Sample("x")], [{"answer": "42"}] * 3)
        assert [r.grades["mix"].score for r in (r42, r41, rx)] == [1.0, 0.25, 0.0]
        assert [r.grades["sum"].score for r in (r42, r41, rx)] == [4.0, 1.0, 0.0]
        assert [r.total for r in (r42, r41, rx)] == [1.5, 0.25, 0.0]
        # A child shared by the job and two parents is graded once per batch.
        assert graders.stats().calls["exact"] == 3


def test_a_child_that_skips_makes_its_parent_skip() -> None:
    specs = {
        "flaky": spec(python={"source": RAISES}, onError="skip"),
        "zeroing": spec(python={"source": RAISES}, onError="zero"),
        "parent": spec(weighted={"graders": {"flaky": 1, "zeroing": 1}}),
    }
    with GraderSet([("parent", 1.0)], specs) as graders:
        ok, bad = graders.grade([Sample("ok"), Sample("bad")], [{}, {}])
        assert ok.total == 1.0
        assert bad.total is None and bad.grades["parent"].error == "child"
        errors = graders.stats().errors
        assert errors[("flaky", "exception")] == 1 and errors[("zeroing", "exception")] == 1


def test_missing_children_and_cycles_are_errors_naming_them() -> None:
    with pytest.raises(GraderConfigError, match="RewardGrader a \\(weighted\\) names child 'nope'"):
        GraderSet([("a", 1.0)], {"a": spec(weighted={"graders": {"nope": 1}})})
    cyclic = {
        "a": spec(weighted={"graders": {"b": 1}}),
        "b": spec(weighted={"graders": {"c": 1}}),
        "c": spec(weighted={"graders": {"a": 1}}),
    }
    with pytest.raises(GraderConfigError, match="cycle: a -> b -> c -> a"):
        GraderSet([("a", 1.0)], cyclic)
    with pytest.raises(GraderConfigError, match="'missing', which does not exist"):
        GraderSet([("missing", 1.0)], {})
    with pytest.raises(ValueError, match="at least one weight must be above 0"):
        spec(weighted={"graders": {"a": 0}})


# --- test cases --------------------------------------------------------------------------------------------


def test_run_test_cases_reports_the_first_failure_with_expected_and_got() -> None:
    grader = spec(
        stringCheck={"reference": "{{ item.answer }}"},
        testCases=[
            {"sample": "42", "item": {"answer": "42"}, "expectedScore": 1},
            {"sample": "41", "item": {"answer": "42"}, "expectedScore": 0},
            {"sample": "41", "item": {"answer": "42"}, "expectedScore": 1},
        ],
    )
    report = run_test_cases("exact", grader)
    assert (report.passed, report.total, report.ok) == (2, 3, False)
    failure = report.first_failure
    assert failure is not None and (failure.index, failure.expected, failure.got) == (2, 1.0, 0.0)
    assert report.summary() == "test case 2 expected 1, got 0"


def test_run_test_cases_tolerance_and_errors() -> None:
    grader = spec(
        python={"source": "def grade(s, i):\n    return 1 / 3"},
        testCases=[
            {"sample": "x", "expectedScore": 0.333, "tolerance": 0.001},
            {"sample": "x", "expectedScore": 0.333},
        ],
    )
    report = run_test_cases("third", grader)
    assert [c.passed for c in report.cases] == [True, False]
    assert math.isclose(report.cases[1].got or 0, 1 / 3)
    failing = spec(python={"source": "def grade(s, i):\n    raise KeyError('x')"}, onError="fail",
                   testCases=[{"sample": "x", "expectedScore": 0}])  # fmt: skip
    report = run_test_cases("failing", failing)
    assert report.summary() == "test case 0 expected 0, got no score (exception: KeyError: 'x')"
    weighted = spec(weighted={"graders": {"gone": 1}}, testCases=[{"sample": "x", "expectedScore": 0}])
    assert "names child 'gone', which does not exist" in (run_test_cases("w", weighted).problem or "")


def test_a_grader_whose_code_does_not_load_is_a_problem_even_without_test_cases() -> None:
    broken = spec(python={"source": "def grade(s, i) return 1"})
    report = run_test_cases("broken", broken)
    assert report.problem is not None and report.problem.startswith("RewardGrader broken does not load")
    assert "invalid_source: loading the grader: SyntaxError" in report.problem
    with GraderSet(
        [("broken", 1.0), ("ok", 1.0)], {"broken": broken, "ok": spec(python={"source": "grade = max"})}
    ) as graders:
        assert list(graders.preload()) == ["broken"]
