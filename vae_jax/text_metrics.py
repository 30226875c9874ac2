"""Text-generation metrics over token sequences, as pure Python / numpy functions.

A *sentence* is a sequence of hashable tokens: a list of str tokens, a list (or 1-D numpy array)
of int ids, or anything else whose items hash. A raw `str` is refused rather than read as a
sequence of characters; split it into tokens first. n-grams are tuples of n consecutive tokens.

- **BLEU** (Papineni et al. 2002), corpus level `corpus_bleu` and sentence level
  `sentence_bleu`, with the conventions of NLTK's `nltk.translate.bleu_score` and three ways
  of handling zero n-gram matches (Chen & Cherry 2014): none, NLTK's method1 ('epsilon') and
  method2 ('add1', Lin & Och 2004);
- **BLEU precision / recall** of several sampled responses against several references for one
  dialogue context (Zhao et al. 2017), `bleu_precision_recall`;
- **Self-BLEU** (Zhu et al. 2018), `self_bleu`, in time linear in the number of tokens rather
  than quadratic in the number of sentences;
- **Distinct-n** (Li et al. 2016), `distinct_n`, and `average_length`.

References:
  K. Papineni, S. Roukos, T. Ward, W.-J. Zhu. BLEU: a method for automatic evaluation of
    machine translation. ACL 2002.
  C.-Y. Lin, F. J. Och. ORANGE: a method for evaluating automatic evaluation metrics for
    machine translation. COLING 2004.
  B. Chen, C. Cherry. A systematic comparison of smoothing techniques for sentence-level BLEU.
    WMT 2014.
  J. Li, M. Galley, C. Brockett, J. Gao, B. Dolan. A diversity-promoting objective function for
    neural conversation models. NAACL 2016.
  T. Zhao, R. Zhao, M. Eskenazi. Learning discourse-level diversity for neural dialog models
    using conditional variational autoencoders. ACL 2017.
  Y. Zhu, S. Lu, L. Zheng, J. Guo, W. Zhang, J. Wang, Y. Yu. Texygen: a benchmarking platform
    for text generation models. SIGIR 2018.
"""

from __future__ import annotations

import bisect
import collections
import math
from typing import Hashable, Sequence

import numpy as np

Sentence = Sequence[Hashable]

# Ways of handling an n-gram order with no match (see `corpus_bleu`).
SMOOTHINGS = ("none", "epsilon", "add1")
# Numerator given to a zero-match precision by the 'epsilon' smoothing (NLTK method1 default).
EPSILON = 0.1


# ---------------------------------------------------------------------------------------------
# n-grams.
# ---------------------------------------------------------------------------------------------


def _as_tokens(sentence: Sentence) -> list:
  """The tokens of `sentence` as a list (numpy arrays through `tolist`, so ids become ints)."""
  if isinstance(sentence, (str, bytes)):
    raise TypeError(
        f"a sentence must be a sequence of tokens, not a string ({sentence[:30]!r}...); "
        "split it into tokens first")
  if isinstance(sentence, np.ndarray):
    return sentence.tolist()
  return list(sentence)


