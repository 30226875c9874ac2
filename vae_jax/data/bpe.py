"""GPT-2's byte-level BPE tokenizer, read from a checkpoint directory in the Hugging Face layout
(`vocab.json` + `merges.txt`).

References: Radford et al. 2019, "Language Models are Unsupervised Multitask Learners" (GPT-2's
byte-level BPE); Sennrich et al. 2016, "Neural Machine Translation of Rare Words with Subword
Units" (BPE).

Encoding. Text is cut into pre-tokens by GPT-2's pattern (`pretokenize`); each pre-token's UTF-8
bytes are written as printable characters (`bytes_to_unicode`: byte 32 ' ' is 'Ġ', byte 10 '\\n'
is 'Ċ'), and the merges of merges.txt are applied in rank order (`GPT2Tokenizer.bpe`): the
adjacent pair with the lowest rank is merged everywhere in the pre-token (left to right), until
no pair has a rank. Every byte has a symbol in the vocabulary, so any text encodes without
unknown tokens, and `decode(encode(text)) == text`.

Pre-tokenisation. GPT-2's pattern
  's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
needs the `regex` package for `\\p{..}`; here it is written for the stdlib `re` with
\\p{L} -> `[^\\W\\d_]` and \\p{N} -> `\\d` (so the third class becomes `[^\\s\\w]` or `_`). Letters
are matched exactly as GPT-2 matches them. \\p{N} also holds the non-decimal numerals (Unicode
categories No and Nl, e.g. '½', '²', 'Ⅻ'), which `\\d` does not match; they are word characters
that are neither digits nor '_', so `[^\\W\\d_]` matches them and they join letter runs: 'x½'
is one pre-token here and two ('x', '½') in GPT-2. `\\s` follows `str.isspace`, which also
counts the separators U+001C..U+001F. Text without such characters is split exactly as GPT-2
splits it. A literal '<|endoftext|>' in the text is encoded as ordinary text, never as GPT-2's
control token.

Project ids. Ids 0..3 of this project are PAD, BOS, EOS, UNK (`vae_jax.data.vocab`), so GPT-2
token g is project id g + ID_OFFSET and the project vocabulary has GPT-2's size + ID_OFFSET
(`vocab_size`), as in `vae_jax.nn.gpt2`. `encode_ids` returns project ids without EOS (callers
append it, as `vae_jax.data.encoding.encode` does); `decode_ids` stops at EOS.

Word-tokenised corpora. The corpora of this project are lists of words with their own unknown
markers (`<unk>`, `_UNK`, `<UNK>`; `vocab.UNK_MARKERS`). `encode_words` joins the words with
single spaces and encodes every marker as the project's UNK id instead of BPE-ing the marker's
characters; the space before a marker goes with it, so the word after it keeps its leading
space. GPT-2 never saw a UNK token: its embedding row is new (see `vae_jax.nn.gpt2` for how it
is initialised).

A tokenizer is identified by `fingerprint()` (sha256 over its token list and merges), so a
checkpoint can check that it is used with the tokenizer it was trained with.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from vae_jax import fileio
from vae_jax.data.vocab import (BOS, EOS, PAD, SPECIAL_TOKENS, UNK, UNK_MARKERS, UNK_TOKEN,
                                Vocab, VocabMismatchError)

ID_OFFSET = len(SPECIAL_TOKENS)

VOCAB_FILE = 'vocab.json'
MERGES_FILE = 'merges.txt'

_BPE_CACHE_SIZE = 1 << 17

# GPT-2's pattern for the stdlib `re` (see the module docstring for the approximation).
PRETOKENIZE_PATTERN = re.compile(
    r"""'s|'t|'re|'ve|'m|'ll|'d| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+""")


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's reversible map from bytes to printable characters.

  The printable bytes '!'..'~', '¡'..'¬' and '®'..'ÿ' map to the character with the same code;
  the other 68 bytes (controls, space, DEL, NBSP, soft hyphen) map, in increasing order, to
  chr(256), chr(257), ... (so ' ' -> 'Ġ' = U+0120 and '\\n' -> 'Ċ' = U+010A).
  """
  printable = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1),
               *range(ord('®'), ord('ÿ') + 1)]
  table = {b: chr(b) for b in printable}
  others = (b for b in range(256) if b not in table)
  table.update({b: chr(256 + n) for n, b in enumerate(others)})
  return dict(sorted(table.items()))


# str.translate tables between latin-1 text (one character per byte) and byte-level symbols.
_BYTE_TO_CHAR = bytes_to_unicode()
_CHAR_TO_BYTE = {ord(c): b for b, c in _BYTE_TO_CHAR.items()}


def pretokenize(text: str) -> list[str]:
  """Splits text into GPT-2's pre-tokens (words with their leading space, numbers,
  punctuation runs, contractions, whitespace); their concatenation is `text`."""
  return PRETOKENIZE_PATTERN.findall(text)


def _to_symbols(piece: str) -> str:
  """A pre-token's UTF-8 bytes as byte-level symbols."""
  return piece.encode('utf-8').decode('latin-1').translate(_BYTE_TO_CHAR)


