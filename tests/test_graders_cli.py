"""`whetstone grader test FILE.yaml`: every case printed, exit 1 naming the failing case, expected and got;
weighted graders resolve children from the same file; other kinds in the file are ignored."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import EXAMPLES
from whetstone_cli.main import main

FAILING = """
apiVersion: whetstone.dev/v1alpha1
kind: FineTuneJob
metadata: {name: ignored-here}
spec: {}
---
apiVersion: whetstone.dev/v1alpha1
kind: RewardGrader
metadata: {name: exact}
spec:
  stringCheck: {reference: "{{ item.answer }}"}
---
apiVersion: whetstone.dev/v1alpha1
kind: RewardGrader
metadata: {name: mix}
spec:
  weighted: {graders: {exact: 1}}
  testCases:
    - {sample: "7", item: {answer: "7"}, expectedScore: 1}
    - {sample: "7", item: {answer: "8"}, expectedScore: 1}
"""


def test_the_example_graders_pass(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["grader", "test", str(EXAMPLES / "graders" / "arithmetic.yaml")]) == 0
    out = capsys.readouterr().out
    assert "RewardGrader/arithmetic (weighted): 2/2 test cases passed" in out
    assert "ok   case 1: expected 0.5, got 0.5" in out  # numeric-distance, printed case by case


def test_a_failing_case_is_named_with_expected_and_got(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "graders.yaml"
    path.write_text(FAILING)
    assert main(["grader", "test", str(path)]) == 1
    captured = capsys.readouterr()
    assert "FAIL case 1: expected 1, got 0" in captured.out
    assert f"{path}: RewardGrader/mix: test case 1 expected 1, got 0" in captured.err
    assert "RewardGrader/exact (stringCheck): 0/0 test cases passed" in captured.out


def test_children_may_come_from_another_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    parent, child = tmp_path / "parent.yaml", tmp_path / "child.yaml"
    parent.write_text(
        "apiVersion: whetstone.dev/v1alpha1\nkind: RewardGrader\nmetadata: {name: mix}\nspec:\n"
        "  weighted: {graders: {exact: 1}}\n"
        "  testCases: [{sample: '7', item: {answer: '7'}, expectedScore: 1}]\n"
    )
    child.write_text(
        "apiVersion: whetstone.dev/v1alpha1\nkind: RewardGrader\nmetadata: {name: exact}\nspec:\n"
        "  stringCheck: {reference: '{{ item.answer }}'}\n"
    )
    assert main(["grader", "test", str(parent)]) == 1
    assert "names child 'exact', which does not exist" in capsys.readouterr().out
    assert main(["grader", "test", str(parent), str(child)]) == 0


def test_an_invalid_grader_names_file_line_and_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(
        "apiVersion: whetstone.dev/v1alpha1\nkind: RewardGrader\nmetadata: {name: bad}\n"
        "spec:\n  regex: {pattern: '(unclosed'}\n"
    )
    assert main(["grader", "test", str(path)]) == 1
    assert f"{path}:5: spec.regex.pattern: the pattern does not compile" in capsys.readouterr().err


def _rft_file(tmp_path: Path, rows: list[str], graders: str) -> Path:
    (tmp_path / "prompts.jsonl").write_text("".join(r + "\n" for r in rows))
    path = tmp_path / "job.yaml"
    path.write_text(
        graders
        + """
