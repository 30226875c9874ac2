"""The embedded default corpus: English-like sentences governed by discrete latent factors.

No download and no files: `generate(split)` builds the corpus deterministically from a seed.
It is the corpus of the README quick-start and of most tests, and it is built so that the
phenomena this library is about (a latent code that carries information, posterior collapse
and its cures) show up within minutes of CPU training.

Factors
-------
Every sentence is generated from four independent, uniformly distributed factors:

  topic      4 values  animals | food | music | sports
  sentiment  2 values  negative | positive
  tense      2 values  past | present
  number     2 values  singular | plural   (of the subject)

`label = ((topic * 2 + sentiment) * 2 + tense) * 2 + number` (0..31) combines them
(`combined_label` / `factors_from_label`), and `Example.factors` keeps the tuple.
The entropy of the factors is exactly H(f) = log(4 * 2 * 2 * 2) = log 32 = 3.4657 nats (5 bits)
(`FACTOR_ENTROPY`). Every sentence reveals all four factors (the posterior over the 32
combinations given the words is one-hot; `factor_posterior` computes it), so
I(x; f) = H(f) = 3.4657 nats: a VAE whose code holds the factors needs at least that much KL.

Grammar
-------
A sentence is a fixed sequence of slots; given the factors, each slot independently draws a
phrase (possibly empty for optional slots) from its own distribution:

  OPEN     optional (p=0.35) time phrase, by tense:  "yesterday ," / "these days ,"
  SUBJECT  determiner (number) + optional adjective (p=0.5, sentiment) + noun (topic, number):
           "those grumpy drummers", "every dog"
  MOD      optional (p=0.35) neutral modifier: "from the village", "next door"
  VERB     (tense, number, sentiment, topic): a topic verb (p=0.65) or a sentiment verb
           ("loves" / "hates"), simple (p=0.7: "chases", "chase", "chased") or progressive
           ("is / are / was / were chasing"), with an optional adverb (p=0.4, sentiment):
           "happily baked", "were clumsily rehearsing"
  OBJECT   determiner + optional neutral adjective (p=0.35) + topic noun; the object's own
           number is random (not a factor): "the old balls", "this stew"
  PLACE    optional (p=0.5) place by topic: "in the kitchen", "on the field"
  CLOSING  one of three clauses that repeat the factors at the end of the sentence:
           (0.5) ", and|so it|they was|were|is|are [really|very|truly] wonderful|awful"
                 (number, tense, sentiment)
           (0.3) ", and the <audience> cheered|complained"  (topic, tense, sentiment)
           (0.2) ", which was|is a|such a delight|disaster"  (tense, sentiment)
  "."

Each factor is expressed at several places spread over the sentence (topic: subject noun,
verb, object noun, place, audience; number: determiner, noun, present-tense verb, closing
pronoun and auxiliary; tense: opening, verb, closing; sentiment: adjective, adverb, verb,
closing), with factor-independent variation in between. Sentences have 11 to 25 words
(`length_range()`; mean 16.3, plus EOS in the pipeline) over a vocabulary of 369 words
(`vocabulary()`).

Why this corpus
---------------
The factors shape words far apart. A language model has to infer them from the first words
and carry them across the factor-independent phrases in between; a VAE decoder can read them
from z at every step. So, early in training, knowing the factors is worth more than the
3.47 nats they cost in KL: with the library's LSTM decoder (embedding 64, hidden 64, batch 64,
Adam 1e-3, 2,400 steps, about a minute on 2 CPU cores) the language model reaches 28.6 nats
per validation sentence while the same decoder given the true factors reaches 23.3, a gap of
5.3 nats. A VAE whose code holds the factors can therefore beat the language model at that
budget (23.3 + 3.47 < 28.6), and one whose code holds nothing (posterior collapse) cannot;
whether a given method gets there is what the corpus is meant to show.

The exact reference exists: the slots are independent given the factors, so `log_prob`
computes the true log p(x) = log sum_f p(f) p(x|f) of any token sequence by dynamic
programming, and model NLLs can be compared with the entropy of the source. On the default
validation split (seed 0) the true NLL is 26.01 nats per sentence, i.e. 1.509 nats per token
with EOS counted (17.23 tokens per sentence). No model does better on average; a perfect
language model reaches it too, so any advantage of the VAE is one of learnability, not of the
optimum.

The splits are independent streams of one generator (`np.random.default_rng([seed, split])`)
and prefix-stable: the first k examples of `generate(split, n, seed)` are those of
`generate(split, k, seed)`. Change `GRAMMAR_VERSION` whenever the grammar changes.
"""

