"""Device mesh with a `data` axis, batch sharding and multi-host batch assembly.

Data parallelism is expressed with shardings only: the batch is sharded along its
leading dimension over the `data` axis, parameters are replicated, and `jax.jit`
inserts the cross-device reductions. The same code runs on one CPU, all local
accelerators, and several processes joined by `jax.distributed`.
"""

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
