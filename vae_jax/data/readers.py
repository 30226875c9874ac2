"""Readers for the on-disk formats of the local corpora (../shared/data, see its README).

Every reader takes a path to either the compressed `FILE.xz` or the plain `FILE`: `resolve_path`
accepts the name with or without `.xz` and uses whichever exists, and `.xz` files are
decompressed on the fly with `lzma`. All files are UTF-8, one example per line, tokens separated
by whitespace; readers return lists of small frozen dataclasses and never build vocabularies.

Formats:
  * plain lines (PTB, Yahoo, SNLI): `read_lines`.
  * `label<TAB>text` (short_yelp): `read_labeled_lines`.
  * label in the file name, e.g. `sentiment.dev.0` / `sentiment.dev.1` (Shen et al. 2017
    Yelp): `read_label_per_file`.
  * SST PTB-format trees, `(3 (2 The) (2 Rock) ...)` (Socher et al. 2013): `read_sst_trees`
    (leaves + root label, fine-grained 0-4 or binary SST-2).
  * DailyDialog (Li et al. 2017): `read_dailydialog` (turns split on `__eou__`, aligned with
    the per-turn act and emotion files) and `dialogue_utterances` (one example per turn).
"""

from __future__ import annotations

import dataclasses
import lzma
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Literal

from absl import logging
from etils import epath

from vae_jax import errors

PathLike = os.PathLike[str] | str

XZ_SUFFIX = '.xz'

# DailyDialog label ids as in the release (README of ../shared/data).
DAILYDIALOG_ACTS = ('inform', 'question', 'directive', 'commissive')  # ids 1..4 in the files
DAILYDIALOG_EMOTIONS = ('none', 'anger', 'disgust', 'fear', 'happiness', 'sadness', 'surprise')
_EOU = '__eou__'


@dataclasses.dataclass(frozen=True)
class Example:
  """One sentence (or document).

  Attributes:
    tokens: the whitespace-separated tokens, as in the file.
    label: a 0-based class id where the corpus has one, else None.
    factors: optional discrete attributes of the example, e.g. the latent factors of the
      synthetic corpus or DailyDialog's (act, emotion); names are in the corpus registry.
  """
  tokens: tuple[str, ...]
  label: int | None = None
  factors: tuple[int, ...] | None = None

  @property
  def text(self) -> str:
    return ' '.join(self.tokens)


@dataclasses.dataclass(frozen=True)
class Turn:
  """One DailyDialog turn: its tokens, dialogue act (1-4 as in the file) and emotion (0-6)."""
  tokens: tuple[str, ...]
  act: int
  emotion: int


@dataclasses.dataclass(frozen=True)
class Dialogue:
  """A DailyDialog dialogue; `index` is its 0-based line number in the source file."""
  turns: tuple[Turn, ...]
  index: int


# Files.


def resolve_path(path: PathLike) -> epath.Path:
  """Returns the existing file for `path`, trying it as given and with/without `.xz`.

  Raises:
    FileNotFoundError: naming every candidate that was tried.
  """
  path = epath.Path(path)
  if path.name.endswith(XZ_SUFFIX):
    candidates = [path, path.parent / path.name[:-len(XZ_SUFFIX)]]
  else:
    candidates = [path, path.parent / (path.name + XZ_SUFFIX)]
  for c in candidates:
    if c.is_file():
      return c
  if not path.parent.is_dir():
    raise errors.DataNotFoundError(
        f'Directory not found: {path.parent} (looking for {path.name}). Check the data '
        'directory you passed (the corpora live in ../shared/data relative to the checkout).')
  raise errors.DataNotFoundError(
      f'Corpus file not found: tried {" and ".join(str(c) for c in candidates)}. '
      'Check the data directory and the file name.')


# Control characters other than tab and line breaks (C0, DEL, C1). NUL is never text: a file
# holding one is a binary, zero-filled or damaged copy.
_CONTROL = re.compile('[\x01-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]')


def _line_number(text: str | bytes, position: int) -> int:
  newline = '\n' if isinstance(text, str) else b'\n'
  return text.count(newline, 0, position) + 1