from __future__ import annotations

import collections
import functools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from vae_jax import errors
from vae_jax.data.readers import Example

GRAMMAR_VERSION = 1

FACTOR_NAMES: tuple[str, ...] = ('topic', 'sentiment', 'tense', 'number')
FACTOR_VALUES: Mapping[str, tuple[str, ...]] = {
    'topic': ('animals', 'food', 'music', 'sports'),
    'sentiment': ('negative', 'positive'),
    'tense': ('past', 'present'),
    'number': ('singular', 'plural'),
}
FACTOR_SIZES: tuple[int, ...] = tuple(len(FACTOR_VALUES[n]) for n in FACTOR_NAMES)
NUM_LABELS = math.prod(FACTOR_SIZES)  # 32
FACTOR_ENTROPY = math.log(NUM_LABELS)  # nats; log 32 = 3.4657

SPLITS: tuple[str, ...] = ('train', 'valid', 'test')
SPLIT_SIZES: Mapping[str, int] = {'train': 20_000, 'valid': 2_000, 'test': 2_000}

Phrase = tuple[str, ...]
Dist = dict[Phrase, float]  # phrase -> probability, summing to 1


def combined_label(factors: Sequence[int]) -> int:
  """(topic, sentiment, tense, number) -> 0..31, topic most significant."""
  return int(np.ravel_multi_index(tuple(int(f) for f in factors), FACTOR_SIZES))


def factors_from_label(label: int) -> tuple[int, ...]:
  """Inverse of `combined_label`."""
  return tuple(int(f) for f in np.unravel_index(int(label), FACTOR_SIZES))


def describe(factors: Sequence[int]) -> dict[str, str]:
  """{'topic': 'food', ...} for a factor tuple."""
  return {n: FACTOR_VALUES[n][int(f)] for n, f in zip(FACTOR_NAMES, factors)}


# Lexicon.

_TOPIC_SUBJECTS = (  # (singular, plural)
    (('dog', 'dogs'), ('cat', 'cats'), ('horse', 'horses'), ('fox', 'foxes'),
     ('puppy', 'puppies'), ('goat', 'goats')),
    (('chef', 'chefs'), ('baker', 'bakers'), ('waiter', 'waiters'), ('butcher', 'butchers'),
     ('farmer', 'farmers'), ('caterer', 'caterers')),
    (('singer', 'singers'), ('drummer', 'drummers'), ('pianist', 'pianists'),
     ('guitarist', 'guitarists'), ('violinist', 'violinists'), ('band', 'bands')),
    (('player', 'players'), ('runner', 'runners'), ('athlete', 'athletes'),
     ('swimmer', 'swimmers'), ('goalie', 'goalies'), ('boxer', 'boxers')),
)
_TOPIC_OBJECTS = (
    (('ball', 'balls'), ('stick', 'sticks'), ('mouse', 'mice'), ('squirrel', 'squirrels'),
     ('bone', 'bones'), ('rabbit', 'rabbits')),
    (('soup', 'soups'), ('cake', 'cakes'), ('pie', 'pies'), ('salad', 'salads'),
     ('sandwich', 'sandwiches'), ('stew', 'stews')),
    (('song', 'songs'), ('melody', 'melodies'), ('tune', 'tunes'), ('album', 'albums'),
     ('ballad', 'ballads'), ('symphony', 'symphonies')),
    (('match', 'matches'), ('race', 'races'), ('game', 'games'), ('trophy', 'trophies'),
     ('tournament', 'tournaments'), ('title', 'titles')),
)
# (plural present, singular present, past, -ing)
_TOPIC_VERBS = (
    (('chase', 'chases', 'chased', 'chasing'), ('watch', 'watches', 'watched', 'watching'),
     ('follow', 'follows', 'followed', 'following'), ('hunt', 'hunts', 'hunted', 'hunting'),
     ('sniff', 'sniffs', 'sniffed', 'sniffing')),
    (('cook', 'cooks', 'cooked', 'cooking'), ('bake', 'bakes', 'baked', 'baking'),
     ('taste', 'tastes', 'tasted', 'tasting'), ('serve', 'serves', 'served', 'serving'),
     ('prepare', 'prepares', 'prepared', 'preparing')),
    (('play', 'plays', 'played', 'playing'), ('record', 'records', 'recorded', 'recording'),
     ('practice', 'practices', 'practiced', 'practicing'),
     ('compose', 'composes', 'composed', 'composing'),
     ('rehearse', 'rehearses', 'rehearsed', 'rehearsing')),
    (('win', 'wins', 'won', 'winning'), ('lose', 'loses', 'lost', 'losing'),
     ('join', 'joins', 'joined', 'joining'), ('enter', 'enters', 'entered', 'entering'),
     ('finish', 'finishes', 'finished', 'finishing')),
)
_SENTIMENT_VERBS = (
    (('hate', 'hates', 'hated', 'hating'), ('dislike', 'dislikes', 'disliked', 'disliking'),
     ('avoid', 'avoids', 'avoided', 'avoiding'), ('ignore', 'ignores', 'ignored', 'ignoring')),
    (('love', 'loves', 'loved', 'loving'), ('enjoy', 'enjoys', 'enjoyed', 'enjoying'),
     ('admire', 'admires', 'admired', 'admiring'), ('praise', 'praises', 'praised', 'praising')),
)
_SUBJECT_ADJECTIVES = (
    ('lazy', 'rude', 'clumsy', 'grumpy', 'nasty', 'sloppy', 'careless', 'boring'),
    ('friendly', 'brave', 'clever', 'cheerful', 'gentle', 'lovely', 'kind', 'talented'),
)
_ADVERBS = (
    ('lazily', 'rudely', 'clumsily', 'angrily', 'carelessly', 'poorly'),
    ('happily', 'gladly', 'proudly', 'eagerly', 'gracefully', 'skillfully'),
)
_END_ADJECTIVES = (
    ('terrible', 'awful', 'horrible', 'dreadful', 'disappointing', 'miserable'),
    ('wonderful', 'great', 'amazing', 'fantastic', 'delightful', 'superb'),
)
_EVAL_NOUNS = (('disaster', 'mess', 'shame', 'nightmare'),
               ('delight', 'joy', 'treat', 'pleasure'))
