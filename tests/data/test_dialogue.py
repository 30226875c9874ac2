"""Tests for vae_jax.data.dialogue: pairs, encoding, the batch layout and the iterators."""

import json
from pathlib import Path

import numpy as np
import pytest

from vae_jax.data import dialogue
from vae_jax.data import pipeline
from vae_jax.data.readers import Dialogue, Turn
from vae_jax.data.vocab import EOS, PAD, Vocab

# As in conftest.py: the corpora live beside the checkout, <checkout>/../shared/data.
SHARED_DATA = Path(__file__).parents[2].parent / 'shared' / 'data'


def turn(text, act=1, emotion=0):
  return Turn(tuple(text.split()), act, emotion)


SMALL = [
    Dialogue((turn('Hi there'), turn('Hello', 2, 4), turn('How are you ?', 3, 1),
              turn('Fine', 4, 6), turn('Good to hear .')), index=0),
    Dialogue((turn('x'), turn('y z', 2, 5)), index=1),
    Dialogue((turn('alone'),), index=2),
]


def random_dialogues(n, seed=0):
  """Dialogues whose turns start with a token naming them (`d{dialogue}t{turn}`)."""
  rng = np.random.default_rng(seed)
  words = [f'w{i}' for i in range(30)]
  out = []
  for d in range(n):
    turns = tuple(
        Turn((f'd{d}t{t}',) + tuple(rng.choice(words, size=int(rng.integers(0, 25)))),
             int(rng.integers(1, 5)), int(rng.integers(0, 7)))
        for t in range(int(rng.integers(2, 9))))
    out.append(Dialogue(turns, index=d))
  return out


DIALOGUES = random_dialogues(40)
PAIRS = dialogue.dialogue_pairs(DIALOGUES, 3)
VOCAB = Vocab.build(dialogue.vocabulary_tokens(PAIRS))


def encode(pairs=PAIRS, window=3, **kwargs):
  kwargs = {'max_length': 16, 'max_context_length': 12, **kwargs}
  return dialogue.encode_pairs(pairs, VOCAB, context_window=window, **kwargs)


def ids(tokens, limit=None):
  """Expected encoding: the first `limit - 1` words and EOS."""
  words = VOCAB.encode(tokens)
  return (words if limit is None else words[:limit - 1]) + [EOS]


def expected_batch(pairs, rows, length, window, context_length, max_length, max_context):
  """The batch built directly from the pairs (the reference for `EncodedDialogues.batch`)."""
  b = len(rows)
  out = {'tokens': np.zeros((b, length), np.int32), 'weights': np.zeros(b, np.float32),
         'context': np.zeros((b, window, context_length), np.int32),
         'context_speakers': np.zeros((b, window), np.int32),
         'act': np.zeros(b, np.int32), 'emotion': np.zeros(b, np.int32)}
  for r, i in enumerate(rows):
    if i < 0:
      continue
    p = pairs[i]
    seq = ids(p.response, max_length)
    out['tokens'][r, :len(seq)] = seq
    out['weights'][r] = 1
    for k, (utt, speaker) in enumerate(zip(p.context, p.speakers)):
      seq = ids(utt, max_context)
      out['context'][r, k, :len(seq)] = seq
      out['context_speakers'][r, k] = speaker
    out['act'][r], out['emotion'][r] = p.act, p.emotion
  return out


def assert_batches_equal(a, b):
  assert set(a) == set(b)
  for key in a:
    assert a[key].dtype == b[key].dtype and a[key].shape == b[key].shape, key
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def response_names(batch):
  """`d{dialogue}t{turn}` of every real row (the first response token)."""
  real = batch['weights'] > 0
  return [VOCAB.id_to_token(int(i)) for i in batch['tokens'][real, 0]]


# Pairs.


@pytest.mark.parametrize('window', [1, 2, 3, 10])
def test_pairs_follow_the_window(window):
  pairs = dialogue.dialogue_pairs(SMALL, window)
  assert len(pairs) == 4 + 1 + 0  # n - 1 pairs per dialogue of n turns.
  assert [(p.dialogue, p.turn) for p in pairs] == [(0, 1), (0, 2), (0, 3), (0, 4), (1, 1)]
  for p in pairs:
    turns = SMALL[p.dialogue].turns
    first = max(0, p.turn - window)
    assert p.context == tuple(t.tokens for t in turns[first:p.turn])
    assert p.response == turns[p.turn].tokens
    # The speakers alternate: turn j is the responder's iff t - j is even.
    assert p.speakers == tuple(int((p.turn - j) % 2 == 0) for j in range(first, p.turn))
  assert pairs[3].context[-1] == ('Fine',) and pairs[3].speakers[-1] == 0
  if window >= 4:
    assert pairs[3].speakers == (1, 0, 1, 0)


