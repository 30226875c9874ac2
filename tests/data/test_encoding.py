"""Tests for vae_jax.data.encoding: EOS, labels, the over-long policy, training words."""

import numpy as np
import pytest

from vae_jax.data import encoding
from vae_jax.data.readers import Example
from vae_jax.data.vocab import EOS, UNK, Vocab


def random_examples(num: int = 203) -> list[Example]:
  """`num` sentences of 1 to 39 words drawn from 50; example i has label i."""
  rng = np.random.default_rng(0)
  words = [f'w{i}' for i in range(50)]
  return [Example(tuple(rng.choice(words, size=int(n))), i)
          for i, n in enumerate(rng.integers(1, 40, size=num))]


EXAMPLES = random_examples()
VOCAB = Vocab.build(e.tokens for e in EXAMPLES)


def test_encode_appends_eos_without_bos():
  data = encoding.encode([Example(('w1', 'zzz')), Example(())], VOCAB)
  assert data[0].tolist() == [VOCAB.token_to_id('w1'), UNK, EOS]
  assert data[1].tolist() == [EOS]
  assert data[0].dtype == np.int32 and data.labels is None
  assert data.num_tokens == 4 and data.num_unk == 1
  assert encoding.encode(EXAMPLES, VOCAB).labels.tolist() == list(range(len(EXAMPLES)))


def test_encode_rejects_mixed_labels_and_bad_options():
  with pytest.raises(ValueError, match='have a label and the others do not'):
    encoding.encode([Example(('a',), 1), Example(('b',))], VOCAB)
  with pytest.raises(ValueError, match='max_length'):
    encoding.encode(EXAMPLES, VOCAB, max_length=1)
  with pytest.raises(ValueError, match='overlong'):
    encoding.encode(EXAMPLES, VOCAB, max_length=5, overlong='wrap')


def test_overlong_policy():
  n_long = sum(len(e.tokens) + 1 > 10 for e in EXAMPLES)
  assert 0 < n_long < len(EXAMPLES)
  cut = encoding.encode(EXAMPLES, VOCAB, max_length=10)
  assert cut.num_truncated == n_long and cut.num_dropped == 0 and len(cut) == len(EXAMPLES)
  assert cut.lengths.max() == 10
  long_i = next(i for i, e in enumerate(EXAMPLES) if len(e.tokens) > 9)
  assert cut[long_i].tolist() == VOCAB.encode(EXAMPLES[long_i].tokens[:9]) + [EOS]
  drop = encoding.encode(EXAMPLES, VOCAB, max_length=10, overlong='drop')
  assert drop.num_dropped == n_long and len(drop) == len(EXAMPLES) - n_long
  assert drop.lengths.max() <= 10
  assert drop.labels.tolist() == drop.source_indices.tolist()
  assert 'truncated' in cut.summary()


@pytest.mark.parametrize('overlong', ['truncate', 'drop'])
def test_training_tokens_are_the_words_encode_keeps(overlong):
  # The vocabulary of a run is built from these: a word only in the cut-off tail of a long
  # sentence (or in a dropped one) must not enter it.
  kept = list(encoding.training_tokens(EXAMPLES, max_length=10, overlong=overlong))
  data = encoding.encode(EXAMPLES, VOCAB, max_length=10, overlong=overlong)
  assert len(kept) == len(data)
  for words, ids in zip(kept, (data[i] for i in range(len(data)))):
    assert VOCAB.encode(words) + [EOS] == ids.tolist()
  tail_only = ({w for e in EXAMPLES for w in e.tokens} - {w for ws in kept for w in ws})
  vocab = Vocab.build(kept)
  assert all(vocab.token_to_id(w) == UNK for w in tail_only)