def read_text(path: PathLike) -> str:
  """The decoded UTF-8 text of a file, decompressing `.xz` transparently.

  Control characters other than tab, CR and LF (C0, DEL, C1; e.g. one DEL in DailyDialog's
  training dialogues) are replaced by spaces, so they never become part of a word or a word of
  their own; how many were replaced, and the line of the first, is logged as a warning.

  Raises:
    DataError: naming the file (and line) if it is not valid `.xz`, not UTF-8, holds a NUL
      character, or holds no text at all (an empty or truncated copy).
  """
  resolved = resolve_path(path)
  data = resolved.read_bytes()
  if resolved.name.endswith(XZ_SUFFIX):
    try:
      data = lzma.decompress(data)
    except lzma.LZMAError as e:
      raise errors.DataError(f'{resolved} is not a valid .xz file ({e}); re-copy it.') from e
  try:
    text = data.decode('utf-8')
  except UnicodeDecodeError as e:
    raise errors.DataError(
        f'{resolved}, line {_line_number(data, e.start)}: not UTF-8 text ({e.reason}: byte '
        f'0x{data[e.start]:02x}); convert the file to UTF-8 (e.g. iconv -f latin1 -t utf-8) '
        'or re-copy it.') from e
  if not text.strip():
    raise errors.DataError(f'{resolved} is empty; re-copy the corpus file.')
  nul = text.find('\x00')
  if nul >= 0:
    raise errors.DataError(
        f'{resolved}, line {_line_number(text, nul)}: a NUL character inside the text (a '
        'binary, zero-filled or damaged copy); re-copy the file, or remove NUL bytes with '
        "tr -d '\\000'.")
  first = _CONTROL.search(text)
  if first is not None:
    text, count = _CONTROL.subn(' ', text)
    logging.warning('%s: replaced %d control character(s) by spaces (the first, %r, on line '
                    '%d).', resolved, count, first.group(), _line_number(text, first.start()))
  return text


def read_text_lines(path: PathLike) -> list[str]:
  """All lines of a file (see `read_text`) without their line endings.

  Lines are split on '\n' only (a '\r' before it is dropped): `str.splitlines` would also
  split on characters such as U+2028 inside a sentence and misalign line-parallel files.
  """
  lines = read_text(path).split('\n')
  if lines[-1] == '':
    lines.pop()
  return [line[:-1] if line.endswith('\r') else line for line in lines]


def _nonblank(lines: Sequence[str]) -> Iterator[tuple[int, str]]:
  """(1-based line number, line) for every line holding a token."""
  for n, line in enumerate(lines, start=1):
    if line.strip():
      yield n, line


# Formats.


def read_lines(path: PathLike) -> list[Example]:
  """One whitespace-tokenised example per line, no label (PTB, Yahoo, SNLI).

  Blank lines carry no sentence and are skipped. PTB lines start and end with a space; `split()`
  removes it. Nothing is added for the end of sentence (the pipeline appends EOS).
  """
  return [Example(tuple(line.split())) for _, line in _nonblank(read_text_lines(path))]


def read_labeled_lines(path: PathLike, sep: str = '\t') -> list[Example]:
  """`label<sep>text` lines with an integer label (short_yelp: 0 negative, 1 positive)."""
  resolved = resolve_path(path)
  out = []
  for n, line in _nonblank(read_text_lines(resolved)):
    label, found, text = line.partition(sep)
    try:
      if not found:
        raise ValueError
      out.append(Example(tuple(text.split()), int(label)))
    except ValueError:
      raise errors.DataError(
          f'{resolved}:{n}: expected "label{sep!r}text" with an integer label, got '
          f'{line[:60]!r}.') from None
  return out


def read_label_per_file(files: Mapping[int, PathLike]) -> list[Example]:
  """Concatenates plain-line files whose label is given by the file (ascending label order).

  Used for the Shen et al. (2017) Yelp data, `sentiment.{split}.0` (negative) and
  `sentiment.{split}.1` (positive).
  """
  out = []
  for label in sorted(files):
    out.extend(Example(ex.tokens, int(label)) for ex in read_lines(files[label]))
  return out