def test_pair_labels_are_the_responses():
  p = dialogue.dialogue_pairs(SMALL, 2)[2]
  assert p.response == ('Fine',) and p.context == (('Hello',), ('How', 'are', 'you', '?'))
  assert (p.act, p.emotion) == (3, 6)  # The file's act 4, 0-based.
  assert p.speakers == (1, 0)
  last = dialogue.dialogue_pairs(SMALL, 2)[-1]
  assert (last.act, last.emotion) == (1, 5)


def test_lowercase_and_bad_window():
  (p,) = dialogue.dialogue_pairs(
      [Dialogue((turn('Hi <unk> THERE'), turn('OK .')), index=7)], 1, lowercase=True)
  assert p.context == (('hi', '<unk>', 'there'),) and p.response == ('ok', '.')
  assert p.dialogue == 7 and p.turn == 1
  for bad in (0, -1, 1.5):
    with pytest.raises(ValueError, match='context_window'):
      dialogue.dialogue_pairs(SMALL, bad)


@pytest.mark.parametrize('window', [1, 4])
def test_vocabulary_tokens_counts_every_turn_once(window):
  tokens = dialogue.vocabulary_tokens(dialogue.dialogue_pairs(SMALL, window))
  # The one-turn dialogue gives no pair, hence no tokens.
  assert tokens == [t.tokens for d in SMALL[:2] for t in d.turns]


# Encoding.


def test_encoding_and_truncation():
  data = encode(max_length=4, max_context_length=3)
  assert len(data) == len(PAIRS) and data.source_indices.tolist() == list(range(len(PAIRS)))
  for i, p in enumerate(PAIRS):
    assert data.responses[i].tolist() == ids(p.response, 4)
    got = [data.contexts[data.context_start[i] + k].tolist() for k in range(len(p.context))]
    assert got == [ids(u, 3) for u in p.context]
  assert data.lengths.max() == 4 and data.contexts.lengths.max() == 3
  assert data.acts.tolist() == [p.act for p in PAIRS]
  assert data.emotions.tolist() == [p.emotion for p in PAIRS]
  assert data.context_count.tolist() == [len(p.context) for p in PAIRS]
  # Every turn except each dialogue's last is stored once, although it is in up to 3 contexts.
  assert len(data.contexts) == sum(len(d.turns) - 1 for d in DIALOGUES)
  n_long = sum(len(d.turns[t].tokens) + 1 > 3 for d in DIALOGUES for t in range(len(d.turns) - 1))
  assert data.contexts.num_truncated == n_long > 0
  assert data.responses.num_truncated == sum(len(p.response) + 1 > 4 for p in PAIRS)
  assert 'pairs' in data.summary() and 'truncated' in data.summary()


def test_drop_removes_whole_pairs():
  data = encode(max_length=8, overlong='drop')
  keep = [i for i, p in enumerate(PAIRS) if len(p.response) + 1 <= 8]
  assert 0 < len(keep) < len(PAIRS)
  assert data.source_indices.tolist() == keep
  assert data.responses.num_dropped == len(PAIRS) - len(keep)
  assert data.acts.tolist() == [PAIRS[i].act for i in keep]
  rows = np.arange(len(data))
  assert_batches_equal(data.batch(rows, 8),
                       expected_batch([PAIRS[i] for i in keep], rows, 8, 3, 16, 8, 12))


def test_contexts_of_unrelated_pairs_are_stored_correctly():
  # Pairs given out of order, and two with the same (dialogue, turn) but different text.
  pairs = PAIRS[5:9][::-1] + PAIRS[:3]
  other = dialogue.DialoguePair(context=(('w1', 'w2'), ('w3',)), speakers=(1, 0),
                                response=('w4',), act=0, emotion=0, dialogue=0, turn=2)
  pairs = pairs + [other, dialogue.DialoguePair((), (), ('w5',), 1, 2, 9, 0)]
  data = encode(pairs)
  rows = np.arange(len(pairs))
  assert_batches_equal(data.batch(rows, 16), expected_batch(pairs, rows, 16, 3, 16, 16, 12))


