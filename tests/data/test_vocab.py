"""Tests for vae_jax.data.vocab."""

import json

import numpy as np
import pytest

from vae_jax.data import vocab as vocab_lib
from vae_jax.data.vocab import BOS, EOS, PAD, UNK, Vocab, VocabMismatchError


def test_special_ids_are_the_contract():
  assert (PAD, BOS, EOS, UNK) == (0, 1, 2, 3)
  v = Vocab.build([['a']])
  assert v.tokens[:4] == ('<pad>', '<s>', '</s>', '<unk>')
  assert [v.token_to_id(t) for t in ('<unk>', '_UNK', '<UNK>')] == [UNK] * 3


def test_build_orders_by_count_then_token():
  v = Vocab.build([['b', 'a', 'c'], ['c', 'b'], ['c', 'd']])
  assert v.tokens[4:] == ('c', 'b', 'a', 'd')


def test_build_is_independent_of_sentence_order():
  sents = [['x', 'y'], ['y', 'z', 'z'], ['w']]
  assert Vocab.build(sents).fingerprint == Vocab.build(sents[::-1]).fingerprint


def test_max_size_counts_specials_and_min_count():
  sents = [['a'] * 5 + ['b'] * 3 + ['c'] * 2 + ['d']]
  assert Vocab.build(sents, max_size=6).tokens[4:] == ('a', 'b')
  assert len(Vocab.build(sents, max_size=6)) == 6
  assert Vocab.build(sents, min_count=2).tokens[4:] == ('a', 'b', 'c')
  assert len(Vocab.build(sents, max_size=4)) == 4


@pytest.mark.parametrize('kwargs', [{'max_size': 3}, {'min_count': 0}])
def test_build_rejects_bad_options(kwargs):
  with pytest.raises(ValueError):
    Vocab.build([['a']], **kwargs)


def test_build_rejects_untokenised_text():
  with pytest.raises(TypeError, match='split'):
    Vocab.build(['a sentence'])


def test_literal_specials_in_text_do_not_become_control_ids():
  sents = [['<s>', 'hi', '</s>', '<pad>', '_UNK', '<UNK>', '<unk>']]
  v = Vocab.build(sents)
  assert v.tokens[4:] == ('hi',)  # Reserved strings are never counted as words.
  ids = v.encode(sents[0])
  assert ids == [UNK, 4, UNK, UNK, UNK, UNK, UNK]
  assert EOS not in ids and PAD not in ids and BOS not in ids


def test_encode_decode_roundtrip_and_unknown_words():
  v = Vocab.build([['the', 'cat', 'sat']])
  ids = v.encode(['the', 'dog', 'sat'])
  assert ids[1] == UNK
  assert v.decode(ids + [EOS]) == ['the', '<unk>', 'sat']


def test_decode_stops_at_eos_and_strips_specials():
  v = Vocab.build([['a', 'b']])
  a, b = v.token_to_id('a'), v.token_to_id('b')
  ids = np.array([BOS, a, PAD, b, EOS, a, PAD])
  assert v.decode(ids) == ['a', 'b']
  assert v.decode(ids, strip_special=False) == ['<s>', 'a', '<pad>', 'b', '</s>']
  assert v.decode([a, PAD], strip_special=False) == ['a', '<pad>']
  with pytest.raises(ValueError, match='outside'):
    v.decode([len(v)])


def test_vocab_is_immutable_and_hashable():
  v = Vocab.build([['a']])
  with pytest.raises(AttributeError):
    v.foo = 1  # pytype: disable=not-writable
  assert {v: 1}[Vocab.build([['a']])] == 1


def test_constructor_validates_tokens():
  with pytest.raises(ValueError, match='special tokens'):
    Vocab(['a', 'b'])
  with pytest.raises(ValueError, match='Duplicate'):
    Vocab(vocab_lib.SPECIAL_TOKENS + ('a', 'a'))
  with pytest.raises(ValueError, match='reserved'):
    Vocab(vocab_lib.SPECIAL_TOKENS + ('_UNK',))
  with pytest.raises(ValueError, match='whitespace'):
    Vocab(vocab_lib.SPECIAL_TOKENS + ('a b',))
  assert Vocab.from_words(['x', '<s>', 'y', 'x']).tokens[4:] == ('x', 'y')


def test_save_load_roundtrip(tmp_path):
  v = Vocab.build([['héllo', 'wörld', 'wörld']])
  path = tmp_path / 'sub' / 'vocab.json'
  v.save(path)
  w = Vocab.load(path)
  assert w == v and w.fingerprint == v.fingerprint
  assert json.loads(path.read_text())['size'] == len(v)


def test_load_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match='Vocabulary file not found'):
    Vocab.load(tmp_path / 'missing.json')
  bad = tmp_path / 'bad.json'
  obj = Vocab.build([['a']]).to_json()
  obj['tokens'].append('b')  # Tokens no longer match the stored fingerprint.
  bad.write_text(json.dumps(obj))
  with pytest.raises(ValueError, match='fingerprint'):
    Vocab.load(bad)
  bad.write_text('{not json')
  with pytest.raises(ValueError, match='not valid JSON'):
    Vocab.load(bad)


def test_assert_compatible_explains_the_difference():
  v = Vocab.build([['a', 'a', 'b']])
  v.assert_compatible(Vocab.build([['b', 'a', 'a']]))
  with pytest.raises(VocabMismatchError) as e:
    v.assert_compatible(Vocab.build([['a', 'a', 'c']]))
  msg = str(e.value)
  assert "first difference at id 5: expected 'b', got 'c'" in msg
  assert 'fresh workdir' in msg and 'Vocab.load' in msg
  with pytest.raises(VocabMismatchError, match='expected 6 tokens .* got 5'):
    v.assert_compatible(Vocab.build([['a']]))