_SST_TOKEN = re.compile(r'\(|\)|[^\s()]+')


def parse_sst_tree(line: str) -> tuple[tuple[str, ...], int]:
  """Leaves and root label of one SST tree in PTB bracket format.

  `(3 (2 (2 The) (2 Rock)) (4 ...))` -> (('The', 'Rock', ...), 3). Every node is
  `(label child+)` or a leaf `(label word+)`. A few leaves hold several space-separated words
  (`(2 8 1\\/2)`); like every other file they are split on whitespace. Tokens are kept as in
  the release (brackets as -LRB- / -RRB-, `\\/` for a slash).

  Raises:
    ValueError: on unbalanced brackets, a non-integer label or trailing text.
  """
  toks = _SST_TOKEN.findall(line)
  words: list[str] = []
  depth = 0
  root_label: int | None = None
  i = 0
  while i < len(toks):
    t = toks[i]
    if t == '(':
      if depth == 0 and root_label is not None:
        raise ValueError('text after the end of the tree')
      if i + 1 >= len(toks) or not toks[i + 1].lstrip('-').isdigit():
        raise ValueError(f'expected an integer label after "(" (token {i})')
      if root_label is None:
        root_label = int(toks[i + 1])
      depth += 1
      i += 2
      if i < len(toks) and toks[i] not in ('(', ')'):  # Leaf: (label word+).
        while i < len(toks) and toks[i] not in ('(', ')'):
          words.append(toks[i])
          i += 1
        if i >= len(toks) or toks[i] != ')':
          raise ValueError(f'a leaf must hold words only (token {i})')
    elif t == ')':
      depth -= 1
      if depth < 0:
        raise ValueError('unbalanced ")"')
      i += 1
    else:
      raise ValueError(f'unexpected word {t!r} outside a leaf (token {i})')
  if depth != 0 or root_label is None:
    raise ValueError('unbalanced brackets or empty tree')
  return tuple(words), root_label


def sst_binary_label(fine_label: int) -> int | None:
  """SST-2 label of a fine-grained SST label: 0-1 -> 0 (negative), 3-4 -> 1, 2 (neutral) -> None."""
  if fine_label in (0, 1):
    return 0
  if fine_label in (3, 4):
    return 1
  if fine_label == 2:
    return None
  raise ValueError(f'SST labels are 0-4, got {fine_label}.')


def read_sst_trees(path: PathLike, binary: bool = False) -> list[Example]:
  """SST sentences (tree leaves) with the root label (Socher et al. 2013).

  Args:
    path: one tree per line (e.g. `sst/train.txt.xz`).
    binary: False keeps the 5 fine-grained labels 0-4 (SST-5); True gives SST-2: neutral
      sentences (root 2) are dropped, 0-1 become 0 (negative) and 3-4 become 1 (positive).
  """
  resolved = resolve_path(path)
  out = []
  for n, line in _nonblank(read_text_lines(resolved)):
    try:
      words, label = parse_sst_tree(line)
    except ValueError as e:
      raise errors.DataError(f'{resolved}:{n}: not a valid SST tree ({e}): {line[:60]!r}') from None
    if not 0 <= label <= 4:
      raise errors.DataError(f'{resolved}:{n}: SST root label must be 0-4, got {label}.')
    if binary:
      label = sst_binary_label(label)
      if label is None:
        continue
    out.append(Example(words, label))
  return out


def _int_labels(line: str, path: epath.Path, n: int) -> list[int]:
  try:
    return [int(x) for x in line.split()]
  except ValueError:
    raise errors.DataError(f'{path}:{n}: expected space-separated integer labels, got '
                     f'{line[:60]!r}.') from None


