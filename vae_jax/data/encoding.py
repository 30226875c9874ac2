"""From examples to token ids: the encoded corpus the batch iterators of `pipeline` read.

Every sentence becomes `w_1 ... w_n EOS` (no BOS: models shift right; words outside the
vocabulary become UNK), stored flat in an `EncodedCorpus`.

Over-long sentences. `max_length` counts the EOS. With `overlong='truncate'` a sentence of more
than `max_length - 1` words keeps its first `max_length - 1` words and its EOS (so the model
still learns to stop); with `overlong='drop'` it is removed. Either way `encode` counts the
affected sentences (`EncodedCorpus.num_truncated` / `num_dropped`) and logs them; NLLs on a
truncated evaluation set are not comparable with published numbers, so report them.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

from absl import logging
import numpy as np

from vae_jax.data.readers import Example
from vae_jax.data.vocab import EOS, UNK, Vocab


@dataclasses.dataclass(frozen=True, eq=False)
class EncodedCorpus:
  """Encoded sentences stored flat: sentence i is `tokens[offsets[i]:offsets[i+1]]`.

  Attributes:
    tokens: int32 [total], the concatenated sentences, each ending in EOS.
    offsets: int64 [N + 1].
    labels: int32 [N] or None.
    source_indices: int64 [N], index of each sentence in the examples given to `encode`
      (sentences dropped as over-long are absent).
    num_truncated: sentences cut to `max_length` tokens.
    num_dropped: sentences removed for being over-long.
    max_length: the limit used (EOS included), or None.
  """
  tokens: np.ndarray
  offsets: np.ndarray
  labels: np.ndarray | None
  source_indices: np.ndarray
  num_truncated: int = 0
  num_dropped: int = 0
  max_length: int | None = None

  def __len__(self) -> int:
    return len(self.offsets) - 1

  def __getitem__(self, i: int) -> np.ndarray:
    """Sentence i as int32 ids ending in EOS."""
    return self.tokens[self.offsets[i]:self.offsets[i + 1]]

  @property
  def lengths(self) -> np.ndarray:
    """int64 [N] token counts, EOS included."""
    return np.diff(self.offsets)

  @property
  def num_tokens(self) -> int:
    """Total token count, EOS included (the denominator of per-token NLL)."""
    return int(self.tokens.size)

  @property
  def num_unk(self) -> int:
    return int(np.count_nonzero(self.tokens == UNK))

  def fingerprint(self) -> str:
    """sha256 over token ids, offsets and labels (identifies the data for resuming)."""
    h = hashlib.sha256()
    h.update(np.ascontiguousarray(self.tokens, dtype=np.int32).tobytes())
    h.update(np.ascontiguousarray(self.offsets, dtype=np.int64).tobytes())
    if self.labels is not None:
      h.update(np.ascontiguousarray(self.labels, dtype=np.int32).tobytes())
    return h.hexdigest()

  def summary(self) -> str:
    parts = [f'{len(self)} sentences, {self.num_tokens} tokens (EOS included)',
             f'{self.num_unk / max(self.num_tokens, 1):.2%} UNK']
    if self.max_length is not None:
      parts.append(f'max_length {self.max_length}: {self.num_truncated} truncated, '
                   f'{self.num_dropped} dropped')
    return ', '.join(parts)


def encode_tokens(tokens: Sequence[str], vocab: Vocab) -> np.ndarray:
  """One sentence as int32 `w_1 ... w_n EOS`."""
  return np.asarray(vocab.encode(tokens) + [EOS], dtype=np.int32)


def training_tokens(examples: Iterable[Example], max_length: int | None = None,
                    overlong: Literal['truncate', 'drop'] = 'truncate'
                    ) -> Iterator[tuple[str, ...]]:
  """The words of each example that `encode` keeps: the first `max_length - 1` (EOS takes the
  last place), none of a sentence `overlong='drop'` removes. Build a training vocabulary from
  these, so no word enters it that training never sees."""
  for ex in examples:
    if max_length is not None and len(ex.tokens) + 1 > max_length:
      if overlong == 'drop':
        continue
      yield ex.tokens[:max_length - 1]
    else:
      yield ex.tokens


def encode(examples: Sequence[Example], vocab: Vocab, max_length: int | None = None,
           overlong: Literal['truncate', 'drop'] = 'truncate') -> EncodedCorpus:
  """Encodes examples as `w_1 ... w_n EOS` id sequences.

  Args:
    examples: sentences (e.g. from `corpora.load_split`); either all or none have labels.
    vocab: the vocabulary (words outside it become UNK).
    max_length: longest allowed sequence, EOS included (>= 2); None for no limit.
    overlong: 'truncate' keeps the first `max_length - 1` words + EOS; 'drop' removes the
      sentence. The counts are kept on the result and logged.

  Returns:
    The encoded corpus.
  """
  if overlong not in ('truncate', 'drop'):
    raise ValueError(f"overlong must be 'truncate' or 'drop', got {overlong!r}.")
  if max_length is not None and max_length < 2:
    raise ValueError(f'max_length={max_length} must be >= 2 (one word plus EOS) or None.')
  has_label = [ex.label is not None for ex in examples]
  if any(has_label) and not all(has_label):
    raise ValueError(
        f'{sum(has_label)} of {len(examples)} examples have a label and the others do not; '
        'a batch needs labels for all rows or none. Filter the examples first.')
  seqs, labels, kept = [], [], []
  truncated = dropped = 0
  for i, ex in enumerate(examples):
    ids = vocab.encode(ex.tokens)
    if max_length is not None and len(ids) + 1 > max_length:
      if overlong == 'drop':
        dropped += 1
        continue
      ids = ids[:max_length - 1]
      truncated += 1
    ids.append(EOS)
    seqs.append(ids)
    kept.append(i)
    if ex.label is not None:
      labels.append(ex.label)
  lengths = np.fromiter((len(s) for s in seqs), dtype=np.int64, count=len(seqs))
  offsets = np.zeros(len(seqs) + 1, dtype=np.int64)
  np.cumsum(lengths, out=offsets[1:])
  flat = np.fromiter((t for s in seqs for t in s), dtype=np.int32, count=int(offsets[-1]))
  data = EncodedCorpus(
      tokens=flat,
      offsets=offsets,
      labels=np.asarray(labels, dtype=np.int32) if examples and all(has_label) else None,
      source_indices=np.asarray(kept, dtype=np.int64),
      num_truncated=truncated,
      num_dropped=dropped,
      max_length=max_length)
  if truncated or dropped:
    logging.info('Over-long sentences (more than %d tokens with EOS): %d truncated, %d dropped '
                 'of %d.', max_length, truncated, dropped, len(examples))
  return data
