"""Tests for vae_jax.data.readers (on small files written to tmp_path)."""

import lzma

import pytest

from vae_jax import errors
from vae_jax.data import readers
from vae_jax.data.readers import Example


def write(path, text, xz=False):
  if xz:
    path = path.parent / (path.name + '.xz')
    with lzma.open(path, 'wt', encoding='utf-8') as f:
      f.write(text)
  else:
    path.write_text(text, encoding='utf-8')
  return path


@pytest.mark.parametrize('xz', [False, True])
def test_read_lines_plain_and_xz(tmp_path, xz):
  write(tmp_path / 'c.txt', ' a b \n\nc  d\u2028e\r\n', xz=xz)
  # Either name works; blank lines are skipped; only '\n' ends a line.
  for name in ('c.txt', 'c.txt.xz'):
    assert readers.read_lines(tmp_path / name) == [
        Example(('a', 'b')), Example(('c', 'd', 'e'))]


def test_missing_and_empty_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'c\.txt and .*c\.txt\.xz'):
    readers.read_lines(tmp_path / 'c.txt')
  with pytest.raises(FileNotFoundError, match='Directory not found'):
    readers.read_lines(tmp_path / 'nope' / 'c.txt')
  write(tmp_path / 'e.txt', '\n \n')
  with pytest.raises(ValueError, match='is empty'):
    readers.read_lines(tmp_path / 'e.txt')
  (tmp_path / 'broken.txt.xz').write_bytes(b'not xz')
  with pytest.raises(ValueError, match='not a valid .xz'):
    readers.read_lines(tmp_path / 'broken.txt.xz')


def test_labeled_lines(tmp_path):
  write(tmp_path / 'y.txt', '1\tgreat food !\n0\tbad .\n', xz=True)
  assert readers.read_labeled_lines(tmp_path / 'y.txt') == [
      Example(('great', 'food', '!'), 1), Example(('bad', '.'), 0)]
  write(tmp_path / 'bad.txt', '1\tok\nno label here\n')
  with pytest.raises(ValueError, match=r'bad\.txt:2: expected "label'):
    readers.read_labeled_lines(tmp_path / 'bad.txt')


def test_label_per_file(tmp_path):
  neg = write(tmp_path / 'sentiment.dev.0', 'awful .\n')
  pos = write(tmp_path / 'sentiment.dev.1', 'nice .\ngood\n', xz=True)
  assert readers.read_label_per_file({1: pos, 0: neg}) == [
      Example(('awful', '.'), 0), Example(('nice', '.'), 1), Example(('good',), 1)]


def test_parse_sst_tree():
  line = '(3 (2 (2 The) (2 Rock)) (4 (2 is) (4 (2 8 1\\/2) (3 great))))'
  assert readers.parse_sst_tree(line) == (('The', 'Rock', 'is', '8', '1\\/2', 'great'), 3)
  assert readers.parse_sst_tree('(1 (1 -LRB-) (2 x))') == (('-LRB-', 'x'), 1)
  for bad in ('(3 (2 a)', '(x (2 a))', '(3 a (2 b))', '(2 a) (3 b)', ''):
    with pytest.raises(ValueError):
      readers.parse_sst_tree(bad)


def test_sst_fine_and_binary(tmp_path):
  trees = '(0 (0 bad))\n(2 (2 meh))\n(4 (4 wow))\n(1 (1 poor))\n(3 (3 nice))\n'
  write(tmp_path / 'dev.txt', trees, xz=True)
  fine = readers.read_sst_trees(tmp_path / 'dev.txt')
  assert [e.label for e in fine] == [0, 2, 4, 1, 3]
  binary = readers.read_sst_trees(tmp_path / 'dev.txt', binary=True)
  assert [(e.tokens[0], e.label) for e in binary] == [
      ('bad', 0), ('wow', 1), ('poor', 0), ('nice', 1)]
  write(tmp_path / 'bad.txt', '(2 (2 ok))\n(2 (2 ok)\n')
  with pytest.raises(ValueError, match=r'bad\.txt:2: not a valid SST tree'):
    readers.read_sst_trees(tmp_path / 'bad.txt')


def _dialog_files(tmp_path, acts='2 1 \n3 4 1 \n', emotions='0 4 \n0 0 6 \n'):
  d = write(tmp_path / 'dialogues_x.txt',
            'Hi , Bob . __eou__ Hello ! __eou__\nCome here . __eou__ OK . __eou__ Thanks __eou__\n',
            xz=True)
  a = write(tmp_path / 'dialogues_act_x.txt', acts)
  e = write(tmp_path / 'dialogues_emotion_x.txt', emotions)
  return d, a, e


def test_dailydialog_turns_and_labels(tmp_path):
  dialogues = readers.read_dailydialog(*_dialog_files(tmp_path))
  assert len(dialogues) == 2
  assert dialogues[0].turns == (readers.Turn(('Hi', ',', 'Bob', '.'), 2, 0),
                                readers.Turn(('Hello', '!'), 1, 4))
  assert [t.act for t in dialogues[1].turns] == [3, 4, 1]
  utts = readers.dialogue_utterances(dialogues)
  assert len(utts) == 5
  assert utts[0] == Example(('Hi', ',', 'Bob', '.'), 1, (1, 0))
  assert utts[4] == Example(('Thanks',), 0, (0, 6))


def test_dailydialog_mismatch(tmp_path):
  files = _dialog_files(tmp_path, acts='2 1 \n3 4 \n')
  with pytest.raises(ValueError, match='line 2 .* has 3 turns but 2 act labels'):
    readers.read_dailydialog(*files)
  kept = readers.read_dailydialog(*files, on_mismatch='skip')
  assert [d.index for d in kept] == [0]
  files = _dialog_files(tmp_path, emotions='0 4 \n')
  with pytest.raises(ValueError, match='disagree on the number of dialogues'):
    readers.read_dailydialog(*files)
  with pytest.raises(ValueError, match='on_mismatch'):
    readers.read_dailydialog(*files, on_mismatch='ignore')


def test_read_token_list(tmp_path):
  write(tmp_path / 'vocab.txt', '<pad>\n<s>\nthe\n', xz=True)
  assert readers.read_token_list(tmp_path / 'vocab.txt') == ['<pad>', '<s>', 'the']


def test_a_nul_character_is_an_error_naming_file_and_line(tmp_path):
  write(tmp_path / 'n.txt', 'a b\nc\x00d e\n')
  with pytest.raises(errors.DataError, match=r'n\.txt, line 2: a NUL character'):
    readers.read_lines(tmp_path / 'n.txt')


def test_other_control_characters_are_replaced_by_spaces_and_counted(tmp_path, caplog):
  # One DEL stands alone in DailyDialog's training dialogues; a control character inside a
  # word splits it rather than becoming part of a vocabulary word.
  write(tmp_path / 'c.txt', 'a b\nc . \x7f d\x01e\n')
  with caplog.at_level('WARNING'):
    assert readers.read_lines(tmp_path / 'c.txt') == [
        Example(('a', 'b')), Example(('c', '.', 'd', 'e'))]
  assert "replaced 2 control character(s)" in caplog.text and 'on line 2' in caplog.text


def test_text_that_is_not_utf8_names_its_line(tmp_path):
  (tmp_path / 'l.txt').write_bytes('a b\nc d\ncaf\xe9\n'.encode('latin-1'))
  with pytest.raises(errors.DataError, match=r'l\.txt, line 3: not UTF-8'):
    readers.read_lines(tmp_path / 'l.txt')
