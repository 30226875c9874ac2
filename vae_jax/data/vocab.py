"""Token vocabulary with fixed special ids, deterministic construction and JSON storage.

The ids of the special tokens are a contract shared by every model, loss and decoder of the
library (docs/design.md): `PAD=0, BOS=1, EOS=2, UNK=3`. Corpora write unknown words in different
ways (`<unk>` in PTB/SNLI/Yelp, `_UNK` in Yahoo, `<UNK>` elsewhere); all of them map to `UNK`, so a
corpus's own unknown marker never becomes an ordinary word and UNK counts are comparable.

A literal special string in the text (for example a `<s>` or `</s>` typed in a review) must never
turn into a control id: a `</s>` in the middle of a sentence would end it early, a `<pad>` would
be masked out of the loss. `encode` therefore maps such strings to `UNK`, and `build` never
counts them as words.

A vocabulary is identified by its `fingerprint` (sha256 of the token list). A model's embedding
rows are only meaningful with the exact vocabulary it was trained with, so the training loop
saves the vocabulary beside the checkpoints and checks it with `assert_compatible` on resume.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from etils import epath

from vae_jax import errors, fileio

PAD = 0
BOS = 1
EOS = 2
UNK = 3

PAD_TOKEN = '<pad>'
BOS_TOKEN = '<s>'
EOS_TOKEN = '</s>'
UNK_TOKEN = '<unk>'

# Index i holds the string of id i.
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN, UNK_TOKEN)
NUM_SPECIAL = len(SPECIAL_TOKENS)

# Unknown-word markers used by the corpora in ../shared/data (see its README): all map to UNK.
UNK_MARKERS: frozenset[str] = frozenset({'<unk>', '_UNK', '<UNK>'})

# Strings that never become ordinary words: specials (as literal text) and unknown markers.
_RESERVED: frozenset[str] = frozenset(SPECIAL_TOKENS) | UNK_MARKERS

_FILE_FORMAT = 'vae_jax.vocab'
_FILE_VERSION = 1


# Two vocabularies that must be identical (e.g. checkpoint vs. current data) differ.
VocabMismatchError = errors.VocabMismatchError


def _fingerprint(tokens: Sequence[str]) -> str:
  """sha256 over the newline-joined token list (tokens never contain whitespace)."""
  return hashlib.sha256('\n'.join(tokens).encode('utf-8')).hexdigest()


class Vocab:
  """An immutable mapping between token strings and integer ids.

  Ids 0..3 are always `<pad>`, `<s>`, `</s>`, `<unk>`; words follow from id 4. Create one with
  `Vocab.build` (from a training split), `Vocab.from_words` or `Vocab.load`.
  """

  __slots__ = ('_tokens', '_index', '_fingerprint')

  def __init__(self, tokens: Sequence[str]):
    """Wraps a full token list whose first four entries are `SPECIAL_TOKENS`.

    Args:
      tokens: every token, index = id. Words must be unique, non-empty, whitespace-free and
        must not be special strings or unknown markers.

    Raises:
      ValueError: if the list does not start with the special tokens or a word is invalid.
    """
    tokens = tuple(tokens)
    if tokens[:NUM_SPECIAL] != SPECIAL_TOKENS:
      raise ValueError(
          f'A vocabulary must start with the special tokens {list(SPECIAL_TOKENS)} (ids 0-3); '
          f'got {list(tokens[:NUM_SPECIAL])}. Use Vocab.from_words(words) to add them.')
    index: dict[str, int] = {}
    for i, tok in enumerate(tokens):
      if i >= NUM_SPECIAL:
        if not tok or tok != tok.strip() or len(tok.split()) != 1:
          raise ValueError(f'Vocabulary word at id {i} is empty or contains whitespace: {tok!r}.')
        if tok in _RESERVED:
          raise ValueError(
              f'Vocabulary word at id {i} is the reserved string {tok!r} (a special token or '
              f'unknown marker); reserved strings only live at ids 0-3.')
      if tok in index:
        raise ValueError(f'Duplicate vocabulary token {tok!r} at ids {index[tok]} and {i}.')
      index[tok] = i
    object.__setattr__(self, '_tokens', tokens)
    object.__setattr__(self, '_index', index)
    object.__setattr__(self, '_fingerprint', _fingerprint(tokens))

  def __setattr__(self, name: str, value: Any) -> None:
    raise AttributeError('Vocab is immutable.')

  def __delattr__(self, name: str) -> None:
    raise AttributeError('Vocab is immutable.')

  # Construction.

  @classmethod
  def from_words(cls, words: Iterable[str]) -> Vocab:
    """Vocabulary of the special tokens followed by `words` (order kept, reserved skipped)."""
    seen = set()
    kept = []
    for w in words:
      if w in _RESERVED or w in seen:
        continue
      seen.add(w)
      kept.append(w)
    return cls(SPECIAL_TOKENS + tuple(kept))

  @classmethod
  def build(cls, token_lists: Iterable[Sequence[str]], max_size: int | None = None,
            min_count: int = 1) -> Vocab:
    """Builds a vocabulary from tokenised sentences (normally the training split only).

    Words are ordered by count (descending), ties broken by the token string, so the result
    depends only on the multiset of tokens, not on sentence order or hash seeds. Special strings
    and unknown markers in the text are not counted (they encode to UNK).

    Args:
      token_lists: an iterable of token sequences.
      max_size: the largest allowed `len(vocab)`, the four special tokens included (so
        `max_size=10_000` keeps the 9,996 most frequent words); `None` keeps every word.
      min_count: words seen fewer times are left out (they encode to UNK).

    Returns:
      The vocabulary.
    """
    if max_size is not None and max_size < NUM_SPECIAL:
      raise ValueError(
          f'max_size={max_size} is smaller than the {NUM_SPECIAL} special tokens it must hold; '
          f'pass max_size >= {NUM_SPECIAL} or None for no limit.')
    if min_count < 1:
      raise ValueError(f'min_count={min_count} must be >= 1.')
    if isinstance(token_lists, str):
      raise TypeError('token_lists must be an iterable of token sequences, not a string.')
    counts: collections.Counter[str] = collections.Counter()
    for tokens in token_lists:
      if isinstance(tokens, str):
        raise TypeError(
            'token_lists must hold token sequences (e.g. tuples of strings), got a string; '
            'split the text first (e.g. line.split()).')
      counts.update(tokens)
    words = sorted(
        (w for w, c in counts.items() if c >= min_count and w not in _RESERVED),
        key=lambda w: (-counts[w], w))
    if max_size is not None:
      words = words[:max_size - NUM_SPECIAL]
    return cls(SPECIAL_TOKENS + tuple(words))

  # Lookup.

  def __len__(self) -> int:
    return len(self._tokens)

  def __contains__(self, token: object) -> bool:
    return token in self._index

  def __iter__(self) -> Iterator[str]:
    return iter(self._tokens)

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Vocab) and self._tokens == other._tokens

  def __hash__(self) -> int:
    return hash(self._fingerprint)

  def __repr__(self) -> str:
    return f'Vocab(size={len(self)}, fingerprint={self._fingerprint[:12]})'

  @property
  def tokens(self) -> tuple[str, ...]:
    """All tokens, index = id."""
    return self._tokens

  @property
  def fingerprint(self) -> str:
    """sha256 hex digest of the token list: equal fingerprints <=> identical vocabularies."""
    return self._fingerprint

  def token_to_id(self, token: str) -> int:
    """Id of `token`; unknown words, unknown markers and literal special strings give UNK."""
    if token in _RESERVED:
      return UNK
    return self._index.get(token, UNK)

  def id_to_token(self, idx: int) -> str:
    """String of id `idx`."""
    idx = int(idx)
    if not 0 <= idx < len(self._tokens):
      raise ValueError(f'Token id {idx} is outside this vocabulary of size {len(self)}.')
    return self._tokens[idx]

  def encode(self, tokens: Sequence[str]) -> list[int]:
    """Maps words to ids (no BOS/EOS added; see `vae_jax.data.pipeline` for that)."""
    if isinstance(tokens, str):
      raise TypeError('encode expects a sequence of tokens, not a string; use text.split().')
    index = self._index
    return [UNK if t in _RESERVED else index.get(t, UNK) for t in tokens]

  def decode(self, ids: Iterable[int], strip_special: bool = True) -> list[str]:
    """Maps ids back to strings, up to the first EOS.

    Args:
      ids: token ids (a list, or a 1-D numpy / jax array).
      strip_special: if True (the default, for reading model output), PAD, BOS and the EOS
        are left out; UNK stays visible as `<unk>`. If False, they are kept as strings and the
        EOS that ends the sequence is included (for inspecting batches and decoder output).

    Returns:
      The list of token strings.
    """
    out = []
    for i in ids:
      i = int(i)
      if i == EOS:
        if not strip_special:
          out.append(EOS_TOKEN)
        break
      if strip_special and i in (PAD, BOS):
        continue
      out.append(self.id_to_token(i))
    return out

  # Compatibility.

  def assert_compatible(self, other: Vocab) -> None:
    """Raises `VocabMismatchError` unless `other` is identical to this (the expected) vocab.

    The message says how they differ (size, first differing id) and how to fix it.
    """
    if not isinstance(other, Vocab):
      raise TypeError(f'Expected a Vocab, got {type(other).__name__}.')
    if self._fingerprint == other._fingerprint:
      return
    diff = next((i for i, (a, b) in enumerate(zip(self._tokens, other._tokens)) if a != b), None)
    if diff is None:
      where = (f'the first {min(len(self), len(other))} tokens agree, then one vocabulary '
               'continues')
    else:
      where = (f'first difference at id {diff}: expected {self._tokens[diff]!r}, '
               f'got {other._tokens[diff]!r}')
    raise VocabMismatchError(
        f'Vocabulary mismatch: expected {len(self)} tokens (fingerprint '
        f'{self._fingerprint[:12]}), got {len(other)} (fingerprint {other._fingerprint[:12]}); '
        f'{where}. Token ids of one vocabulary are meaningless under another: use the '
        'vocabulary saved in the workdir (Vocab.load) with its checkpoints, or start a fresh '
        'workdir to train with the new vocabulary.')

  # Storage.

  def to_json(self) -> dict[str, Any]:
    """JSON-able description (the format written by `save`)."""
    return {
        'format': _FILE_FORMAT,
        'version': _FILE_VERSION,
        'size': len(self),
        'fingerprint': self._fingerprint,
        'tokens': list(self._tokens),
    }

  @classmethod
  def from_json(cls, obj: dict[str, Any]) -> Vocab:
    """Inverse of `to_json`; checks the stored fingerprint."""
    if not isinstance(obj, dict) or obj.get('format') != _FILE_FORMAT or 'tokens' not in obj:
      raise ValueError(f'Not a vae_jax vocabulary (expected a JSON object with format '
                       f'{_FILE_FORMAT!r} and a token list).')
    vocab = cls(obj['tokens'])
    if obj.get('fingerprint') not in (None, vocab.fingerprint):
      raise ValueError('The stored vocabulary fingerprint does not match its token list; the '
                       'file was edited or corrupted. Rebuild it from the training data.')
    return vocab

  def save(self, path: os.PathLike[str] | str) -> None:
    """Writes the vocabulary as JSON (via a temporary file, so readers never see half a file)."""
    path = epath.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fileio.write_text_atomic(path, json.dumps(self.to_json(), ensure_ascii=False, indent=0)
                             + '\n')

  @classmethod
  def load(cls, path: os.PathLike[str] | str) -> Vocab:
    """Reads a vocabulary written by `save`."""
    path = epath.Path(path)
    if not path.exists():
      raise FileNotFoundError(
          f'Vocabulary file not found: {path}. Build one with Vocab.build(...) and save it, or '
          'point to the vocab.json in an existing workdir.')
    try:
      obj = json.loads(path.read_text())
    except json.JSONDecodeError as e:
      raise ValueError(f'Vocabulary file {path} is not valid JSON ({e}).') from e
    try:
      return cls.from_json(obj)
    except ValueError as e:
      raise ValueError(f'{path}: {e}') from e
