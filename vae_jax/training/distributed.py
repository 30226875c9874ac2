"""Joining several processes into one JAX program (multi-host data parallelism).

Call `initialize` first thing in a main, before anything else touches JAX.
With no arguments it does nothing (one process). With a coordinator address,
a process count and this process's id it calls `jax.distributed.initialize`;
with `auto_detect=True` JAX finds them itself (Cloud TPU VMs, SLURM, ...).
On CPU, cross-process collectives use gloo, so several processes on one
machine form a real multi-host run (this is how it is tested).
"""

import os

from absl import logging
import jax

from vae_jax import errors


def _backends_initialized() -> bool:
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # Private API: be permissive if it moves.
    return False


def _may_use_cpu() -> bool:
  platforms = jax.config.jax_platforms or os.environ.get('JAX_PLATFORMS', '')
  return not platforms or 'cpu' in platforms.split(',')


def initialize(coordinator_address: str | None = None,
               num_processes: int | None = None,
               process_id: int | None = None,
               *,
               auto_detect: bool = False,
               local_device_ids: list[int] | None = None,
               initialization_timeout: int = 300) -> bool:
  """Initialises multi-process JAX when asked; returns whether it did.

  Args:
    coordinator_address: 'host:port' of process 0's coordinator service.
    num_processes: total number of processes.
    process_id: this process's id in [0, num_processes).
    auto_detect: let `jax.distributed.initialize` detect the cluster (Cloud TPU
      pod slices, SLURM, ...) when the three values above are not given.
    local_device_ids: restrict this process to these local devices.
    initialization_timeout: seconds to wait for all processes to join.
  """
  given = [coordinator_address is not None, num_processes is not None,
           process_id is not None]
  if any(given) and not all(given):
    raise errors.ConfigError(
        'Multi-process runs need all of coordinator_address, num_processes and '
        f'process_id; got coordinator_address={coordinator_address!r}, '
        f'num_processes={num_processes!r}, process_id={process_id!r}. Give all '
        'three, or none (one process, or auto_detect on a TPU pod slice).')
  if all(given):
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise errors.ConfigError(
          f'process_id={process_id} must be in [0, num_processes={num_processes}).')
    if num_processes == 1:
      return False
  elif not auto_detect:
    return False
  if _backends_initialized():
    raise RuntimeError(
        'vae_jax.training.distributed.initialize must run before any other JAX '
        'call (devices, arrays, jit); move it to the top of main().')
  if _may_use_cpu():
    # CPU collectives across processes; ignored by accelerator backends.
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  kwargs = dict(initialization_timeout=initialization_timeout)
  if local_device_ids is not None:
    kwargs['local_device_ids'] = local_device_ids
  if all(given):
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes,
                               process_id=process_id, **kwargs)
  else:
    jax.distributed.initialize(**kwargs)
  logging.info('Process %d of %d joined (%d local devices, %d in all).',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  return True


def shutdown() -> None:
  """Leaves the distributed program (safe to call when it was never joined)."""
  if jax.process_count() > 1:
    jax.distributed.shutdown()
