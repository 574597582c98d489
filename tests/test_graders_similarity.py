"""The similarity metrics against hand computations, and the similarity grader (in its sandbox)."""

from __future__ import annotations

import math
import random

import pytest
from whetstone_api.rewardgrader import RewardGraderSpec
from whetstone_graders import GraderSet, Sample
from whetstone_graders.similarity import (
    METRICS,
    bleu,
    fuzzy_match,
    gleu,
    lcs_length,
    meteor,
    rouge_l,
    rouge_n,
)

HYP, REF = "The cat sat on the mat.", "the cat is on the mat"
# words: the cat sat on the mat / the cat is on the mat (6 each)


def lcs_by_table(a: str, b: str) -> int:
    table = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            table[i + 1][j + 1] = table[i][j] + 1 if x == y else max(table[i][j + 1], table[i + 1][j])
    return table[-1][-1]


def test_bit_parallel_lcs_equals_the_textbook_table() -> None:
    rng = random.Random(0)
    for _ in range(500):
        a = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 30)))
        assert lcs_length(a, b) == lcs_by_table(a, b), (a, b)


def test_fuzzy_match_is_the_normalised_indel_similarity() -> None:
    # LCS(kitten, sitting) = "ittn": 2 * 4 / (6 + 7); rapidfuzz's fuzz.ratio gives 61.54.
    assert fuzzy_match("kitten", "sitting") == pytest.approx(8 / 13)
    assert (fuzzy_match("", ""), fuzzy_match("a", ""), fuzzy_match("same", "same")) == (1.0, 0.0, 1.0)


def test_bleu_by_hand() -> None:
    # clipped precisions: 1-grams 5/6; 2-grams (3+1)/(5+1); 3-grams (1+1)/(4+1); 4-grams (0+1)/(3+1);
    # equal lengths: no brevity penalty.
    expected = (5 / 6 * 4 / 6 * 2 / 5 * 1 / 4) ** 0.25
    assert bleu(HYP, REF) == pytest.approx(expected)
    # A shorter answer pays the brevity penalty exp(1 - 6/3); no matching word scores 0.
    short = (1 * (2 + 1) / (2 + 1) * (1 + 1) / (1 + 1) * 1) ** 0.25 * math.exp(1 - 6 / 3)
    assert bleu("the cat is", REF) == pytest.approx(short)
    assert bleu("dog", REF) == 0.0 and bleu(REF, REF) == pytest.approx(1.0)


def test_gleu_by_hand() -> None:
    # n-grams 1..4: 18 in each; matching 5 + 3 + 1 + 0.
    assert gleu(HYP, REF) == pytest.approx(9 / 18)
    assert gleu("", "") == 0.0


def test_rouge_by_hand() -> None:
    assert rouge_n(HYP, REF, 1) == pytest.approx(5 / 6)  # P = R = 5/6
    assert rouge_n(HYP, REF, 2) == pytest.approx(3 / 5)
    assert rouge_l(HYP, REF) == pytest.approx(5 / 6)  # LCS: the cat on the mat
    # P = 1/1, R = 1/6: F1 = 2 * 1/6 / (7/6)
    assert rouge_n("mat", REF, 1) == pytest.approx(2 / 7)


def test_meteor_exact_matches_by_hand() -> None:
    # 5 matches, P = R = 5/6, Fmean = PR / (0.9 P + 0.1 R) = 5/6; aligned positions (0,0) (1,1) | (3,3)
    # (4,4) (5,5): 2 chunks, penalty 0.5 * (2/5)^3.
    assert meteor(HYP, REF) == pytest.approx(5 / 6 * (1 - 0.5 * (2 / 5) ** 3))
    # Word order matters through the chunks: reversed words match all, in 6 chunks of one.
    reversed_ref = " ".join(reversed(REF.split()))
    p = r = 1.0
    assert meteor(REF, reversed_ref) == pytest.approx(p * r / (0.9 * p + 0.1 * r) * (1 - 0.5 * (6 / 6) ** 3))
    assert meteor("nothing here", REF) == 0.0


def test_every_metric_is_in_range_and_one_on_identity() -> None:
    for name, metric in METRICS.items():
        # METEOR keeps its fragmentation penalty even for one chunk: 0.5 * (1/6)^3 for six words.
        identity = 1 - 0.5 * (1 / 6) ** 3 if name == "meteor" else 1.0
        assert metric(REF, REF) == pytest.approx(identity), name
        assert 0.0 <= metric(HYP, REF) <= 1.0, name


def test_the_similarity_grader_with_a_pass_threshold() -> None:
    spec = RewardGraderSpec.model_validate(
        {"similarity": {"reference": "{{ item.ref }}", "metric": "rouge_1", "passThreshold": 0.8}}
    )
    raw = RewardGraderSpec.model_validate(
        {"similarity": {"reference": "{{ item.ref }}", "metric": "rouge_2"}}
    )
    with GraderSet([("pass", 1.0), ("raw", 1.0)], {"pass": spec, "raw": raw}) as graders:
        close, far = graders.grade([Sample(HYP), Sample("a dog")], [{"ref": REF}, {"ref": REF}])
    assert close.grades["pass"].score == 1.0 and far.grades["pass"].score == 0.0
    assert close.grades["raw"].score == pytest.approx(3 / 5)
