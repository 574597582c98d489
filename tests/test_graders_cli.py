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
    assert main(["grader", "test", str(EXAMPLES / "rewardgraders.yaml")]) == 0
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
