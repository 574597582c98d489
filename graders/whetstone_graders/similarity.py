"""Text-similarity metrics in [0, 1], written out here (standard library only: this file is also sent as
source to the sandbox worker that runs similarity graders, since the metrics are quadratic in the answer's
length).

Words are lowercased runs of letters and digits (as rouge-score's default tokenizer). Definitions:

- fuzzy_match: 2·LCS(a, b) / (|a| + |b|) over characters, the normalised InDel similarity (rapidfuzz's
  fuzz.ratio / 100); 1 for two empty strings.
- bleu: sentence BLEU-4 (Papineni et al. 2002): geometric mean of clipped 1- to 4-gram precisions times the
  brevity penalty; 2- to 4-gram precisions use add-one smoothing (Lin and Och 2004), so a short answer
  without a matching 4-gram still scores; 0 when no word matches.
- gleu: Google BLEU (Wu et al. 2016, as nltk's sentence_gleu): matching 1- to 4-grams divided by the larger
  of the answer's and the reference's n-gram counts.
- rouge_n: F1 of clipped n-gram overlap (rouge-score's rougeN). rouge_l: F1 of the longest common word
  subsequence (rouge-score's rougeL).
- meteor: METEOR (Banerjee and Lavie 2005) with nltk's parameters (alpha 0.9, beta 3, gamma 0.5) and its
  greedy alignment, using exact word matches only: no stemming, no WordNet synonyms. For answers whose words
  match only exactly, it equals nltk's meteor_score.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Sequence

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def lcs_length(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Length of the longest common subsequence, bit-parallel (Allison and Dix 1986; Hyyrö 2004): one pass
    over b with big-integer operations on a bit per position of a."""
    if not a or not b:
        return 0
    masks: dict[Hashable, int] = {}
    for j, x in enumerate(a):
        masks[x] = masks.get(x, 0) | (1 << j)
    full = (1 << len(a)) - 1
    v = full
    for y in b:
        u = v & masks.get(y, 0)
        v = ((v + u) | (v - u)) & full
    return len(a) - v.bit_count()


def fuzzy_match(text: str, reference: str) -> float:
    if not text and not reference:
        return 1.0
    return 2 * lcs_length(text, reference) / (len(text) + len(reference))


def _ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _overlap(a: Counter[tuple[str, ...]], b: Counter[tuple[str, ...]]) -> int:
    return sum(min(count, b[gram]) for gram, count in a.items())


def bleu(text: str, reference: str, max_n: int = 4) -> float:
    hyp, ref = words(text), words(reference)
    if not hyp or not ref:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        matches = _overlap(_ngrams(hyp, n), _ngrams(ref, n))
        total = max(len(hyp) - n + 1, 0)
        if n == 1:
            if matches == 0:
                return 0.0
            precision = matches / total
        else:
            precision = (matches + 1) / (total + 1)
        log_precision += math.log(precision) / max_n
    brevity = 1.0 if len(hyp) > len(ref) else math.exp(1 - len(ref) / len(hyp))
    return brevity * math.exp(log_precision)


def gleu(text: str, reference: str, max_n: int = 4) -> float:
    hyp, ref = words(text), words(reference)
    matches = hyp_total = ref_total = 0
    for n in range(1, max_n + 1):
        h, r = _ngrams(hyp, n), _ngrams(ref, n)
        matches += _overlap(h, r)
        hyp_total += sum(h.values())
        ref_total += sum(r.values())
    denominator = max(hyp_total, ref_total)
    return matches / denominator if denominator else 0.0


def _f1(overlap: int, hyp_count: int, ref_count: int) -> float:
    if not overlap or not hyp_count or not ref_count:
        return 0.0
    precision, recall = overlap / hyp_count, overlap / ref_count
    return 2 * precision * recall / (precision + recall)


def rouge_n(text: str, reference: str, n: int) -> float:
    h, r = _ngrams(words(text), n), _ngrams(words(reference), n)
    return _f1(_overlap(h, r), sum(h.values()), sum(r.values()))


def rouge_l(text: str, reference: str) -> float:
    hyp, ref = words(text), words(reference)
    return _f1(lcs_length(hyp, ref), len(hyp), len(ref))


def meteor(text: str, reference: str, alpha: float = 0.9, beta: float = 3.0, gamma: float = 0.5) -> float:
    hyp, ref = list(enumerate(words(text))), list(enumerate(words(reference)))
    n_hyp, n_ref = len(hyp), len(ref)
    matches: list[tuple[int, int]] = []
    # nltk's exact stage: from the last answer word back, match the last unmatched equal reference word.
    for i in range(len(hyp))[::-1]:
        for j in range(len(ref))[::-1]:
            if hyp[i][1] == ref[j][1]:
                matches.append((hyp[i][0], ref[j][0]))
                hyp.pop(i)
                ref.pop(j)
                break
    if not matches:
        return 0.0
    matches.sort()
    chunks = 1 + sum(
        1
        for (h0, r0), (h1, r1) in zip(matches, matches[1:], strict=False)
        if not (h1 == h0 + 1 and r1 == r0 + 1)
    )
    precision, recall = len(matches) / n_hyp, len(matches) / n_ref
    fmean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    penalty = gamma * (chunks / len(matches)) ** beta
    return (1 - penalty) * fmean


METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match,
    "bleu": bleu,
    "gleu": gleu,
    "meteor": meteor,
    "rouge_l": rouge_l,
    **{f"rouge_{n}": (lambda t, r, n=n: rouge_n(t, r, n)) for n in range(1, 6)},
}
