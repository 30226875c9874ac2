"""From encoded sentences to batches: length bucketing, padding, resumable iteration, sharding.

The sentences come encoded by `vae_jax.data.encoding` (`encode`, `EncodedCorpus`).

Batch format (docs/design.md): a dict of numpy arrays
  tokens  int32   [B_local, L]  `w_1 ... w_n EOS PAD ...` (no BOS: models shift right)
  weights float32 [B_local]     1 for a real example, 0 for a padding row (all-PAD tokens)
  labels  int32   [B_local]     only when the corpus has labels (0 in padding rows)
The token mask is `tokens != PAD`; a sentence's token count includes its EOS.

Training order. Every epoch is a deterministic function of (seed, epoch): the examples are
permuted with `np.random.default_rng([seed, epoch])`; then, for length bucketing, each window
of `bucket_window` consecutive batches' worth of examples is sorted by length and cut into
batches, and the batch order is shuffled with the same generator. Batches of similar lengths
need less padding (Khomenko et al. 2016, "Accelerating recurrent neural network training
using sequence bucketing"); the window keeps batch composition random across epochs. Each
batch is padded to the next multiple of `pad_multiple` tokens, so only a few distinct shapes
are compiled. The epoch's last, partial batch is filled up to the batch size with padding
rows of weight 0. `state()` = (seed, epoch, position) and `restore(state)` resume exactly.

Multiple hosts. Every process computes the same *global* batch of `batch_size` rows, hence the
same padded length, and yields only its contiguous slice `[p*B/P, (p+1)*B/P)` of rows. The
union over processes is the batch a single-process run sees, so results do not depend on the
number of hosts, and the iterator state (counted in global batches) is the same on every host.

Other batch formats. The iterators also accept any dataset following the `BatchSource`
protocol (`__len__`, `lengths`, `fingerprint()`, `batch(rows, length)`), e.g. the dialogue
pairs of `vae_jax.data.dialogue`: they order, bucket and pad by `lengths` exactly as above and
let the dataset build its own batch dict. Such a batch may have shapes that depend on its rows
besides the token length (the context length of a dialogue batch), so every process builds the
whole global batch and yields its slice of rows: the shapes are then the same on every host.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any, Protocol

import numpy as np

from vae_jax.data.encoding import EncodedCorpus
from vae_jax.data.vocab import PAD

Batch = dict[str, np.ndarray]

_STATE_VERSION = 1


# Batching helpers.


class BatchSource(Protocol):
  """A dataset the iterators can batch besides `EncodedCorpus` (see the module docstring)."""

  def __len__(self) -> int:
    ...

  @property
  def lengths(self) -> np.ndarray:
    """int64 [N] token counts (EOS included) used for bucketing and the padded length."""
    ...

  def fingerprint(self) -> str:
    """Identifies the data for resuming."""
    ...

  def batch(self, rows: np.ndarray, length: int) -> Batch:
    """Batch of the given example indices (-1 = padding row), tokens padded to `length`."""
    ...


def round_up(n: int, multiple: int) -> int:
  """Smallest multiple of `multiple` that is >= n (and >= multiple)."""
  return max(multiple, -(-int(n) // multiple) * multiple)


def process_rows(batch_size: int, process_index: int, process_count: int) -> slice:
  """The rows `[p*B/P, (p+1)*B/P)` of a global batch that process p yields."""
  _check_processes(batch_size, process_index, process_count)
  per = batch_size // process_count
  return slice(process_index * per, (process_index + 1) * per)


def _check_processes(batch_size: int, process_index: int, process_count: int) -> None:
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}.')
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f'Need 0 <= process_index < process_count, got process_index='
                     f'{process_index}, process_count={process_count}.')
  if batch_size % process_count:
    raise ValueError(
        f'The global batch size {batch_size} is not divisible by the number of processes '
        f'{process_count}; every process must get the same number of rows. Use a batch size '
        f'that is a multiple of {process_count}.')


def _check_common(data: EncodedCorpus | BatchSource, pad_multiple: int) -> None:
  if not isinstance(data, EncodedCorpus) and not (
      callable(getattr(data, 'batch', None)) and callable(getattr(data, 'fingerprint', None))
      and hasattr(data, 'lengths') and hasattr(data, '__len__')):
    raise TypeError(f'Expected an EncodedCorpus (from pipeline.encode) or a dataset with '
                    f'__len__, lengths, fingerprint() and batch(rows, length), got '
                    f'{type(data).__name__}.')
  if len(data) == 0:
    raise ValueError('The dataset has no sentences (empty split, or all were dropped as '
                     'over-long); check the corpus files and max_length.')
  if pad_multiple < 1:
    raise ValueError(f'pad_multiple must be >= 1, got {pad_multiple}.')


def make_batch(data: EncodedCorpus, rows: np.ndarray, length: int) -> Batch:
  """Batch of the given example indices (-1 = padding row), padded to `length` tokens."""
  rows = np.asarray(rows, dtype=np.int64)
  tokens = np.full((len(rows), length), PAD, dtype=np.int32)
  real = rows >= 0
  for r in np.flatnonzero(real):
    seq = data[rows[r]]
    if len(seq) > length:
      raise ValueError(f'Sentence {rows[r]} has {len(seq)} tokens, more than the batch '
                       f'length {length}.')
    tokens[r, :len(seq)] = seq
  batch = {'tokens': tokens, 'weights': real.astype(np.float32)}
  if data.labels is not None:
    batch['labels'] = np.where(real, data.labels[np.maximum(rows, 0)], 0).astype(np.int32)
  return batch


def _make_batch(data: EncodedCorpus | BatchSource, rows: np.ndarray, local: slice,
                length: int) -> Batch:
  """This process's `local` slice of the global batch `rows`, padded to `length` tokens.

  An `EncodedCorpus` batch only depends on `length` and its own rows, so only the local rows
  are built. Any other dataset builds the global batch and it is sliced, so that shapes it
  derives from the rows are the same on every process.
  """
  if isinstance(data, EncodedCorpus):
    return make_batch(data, rows[local], length)
  return {key: value[local] for key, value in data.batch(rows, length).items()}


def _padded_length(lengths: np.ndarray, rows: np.ndarray, pad_multiple: int) -> int:
  real = rows[rows >= 0]
  return round_up(int(lengths[real].max()) if real.size else 1, pad_multiple)


# Training.


class TrainIterator(Iterator[Batch]):
  """Infinite, deterministic, resumable iterator of length-bucketed training batches.

  See the module docstring for the order, padding and sharding rules. Typical use:

    it = TrainIterator(train, batch_size=64, seed=cfg.seed,
                       process_index=jax.process_index(), process_count=jax.process_count())
    it.restore(saved_state)       # when resuming
    batch = next(it)
    checkpoint(..., data_state=it.state())
  """

  def __init__(self, data: EncodedCorpus | BatchSource, batch_size: int, *, seed: int = 0,
               bucket_window: int = 32, pad_multiple: int = 8, process_index: int = 0,
               process_count: int = 1):
    """Creates the iterator at epoch 0, position 0.

    Args:
      data: the encoded training sentences (or another `BatchSource`).
      batch_size: the global batch size B (over all processes).
      seed: shuffling seed; epoch e uses `np.random.default_rng([seed, e])`.
      bucket_window: number of batches whose examples are sorted by length together; 1
        disables bucketing (batches are then random subsets), larger values give less padding
        but batches that are more alike within an epoch.
      pad_multiple: the padded length of a batch is a multiple of this.
      process_index, process_count: this process and the number of processes; each yields
        `batch_size // process_count` rows.
    """
    _check_common(data, pad_multiple)
    _check_processes(batch_size, process_index, process_count)
    if bucket_window < 1:
      raise ValueError(f'bucket_window must be >= 1 (1 = no bucketing), got {bucket_window}.')
    if seed < 0:
      raise ValueError(f'seed must be >= 0, got {seed}.')
    self._data = data
    self._lengths = data.lengths
    self._batch_size = batch_size
    self._bucket_window = bucket_window
    self._pad_multiple = pad_multiple
    self._rows = process_rows(batch_size, process_index, process_count)
    self._seed = seed
    self._epoch = 0
    self._position = 0
    self._plan: tuple[int, np.ndarray] | None = None  # (epoch, [steps, B] row indices)
    self._fingerprint = data.fingerprint()

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per epoch: ceil(N / B)."""
    return math.ceil(len(self._data) / self._batch_size)

  @property
  def epoch(self) -> int:
    return self._epoch

  @property
  def position(self) -> int:
    """Index of the next batch within the current epoch."""
    return self._position

  def epoch_plan(self, epoch: int) -> np.ndarray:
    """int64 [steps_per_epoch, B]: the example index of every row of every global batch of
    `epoch`, in order (-1 for padding rows)."""
    if self._plan is not None and self._plan[0] == epoch:
      return self._plan[1]
    n, b = len(self._data), self._batch_size
    rng = np.random.default_rng([self._seed, epoch])
    perm = rng.permutation(n)
    window = self._bucket_window * b
    batches = []
    for start in range(0, n, window):
      chunk = perm[start:start + window]
      chunk = chunk[np.argsort(self._lengths[chunk], kind='stable')]
      batches.extend(chunk[i:i + b] for i in range(0, len(chunk), b))
    plan = np.full((len(batches), b), -1, dtype=np.int64)
    for i, j in enumerate(rng.permutation(len(batches))):
      plan[i, :len(batches[j])] = batches[j]
    self._plan = (epoch, plan)
    return plan

  def __iter__(self) -> TrainIterator:
    return self

  def __next__(self) -> Batch:
    plan = self.epoch_plan(self._epoch)
    rows = plan[self._position]
    length = _padded_length(self._lengths, rows, self._pad_multiple)
    batch = _make_batch(self._data, rows, self._rows, length)
    self._position += 1
    if self._position == len(plan):
      self._epoch += 1
      self._position = 0
    return batch

  def state(self) -> dict[str, Any]:
    """JSON-able position: seed, epoch, position (+ what must match to resume)."""
    return {
        'version': _STATE_VERSION,
        'seed': self._seed,
        'epoch': self._epoch,
        'position': self._position,
        'batch_size': self._batch_size,
        'bucket_window': self._bucket_window,
        'num_examples': len(self._data),
        'data_fingerprint': self._fingerprint,
    }

  def restore(self, state: dict[str, Any]) -> None:
    """Continues from `state()`: the next batch is the one that followed when it was saved.

    The seed is taken from the state. The global batch size, bucket window and data must be
    the ones the state was saved with; the number of processes may differ.
    """
    if not isinstance(state, dict) or state.get('version') != _STATE_VERSION:
      raise ValueError(f'Not a TrainIterator state (version {_STATE_VERSION}): {state!r}.')
    mine = self.state()
    for key in ('batch_size', 'bucket_window', 'num_examples', 'data_fingerprint'):
      if state.get(key) != mine[key]:
        raise ValueError(
            f'Cannot resume the data iterator: the saved state has {key}={state.get(key)!r}, '
            f'this iterator has {mine[key]!r}. Resume with the same data, vocabulary, batch '
            'size and bucket_window as the saved run, or start a fresh workdir.')
    epoch, position = int(state['epoch']), int(state['position'])
    if epoch < 0 or not 0 <= position < self.steps_per_epoch:
      raise ValueError(f'Invalid iterator state: epoch {epoch}, position {position} '
                       f'(steps_per_epoch {self.steps_per_epoch}).')
    self._seed = int(state['seed'])
    self._plan = None
    self._epoch, self._position = epoch, position


