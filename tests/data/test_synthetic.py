"""Tests for the embedded synthetic corpus."""

import collections
import math

import pytest

from vae_jax.data import synthetic as syn

TOPIC, SENTIMENT, TENSE, NUMBER = range(4)


@pytest.fixture(scope='module')
def train():
  return syn.generate('train', 3000, seed=0)


def test_factor_entropy():
  assert syn.NUM_LABELS == 32
  assert syn.FACTOR_ENTROPY == pytest.approx(math.log(32))
  for label in range(32):
    assert syn.combined_label(syn.factors_from_label(label)) == label
  assert syn.combined_label((1, 0, 1, 1)) == 11


def test_deterministic_and_prefix_stable(train):
  assert syn.generate('train', 3000, seed=0) == train
  assert syn.generate('train', 100, seed=0) == train[:100]
  assert syn.generate('train', 100, seed=1) != train[:100]
  assert syn.generate('valid', 100, seed=0) != train[:100]
  assert syn.generate('dev', 5) == syn.generate('valid', 5)


def test_default_sizes_and_bad_split():
  assert len(syn.generate('test')) == 2000
  with pytest.raises(ValueError, match='Unknown split'):
    syn.generate('holdout')


def test_lengths_vocabulary_and_label_balance(train):
  lo, hi = syn.length_range()
  assert 8 <= lo and hi <= 25
  lengths = [len(e.tokens) for e in train]
  assert lo <= min(lengths) and max(lengths) <= hi and max(lengths) - min(lengths) >= 10
  assert 250 <= len(syn.vocabulary()) <= 500
  assert {t for e in train for t in e.tokens} <= set(syn.vocabulary())
  counts = collections.Counter(e.label for e in train)
  assert len(counts) == 32 and min(counts.values()) > 3000 / 32 / 2
  assert len({e.tokens for e in train}) > 0.99 * len(train)  # Varied sentences.


def _verb_forms():
  """word -> (kind, form) for every verb word: forms pl-present, sg-present, past, -ing."""
  out = {}
  for verbs in syn._TOPIC_VERBS + syn._SENTIMENT_VERBS:
    for forms in verbs:
      for kind, w in zip(('pl', 'sg', 'past', 'ing'), forms):
        out[w] = kind
  return out


def test_number_and_tense_decide_verb_agreement(train):
  forms = _verb_forms()
  aux = {'was': (0, 0), 'were': (0, 1), 'is': (1, 0), 'are': (1, 1)}  # (tense, number)
  for ex in train:
    f = ex.factors
    # The main verb is the first verb word; a progressive auxiliary may precede it.
    i = next(i for i, t in enumerate(ex.tokens) if t in forms)
    kind = forms[ex.tokens[i]]
    if kind == 'ing':
      before = [t for t in ex.tokens[:i] if t in aux]
      assert aux[before[-1]] == (f[TENSE], f[NUMBER]), ex
    elif f[TENSE] == 0:
      assert kind == 'past', ex
    else:
      assert kind == ('sg' if f[NUMBER] == 0 else 'pl'), ex
    # The closing pronoun agrees with the subject's number, its verb with tense and number.
    for j, t in enumerate(ex.tokens[:-1]):
      if t in ('it', 'they'):
        assert (t == 'they') == (f[NUMBER] == 1), ex
        assert aux[ex.tokens[j + 1]] == (f[TENSE], f[NUMBER]), ex


def test_topic_and_sentiment_words_match_labels(train):
  subjects = [{w for pair in nouns for w in pair} for nouns in syn._TOPIC_SUBJECTS]
  positive = set(syn._END_ADJECTIVES[1]) | set(syn._EVAL_NOUNS[1]) | {
      r for pair in syn._REACTIONS[1] for r in pair}
  negative = set(syn._END_ADJECTIVES[0]) | set(syn._EVAL_NOUNS[0]) | {
      r for pair in syn._REACTIONS[0] for r in pair}
  for ex in train:
    f = ex.factors
    assert ex.label == syn.combined_label(f)
    assert [i for i, s in enumerate(subjects) if s & set(ex.tokens)] == [f[TOPIC]], ex
    # Every closing clause ends with a sentiment word right before the final '.'.
    assert ex.tokens[-1] == '.'
    assert ex.tokens[-2] in (positive if f[SENTIMENT] == 1 else negative), ex


def test_slot_distributions_are_normalised():
  for label in (0, 13, 31):
    for d in syn._slots(syn.factors_from_label(label)):
      assert sum(d.values()) == pytest.approx(1.0)


def test_exact_log_prob_and_factor_posterior(train):
  for ex in train[:100]:
    post = syn.factor_posterior(ex.tokens)
    assert post.argmax() == ex.label and post.max() == pytest.approx(1.0)
    lp = syn.log_prob(ex.tokens)
    assert -80 < lp < -math.log(32)
  assert syn.log_prob(('the', 'dog', '.')) == -math.inf
  assert not syn.factor_posterior(('the', 'dog', '.')).any()


def _brute_force_likelihood(tokens, slots):
  """p(tokens | factors) by recursive search over every phrase of every slot."""
  if not slots:
    return 1.0 if not tokens else 0.0
  total = 0.0
  for phrase, p in slots[0].items():
    if tokens[:len(phrase)] == phrase:
      total += p * _brute_force_likelihood(tokens[len(phrase):], slots[1:])
  return total


def test_log_prob_matches_brute_force(train):
  for ex in train[:20]:
    lik = _brute_force_likelihood(ex.tokens, syn._slots(ex.factors))
    assert syn.log_prob(ex.tokens) == pytest.approx(math.log(lik / 32), rel=1e-9)