def ngram_counts(tokens: Sentence, n: int) -> collections.Counter:
  """Counts of the n-grams (tuples of n consecutive tokens) of one sentence.

  A sentence of length L has max(0, L - n + 1) n-grams; the counter is empty when L < n.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  tokens = _as_tokens(tokens)
  return collections.Counter(zip(*(tokens[k:] for k in range(n))))


# ---------------------------------------------------------------------------------------------
# BLEU.
# ---------------------------------------------------------------------------------------------


def _check_smoothing(smoothing: str) -> None:
  if smoothing not in SMOOTHINGS:
    raise ValueError(f"smoothing must be one of {SMOOTHINGS}, got {smoothing!r}")


def _bleu_weights(max_n: int, weights: Sequence[float] | None) -> tuple[float, ...]:
  """Uniform weights 1/max_n by default; otherwise `max_n` non-negative weights."""
  if max_n < 1:
    raise ValueError(f"max_n must be >= 1, got {max_n}")
  if weights is None:
    return (1.0 / max_n,) * max_n
  weights = tuple(float(w) for w in weights)
  if len(weights) != max_n:
    raise ValueError(f"{len(weights)} weights given for max_n={max_n}")
  if any(w < 0 for w in weights):
    raise ValueError(f"weights must be non-negative, got {weights}")
  return weights


def _closest_ref_length(ref_lengths, hyp_len: int) -> int:
  """The reference length closest to `hyp_len`, the shorter one on ties (as NLTK)."""
  return min(ref_lengths, key=lambda r: (abs(r - hyp_len), r))


def brevity_penalty(ref_len: int, hyp_len: int) -> float:
  """BP = 1 if c > r, exp(1 - r / c) if 0 < c <= r, 0 if c = 0 (Papineni et al. 2002, §2.2.2).

  c = `hyp_len` is the (summed) hypothesis length and r = `ref_len` the (summed) closest
  reference length.
  """
  if hyp_len > ref_len:
    return 1.0
  if hyp_len == 0:
    return 0.0
  return math.exp(1.0 - ref_len / hyp_len)


def _clipped_counts(hyp_counts: collections.Counter, max_ref_count) -> tuple[int, int]:
  """(sum_g min(c(g), max_ref_count(g)), max(1, sum_g c(g))) for the n-grams g of a hypothesis.

  `max_ref_count(g)` is the largest count of g in any single reference. The denominator is at
  least 1 as in NLTK, so that a hypothesis shorter than n contributes 0 / 1 to p_n.
  """
  numerator = sum(min(c, max_ref_count(g)) for g, c in hyp_counts.items())
  return numerator, max(1, sum(hyp_counts.values()))


def _sentence_stats(references: Sequence[Sentence], hypothesis: Sentence, max_n: int):
  """Clipped matches and n-gram totals for n = 1..max_n, hypothesis and closest ref length."""
  hyp = _as_tokens(hypothesis)
  refs = [_as_tokens(r) for r in references]
  if not refs:
    raise ValueError("each hypothesis needs at least one reference")
  numerators, denominators = [], []
  for n in range(1, max_n + 1):
    ref_counts = [ngram_counts(r, n) for r in refs]
    num, den = _clipped_counts(ngram_counts(hyp, n),
                               lambda g: max(rc[g] for rc in ref_counts))
    numerators.append(num)
    denominators.append(den)
  ref_len = _closest_ref_length((len(r) for r in refs), len(hyp))
  return numerators, denominators, len(hyp), ref_len


def _bleu_from_stats(numerators, denominators, hyp_len: int, ref_len: int,
                     weights: Sequence[float], smoothing: str) -> float:
  """BP * exp(sum_n w_n log p_n) from summed statistics, with the smoothing of `corpus_bleu`."""
  if numerators[0] == 0:  # No unigram match (or an empty hypothesis): 0 whatever the smoothing.
    return 0.0
  log_precision = 0.0
  for k, w in enumerate(weights):
    num, den = float(numerators[k]), float(denominators[k])
    if smoothing == "add1" and k > 0:
      num, den = num + 1.0, den + 1.0
    elif smoothing == "epsilon" and num == 0:
      num = EPSILON
    if w == 0:
      continue
    if num == 0:
      return 0.0
    log_precision += w * math.log(num / den)
  return brevity_penalty(ref_len, hyp_len) * math.exp(log_precision)


def corpus_bleu(references: Sequence[Sequence[Sentence]], hypotheses: Sequence[Sentence],
                max_n: int = 4, weights: Sequence[float] | None = None,
                smoothing: str = "none") -> float:
  """Corpus BLEU (Papineni et al. 2002), with the conventions of NLTK's `corpus_bleu`.

    BLEU = BP * exp(sum_{n=1}^{N} w_n log p_n),
    p_n = sum_s sum_g min(c_s(g), max_r c_{s,r}(g)) / sum_s max(1, sum_g c_s(g)),
    BP = 1 if c > r else exp(1 - r / c),

  where s runs over the hypotheses, g over the n-grams of hypothesis s, c_s(g) is the count of
  g in hypothesis s and c_{s,r}(g) its count in reference r of s (clipping uses the largest
  count in any *single* reference, not the sum over references), c = sum_s |hyp_s| and
  r = sum_s |closest reference of s|, the closest being the reference length nearest |hyp_s|,
  the shorter on ties. Precisions are summed over the corpus before the division (a micro
  average; not the mean of sentence BLEUs). Weights are 1/N by default.

  Conventions shared with NLTK: a hypothesis shorter than n counts 1 in the denominator of p_n
  (NLTK's max(1, .)); with no unigram match in the corpus the score is 0 for every smoothing;
  an empty hypothesis has BP = 0.

  Zero-match precisions (`smoothing`, Chen & Cherry 2014):
    'none': BLEU = 0 when any p_n with w_n > 0 is 0 (NLTK method0 gives a tiny positive
      number instead);
    'epsilon': a zero numerator is replaced by EPSILON = 0.1 (NLTK method1);
    'add1': p_n = (matches + 1) / (total + 1) for every n > 1, zero or not; p_1 unchanged
      (Lin & Och 2004; NLTK >= 3.6 method2, earlier NLTK versions also smoothed p_1).

  Args:
    references: one entry per hypothesis, each a non-empty list of reference sentences.
    hypotheses: the hypothesis sentences.
    max_n: N, the largest n-gram order.
    weights: N non-negative weights w_1..w_N; `None` for 1/N each.
    smoothing: 'none', 'epsilon' or 'add1'.

  Returns:
    BLEU in [0, 1] (0.0 for an empty corpus).
  """
  weights = _bleu_weights(max_n, weights)
  _check_smoothing(smoothing)
  if len(references) != len(hypotheses):
    raise ValueError(f"{len(references)} reference lists for {len(hypotheses)} hypotheses")
  numerators, denominators = [0] * max_n, [0] * max_n
  hyp_len = ref_len = 0
  for refs, hyp in zip(references, hypotheses):
    nums, dens, h, r = _sentence_stats(refs, hyp, max_n)
    numerators = [a + b for a, b in zip(numerators, nums)]
    denominators = [a + b for a, b in zip(denominators, dens)]
    hyp_len += h
    ref_len += r
  return _bleu_from_stats(numerators, denominators, hyp_len, ref_len, weights, smoothing)


def sentence_bleu(references: Sequence[Sentence], hypothesis: Sentence, max_n: int = 4,
                  weights: Sequence[float] | None = None, smoothing: str = "none") -> float:
  """BLEU of one hypothesis against its references: `corpus_bleu([references], [hypothesis])`."""
  return corpus_bleu([references], [hypothesis], max_n, weights, smoothing)


# ---------------------------------------------------------------------------------------------
# BLEU precision / recall of a set of samples (Zhao et al. 2017).
# ---------------------------------------------------------------------------------------------


def bleu_precision_recall(references: Sequence[Sentence], hypotheses: Sequence[Sentence],
                          max_n: int = 4, smoothing: str = "add1"
                          ) -> tuple[np.ndarray, np.ndarray]:
  """BLEU-n precision and recall of sampled responses for one context (Zhao et al. 2017, §5.2).

  With N hypotheses h_1..h_N sampled for one context and M references r_1..r_M for it, and
  d_n(r, h) the sentence BLEU-n of h against the single reference r (weights 1/n for orders
  1..n):

    precision_n = (1/N) sum_i max_j d_n(r_j, h_i),
    recall_n    = (1/M) sum_j max_i d_n(r_j, h_i).

  Precision is high when every sample is close to some reference, recall when every reference
  is covered by some sample. The per-context values are averaged over the test set by the
  caller.

  Difference from the reference implementation: Zhao et al. smoothed d_n with NLTK's
  `SmoothingFunction().method7` (Chen & Cherry 2014, methods 4 + 5), and their released code
  scores `sentence_bleu([ref], hyp, smoothing_function=method7, weights=[1/3] * 3)` with one
  reference and 0.0 on any exception. Method 7 is not implemented here: its value depends on
  the NLTK version (method 4 was rewritten at least twice, and method 5 always uses the order-5
  precision whatever n). The default here is 'add1' (NLTK method2) smoothing, so numbers are
  comparable between models scored by this function but not digit for digit with published
  tables; 'none' and 'epsilon' are available too (see `corpus_bleu`).

  Args:
    references: the M >= 1 reference sentences of the context.
    hypotheses: the N >= 1 sampled sentences.
    max_n: BLEU-n is computed for n = 1..max_n.
    smoothing: 'add1' (default), 'epsilon' or 'none'.

  Returns:
    (precision, recall), two float arrays `[max_n]`; index n - 1 holds BLEU-n.
  """
  _check_smoothing(smoothing)
  if max_n < 1:
    raise ValueError(f"max_n must be >= 1, got {max_n}")
  if not references or not hypotheses:
    raise ValueError("need at least one reference and one hypothesis")
  refs = [_as_tokens(r) for r in references]
  hyps = [_as_tokens(h) for h in hypotheses]
  orders = range(1, max_n + 1)
  ref_counts = [[ngram_counts(r, n) for n in orders] for r in refs]
  hyp_counts = [[ngram_counts(h, n) for n in orders] for h in hyps]
  scores = np.zeros((max_n, len(hyps), len(refs)))
  for i, (h, hc) in enumerate(zip(hyps, hyp_counts)):
    for j, (r, rc) in enumerate(zip(refs, ref_counts)):
      stats = [_clipped_counts(hc[k], rc[k].__getitem__) for k in range(max_n)]
      nums, dens = [s[0] for s in stats], [s[1] for s in stats]
      for n in orders:
        scores[n - 1, i, j] = _bleu_from_stats(nums[:n], dens[:n], len(h), len(r),
                                               (1.0 / n,) * n, smoothing)
  precision = scores.max(axis=2).mean(axis=1)
  recall = scores.max(axis=1).mean(axis=1)
  return precision, recall


# ---------------------------------------------------------------------------------------------
# Self-BLEU.
# ---------------------------------------------------------------------------------------------


def _top_two_counts(counters: Sequence[collections.Counter]) -> dict:
  """For each n-gram g: [largest count, index of a sentence holding it, second largest count].

  Counts are per sentence; the second largest equals the largest when two sentences tie, and
  is 0 when g occurs in one sentence only. The largest count over all sentences but i is then
  top2 if i is the arg max, else top1: O(1) per query.
  """
  top = {}
  for i, counts in enumerate(counters):
    for g, c in counts.items():
      t = top.get(g)
      if t is None:
        top[g] = [c, i, 0]
      elif c > t[0]:
        t[2], t[0], t[1] = t[0], c, i
      elif c > t[2]:
        t[2] = c
  return top


def _closest_other_length(sorted_lengths: list[int], length_counts: collections.Counter,
                          hyp_len: int) -> int:
  """Closest length to `hyp_len` among all lengths but one occurrence of `hyp_len` itself.

  `sorted_lengths` are the distinct lengths, sorted; ties go to the shorter length.
  """
  if length_counts[hyp_len] > 1:
    return hyp_len
  pos = bisect.bisect_left(sorted_lengths, hyp_len)  # sorted_lengths[pos] == hyp_len.
  candidates = []
  if pos > 0:
    candidates.append(sorted_lengths[pos - 1])
  if pos + 1 < len(sorted_lengths):
    candidates.append(sorted_lengths[pos + 1])
  return _closest_ref_length(candidates, hyp_len)


def self_bleu(hypotheses: Sequence[Sentence], max_n: int = 4, smoothing: str = "add1",
              max_hypotheses: int | None = None, seed: int = 0) -> float:
  """Self-BLEU (Zhu et al. 2018): mean sentence BLEU of each sample against all the others.

    Self-BLEU = (1/|I|) sum_{i in I} BLEU(hyp_i; references = {hyp_j : j != i}),

  with I all N sentences, or a random subset of `max_hypotheses` of them. Higher means less
  diverse samples. Each term equals `sentence_bleu([h for j, h in enumerate(hypotheses)
  if j != i], hypotheses[i], max_n, smoothing=smoothing)`, computed without the O(N^2) loop:
  the n-gram counters of all sentences are built once, and for each n-gram the two largest
  per-sentence counts are kept, so that the largest count in any sentence but i (the clipping
  count of `corpus_bleu`) is found in O(1); the closest reference length, which also excludes
  sentence i, comes from the sorted distinct lengths. The cost is O(total tokens * max_n).

  Subsampling: the scored sentences I are `np.random.default_rng(seed).choice(N,
  max_hypotheses, replace=False)`, but each is still scored against all N - 1 others, so the
  result is an unbiased estimate of the full Self-BLEU. Texygen's fast mode instead restricts
  the whole computation, references included, to a subset (fewer references lower the score);
  to reproduce it, call `self_bleu` on that subset.

  Texygen used NLTK `SmoothingFunction().method1` ('epsilon' here) with uniform weights; the
  default here is 'add1'.

  Args:
    hypotheses: N >= 2 sentences.
    max_n: largest n-gram order, uniform weights 1/max_n.
    smoothing: 'add1' (default), 'epsilon' or 'none' (see `corpus_bleu`).
    max_hypotheses: score at most this many sentences; `None` scores all.
    seed: seed of the subsample.

  Returns:
    Self-BLEU in [0, 1].
  """
  weights = _bleu_weights(max_n, None)
  _check_smoothing(smoothing)
  sentences = [_as_tokens(h) for h in hypotheses]
  num = len(sentences)
  if num < 2:
    raise ValueError(f"self-BLEU needs at least 2 sentences, got {num}")
  if max_hypotheses is not None and max_hypotheses < 1:
    raise ValueError(f"max_hypotheses must be >= 1, got {max_hypotheses}")
  if max_hypotheses is None or max_hypotheses >= num:
    scored = range(num)
  else:
    scored = np.random.default_rng(seed).choice(num, max_hypotheses, replace=False).tolist()

  counters = [[ngram_counts(s, n) for s in sentences] for n in range(1, max_n + 1)]
  tops = [_top_two_counts(c) for c in counters]
  lengths = [len(s) for s in sentences]
  length_counts = collections.Counter(lengths)
  sorted_lengths = sorted(length_counts)

  total = 0.0
  for i in scored:
    nums, dens = [], []
    for k in range(max_n):
      top = tops[k]

      def max_other(g, top=top, i=i):
        t = top[g]
        return t[2] if t[1] == i else t[0]

      n_match, n_total = _clipped_counts(counters[k][i], max_other)
      nums.append(n_match)
      dens.append(n_total)
    ref_len = _closest_other_length(sorted_lengths, length_counts, lengths[i])
    total += _bleu_from_stats(nums, dens, lengths[i], ref_len, weights, smoothing)
  return total / len(scored)


# ---------------------------------------------------------------------------------------------
# Diversity and length.
# ---------------------------------------------------------------------------------------------


def distinct_n(hypotheses: Sequence[Sentence], n: int) -> float:
  """Distinct-n (Li et al. 2016): distinct n-grams / total n-grams over all hypotheses.

    distinct-n = |union_s {n-grams of s}| / sum_s max(0, |s| - n + 1),

  n-grams never straddling two sentences; 0.0 when there are no n-grams at all.
  """
  distinct = set()
  total = 0
  for h in hypotheses:
    counts = ngram_counts(h, n)
    distinct.update(counts)
    total += sum(counts.values())
  return len(distinct) / total if total else 0.0


def average_length(hypotheses: Sequence[Sentence]) -> float:
  """Mean number of tokens per hypothesis; 0.0 for no hypotheses."""
  lengths = [len(_as_tokens(h)) for h in hypotheses]
  return float(np.mean(lengths)) if lengths else 0.0