_REACTIONS = (  # (past, present) by sentiment
    (('complained', 'complain'), ('groaned', 'groan'), ('frowned', 'frown'),
     ('sighed', 'sigh')),
    (('cheered', 'cheer'), ('clapped', 'clap'), ('smiled', 'smile'), ('laughed', 'laugh')),
)
_AUDIENCES = (('owners', 'kids', 'neighbors'), ('guests', 'diners', 'customers'),
              ('fans', 'listeners', 'critics'), ('spectators', 'supporters', 'coaches'))
_PLACES = (
    ('in the park', 'in the forest', 'near the river', 'on the farm', 'in the garden',
     'in the yard'),
    ('in the kitchen', 'at the market', 'in the restaurant', 'at the bakery', 'at the diner',
     'in the cafe'),
    ('on the stage', 'in the studio', 'at the festival', 'at the club', 'in the theater',
     'at the opera'),
    ('on the field', 'in the stadium', 'at the gym', 'on the court', 'at the track',
     'in the arena'),
)
_OPENINGS = (  # by tense
    ('yesterday ,', 'last night ,', 'last week ,', 'long ago ,', 'that morning ,'),
    ('today ,', 'now ,', 'this week ,', 'tonight ,', 'these days ,'),
)
_MODIFIERS = ('from the village', 'from the city', 'next door', 'from the north',
              'from the south', 'with the hat', 'down the street', 'across town')
_OBJECT_ADJECTIVES = ('big', 'small', 'old', 'new', 'red', 'green', 'little', 'huge')
# (word, weight): "the" is the most frequent determiner, as in English.
_DETERMINERS = (
    (('the', 4.0), ('this', 1.0), ('that', 1.0), ('every', 1.0), ('one', 1.0)),
    (('the', 4.0), ('these', 1.0), ('those', 1.0), ('some', 1.0), ('many', 1.0)),
)
_AUX = (('was', 'were'), ('is', 'are'))  # [tense][number]
_PRONOUNS = ('it', 'they')  # [number]


# Phrase distributions.


def _uniform(phrases: Sequence[str]) -> Dist:
  """Uniform over phrases given as space-separated strings."""
  return _weighted([(p, 1.0) for p in phrases])


def _weighted(items: Sequence[tuple[str, float]]) -> Dist:
  total = sum(w for _, w in items)
  out: Dist = collections.defaultdict(float)
  for phrase, w in items:
    out[tuple(phrase.split())] += w / total
  return dict(out)