def _from_symbols(tokens: Iterable[str]) -> str:
  """Text of byte-level tokens; invalid UTF-8 (e.g. a cut multi-byte character) -> U+FFFD."""
  return ''.join(tokens).translate(_CHAR_TO_BYTE).encode('latin-1').decode('utf-8', 'replace')


def _check_vocab(encoder: Mapping[str, int]) -> tuple[str, ...]:
  """The token list (index = GPT-2 id) of a vocab.json mapping; raises ValueError if invalid."""
  if not isinstance(encoder, Mapping) or not encoder:
    raise ValueError('The vocabulary must be a non-empty JSON object mapping token strings to '
                     'ids.')
  tokens: list[str | None] = [None] * len(encoder)
  for tok, idx in encoder.items():
    if not isinstance(tok, str) or isinstance(idx, bool) or not isinstance(idx, int):
      raise ValueError(f'Vocabulary entry {tok!r}: {idx!r} is not a string mapped to an int.')
    if not 0 <= idx < len(tokens) or tokens[idx] is not None:
      raise ValueError(
          f'Vocabulary ids must be 0..{len(tokens) - 1}, each used once; {tok!r} has id {idx}'
          + (f', already used by {tokens[idx]!r}' if 0 <= idx < len(tokens) else '') + '.')
    tokens[idx] = tok
  for idx, tok in enumerate(tokens):
    if not tok or any(ord(c) not in _CHAR_TO_BYTE for c in tok):
      raise ValueError(f'Vocabulary token {tok!r} (id {idx}) is not a string of byte-level '
                       f'symbols (bytes_to_unicode); this is not a byte-level BPE vocabulary.')
  missing = [b for b, c in _BYTE_TO_CHAR.items() if c not in encoder]
  if missing:
    raise ValueError(f'The vocabulary lacks the symbols of {len(missing)} bytes (first: byte '
                     f'{missing[0]} = {_BYTE_TO_CHAR[missing[0]]!r}); a byte-level BPE vocabulary '
                     'holds all 256.')
  return tuple(tokens)


def _check_merges(merges: Sequence[tuple[str, str]],
                  encoder: Mapping[str, int]) -> dict[tuple[str, str], int]:
  """Merge ranks (pair -> position in `merges`); raises ValueError if a merge is invalid."""
  ranks: dict[tuple[str, str], int] = {}
  for rank, pair in enumerate(merges):
    if len(pair) != 2:
      raise ValueError(f'Merge of rank {rank} is not a pair of tokens: {pair!r}.')
    for tok in (*pair, pair[0] + pair[1]):
      if tok not in encoder:
        raise ValueError(f"Merge of rank {rank} ('{pair[0]} {pair[1]}'): the token {tok!r} "
                         'is not in the vocabulary.')
    if tuple(pair) in ranks:
      raise ValueError(f"Merge of rank {rank} ('{pair[0]} {pair[1]}') repeats the one of rank "
                       f'{ranks[tuple(pair)]}.')
    ranks[tuple(pair)] = rank
  return ranks


def _bpe(ranks: Mapping[tuple[str, str], int], word: str) -> tuple[str, ...]:
  """Applies the ranked merges to the symbols of `word` (lowest rank first)."""
  symbols = list(word)
  while len(symbols) > 1:
    pair = min(zip(symbols, symbols[1:]), key=lambda p: ranks.get(p, len(ranks)))
    if pair not in ranks:
      break
    merged, i = [], 0
    while i < len(symbols):
      if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
        merged.append(symbols[i] + symbols[i + 1])
        i += 2
      else:
        merged.append(symbols[i])
        i += 1
    symbols = merged
  return tuple(symbols)


def _read_merges(path: pathlib.Path) -> list[tuple[str, str]]:
  """The merges of a merges.txt: an optional '#version' line, then one 'a b' per line."""
  merges = []
  for number, line in enumerate(path.read_text(encoding='utf-8').split('\n'), start=1):
    line = line.rstrip('\r')
    if not line or (number == 1 and line.startswith('#version')):
      continue
    parts = line.split(' ')
    if len(parts) != 2 or not all(parts):
      raise ValueError(f'{path}, line {number}: expected two tokens separated by one space '
                       f'("a b"), got {line!r}.')
    merges.append((parts[0], parts[1]))
  return merges


