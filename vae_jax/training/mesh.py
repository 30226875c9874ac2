"""Device mesh with a `data` axis, batch sharding and multi-host batch assembly.

Data parallelism is expressed with shardings only: the batch is sharded along its
leading dimension over the `data` axis, parameters are replicated, and `jax.jit`
inserts the cross-device reductions. The same code runs on one CPU, all local
accelerators, and several processes joined by `jax.distributed`.
"""

import collections
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = 'data'


def make_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Returns a 1-D mesh with a `data` axis over `devices` (default: all devices of all processes)."""
  devices = jax.devices() if devices is None else list(devices)
  if not devices:
    raise ValueError('make_mesh needs at least one device.')
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def data_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a batch: leading (example) dimension split over the `data` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  """Sharding of parameters, optimiser state and metrics: a full copy on every device."""
  return NamedSharding(mesh, P())


def local_batch_divisor(mesh: Mesh) -> int:
  """Number of this process's devices in `mesh`: local batch sizes must be a multiple of it."""
  return len(mesh.local_devices)


def to_global(local_batch: Mapping[str, Any], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles this process's rows of a batch into global arrays sharded over `data`.

  Every process passes its own rows (the same number on every process); the
  global batch is their concatenation in process order. On one process this is
  a plain device put with the data sharding.

  Args:
    local_batch: dict of numpy arrays with the same leading (example) dimension.
    mesh: mesh from `make_mesh`.

  Returns:
    dict of global `jax.Array`s with leading dimension `rows * process_count`.
  """
  sharding = data_sharding(mesh)
  n_local = local_batch_divisor(mesh)
  out = {}
  rows = None
  for name, value in local_batch.items():
    value = np.asarray(value)
    if value.ndim == 0:
      raise ValueError(
          f'Batch entry {name!r} is a scalar; every batch entry needs a leading '
          'example dimension.')
    if rows is None:
      rows = value.shape[0]
    if value.shape[0] != rows:
      raise ValueError(
          f'Batch entry {name!r} has {value.shape[0]} rows but other entries have '
          f'{rows}; all entries of a batch must have the same leading dimension.')
    if value.shape[0] % n_local:
      raise ValueError(
          f'The local batch has {value.shape[0]} rows, which does not divide over '
          f'the {n_local} local devices of this process. Use a per-process batch '
          f'size that is a multiple of {n_local} (pad with weight-0 rows).')
    out[name] = jax.make_array_from_process_local_data(sharding, value)
  return out


class Prefetcher:
  """Batches of a resumable iterator, already placed on the mesh when they are asked for.

  `next()` returns the oldest batch read ahead and reads the next one when it is asked for the
  following batch, so up to `depth` batches stand on the devices: the host reads and transfers
  batch i + 1 while the devices run the (asynchronously dispatched) step on batch i, and a
  step that follows a host synchronisation (logging, evaluation) finds its batch already there,
  as flax's `prefetch_to_device` does.

  The position to checkpoint is `position()`: the iterator's `state()` just after the last
  batch `next()` returned, i.e. the batches the caller consumed, not those read ahead;
  `rewind()` puts the iterator back there. Reading ahead never fails a run that would not have
  needed the batch: an exception the iterator raises while reading ahead (including
  StopIteration) is raised by the `next()` call that would have returned that batch, and
  `limit` caps the batches read in all (e.g. the steps left), so a finite iterator is not read
  past what the caller uses.

  Args:
    iterator: this process's local batches, with `state()` and `restore()`.
    mesh: mesh from `make_mesh`; batches are placed with `to_global`.
    depth: batches held on the devices ahead of their use (>= 1).
    limit: read at most this many batches (None: no limit).
    read: reads one local batch, given how many this prefetcher read before (default
      `next(iterator)`); lets the caller turn StopIteration into its own error.
  """

  def __init__(self, iterator, mesh: Mesh, depth: int = 2, limit: int | None = None,
               read=None):
    if depth < 1:
      raise ValueError(f'Prefetch depth {depth} must be at least 1.')
    self._iterator, self._mesh, self._depth, self._limit = iterator, mesh, depth, limit
    self._read = read if read is not None else (lambda _: next(iterator))
    self._queue = collections.deque()  # (global batch, position after it) or (None, error)
    self._reads = 0
    self._failed = False
    self._position = iterator.state()
    self._fill()

  def _fill(self):
    while (len(self._queue) < self._depth and not self._failed
           and (self._limit is None or self._reads < self._limit)):
      try:
        local = self._read(self._reads)
        entry = (to_global(local, self._mesh), self._iterator.state())
      except Exception as e:  # pylint: disable=broad-except  (raised when its turn comes)
        entry, self._failed = (None, e), True
      self._reads += 1
      self._queue.append(entry)

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    self._fill()
    if not self._queue:
      raise StopIteration  # `limit` batches were returned
    batch, position = self._queue.popleft()
    if batch is None:
      raise position
    self._position = position
    return batch

  def position(self) -> Any:
    """The iterator's state after the batches `next()` returned (what to checkpoint)."""
    return self._position

  def rewind(self) -> None:
    """Drops the batches read ahead and puts the iterator back at `position()`."""
    self._reads -= len(self._queue)
    self._queue.clear()
    self._failed = False
    self._iterator.restore(self._position)