---
apiVersion: whetstone.dev/v1alpha1
kind: FineTuneJob
metadata: {name: rft-fields}
spec:
  method: rft
  baseModel: {uri: whetstone://tiny}
  dataset: {uri: prompts.jsonl}
  rft: {graders: [{name: mix}]}
  lora: {rank: 4}
  output: {uri: out}
"""
    )
    return path


GRADERS = """
apiVersion: whetstone.dev/v1alpha1
kind: RewardGrader
metadata: {name: exact}
spec:
  stringCheck: {reference: "{{ item.answer.value }}"}
---
apiVersion: whetstone.dev/v1alpha1
kind: RewardGrader
metadata: {name: mix}
spec:
  weighted: {graders: {exact: 1}}
"""
ASK = '{"messages": [{"role": "user", "content": "1+1?"}]'


def test_a_template_field_no_row_has_is_refused_before_training(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from whetstone_trainer.entry import JobRefused, load_job_file, prepare

    # The weighted grader's child reads item.answer.value; no row has it (one has answer, but not an object).
    path = _rft_file(tmp_path, [ASK + ', "question": "q"}', ASK + ', "answer": "2"}'], GRADERS)
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "spec.rft.graders: RewardGrader exact reads a field that no row of spec.dataset.uri has" in err
    assert "prompts.jsonl:line 1: {{ item.answer.value }}: item has no field 'answer'" in err
    with pytest.raises(JobRefused, match=r"RewardGrader exact reads a field"):
        prepare(load_job_file(path))
    # One row with the field is enough: rows without it are graded per onError, as the user chose.
    path = _rft_file(tmp_path, [ASK + ', "question": "q"}', ASK + ', "answer": {"value": "2"}}'], GRADERS)
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert prepare(load_job_file(path)).graders.keys() == {"exact", "mix"}


def test_validate_checks_only_the_graders_in_its_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # The child is not in the file (it may be in the cluster): validate says nothing about it; a local run,
    # which has only this file, refuses the job naming the missing child.
    from whetstone_trainer.entry import JobRefused, load_job_file, prepare

    path = _rft_file(tmp_path, [ASK + "}"], GRADERS.split("---")[1])
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    with pytest.raises(
        JobRefused, match="RewardGrader mix \\(weighted\\) names child 'exact', which does not"
    ):
        prepare(load_job_file(path))


BROKEN_PYTHON = """
apiVersion: whetstone.dev/v1alpha1
kind: RewardGrader
metadata: {name: typo}
spec:
  python:
    source: |
      def grade(sample, item):
          return 1.0 if sample["output_text"] == item["answer"] else 0.0
      def helper(
"""


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("def grade(sample, item):\n    return 1.0\n", None),
        ("def grade(sample, item)\n    return 1.0\n", "line 1"),
        ("def grade(sample, item):\nreturn 1.0\n", "line 2, column 1: expected an indented block"),
        # only the compiler, not the parser, says this one:
        ("return 1.0\n", "line 1, column 1: 'return' outside function"),
        ("x = 1\0\n", "source code string cannot contain null bytes"),
        ("x = " + "(" * 300 + ")" * 300 + "\n", "too many nested parentheses"),
    ],
)
def test_python_source_problem_compiles_without_running(source: str, why: str | None) -> None:
    from whetstone_graders.graders import python_source_problem

    problem = python_source_problem(source)
    assert (problem is None) if why is None else (problem is not None and why in problem)


def test_a_python_grader_that_does_not_compile_is_refused_before_the_model_loads(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from whetstone_trainer.entry import JobRefused, load_job_file, prepare

    grader = tmp_path / "grader.yaml"
    grader.write_text(BROKEN_PYTHON)
    assert main(["validate", str(grader)]) == 1
    assert "RewardGrader/typo: 1 problem(s):\n  spec.python.source does not compile: line 3" in (
        capsys.readouterr().err
    )
    path = _rft_file(tmp_path, [ASK + ', "answer": "2"}'], BROKEN_PYTHON)
    path.write_text(path.read_text().replace("graders: [{name: mix}]", "graders: [{name: typo}]"))
    assert main(["validate", str(path)]) == 1
    err = capsys.readouterr().err
    assert "spec.rft.graders: RewardGrader typo: spec.python.source does not compile: line 3" in err
    with pytest.raises(JobRefused, match="RewardGrader typo: spec.python.source does not compile"):
        prepare(load_job_file(path))