class GPT2Tokenizer:
  """GPT-2's byte-level BPE: text <-> GPT-2 ids, and text / words <-> project ids.

  Create one with `GPT2Tokenizer.from_dir(checkpoint_dir)`, or from the parsed files.
  """

  def __init__(self, encoder: Mapping[str, int], merges: Sequence[tuple[str, str]]):
    """Checks and wraps a vocabulary and its merges.

    Args:
      encoder: vocab.json, token string (byte-level symbols) -> GPT-2 id; the ids must be
        0..N-1 and the 256 byte symbols must be present.
      merges: merges.txt, (a, b) pairs in rank order; a, b and a + b must be in `encoder`.

    Raises:
      ValueError: if the vocabulary or a merge is invalid.
    """
    self._tokens = _check_vocab(encoder)
    self._encoder = {tok: i for i, tok in enumerate(self._tokens)}
    self._merges = tuple((a, b) for a, b in merges)
    self._ranks = _check_merges(self._merges, self._encoder)
    self._fingerprint = hashlib.sha256(json.dumps(
        {'tokens': self._tokens, 'merges': [f'{a} {b}' for a, b in self._merges]},
        ensure_ascii=False).encode('utf-8')).hexdigest()
    self._cached_bpe = functools.lru_cache(maxsize=_BPE_CACHE_SIZE)(
        functools.partial(_bpe, self._ranks))

  @classmethod
  def from_dir(cls, path: str | os.PathLike[str]) -> GPT2Tokenizer:
    """Reads `vocab.json` and `merges.txt` from a checkpoint directory (Hugging Face layout).

    Raises:
      FileNotFoundError: if the directory or one of the files is missing.
      ValueError: if a file is malformed or the files do not agree.
    """
    path = pathlib.Path(path)
    for name in (VOCAB_FILE, MERGES_FILE):
      if not (path / name).is_file():
        raise FileNotFoundError(
            f'GPT-2 tokenizer file not found: {path / name}. Expected a checkpoint directory '
            f'in the Hugging Face layout with {VOCAB_FILE} and {MERGES_FILE} (the files of the '
            'gpt2 model repository).')
    try:
      encoder = json.loads((path / VOCAB_FILE).read_text(encoding='utf-8'))
    except json.JSONDecodeError as e:
      raise ValueError(f'{path / VOCAB_FILE} is not valid JSON ({e}).') from e
    merges = _read_merges(path / MERGES_FILE)
    try:
      return cls(encoder, merges)
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from e

  def __reduce__(self):
    return (type(self), (self._encoder, self._merges))

  def __repr__(self) -> str:
    return (f'GPT2Tokenizer(gpt2_tokens={len(self._tokens)}, merges={len(self._merges)}, '
            f'fingerprint={self._fingerprint[:12]})')

  @property
  def vocab_size(self) -> int:
    """Size of the project vocabulary: GPT-2's tokens + ID_OFFSET special ids."""
    return len(self._tokens) + ID_OFFSET

  def fingerprint(self) -> str:
    """sha256 hex digest of the token list (in id order) and the merges (in rank order): equal
    for equal tokenizers, whatever the formatting of their files."""
    return self._fingerprint

  # GPT-2 ids.

  def bpe(self, word: str) -> tuple[str, ...]:
    """The BPE tokens of one pre-token written in byte-level symbols (memoised per instance)."""
    return self._cached_bpe(word)

  def tokenize(self, text: str) -> list[str]:
    """The BPE tokens of `text`, as byte-level symbol strings (e.g. 'Ġthe')."""
    if not isinstance(text, str):
      raise TypeError(f'Expected text (str), got {type(text).__name__}.')
    return [tok for piece in pretokenize(text) for tok in self.bpe(_to_symbols(piece))]

  def encode(self, text: str) -> list[int]:
    """GPT-2 ids of `text` (no special tokens added)."""
    encoder = self._encoder
    return [encoder[tok] for tok in self.tokenize(text)]

  def decode(self, ids: Iterable[int]) -> str:
    """Text of GPT-2 ids; invalid UTF-8 (e.g. a cut multi-byte character) becomes U+FFFD."""
    return _from_symbols(self._token(i) for i in ids)

  def _token(self, gpt2_id: int) -> str:
    gpt2_id = int(gpt2_id)
    if not 0 <= gpt2_id < len(self._tokens):
      raise ValueError(f'GPT-2 id {gpt2_id} is outside this vocabulary of {len(self._tokens)} '
                       'tokens.')
    return self._tokens[gpt2_id]

  # Project ids.

  def encode_ids(self, text: str) -> np.ndarray:
    """int32 project ids of `text` (GPT-2 id + ID_OFFSET; no EOS appended)."""
    return np.asarray(self.encode(text), dtype=np.int32).reshape(-1) + np.int32(ID_OFFSET)

  def encode_words(self, words: Sequence[str]) -> np.ndarray:
    """int32 project ids of a word-tokenised sentence joined with single spaces; unknown
    markers (`<unk>`, `_UNK`, `<UNK>`) become UNK (no EOS appended)."""
    if isinstance(words, str):
      raise TypeError('encode_words expects a sequence of words, not a string; use '
                      'encode_ids(text) for text.')
    ids: list[int] = []
    run: list[str] = []

    def flush():
      if run:
        text = ' '.join(run)
        ids.extend(g + ID_OFFSET for g in self.encode(' ' + text if ids else text))
        run.clear()

    for word in words:
      if word in UNK_MARKERS:
        flush()
        ids.append(UNK)
      else:
        run.append(word)
    flush()
    return np.asarray(ids, dtype=np.int32).reshape(-1)

  def decode_ids(self, ids: Iterable[int]) -> str:
    """Text of project ids up to the first EOS; PAD and BOS are skipped, and UNK is written as
    '<unk>', separated by a space from the text before it (it stands for a whole word)."""
    text, tokens = '', []
    for i in ids:
      i = int(i)
      if i == EOS:
        break
      if i in (PAD, BOS):
        continue
      if i == UNK:
        text += _from_symbols(tokens)
        tokens = []
        text += UNK_TOKEN if not text or text[-1].isspace() else ' ' + UNK_TOKEN
      elif ID_OFFSET <= i < self.vocab_size:
        tokens.append(self._tokens[i - ID_OFFSET])
      else:
        raise ValueError(f'Project id {i} is outside this vocabulary of size {self.vocab_size}.')
    return text + _from_symbols(tokens)


