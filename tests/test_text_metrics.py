"""Tests of vae_jax.text_metrics against independent computations.

BLEU is checked on hand-worked examples (the arithmetic is in the comments), among them the
examples of Papineni et al. 2002 and the values documented in NLTK's `bleu_score` doctests;
self-BLEU's fast path against a naive O(N^2) loop of `sentence_bleu`; BLEU precision / recall
against a hand-worked case and a naive double loop; distinct-n on a hand example. Sentence and
corpus BLEU, Self-BLEU and BLEU precision / recall are also compared with NLTK's
`nltk.translate.bleu_score` (a test dependency, pinned in pyproject.toml), with each of the
three smoothings.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from nltk.translate import bleu_score as nltk_bleu

from vae_jax import text_metrics as tm

# Papineni et al. 2002, Example 1 (also NLTK's doctests).
HYP1 = ("It is a guide to action which ensures that the military always obeys the commands of "
        "the party").split()
REF1A = ("It is a guide to action that ensures that the military will forever heed Party "
         "commands").split()
REF1B = ("It is the guiding principle which guarantees the military forces always being under "
         "the command of the Party").split()
REF1C = ("It is the practical guide for the army always to heed the directions of the "
         "party").split()
HYP2 = "he read the book because he was interested in world history".split()
REF2A = "he was interested in world history because he read the book".split()


def test_ngram_counts():
  assert tm.ngram_counts("a b a b".split(), 2) == {("a", "b"): 2, ("b", "a"): 1}
  assert tm.ngram_counts([1, 2, 3], 3) == {(1, 2, 3): 1}
  assert tm.ngram_counts([1, 2], 3) == {}
  assert tm.ngram_counts(np.array([4, 4, 4]), 1) == {(4,): 3}
  with pytest.raises(TypeError):
    tm.ngram_counts("a b c", 1)  # A raw string, not tokens.
  with pytest.raises(ValueError):
    tm.ngram_counts([1, 2], 0)


def test_papineni_the_the_the():
  # Papineni et al. 2002, §2.1: "the" x 7 against two references; "the" occurs at most twice in
  # a single reference (ref 1), so the modified unigram precision is 2/7. c = 7, reference
  # lengths 6 and 7: the closest is 7, BP = 1.
  hyp = "the the the the the the the".split()
  refs = ["the cat is on the mat".split(), "there is a cat on the mat".split()]
  assert tm.sentence_bleu(refs, hyp, max_n=1) == pytest.approx(2 / 7, rel=1e-12)


def test_clipping_uses_max_over_single_references_not_sum():
  # "the" occurs once in each reference: clipped count is max(1, 1) = 1, not 1 + 1 = 2.
  # p_1 = 1/2; c = 2, r = 2 (both references have length 2), BP = 1.
  refs = ["the cat".split(), "the dog".split()]
  assert tm.sentence_bleu(refs, "the the".split(), max_n=1) == pytest.approx(0.5, rel=1e-12)


def test_papineni_example_sentence_bleu():
  # HYP1 against REF1A/B/C, counted by hand:
  #   p_1 = 17/18 (only "obeys" unmatched);
  #   p_2 = 10/17;
  #   p_3 = 7/16: It is a, is a guide, a guide to, guide to action, ensures that the,
  #         that the military (REF1A), of the party (REF1C);
  #   p_4 = 4/15: It is a guide, is a guide to, a guide to action, ensures that the military;
  #   c = 18, reference lengths 16, 18, 16 -> r = 18, BP = 1.
  # BLEU = (17/18 * 10/17 * 7/16 * 4/15)^(1/4) = (7/108)^(1/4) = 0.50456... (NLTK: 0.5045...).
  expected = (17 / 18 * 10 / 17 * 7 / 16 * 4 / 15) ** 0.25
  got = tm.sentence_bleu([REF1A, REF1B, REF1C], HYP1)
  assert got == pytest.approx(expected, rel=1e-12)
  assert got == pytest.approx(0.5045, abs=1e-4)


def test_corpus_bleu_sums_counts_over_sentences():
  # HYP2 against REF2A (both 11 tokens): p_1 = 11/11; p_2 = 9/10 (all but "book because");
  # p_3 = 6/9 (he read the, read the book, he was interested, was interested in,
  # interested in world, in world history); p_4 = 4/8 (he read the book, he was interested in,
  # was interested in world, interested in world history).
  # Corpus: p_1 = 28/29, p_2 = 19/27, p_3 = 13/25, p_4 = 8/23, c = r = 29, BP = 1,
  # BLEU = 0.59208... (NLTK doctest: 0.5920...), whereas the mean of the sentence BLEUs is
  # (0.50456 + (1 * 9/10 * 6/9 * 4/8)^(1/4)) / 2 = 0.6223... (NLTK doctest: 0.6223...).
  refs = [[REF1A, REF1B, REF1C], [REF2A]]
  hyps = [HYP1, HYP2]
  expected = (28 / 29 * 19 / 27 * 13 / 25 * 8 / 23) ** 0.25
  assert tm.corpus_bleu(refs, hyps) == pytest.approx(expected, rel=1e-12)
  assert tm.corpus_bleu(refs, hyps) == pytest.approx(0.5920, abs=1e-4)
  s2 = tm.sentence_bleu([REF2A], HYP2)
  assert s2 == pytest.approx((0.9 * 6 / 9 * 0.5) ** 0.25, rel=1e-12)
  mean = (tm.sentence_bleu(refs[0], HYP1) + s2) / 2
  assert mean == pytest.approx(0.6223, abs=1e-4)


@pytest.mark.parametrize("smoothing", tm.SMOOTHINGS)
def test_identical_is_one(smoothing):
  sent = "a b c d e f".split()
  assert tm.sentence_bleu([sent], sent, smoothing=smoothing) == pytest.approx(1.0)
  assert tm.corpus_bleu([[sent], [sent[:4]]], [sent, sent[:4]],
                        smoothing=smoothing) == pytest.approx(1.0)
  ids = [3, 1, 4, 1, 5]
  assert tm.sentence_bleu([ids, [9, 9]], ids, smoothing=smoothing) == pytest.approx(1.0)


def test_brevity_penalty():
  a = lambda k: ["a"] * k  # noqa: E731
  # All precisions are 1 (every n-gram is "a a ... a", the reference has more of them), so
  # BLEU = BP = exp(1 - 28/12) = 0.26359... (NLTK doctest: 0.2635971381157267).
  assert tm.sentence_bleu([a(28), a(28)], a(12)) == pytest.approx(math.exp(1 - 28 / 12))
  assert tm.sentence_bleu([a(28), a(28)], a(12)) == pytest.approx(0.2635971381157267)
  # Reference lengths 13 and 2, c = 12: closest r = 13, BP = exp(1 - 13/12) = 0.9200...
  assert tm.sentence_bleu([a(13), a(2)], a(12), max_n=1) == pytest.approx(math.exp(-1 / 12))
  # 13 and 11 are equally close to 12: the shorter, 11, is used, so c > r and BP = 1.
  assert tm.sentence_bleu([a(13), a(11)], a(12), max_n=1) == pytest.approx(1.0)
  assert tm.sentence_bleu([a(11), a(13)], a(12), max_n=1) == pytest.approx(1.0)
  # mteval-v13a example: lengths 11 and 8, c = 7: r = 8, BP = exp(1 - 8/7) = 0.8668...
  assert tm.sentence_bleu([a(11), a(8)], a(7), max_n=1) == pytest.approx(0.8668, abs=1e-4)
  assert tm.brevity_penalty(5, 0) == 0.0
  assert tm.brevity_penalty(5, 6) == 1.0


def test_smoothing_hand_example():
  # "a b c d" against "a b x d": p_1 = 3/4 (a, b, d), p_2 = 1/3 (a b), p_3 = 0/2, p_4 = 0/1;
  # c = r = 4, BP = 1.
  hyp, refs = "a b c d".split(), ["a b x d".split()]
  # none: a zero precision -> 0.
  assert tm.sentence_bleu(refs, hyp, smoothing="none") == 0.0
  # epsilon: p_3 = 0.1/2, p_4 = 0.1/1 -> (3/4 * 1/3 * 0.05 * 0.1)^(1/4) = 0.00125^(1/4).
  assert tm.sentence_bleu(refs, hyp, smoothing="epsilon") == pytest.approx(0.00125 ** 0.25)
  # add1 (n > 1 only): 3/4, 2/4, 1/3, 1/2 -> (1/16)^(1/4) = 1/2.
  assert tm.sentence_bleu(refs, hyp, smoothing="add1") == pytest.approx(0.5)
  # Up to bigrams nothing is zero: none = epsilon = (3/4 * 1/3)^(1/2) = 1/2.
  assert tm.sentence_bleu(refs, hyp, max_n=2) == pytest.approx(0.5)
  assert tm.sentence_bleu(refs, hyp, max_n=2, smoothing="epsilon") == pytest.approx(0.5)
  # Weights: only the bigram precision counts -> 1/3.
  assert tm.sentence_bleu(refs, hyp, max_n=2, weights=[0, 1]) == pytest.approx(1 / 3)


def test_short_hypothesis_denominator_is_one():
  # "a b" against "a b c" with add1: p_1 = 2/2, p_2 = (1+1)/(1+1) = 1, and for n = 3, 4 the
  # hypothesis has no n-grams; the denominator is max(1, 0) = 1 (NLTK), so p = (0+1)/(1+1).
  # BP = exp(1 - 3/2). BLEU = exp(-1/2) * (1 * 1 * 1/2 * 1/2)^(1/4).
  got = tm.sentence_bleu(["a b c".split()], "a b".split(), smoothing="add1")
  assert got == pytest.approx(math.exp(-0.5) * 0.25 ** 0.25)
  # epsilon: p_3 = p_4 = 0.1/1.
  got = tm.sentence_bleu(["a b c".split()], "a b".split(), smoothing="epsilon")
  assert got == pytest.approx(math.exp(-0.5) * 0.01 ** 0.25)


@pytest.mark.parametrize("smoothing", tm.SMOOTHINGS)
def test_no_unigram_match_or_empty_is_zero(smoothing):
  assert tm.sentence_bleu([["a", "b"]], ["c", "d"], smoothing=smoothing) == 0.0
  assert tm.sentence_bleu([["a", "b"]], [], smoothing=smoothing) == 0.0
  assert tm.corpus_bleu([], [], smoothing=smoothing) == 0.0


def test_bleu_argument_checks():
  with pytest.raises(ValueError):
    tm.corpus_bleu([[["a"]]], [["a"], ["b"]])
  with pytest.raises(ValueError):
    tm.sentence_bleu([["a"]], ["a"], smoothing="method7")
  with pytest.raises(ValueError):
    tm.sentence_bleu([["a"]], ["a"], max_n=2, weights=[1.0])
  with pytest.raises(ValueError):
    tm.sentence_bleu([], ["a"])
  with pytest.raises(TypeError):
    tm.sentence_bleu(["a b"], "a b")  # Strings instead of token lists.


def _random_corpus(rng, num, vocab=5, max_len=8):
  sents = [rng.integers(0, vocab, size=rng.integers(0, max_len + 1)).tolist()
           for _ in range(num)]
  sents += [sents[1], sents[1], sents[2]]  # Duplicates: ties among the top counts.
  return sents


def _naive_self_bleu(sents, max_n, smoothing, indices=None):
  indices = range(len(sents)) if indices is None else indices
  return np.mean([
      tm.sentence_bleu(sents[:i] + sents[i + 1:], sents[i], max_n, smoothing=smoothing)
      for i in indices])


@pytest.mark.parametrize("smoothing", tm.SMOOTHINGS)
@pytest.mark.parametrize("max_n", [1, 2, 4])
def test_self_bleu_matches_naive_loop(smoothing, max_n):
  rng = np.random.default_rng(7 + max_n)
  sents = _random_corpus(rng, 25)
  got = tm.self_bleu(sents, max_n=max_n, smoothing=smoothing)
  assert got == pytest.approx(_naive_self_bleu(sents, max_n, smoothing), rel=1e-12, abs=1e-15)
  assert 0.0 < got <= 1.0 or smoothing == "none"


def test_self_bleu_lengths_exclude_self():
  # Two sentences: each is scored against the other only. "a b c" vs "a b": p_1 = 2/3,
  # c = 3 > r = 2, BP = 1; "a b" vs "a b c": p_1 = 1, BP = exp(1 - 3/2). (A closest length that
  # included the sentence itself would give BP = 1 for both.)
  sents = ["a b c".split(), "a b".split()]
  expected = (2 / 3 + math.exp(-0.5)) / 2
  assert tm.self_bleu(sents, max_n=1) == pytest.approx(expected)
  # Identical sentences of 3 tokens: self-BLEU 1 up to trigrams. With 4-grams, add1 gives
  # p_4 = (0 + 1) / (max(1, 0) + 1) = 1/2 for 3-token sentences, hence (1/2)^(1/4).
  assert tm.self_bleu([["x", "y", "z"]] * 3, max_n=3) == pytest.approx(1.0)
  assert tm.self_bleu([["x", "y", "z"]] * 3, max_n=4) == pytest.approx(0.5 ** 0.25)


def test_self_bleu_subsampling():
  rng = np.random.default_rng(3)
  sents = _random_corpus(rng, 30)
  a = tm.self_bleu(sents, max_hypotheses=8, seed=5)
  assert a == tm.self_bleu(sents, max_hypotheses=8, seed=5)  # Deterministic.
  # The documented sample: these 8 sentences, each against all the others.
  idx = np.random.default_rng(5).choice(len(sents), 8, replace=False).tolist()
  assert a == pytest.approx(_naive_self_bleu(sents, 4, "add1", idx), rel=1e-12)
  seeds = {tm.self_bleu(sents, max_hypotheses=8, seed=s) for s in range(5)}
  assert len(seeds) > 1
  assert tm.self_bleu(sents, max_hypotheses=len(sents) + 5) == pytest.approx(tm.self_bleu(sents))
  with pytest.raises(ValueError):
    tm.self_bleu([["a"]])
  with pytest.raises(ValueError):
    tm.self_bleu(sents, max_hypotheses=0)


def test_bleu_precision_recall_hand_case():
  # BLEU-1 of each (hypothesis, reference) pair, p_1 * BP (single reference, so r = |ref|):
  #            r1 = "a b"    r2 = "c d x"
  # h1 "a b"       1.0          0
  # h2 "c d e"     0            2/3 (c = r = 3)
  # h3 "q"         0            0
  # precision = mean over hyps of max over refs = (1 + 2/3 + 0) / 3 = 5/9;
  # recall    = mean over refs of max over hyps = (1 + 2/3) / 2 = 5/6.
  refs = ["a b".split(), "c d x".split()]
  hyps = ["a b".split(), "c d e".split(), ["q"]]
  precision, recall = tm.bleu_precision_recall(refs, hyps, max_n=1)
  np.testing.assert_allclose(precision, [5 / 9])
  np.testing.assert_allclose(recall, [5 / 6])


@pytest.mark.parametrize("smoothing", tm.SMOOTHINGS)
def test_bleu_precision_recall_matches_naive_loop(smoothing):
  rng = np.random.default_rng(11)
  refs = _random_corpus(rng, 3, vocab=4)
  hyps = _random_corpus(rng, 4, vocab=4)
  precision, recall = tm.bleu_precision_recall(refs, hyps, max_n=4, smoothing=smoothing)
  assert precision.shape == recall.shape == (4,)
  for n in range(1, 5):
    d = np.array([[tm.sentence_bleu([r], h, max_n=n, smoothing=smoothing) for r in refs]
                  for h in hyps])  # d[i, j] = BLEU-n(h_i; r_j).
    assert precision[n - 1] == pytest.approx(np.mean([max(row) for row in d]), rel=1e-12)
    assert recall[n - 1] == pytest.approx(np.mean([max(col) for col in d.T]), rel=1e-12)


def test_distinct_n():
  hyps = ["a b a b".split(), "a b c".split()]
  # Unigrams: 7 in all, distinct {a, b, c}: 3/7.
  assert tm.distinct_n(hyps, 1) == pytest.approx(3 / 7)
  # Bigrams: (ab, ba, ab) + (ab, bc) = 5, distinct {ab, ba, bc}: 3/5 (none across sentences).
  assert tm.distinct_n(hyps, 2) == pytest.approx(3 / 5)
  # Trigrams: aba, bab, abc, all distinct: 1.
  assert tm.distinct_n(hyps, 3) == pytest.approx(1.0)
  assert tm.distinct_n(hyps, 5) == 0.0
  assert tm.distinct_n([], 1) == 0.0
  assert tm.distinct_n([[1, 2], [1, 2]], 2) == pytest.approx(0.5)


def test_average_length():
  assert tm.average_length([["a"], ["a", "b", "c"], []]) == pytest.approx(4 / 3)
  assert tm.average_length([np.array([1, 2])]) == 2.0
  assert tm.average_length([]) == 0.0


# NLTK's smoothing functions for the three smoothings here (see `tm.corpus_bleu`).
NLTK_SMOOTHING = {"none": "method0", "epsilon": "method1", "add1": "method2"}


def _nltk_smoothing(smoothing):
  return getattr(nltk_bleu.SmoothingFunction(), NLTK_SMOOTHING[smoothing])


def _noisy_copy(rng, sent, vocab, rate=0.25):
  """`sent` with each token replaced by a random one with probability `rate`, sometimes cut."""
  out = [str(rng.integers(vocab)) if rng.random() < rate else t for t in sent]
  return out[:len(out) - int(rng.integers(0, 3))]


def _bleu_corpus(rng, num=12, vocab=6):
  """`num` hypotheses with 1 to 3 references each: the hypotheses are noisy copies of their
  first reference (partial matches at every order), plus edge cases: an empty hypothesis, one
  shorter than the 4-gram order, one with no match at all and an empty reference."""
  refs, hyps = [], []
  for _ in range(num):
    r = [[str(t) for t in rng.integers(0, vocab, size=rng.integers(3, 13))]
         for _ in range(rng.integers(1, 4))]
    refs.append(r)
    hyps.append(_noisy_copy(rng, r[0], vocab))
  refs += [[["1", "2", "3"]], [["1", "2", "3"], ["2", "3"]], [["1", "2"]], [[], ["4", "5"]]]
  hyps += [[], ["2", "3"], ["7", "8", "9"], ["4", "5", "4"]]
  return refs, hyps


def _samples(rng, num=20, vocab=6):
  """`num` "generated" sentences: noisy copies of three templates (shared n-grams of every
  order, as in a model's samples), a duplicate, an empty sentence and a 2-token sentence (the
  only one of its length: its closest reference length, which excludes itself, is longer)."""
  templates = [[str(t) for t in rng.integers(0, vocab, size=length)] for length in (5, 8, 11)]
  sents = [_noisy_copy(rng, templates[i % 3], vocab, rate=0.3) for i in range(num - 3)]
  return sents + [sents[0], [], templates[2][:2]]


# NLTK's method0 warns for every zero precision (and returns BP * exp(w log 2.2e-308) instead of
# 0, a difference below 1e-76 here).
@pytest.mark.filterwarnings(r"ignore:\s*The hypothesis contains 0 counts:UserWarning")
@pytest.mark.parametrize("smoothing", tm.SMOOTHINGS)
def test_bleu_matches_nltk(smoothing):
  """Sentence and corpus BLEU, Self-BLEU and BLEU precision / recall against NLTK's
  `nltk.translate.bleu_score` (pure Python, no downloaded data), on random corpora over a
  6-token vocabulary: partial matches at every order, zero-match orders, hypotheses shorter
  than n, empty sentences, duplicates and 1 to 3 references of different lengths."""
  rng = np.random.default_rng(0)
  smooth = _nltk_smoothing(smoothing)
  refs, hyps = _bleu_corpus(rng)

  # Sentence BLEU, uniform weights for max_n = 1..4 and a non-uniform weighting.
  scores = []
  for max_n, weights in ((1, None), (2, None), (3, None), (4, None), (4, (0.1, 0.3, 0.5, 0.1))):
    nltk_weights = weights or (1.0 / max_n,) * max_n
    for h, r in zip(hyps, refs):
      expected = nltk_bleu.sentence_bleu(r, h, weights=nltk_weights, smoothing_function=smooth)
      got = tm.sentence_bleu(r, h, max_n=max_n, weights=weights, smoothing=smoothing)
      assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)
      scores.append(got)
  assert sum(0.05 < s < 1.0 for s in scores) >= 20      # not a corpus of zeros and ones

  # Corpus BLEU: counts summed over sentences before the division, BP on summed lengths.
  for max_n in (2, 4):
    expected = nltk_bleu.corpus_bleu(refs, hyps, weights=(1.0 / max_n,) * max_n,
                                     smoothing_function=smooth)
    got = tm.corpus_bleu(refs, hyps, max_n=max_n, smoothing=smoothing)
    assert got == pytest.approx(expected, rel=1e-12)
    assert 0.05 < got < 1.0

  # Self-BLEU as Texygen computes it: each sentence scored by NLTK's sentence BLEU against all
  # the others as references, the scores averaged.
  sents = _samples(rng)
  for max_n in (2, 4):
    weights = (1.0 / max_n,) * max_n
    expected = np.mean([
        nltk_bleu.sentence_bleu([s for j, s in enumerate(sents) if j != i], sents[i],
                                weights=weights, smoothing_function=smooth)
        for i in range(len(sents))])
    got = tm.self_bleu(sents, max_n=max_n, smoothing=smoothing)
    assert got == pytest.approx(expected, rel=1e-12)
    assert 0.05 < got < 1.0

  # BLEU precision / recall: BLEU-n of every (sample, single reference) pair.
  pool = _samples(rng, 13)
  samples, references = pool[:8], pool[8:]
  precision, recall = tm.bleu_precision_recall(references, samples, max_n=4,
                                               smoothing=smoothing)
  for n in range(1, 5):
    d = np.array([[nltk_bleu.sentence_bleu([r], h, weights=(1.0 / n,) * n,
                                           smoothing_function=smooth) for r in references]
                  for h in samples])
    assert precision[n - 1] == pytest.approx(d.max(axis=1).mean(), rel=1e-12, abs=1e-15)
    assert recall[n - 1] == pytest.approx(d.max(axis=0).mean(), rel=1e-12, abs=1e-15)