def _seq(*dists: Dist) -> Dist:
  """Distribution of the concatenation of independent phrases."""
  out: Dist = {(): 1.0}
  for d in dists:
    nxt: Dist = collections.defaultdict(float)
    for a, pa in out.items():
      for b, pb in d.items():
        nxt[a + b] += pa * pb
    out = dict(nxt)
  return out


def _mix(*components: tuple[float, Dist]) -> Dist:
  """Mixture of phrase distributions with the given weights (summing to 1)."""
  out: Dist = collections.defaultdict(float)
  for w, d in components:
    for phrase, p in d.items():
      out[phrase] += w * p
  return dict(out)


def _optional(p_present: float, d: Dist) -> Dist:
  return _mix((1.0 - p_present, {(): 1.0}), (p_present, d))


def _verb_phrase(forms: tuple[str, str, str, str], tense: int, number: int,
                 adverbs: Dist) -> Dist:
  """Simple or progressive verb with an optional adverb: 'happily chased', 'is eagerly baking'."""
  pl_present, sg_present, past, ing = forms
  simple = past if tense == 0 else (sg_present if number == 0 else pl_present)
  aux = _AUX[tense][number]
  return _mix((0.7, _seq(adverbs, _uniform([simple]))),
              (0.3, _seq(_uniform([aux]), adverbs, _uniform([ing]))))


@functools.cache
def _slots(factors: tuple[int, int, int, int]) -> tuple[Dist, ...]:
  """The slot distributions of the grammar for one factor combination (see module doc)."""
  topic, sentiment, tense, number = factors
  opening = _optional(0.35, _uniform(_OPENINGS[tense]))
  subject = _seq(
      _weighted(_DETERMINERS[number]),
      _optional(0.5, _uniform(_SUBJECT_ADJECTIVES[sentiment])),
      _uniform([pair[number] for pair in _TOPIC_SUBJECTS[topic]]))
  modifier = _optional(0.35, _uniform(_MODIFIERS))
  adverbs = _optional(0.4, _uniform(_ADVERBS[sentiment]))
  verbs = _TOPIC_VERBS[topic]
  feel = _SENTIMENT_VERBS[sentiment]
  verb = _mix(
      *[(0.65 / len(verbs), _verb_phrase(v, tense, number, adverbs)) for v in verbs],
      *[(0.35 / len(feel), _verb_phrase(v, tense, number, adverbs)) for v in feel])
  obj = _mix(*[
      (0.5, _seq(_weighted(_DETERMINERS[n]),
                 _optional(0.35, _uniform(_OBJECT_ADJECTIVES)),
                 _uniform([pair[n] for pair in _TOPIC_OBJECTS[topic]])))
      for n in (0, 1)])
  place = _optional(0.5, _uniform(_PLACES[topic]))
  closing = _mix(
      (0.5, _seq(_uniform([',']), _weighted([('and', 0.6), ('so', 0.4)]),
                 _uniform([_PRONOUNS[number]]), _uniform([_AUX[tense][number]]),
                 _optional(0.5, _uniform(['really', 'very', 'truly'])),
                 _uniform(_END_ADJECTIVES[sentiment]))),
      (0.3, _seq(_uniform([', and the']), _uniform(_AUDIENCES[topic]),
                 _uniform([r[tense] for r in _REACTIONS[sentiment]]))),
      (0.2, _seq(_uniform([', which']), _uniform([_AUX[tense][0]]),
                 _uniform(['a', 'such a']), _uniform(_EVAL_NOUNS[sentiment]))))
  period = _uniform(['.'])
  return (opening, subject, modifier, verb, obj, place, closing, period)


def _all_factors() -> list[tuple[int, int, int, int]]:
  return [factors_from_label(c) for c in range(NUM_LABELS)]  # type: ignore[misc]


@functools.cache
def _samplers() -> tuple[tuple[tuple[tuple[Phrase, ...], np.ndarray], ...], ...]:
  """Per label, per slot: (phrases, cumulative probabilities) for inverse-CDF sampling."""
  out = []
  for f in _all_factors():
    per_slot = []
    for d in _slots(f):
      phrases = tuple(d)
      cdf = np.cumsum([d[p] for p in phrases])
      cdf /= cdf[-1]
      per_slot.append((phrases, cdf))
    out.append(tuple(per_slot))
  return tuple(out)


@functools.cache
def vocabulary() -> tuple[str, ...]:
  """Every word the grammar can produce, sorted."""
  words = set()
  for f in _all_factors():
    for d in _slots(f):
      for phrase in d:
        words.update(phrase)
  return tuple(sorted(words))


