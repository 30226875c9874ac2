"""Tests for vae_jax.data.pipeline: bucketing, resuming, sharding, evaluation."""

import json

import numpy as np
import pytest

from vae_jax.data import encoding, pipeline
from vae_jax.data.readers import Example
from vae_jax.data.vocab import PAD, Vocab

rng = np.random.default_rng(0)
WORDS = [f'w{i}' for i in range(50)]
# Example i has label i, so a batch's labels name the sentences it holds.
EXAMPLES = [Example(tuple(rng.choice(WORDS, size=int(n))), i)
            for i, n in enumerate(rng.integers(1, 40, size=203))]
VOCAB = Vocab.build(e.tokens for e in EXAMPLES)
DATA = encoding.encode(EXAMPLES, VOCAB)


def real_labels(batch):
  return batch['labels'][batch['weights'] > 0].tolist()


def test_batches_have_the_contract_format():
  it = pipeline.TrainIterator(DATA, 16, seed=3, pad_multiple=8)
  for _ in range(2 * it.steps_per_epoch):
    b = next(it)
    assert set(b) == {'tokens', 'weights', 'labels'}
    assert b['tokens'].dtype == np.int32 and b['weights'].dtype == np.float32
    assert b['labels'].dtype == np.int32
    assert b['tokens'].shape[0] == 16 and b['tokens'].shape[1] % 8 == 0
    real = b['weights'] > 0
    # Padding rows: weight 0, all PAD. Real rows end in EOS followed by PAD only.
    assert (b['tokens'][~real] == PAD).all()
    for row, label in zip(b['tokens'][real], b['labels'][real]):
      n = len(DATA[label])
      assert row[:n].tolist() == DATA[label].tolist() and (row[n:] == PAD).all()
    # Little padding beyond the multiple of 8: the longest row nearly fills the batch.
    longest = max(len(DATA[i]) for i in b['labels'][real])
    assert b['tokens'].shape[1] == pipeline.round_up(longest, 8)


def test_every_sentence_once_per_epoch_and_epochs_differ():
  it = pipeline.TrainIterator(DATA, 16, seed=0)
  assert it.steps_per_epoch == 13  # ceil(203 / 16)
  epochs = []
  for _ in range(2):
    labels = []
    for _ in range(it.steps_per_epoch):
      labels += real_labels(next(it))
    assert sorted(labels) == list(range(len(EXAMPLES)))
    epochs.append(labels)
  assert epochs[0] != epochs[1]
  weights = [next(it)['weights'] for _ in range(it.steps_per_epoch)]
  assert sum(float(w.sum()) for w in weights) == len(EXAMPLES)
  assert sum(int((w == 0).sum()) for w in weights) == 13 * 16 - 203


def test_same_seed_same_batches_and_bucketing_reduces_padding():
  a = pipeline.TrainIterator(DATA, 16, seed=7)
  b = pipeline.TrainIterator(DATA, 16, seed=7)
  for _ in range(20):
    x, y = next(a), next(b)
    assert all(np.array_equal(x[k], y[k]) for k in x)

  def padded_tokens(window):
    it = pipeline.TrainIterator(DATA, 16, seed=1, bucket_window=window, pad_multiple=1)
    return sum(next(it)['tokens'].size for _ in range(it.steps_per_epoch))

  assert padded_tokens(13) < 0.8 * padded_tokens(1)


@pytest.mark.parametrize('k', [0, 5, 13, 30])
def test_exact_resume(k):
  it = pipeline.TrainIterator(DATA, 16, seed=11, bucket_window=4)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.state()))  # As stored in a checkpoint.
  assert state['epoch'] == k // 13 and state['position'] == k % 13
  expected = [next(it) for _ in range(20)]
  fresh = pipeline.TrainIterator(DATA, 16, seed=999, bucket_window=4)  # Seed comes from state.
  fresh.restore(state)
  for e in expected:
    got = next(fresh)
    assert all(np.array_equal(e[key], got[key]) for key in e)


def test_restore_rejects_incompatible_state():
  state = pipeline.TrainIterator(DATA, 16).state()
  with pytest.raises(ValueError, match='batch_size=16, this iterator has 8'):
    pipeline.TrainIterator(DATA, 8).restore(state)
  other = encoding.encode(EXAMPLES[:-1], VOCAB)
  with pytest.raises(ValueError, match='Cannot resume'):
    pipeline.TrainIterator(other, 16).restore(state)
  with pytest.raises(ValueError, match='Not a TrainIterator state'):
    pipeline.TrainIterator(DATA, 16).restore({'epoch': 0})


def test_process_shards_union_is_the_global_batch():
  single = pipeline.TrainIterator(DATA, 16, seed=5)
  shards = [pipeline.TrainIterator(DATA, 16, seed=5, process_index=p, process_count=2)
            for p in range(2)]
  for _ in range(single.steps_per_epoch + 3):
    g = next(single)
    parts = [next(s) for s in shards]
    assert parts[0]['tokens'].shape == (8, g['tokens'].shape[1])
    for key in g:
      assert np.array_equal(np.concatenate([p[key] for p in parts]), g[key])
  # A state saved by one process count resumes under another.
  shards[1].restore(single.state())
  assert np.array_equal(next(shards[1])['tokens'], next(single)['tokens'][8:])


def test_bad_process_options():
  with pytest.raises(ValueError, match='not divisible by the number of processes 3'):
    pipeline.TrainIterator(DATA, 16, process_count=3)
  with pytest.raises(ValueError, match='process_index'):
    pipeline.TrainIterator(DATA, 16, process_index=2, process_count=2)
  with pytest.raises(ValueError, match='no sentences'):
    pipeline.TrainIterator(encoding.encode([], VOCAB), 16)
  with pytest.raises(ValueError, match='bucket_window'):
    pipeline.TrainIterator(DATA, 16, bucket_window=0)


@pytest.mark.parametrize('sort_by_length', [False, True])
def test_eval_iterator(sort_by_length):
  ev = pipeline.EvalIterator(DATA, 20, sort_by_length=sort_by_length)
  batches = list(ev)
  assert len(batches) == len(ev) == 11
  labels = [l for b in batches for l in real_labels(b)]
  if sort_by_length:
    assert sorted(labels) == list(range(len(EXAMPLES)))
    lengths = [len(DATA[i]) for i in labels]
    assert lengths == sorted(lengths)
  else:
    assert labels == list(range(len(EXAMPLES)))
  assert all(b['tokens'].shape[0] == 20 and b['tokens'].shape[1] % 8 == 0 for b in batches)
  assert float(batches[-1]['weights'].sum()) == 3 and (batches[-1]['tokens'][3:] == PAD).all()
  assert ev.order[:len(EXAMPLES)].tolist() == labels and (ev.order[len(EXAMPLES):] == -1).all()
  # Re-iterable with the same result.
  assert all(np.array_equal(a['tokens'], b['tokens']) for a, b in zip(batches, ev))


def test_eval_shards_and_fixed_length():
  full = list(pipeline.EvalIterator(DATA, 20, fixed_length=True))
  assert len({b['tokens'].shape for b in full}) == 1
  shards = [list(pipeline.EvalIterator(DATA, 20, fixed_length=True, process_index=p,
                                       process_count=4)) for p in range(4)]
  assert all(len(s) == len(full) for s in shards)  # Same number of batches everywhere.
  for i, g in enumerate(full):
    for key in g:
      assert np.array_equal(np.concatenate([s[i][key] for s in shards]), g[key])