class BPEVocab:
  """The `vae_jax.data.vocab.Vocab` interface over a GPT-2 tokenizer, so the data pipeline,
  training loop and evaluation run unchanged on GPT-2's sub-word ids: `encode(words)` BPE-encodes
  a word-tokenised sentence (`GPT2Tokenizer.encode_words`), `decode(ids)` returns the detokenised
  text as a one-element list (callers join with spaces), and `save` writes a small JSON naming
  the tokenizer directory and its fingerprint, which `load` checks."""

  KIND = 'gpt2_bpe'

  def __init__(self, tokenizer: GPT2Tokenizer, directory: str | os.PathLike[str]):
    self.tokenizer = tokenizer
    self.directory = str(directory)

  @classmethod
  def from_dir(cls, path: str | os.PathLike[str]) -> BPEVocab:
    return cls(GPT2Tokenizer.from_dir(path), path)

  def __len__(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def fingerprint(self) -> str:
    return self.tokenizer.fingerprint()

  def encode(self, tokens: Sequence[str]) -> list[int]:
    return self.tokenizer.encode_words(tokens).tolist()

  def decode(self, ids: Iterable[int]) -> list[str]:
    return [self.tokenizer.decode_ids(ids)]

  def assert_compatible(self, other: BPEVocab) -> None:
    if getattr(other, 'fingerprint', None) != self.fingerprint:
      raise VocabMismatchError(
          f'Tokenizer mismatch: expected the GPT-2 tokenizer with fingerprint '
          f'{self.fingerprint[:12]}, got {type(other).__name__} with fingerprint '
          f'{str(getattr(other, "fingerprint", None))[:12]}. Token ids of one tokenizer are '
          'meaningless under another: use the tokenizer the workdir was trained with, or a '
          'fresh workdir.')

  def save(self, path: str | os.PathLike[str]) -> None:
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_json_atomic(path, {'kind': self.KIND, 'directory': self.directory,
                                    'fingerprint': self.fingerprint}, indent=0)

  @classmethod
  def load(cls, path: str | os.PathLike[str]) -> BPEVocab:
    saved = json.loads(pathlib.Path(path).read_text())
    vocab = cls.from_dir(saved['directory'])
    if vocab.fingerprint != saved['fingerprint']:
      raise VocabMismatchError(
          f"The tokenizer in {saved['directory']} (fingerprint {vocab.fingerprint[:12]}) is not "
          f"the one {path} was written with ({saved['fingerprint'][:12]}).")
    return vocab


def load_vocabulary(path: str | os.PathLike[str]) -> Vocab | BPEVocab:
  """The vocabulary saved at `path` by `Vocab.save` or `BPEVocab.save`."""
  saved = json.loads(pathlib.Path(path).read_text())
  if isinstance(saved, dict) and saved.get('kind') == BPEVocab.KIND:
    return BPEVocab.load(path)
  return Vocab.load(path)