@functools.cache
def length_range() -> tuple[int, int]:
  """(shortest, longest) possible sentence length in words (EOS not counted)."""
  per_label = []
  for f in _all_factors():
    lens = [[len(p) for p in d] for d in _slots(f)]
    per_label.append((sum(min(x) for x in lens), sum(max(x) for x in lens)))
  lo = min(a for a, _ in per_label)
  hi = max(b for _, b in per_label)
  return lo, hi


# Generation.


def _split_index(split: str) -> int:
  aliases = {'dev': 'valid', 'validation': 'valid', 'val': 'valid'}
  split = aliases.get(split, split)
  if split not in SPLITS:
    raise errors.ConfigError(f'Unknown split {split!r} of the synthetic corpus; use one of {SPLITS}.')
  return SPLITS.index(split)


def generate(split: str = 'train', num_examples: int | None = None,
             seed: int = 0) -> list[Example]:
  """Generates one split of the synthetic corpus.

  Args:
    split: 'train', 'valid' (aliases 'dev', 'validation') or 'test'; each split is an
      independent random stream, so the splits differ for the same seed.
    num_examples: how many sentences; default `SPLIT_SIZES[split]` (20,000 / 2,000 / 2,000).
    seed: the corpus seed.

  Returns:
    Examples with `label = combined_label(factors)` and `factors = (topic, sentiment, tense,
    number)`. The same arguments always give the same list, and a longer list starts with
    the shorter one.
  """
  idx = _split_index(split)
  if num_examples is None:
    num_examples = SPLIT_SIZES[SPLITS[idx]]
  if num_examples < 0:
    raise ValueError(f'num_examples must be >= 0, got {num_examples}.')
  if seed < 0:
    raise ValueError(f'seed must be >= 0, got {seed}.')
  samplers = _samplers()
  num_slots = len(samplers[0])
  rng = np.random.default_rng([seed, idx])
  # One row of uniforms per sentence (label + one per slot): prefix-stable by construction.
  u = rng.random((num_examples, 1 + num_slots))
  labels = np.minimum((u[:, 0] * NUM_LABELS).astype(np.int64), NUM_LABELS - 1)
  choices = np.empty((num_examples, num_slots), dtype=np.int64)
  for c in range(NUM_LABELS):
    rows = np.flatnonzero(labels == c)
    for s, (phrases, cdf) in enumerate(samplers[c]):
      choices[rows, s] = np.minimum(
          np.searchsorted(cdf, u[rows, 1 + s], side='right'), len(phrases) - 1)
  out = []
  for label, row in zip(labels.tolist(), choices.tolist()):
    slots = samplers[label]
    tokens = tuple(w for s, k in enumerate(row) for w in slots[s][0][k])
    out.append(Example(tokens, label, factors_from_label(label)))
  return out


# Exact probabilities.


@functools.cache
def _tables() -> tuple[tuple[tuple[Dist, tuple[int, ...]], ...], ...]:
  """Per label, per slot: (phrase -> prob, the phrase lengths that occur)."""
  return tuple(
      tuple((d, tuple(sorted({len(p) for p in d}))) for d in _slots(f))
      for f in _all_factors())


def _likelihood(tokens: Phrase, label: int) -> float:
  """p(tokens | factors) by a forward pass over the slots (sums over every derivation)."""
  alpha = {0: 1.0}
  n = len(tokens)
  for table, lengths in _tables()[label]:
    nxt: dict[int, float] = collections.defaultdict(float)
    for pos, a in alpha.items():
      for k in lengths:
        if pos + k <= n:
          p = table.get(tokens[pos:pos + k])
          if p:
            nxt[pos + k] += a * p
    if not nxt:
      return 0.0
    alpha = nxt
  return alpha.get(n, 0.0)


def factor_posterior(tokens: Sequence[str]) -> np.ndarray:
  """p(label | tokens) over the 32 combined labels (all zeros if the grammar cannot produce it)."""
  tokens = tuple(tokens)
  lik = np.array([_likelihood(tokens, c) for c in range(NUM_LABELS)])
  total = lik.sum()
  return lik / total if total > 0 else lik


def log_prob(tokens: Sequence[str]) -> float:
  """Exact log p(tokens) in nats under the generating process (-inf if impossible).

  The end of the sentence is certain after its final '.', so this is also the log-probability
  of the token sequence with EOS appended.
  """
  tokens = tuple(tokens)
  total = sum(_likelihood(tokens, c) for c in range(NUM_LABELS)) / NUM_LABELS
  return math.log(total) if total > 0 else -math.inf