def read_dailydialog(dialogues: PathLike, acts: PathLike, emotions: PathLike,
                     on_mismatch: Literal['raise', 'skip'] = 'raise') -> list[Dialogue]:
  """DailyDialog dialogues with per-turn dialogue acts and emotions (Li et al. 2017).

  A dialogue line is `turn __eou__ turn __eou__ ... __eou__`; line i of the act and emotion
  files holds one label per turn of dialogue i.

  Args:
    dialogues, acts, emotions: the three aligned files of one split
      (`dialogues_{split}.txt`, `dialogues_act_{split}.txt`, `dialogues_emotion_{split}.txt`).
    on_mismatch: what to do with a dialogue whose turn count differs from its label counts:
      'raise' (default) raises a ValueError naming the line; 'skip' leaves that dialogue out
      and logs a warning. The official training file has one such dialogue (line 7852: 12
      turns, 11 labels), which `vae_jax.data.corpora` skips.

  Raises:
    ValueError: if the files have different numbers of dialogues, or (with 'raise') turn and
      label counts disagree.
  """
  if on_mismatch not in ('raise', 'skip'):
    raise ValueError(f"on_mismatch must be 'raise' or 'skip', got {on_mismatch!r}.")
  paths = [resolve_path(p) for p in (dialogues, acts, emotions)]
  d_lines, a_lines, e_lines = (read_text_lines(p) for p in paths)
  # A final newline is not a dialogue; blank lines inside would misalign the files.
  while d_lines and not d_lines[-1].strip():
    d_lines.pop()
  while a_lines and not a_lines[-1].strip():
    a_lines.pop()
  while e_lines and not e_lines[-1].strip():
    e_lines.pop()
  if not len(d_lines) == len(a_lines) == len(e_lines):
    raise errors.DataError(
        f'DailyDialog files disagree on the number of dialogues: {paths[0]} has '
        f'{len(d_lines)}, {paths[1]} has {len(a_lines)}, {paths[2]} has {len(e_lines)}. '
        'They must be the three files of the same split.')
  out = []
  skipped = []
  for i, (d, a, e) in enumerate(zip(d_lines, a_lines, e_lines)):
    n = i + 1
    parts = d.split(_EOU)
    if parts and not parts[-1].strip():
      parts = parts[:-1]  # Text after the last __eou__ is empty.
    turns = [tuple(p.split()) for p in parts]
    act_ids = _int_labels(a, paths[1], n)
    emo_ids = _int_labels(e, paths[2], n)
    if not len(turns) == len(act_ids) == len(emo_ids):
      msg = (f'DailyDialog dialogue on line {n} of {paths[0]} has {len(turns)} turns but '
             f'{len(act_ids)} act labels ({paths[1]}) and {len(emo_ids)} emotion labels '
             f'({paths[2]}).')
      if on_mismatch == 'raise':
        raise errors.DataError(msg + " Fix the files or pass on_mismatch='skip' to leave such "
                         'dialogues out.')
      skipped.append(n)
      continue
    for act, emo in zip(act_ids, emo_ids):
      if not 1 <= act <= len(DAILYDIALOG_ACTS) or not 0 <= emo < len(DAILYDIALOG_EMOTIONS):
        raise errors.DataError(f'Line {n}: act labels must be 1-4 and emotions 0-6, got act {act}, '
                         f'emotion {emo} ({paths[1]}, {paths[2]}).')
    out.append(Dialogue(
        tuple(Turn(t, act, emo) for t, act, emo in zip(turns, act_ids, emo_ids)), index=i))
  if skipped:
    logging.warning('Skipped %d DailyDialog dialogue(s) of %s whose turn and label counts '
                    'differ (lines %s).', len(skipped), paths[0], skipped[:10])
  return out


def dialogue_utterances(dialogues: Sequence[Dialogue]) -> list[Example]:
  """Every turn as its own sentence: label = dialogue act - 1 (0-3), factors = (act-1, emotion)."""
  return [Example(t.tokens, t.act - 1, (t.act - 1, t.emotion))
          for d in dialogues for t in d.turns]


def read_token_list(path: PathLike) -> list[str]:
  """One token per line (e.g. short_yelp's `vocab.txt`); use with `Vocab.from_words`."""
  return [line.strip() for _, line in _nonblank(read_text_lines(path))]