# Evaluation.


class EvalIterator:
  """Re-iterable, fixed-order evaluation batches.

  Every batch has `batch_size` global rows: the last one is filled with weight-0 padding rows,
  so every process sees the same number of batches of the same shape (multi-host collectives
  never wait for a missing batch). Metrics are sums over real rows divided by sums of
  denominators, so the order does not change the result; `sort_by_length=True` orders the
  sentences by length (stable) so batches need less padding and evaluation runs faster.
  `order` maps each global row back to its sentence.
  """

  def __init__(self, data: EncodedCorpus | BatchSource, batch_size: int, *,
               sort_by_length: bool = False, pad_multiple: int = 8, fixed_length: bool = False,
               process_index: int = 0, process_count: int = 1):
    """Creates the evaluation batches.

    Args:
      data: the encoded sentences (or another `BatchSource`).
      batch_size: global batch size (over all processes).
      sort_by_length: order sentences by length instead of keeping the data order.
      pad_multiple: padded lengths are multiples of this.
      fixed_length: pad every batch to the same length (the longest sentence, rounded up), so
        evaluation compiles exactly one shape.
      process_index, process_count: as for `TrainIterator`.
    """
    _check_common(data, pad_multiple)
    _check_processes(batch_size, process_index, process_count)
    self._data = data
    self._batch_size = batch_size
    self._rows = process_rows(batch_size, process_index, process_count)
    lengths = data.lengths
    order = (np.argsort(lengths, kind='stable') if sort_by_length
             else np.arange(len(data), dtype=np.int64))
    num_batches = math.ceil(len(data) / batch_size)
    padded = np.full(num_batches * batch_size, -1, dtype=np.int64)
    padded[:len(order)] = order
    self._plan = padded.reshape(num_batches, batch_size)
    if fixed_length:
      size = round_up(int(lengths.max()), pad_multiple)
      self._lengths_per_batch = [size] * num_batches
    else:
      self._lengths_per_batch = [_padded_length(lengths, r, pad_multiple) for r in self._plan]

  @property
  def order(self) -> np.ndarray:
    """int64 [num_batches * B]: sentence index of every global row (-1 for padding)."""
    return self._plan.reshape(-1)

  def __len__(self) -> int:
    return len(self._plan)

  def __iter__(self) -> Iterator[Batch]:
    for rows, length in zip(self._plan, self._lengths_per_batch):
      yield _make_batch(self._data, rows, self._rows, length)