def test_encode_rejects_bad_pairs_and_options():
  p = PAIRS[3]
  assert len(p.context) == 3
  with pytest.raises(ValueError, match='more than context_window=2'):
    encode([p], window=2)
  with pytest.raises(ValueError, match='one speaker flag'):
    encode([dialogue.DialoguePair(p.context, (0,), p.response, 0, 0, 0, 3)])
  with pytest.raises(ValueError, match='act must be 0-3'):
    encode([dialogue.DialoguePair(p.context, p.speakers, p.response, 4, 0, 0, 3)])
  with pytest.raises(ValueError, match='max_context_length'):
    encode(max_context_length=1)
  with pytest.raises(ValueError, match='overlong'):
    encode(overlong='wrap')


# Batches.


@pytest.mark.parametrize('pad_to_max', [True, False])
def test_batch_layout(pad_to_max):
  data = encode(max_length=None, max_context_length=11, pad_context_to_max=pad_to_max)
  rows = np.array([3, 0, -1, 17, 1, -1])
  length = pipeline.round_up(int(data.lengths[rows[rows >= 0]].max()), 8)
  b = data.batch(rows, length)
  # Slots are left-aligned: the oldest kept turn in slot 0, the empty ones last and all PAD.
  slot_mask = (b['context'] != PAD).any(-1)
  assert slot_mask.tolist() == [[k < len(PAIRS[i].context) if i >= 0 else False
                                 for k in range(3)] for i in rows]
  assert (b['context'][rows < 0] == PAD).all() and (b['tokens'][rows < 0] == PAD).all()
  assert b['weights'].tolist() == [1, 1, 0, 1, 1, 0]
  if pad_to_max:
    lc = 16  # round_up(11, 8), whatever the batch holds.
  else:
    lc = pipeline.round_up(max(min(len(u) + 1, 11) for i in rows[rows >= 0]
                               for u in PAIRS[i].context), 8)
  assert b['context'].shape == (6, 3, lc)
  assert_batches_equal(b, expected_batch(PAIRS, rows, length, 3, lc, None, 11))
  assert set(b) == {'tokens', 'weights', 'context', 'context_speakers', 'act', 'emotion'}


def test_short_contexts_and_lc_without_limit():
  data = encode(max_length=None, max_context_length=None, pad_context_to_max=False,
                pad_multiple=4)
  first_pairs = np.array([i for i, p in enumerate(PAIRS) if p.turn == 1][:5])
  b = data.batch(first_pairs, 32)
  assert (b['context'][:, 1:] == PAD).all() and (b['context_speakers'] == 0).all()
  longest = max(len(PAIRS[i].context[0]) + 1 for i in first_pairs)
  assert b['context'].shape[2] == pipeline.round_up(longest, 4)
  everything = max(len(u) + 1 for p in PAIRS for u in p.context)
  padded = encode(max_length=None, max_context_length=None, pad_multiple=4)
  assert padded.context_length == pipeline.round_up(everything, 4)
  assert padded.batch(first_pairs, 32)['context'].shape[2] == padded.context_length


# Iterators.


def test_train_iterator_visits_every_pair_once_per_epoch():
  data = encode(max_length=None)
  it = pipeline.TrainIterator(data, 16, seed=2, bucket_window=2)
  names = [f'd{p.dialogue}t{p.turn}' for p in PAIRS]
  epochs = []
  for _ in range(2):
    seen = []
    for _ in range(it.steps_per_epoch):
      b = next(it)
      seen += response_names(b)
      real = b['weights'] > 0
      # The context rows belong to the response in the same row.
      for row, name in zip(b['context'][real], response_names(b)):
        i = names.index(name)
        assert row[len(PAIRS[i].context) - 1, 0] == VOCAB.token_to_id(
            f'd{PAIRS[i].dialogue}t{PAIRS[i].turn - 1}')
    assert sorted(seen) == sorted(names)
    epochs.append(seen)
  assert epochs[0] != epochs[1]


@pytest.mark.parametrize('k', [0, 7, 19])
def test_train_iterator_resumes_exactly(k):
  data = encode(pad_context_to_max=False)
  it = pipeline.TrainIterator(data, 8, seed=4, bucket_window=3)
  for _ in range(k):
    next(it)
  state = json.loads(json.dumps(it.state()))
  expected = [next(it) for _ in range(it.steps_per_epoch + 2)]
  fresh = pipeline.TrainIterator(encode(pad_context_to_max=False), 8, seed=99, bucket_window=3)
  fresh.restore(state)
  for e in expected:
    assert_batches_equal(e, next(fresh))
  with pytest.raises(ValueError, match='Cannot resume'):
    pipeline.TrainIterator(encode(pad_context_to_max=True), 8, bucket_window=3).restore(state)


