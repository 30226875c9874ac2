"""Tests for vae_jax.data.bpe, on a tiny hand-made byte-level BPE checkpoint.

The tiny vocabulary holds the 256 byte symbols with id = byte value (so 'Ġ' = byte 32 has id
32, 't' id 116), then the results of `MERGES` in order (ids 256..262).
"""

import json
import pickle

import numpy as np
import pytest

from vae_jax.data import bpe as bpe_lib
from vae_jax.data.bpe import ID_OFFSET, GPT2Tokenizer
from vae_jax.data.vocab import BOS, EOS, PAD, UNK

BYTE = bpe_lib.bytes_to_unicode()

# Rank order: a lower rank is merged first.
MERGES = [('Ġ', 't'), ('h', 'e'), ('Ġt', 'he'), ('l', 'o'), ('lo', 'w'), ('e', 'r'), ('a', 'a')]


def _encoder(merges=MERGES):
  encoder = {c: b for b, c in BYTE.items()}
  for a, b in merges:
    encoder.setdefault(a + b, len(encoder))
  return encoder


def _write(path, encoder=None, merges=MERGES, header=True, indent=None):
  """Writes vocab.json and merges.txt in the Hugging Face layout; returns the directory."""
  path.mkdir(parents=True, exist_ok=True)
  encoder = _encoder(merges) if encoder is None else encoder
  (path / 'vocab.json').write_text(json.dumps(encoder, ensure_ascii=False, indent=indent),
                                   encoding='utf-8')
  lines = (['#version: 0.2'] if header else []) + [f'{a} {b}' for a, b in merges]
  (path / 'merges.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return path


@pytest.fixture
def tok(tmp_path):
  return GPT2Tokenizer.from_dir(_write(tmp_path / 'gpt2'))


# bytes_to_unicode and pre-tokenisation.


def test_bytes_to_unicode_is_gpt2s_bijection():
  assert sorted(BYTE) == list(range(256))
  assert len(set(BYTE.values())) == 256
  # Printable bytes map to themselves, the 68 others to U+0100.. in byte order.
  assert all(BYTE[b] == chr(b) for b in (*range(33, 127), *range(161, 173), *range(174, 256)))
  assert sorted(ord(c) for b, c in BYTE.items() if BYTE[b] != chr(b)) == list(range(256, 324))
  assert BYTE[0] == 'Ā' and BYTE[10] == 'Ċ' and BYTE[32] == 'Ġ' == '\u0120'
  assert BYTE[127] == 'ġ' and BYTE[173] == 'Ń'  # DEL, soft hyphen (the last one).


@pytest.mark.parametrize('text, pieces', [
    ("they're here", ['they', "'re", ' here']),
    ("I'll've don't", ['I', "'ll", "'ve", ' don', "'t"]),
    ('abc123def 2024 cats', ['abc', '123', 'def', ' 2024', ' cats']),
    ('Hello, world!?', ['Hello', ',', ' world', '!?']),
    ('snake_case __init__', ['snake', '_', 'case', ' __', 'init', '__']),
    # A whitespace run gives all but its last space to a piece; the word keeps that one.
    ('a  b\n\n c ', ['a', ' ', ' b', '\n\n', ' c', ' ']),
    ('café 日本語', ['café', ' 日本語']),
    ('<|endoftext|>', ['<|', 'endoftext', '|>']),  # Literal text, not a control token.
])
def test_pretokenize_follows_gpt2s_pattern(text, pieces):
  assert bpe_lib.pretokenize(text) == pieces
  assert ''.join(pieces) == text


def test_pretokenize_groups_non_decimal_numerals_with_letters():
  # The documented approximation of \p{N}: GPT-2 gives ['x', '½'] and ['Ⅻ'].
  assert bpe_lib.pretokenize('x½ Ⅻ') == ['x½', ' Ⅻ']


# BPE merges.


def test_encode_applies_merges_in_rank_order(tok):
  # ' the' = Ġ t h e: ranked pairs (Ġ,t)=0, (h,e)=1 -> Ġt h e -> (h,e)=1 -> Ġt he
  #   -> (Ġt,he)=2 -> Ġthe.
  # ' lower' = Ġ l o w e r: (l,o)=3, (e,r)=5 -> Ġ lo w e r -> (lo,w)=4 -> Ġ low e r
  #   -> (e,r)=5 -> Ġ low er  (no merge joins Ġ with l).
  assert tok.tokenize(' the lower') == ['Ġthe', 'Ġ', 'low', 'er']
  assert tok.encode(' the lower') == [258, 32, 260, 261]
  # 'the' without a space: t h e -> (h,e)=1 -> t he; no (t,he) merge.
  assert tok.tokenize('the') == ['t', 'he']


def test_lower_rank_merge_wins_over_a_later_one(tmp_path):
  # 'her' = h e r: (h,e) has rank 1, (e,r) rank 5 -> he r; (he,r) has no rank.
  assert GPT2Tokenizer.from_dir(_write(tmp_path / 'a')).tokenize('her') == ['he', 'r']
  # With (e,r) ranked before (h,e): h er.
  swapped = [('e', 'r'), ('h', 'e')]
  assert GPT2Tokenizer.from_dir(_write(tmp_path / 'b', merges=swapped)).tokenize('her') == [
      'h', 'er']


def test_merge_applies_to_every_occurrence_left_to_right(tok):
  # l o l o: (l,o) at 0 and 2 -> lo lo.  a a a: (a,a) at 0 is taken, its right 'a' is used
  # up, so the last 'a' stays -> aa a.
  assert tok.tokenize('lolo') == ['lo', 'lo']
  assert tok.tokenize('aaa') == ['aa', 'a']
  assert tok.bpe('Ġthe') == ('Ġthe',)


def test_multibyte_characters_become_byte_symbols(tok):
  # 'é' = UTF-8 C3 A9 -> 'Ã' '©' (printable bytes map to themselves); ' ' -> 'Ġ'.
  assert tok.tokenize(' é') == ['Ġ', 'Ã', '©']
  assert tok.encode('é') == [0xC3, 0xA9]


@pytest.mark.parametrize('text', [
    'Hello, world!', "they're 42 lower-case", 'café 日本 🙂 x½', 'a  b\n\n c ', '\t x \u00a0y\r\n',
    '', '<|endoftext|>'])
def test_decode_inverts_encode(tok, text):
  assert tok.decode(tok.encode(text)) == text
  assert tok.decode_ids(tok.encode_ids(text)) == text


def test_decode_replaces_invalid_utf8(tok):
  assert tok.decode([0xC3]) == '\ufffd'  # The first byte of 'é' alone.
  assert tok.decode(np.array([0x61, 0xC3, 0xA9])) == 'aé'
  with pytest.raises(ValueError, match='outside'):
    tok.decode([263])


# Project ids.


def test_project_ids_are_gpt2_ids_plus_offset(tok):
  assert ID_OFFSET == 4
  assert tok.vocab_size == 263 + ID_OFFSET
  ids = tok.encode_ids(' the lower')
  assert ids.dtype == np.int32
  np.testing.assert_array_equal(ids, np.array([258, 32, 260, 261]) + 4)
  assert tok.encode_ids('').shape == (0,) and tok.encode_ids('').dtype == np.int32


def test_decode_ids_stops_at_eos_and_skips_pad_and_bos(tok):
  the, lower = tok.encode_ids(' the'), tok.encode_ids(' lower')
  ids = np.concatenate([[BOS], the, [PAD], lower, [EOS], the, [PAD]])
  assert tok.decode_ids(ids) == ' the lower'
  assert tok.decode_ids([UNK, *the, UNK, EOS]) == '<unk> the <unk>'
  with pytest.raises(ValueError, match='outside'):
    tok.decode_ids([tok.vocab_size])


def test_encode_words_maps_unknown_markers_to_unk(tok):
  ids = tok.encode_words(['the', '<unk>', 'lower', '_UNK', '<UNK>', 'the'])
  # 'the' -> t he; each marker (with the space before it) -> UNK; the next word keeps its
  # leading space: ' lower' -> Ġ low er, ' the' -> Ġthe.
  expected = [116, 257, UNK - 4, 32, 260, 261, UNK - 4, UNK - 4, 258]
  np.testing.assert_array_equal(ids, np.array(expected) + 4)
  assert ids.dtype == np.int32
  assert tok.decode_ids(ids) == 'the <unk> lower <unk> <unk> the'
  np.testing.assert_array_equal(tok.encode_words(['<unk>', 'the']), [UNK, 258 + 4])
  np.testing.assert_array_equal(tok.encode_words(['the', 'lower']), tok.encode_ids('the lower'))
  assert tok.encode_words([]).shape == (0,)
  with pytest.raises(TypeError, match='sequence of words'):
    tok.encode_words('the lower')


# Identity and errors.


def test_fingerprint_depends_on_content_not_formatting(tmp_path):
  a = GPT2Tokenizer.from_dir(_write(tmp_path / 'a'))
  b = GPT2Tokenizer.from_dir(_write(tmp_path / 'b', header=False, indent=2))
  assert a.fingerprint() == b.fingerprint() == GPT2Tokenizer(_encoder(), MERGES).fingerprint()
  swapped = MERGES[:-2] + MERGES[:-3:-1]
  c = GPT2Tokenizer.from_dir(_write(tmp_path / 'c', merges=swapped))
  assert c.fingerprint() != a.fingerprint()


def test_pickle_roundtrip(tok):
  copy = pickle.loads(pickle.dumps(tok))
  assert copy.fingerprint() == tok.fingerprint()
  assert copy.encode(' the lower') == tok.encode(' the lower')


def test_missing_files(tmp_path):
  with pytest.raises(FileNotFoundError, match='vocab.json'):
    GPT2Tokenizer.from_dir(tmp_path / 'absent')
  path = _write(tmp_path / 'gpt2')
  (path / 'merges.txt').unlink()
  with pytest.raises(FileNotFoundError, match='merges.txt'):
    GPT2Tokenizer.from_dir(path)


def test_malformed_files(tmp_path):
  path = _write(tmp_path / 'gpt2')
  (path / 'merges.txt').write_text('#version: 0.2\nĠ t\nh e r\n', encoding='utf-8')
  with pytest.raises(ValueError, match=r"line 3: .*'h e r'"):
    GPT2Tokenizer.from_dir(path)
  (path / 'vocab.json').write_text('{"a": ', encoding='utf-8')
  with pytest.raises(ValueError, match='not valid JSON'):
    GPT2Tokenizer.from_dir(path)


def test_merge_token_absent_from_vocab(tmp_path):
  # 'z z' is a merge, but 'zz' was never added to vocab.json.
  path = _write(tmp_path / 'gpt2', encoder=_encoder(), merges=[*MERGES, ('z', 'z')])
  with pytest.raises(ValueError, match=r"rank 7 \('z z'\): the token 'zz' is not in"):
    GPT2Tokenizer.from_dir(path)


@pytest.mark.parametrize('edit, message', [
    (lambda e: e.update({'ĠĠ': e.pop('Ġ')}), 'lacks the symbols of 1 bytes'),
    (lambda e: e.update({'the': 300}), 'ids must be'),
    (lambda e: e.update({'th e': 263}), 'not a string of byte-level symbols'),
])
def test_invalid_vocab(edit, message):
  encoder = _encoder()
  edit(encoder)
  with pytest.raises(ValueError, match=message):
    GPT2Tokenizer(encoder, [])


def test_encode_rejects_non_text(tok):
  with pytest.raises(TypeError, match='str'):
    tok.encode(['the'])
