"""Tests for vae_jax.data.corpora; the shared_data ones read small real splits."""

import collections
import lzma

import pytest

from vae_jax.data import corpora
from vae_jax.data.vocab import Vocab


def test_registry_lists_every_corpus_and_split():
  assert set(corpora.CORPORA) == {'ptb', 'yahoo', 'snli', 'short_yelp', 'yelp_style_transfer',
                                  'sst', 'sst2', 'dailydialog', 'synthetic'}
  assert corpora.get_corpus('yahoo').splits == ('valid',)
  assert corpora.get_corpus('ptb').splits == ('train', 'valid', 'test')
  assert corpora.get_corpus('sst').num_classes == 5
  assert corpora.get_corpus('synthetic').num_classes == 32
  assert corpora.get_corpus('synthetic').label_names[0] == 'animals/negative/past/singular'


def test_split_aliases_and_errors():
  for alias in ('dev', 'validation', 'val', 'valid'):
    assert corpora.canonical_split('sst', alias) == 'valid'
  with pytest.raises(ValueError, match=r"no split 'train' \(train is not available offline.*"
                                       r"Available splits: valid\."):
    corpora.canonical_split('yahoo', 'train')
  with pytest.raises(ValueError, match='Unknown corpus .* available: ptb'):
    corpora.get_corpus('wikitext')


def test_data_dir_errors(tmp_path):
  with pytest.raises(ValueError, match='pass data_dir'):
    corpora.load_split('ptb', 'valid')
  with pytest.raises(FileNotFoundError, match='Data directory not found'):
    corpora.load_split('ptb', 'valid', tmp_path / 'nope')
  with pytest.raises(FileNotFoundError, match='Corpus directory not found: .*ptb'):
    corpora.load_split('ptb', 'valid', tmp_path)
  (tmp_path / 'ptb').mkdir()
  with pytest.raises(FileNotFoundError, match=r'Missing file for ptb/valid: expected .*'
                                              r'ptb\.valid\.txt or .*ptb\.valid\.txt\.xz'):
    corpora.load_split('ptb', 'valid', tmp_path)


def test_load_from_root_or_corpus_dir(tmp_path):
  (tmp_path / 'yahoo').mkdir()
  with lzma.open(tmp_path / 'yahoo' / 'yahoo.valid.txt.xz', 'wt') as f:
    f.write('What is _UNK ? It Is .\n')
  for d in (tmp_path, tmp_path / 'yahoo'):
    (ex,) = corpora.load_split('yahoo', 'dev', d)
    assert ex.tokens[2] == '_UNK' and ex.label is None
  (ex,) = corpora.load_split('yahoo', 'valid', tmp_path, lowercase=True)
  assert ex.tokens == ('what', 'is', '_UNK', '?', 'it', 'is', '.')


def test_synthetic_needs_no_files():
  ex = corpora.load_split('synthetic', 'validation')
  assert len(ex) == 2000 and ex[0].factors is not None


@pytest.mark.shared_data
def test_ptb(shared_data):
  valid = corpora.load_split('ptb', 'valid', shared_data)
  assert len(valid) == 3370
  assert sum(len(e.tokens) for e in valid) == 70390
  train = corpora.load_split('ptb', 'train', shared_data)
  types = {t for e in train for t in e.tokens}
  assert len(types) == 9999 and '<unk>' in types  # As documented in the data README.
  vocab = Vocab.build(e.tokens for e in train)
  assert len(vocab) == 9998 + 4  # <unk> is the UNK special, not a word.


@pytest.mark.shared_data
def test_sst_dev(shared_data):
  sst = corpora.load_split('sst', 'dev', shared_data)
  assert len(sst) == 1101
  assert sst[0].tokens[:4] == ('It', "'s", 'a', 'lovely') and sst[0].label == 3
  assert len(corpora.load_split('sst2', 'dev', shared_data)) == 872


@pytest.mark.shared_data
def test_dailydialog_validation(shared_data):
  utts = corpora.load_split('dailydialog', 'validation', shared_data)
  assert len(utts) == 8069
  assert utts[0].tokens[:3] == ('Good', 'morning', ',')
  acts = collections.Counter(e.label for e in utts)
  assert set(acts) == {0, 1, 2, 3}
  assert all(e.factors[0] == e.label and 0 <= e.factors[1] <= 6 for e in utts)


@pytest.mark.shared_data
def test_short_yelp_labels(shared_data):
  valid = corpora.load_split('short_yelp', 'valid', shared_data)
  assert collections.Counter(e.label for e in valid) == {0: 3982, 1: 6018}
  assert len(corpora.load_split('short_yelp', 'train_100', shared_data)) == 100