def test_process_shards_have_one_context_shape():
  data = encode(pad_context_to_max=False)
  single = pipeline.TrainIterator(data, 8, seed=5)
  shards = [pipeline.TrainIterator(data, 8, seed=5, process_index=p, process_count=2)
            for p in range(2)]
  for _ in range(single.steps_per_epoch):
    g = next(single)
    parts = [next(s) for s in shards]
    assert parts[0]['context'].shape == parts[1]['context'].shape == (4,) + g['context'].shape[1:]
    for key in g:
      np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), g[key])


@pytest.mark.parametrize('sort_by_length', [False, True])
def test_eval_iterator_covers_every_pair_in_order(sort_by_length):
  data = encode(max_context_length=20, pad_context_to_max=False)
  ev = pipeline.EvalIterator(data, 16, sort_by_length=sort_by_length)
  order = ev.order[ev.order >= 0]
  assert sorted(order.tolist()) == list(range(len(PAIRS)))
  if not sort_by_length:
    assert order.tolist() == list(range(len(PAIRS)))
  batches = list(ev)
  names = [n for b in batches for n in response_names(b)]
  assert names == [f'd{PAIRS[i].dialogue}t{PAIRS[i].turn}' for i in order]
  for b, rows in zip(batches, ev.order.reshape(len(ev), 16)):
    lc = b['context'].shape[2]
    assert_batches_equal(b, expected_batch(PAIRS, rows, b['tokens'].shape[1], 3, lc, 16, 20))
  assert float(sum(b['weights'].sum() for b in batches)) == len(PAIRS)


def test_iterators_reject_other_objects():
  with pytest.raises(TypeError, match='batch\\(rows, length\\)'):
    pipeline.TrainIterator(PAIRS, 8)


# The real corpus.


@pytest.mark.shared_data
@pytest.mark.skipif(not (SHARED_DATA / 'dailydialog').is_dir(),
                    reason=f'DailyDialog not found in {SHARED_DATA}')
def test_dailydialog_validation_pairs(shared_data):
  dialogues = dialogue.load_dialogues('validation', shared_data)
  assert len(dialogues) == 1000
  pairs = dialogue.load_pairs('dev', shared_data, context_window=4, lowercase=True)
  assert len(pairs) == sum(len(d.turns) - 1 for d in dialogues) == 8069 - 1000
  assert pairs[0].context == (('good', 'morning', ',', 'sir', '.', 'is', 'there', 'a', 'bank',
                               'near', 'here', '?'),)
  assert {p.act for p in pairs} == {0, 1, 2, 3} and {p.emotion for p in pairs} == set(range(7))
  assert max(len(p.context) for p in pairs) == 4
  tokens = dialogue.vocabulary_tokens(pairs)
  assert len(tokens) == 8069
  vocab = Vocab.build(tokens)
  data = dialogue.encode_pairs(pairs, vocab, context_window=4, max_length=40,
                               max_context_length=40)
  assert len(data) == len(pairs) and len(data.contexts) == 8069 - 1000
  b = next(pipeline.TrainIterator(data, 32, seed=0))
  assert b['context'].shape == (32, 4, 40) and b['tokens'].shape[1] <= 40


@pytest.mark.parametrize('overlong', ['truncate', 'drop'])
def test_vocabulary_tokens_hold_only_the_words_training_sees(overlong):
  limits = dict(max_length=6, max_context_length=4)
  tokens = dialogue.vocabulary_tokens(PAIRS, overlong=overlong, **limits)
  data = encode(overlong=overlong, **limits)
  seen = set()
  for part in (data.responses, data.contexts):
    for i in range(len(part)):
      seen.update(VOCAB.decode(part[i].tolist()))
  assert {w for t in tokens for w in t} == seen
  # Each turn once: no more lists than turns, each at most as long as its longest view.
  turns = {(p.dialogue, j) for p in PAIRS for j in range(p.turn - len(p.context), p.turn + 1)}
  assert len(tokens) <= len(turns)
  assert max(len(t) for t in tokens) <= 5
