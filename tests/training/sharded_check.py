"""Runs the train step on 8 simulated CPU devices and on 1; prints JSON differences.

Run by test_sharded.py in a subprocess, because the device count must be set
before JAX is imported: python sharded_check.py WORKDIR
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import json  # pylint: disable=g-import-not-at-top,g-bad-import-order
import sys

import jax
import numpy as np

import toy_task
from vae_jax import training
from vae_jax.training import steps


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _max_rel_diff(a, b):
  """Largest |x - y| / max(|y|, 1): sums over a batch differ by float32 rounding of their size."""
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))
                          / np.maximum(np.abs(np.asarray(y)), 1.0)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _batches(num_steps):
  it = toy_task.ToyIterator(batch_size=16, pad_rows=3)
  return [next(it) for _ in range(num_steps)]


def _steps(task, optimizer, mesh, num_steps=6):
  """Initialises and runs train steps and one eval step on `mesh`."""
  state = steps.init_train_state(task, optimizer, toy_task.global_batch(0, 0, 16),
                                seed=0, mesh=mesh)
  train_step = steps.make_train_step(task, training.make_optimizer(optimizer), mesh)
  eval_step = steps.make_eval_step(task, mesh)
  losses = []
  for batch in _batches(num_steps):
    state, out = train_step(state, training.to_global(batch, mesh))
    losses.append(float(out['loss']))
  sums = eval_step(state, training.to_global(toy_task.global_batch(9, 0, 16, 3), mesh),
                   jax.random.PRNGKey(0))
  return jax.device_get(state), losses, jax.device_get(sums), out


def main(workdir):
  assert jax.device_count() == 8, jax.devices()
  task = toy_task.make_task()
  optimizer = training.OptimizerConfig(learning_rate=0.05, grad_clip_norm=1.0)
  mesh1 = training.make_mesh(jax.devices()[:1])
  mesh8 = training.make_mesh()
  state1, losses1, sums1, _ = _steps(task, optimizer, mesh1)
  state8, losses8, sums8, out8 = _steps(task, optimizer, mesh8)
  report = {
      'devices': len(mesh8.devices.flat),
      'loss_sharding_devices': len(out8['loss'].sharding.device_set),
      'losses1': losses1, 'losses8': losses8,
      'params_diff': _max_diff(state1.params, state8.params),
      'model_state_diff': _max_diff(state1.model_state, state8.model_state),
      'opt_state_diff': _max_diff(state1.opt_state, state8.opt_state),
      'eval_sums_diff': _max_rel_diff(sums1, sums8),
  }
  try:
    training.to_global(toy_task.global_batch(0, 0, 12), mesh8)
    report['indivisible_error'] = None
  except ValueError as e:
    report['indivisible_error'] = str(e)

  # The loop on 8 devices, stopped at step 4 and resumed to 6 (checkpoints
  # restored onto the 8-device mesh), against the 6 steps on 1 device above.
  def run(num_steps):
    config = training.TrainConfig(num_steps=num_steps, log_every=2, eval_every=3,
                                  checkpoint_every=2, progress_bar=False,
                                  optimizer=optimizer)
    return training.train_and_evaluate(
        task, toy_task.ToyIterator(batch_size=16, pad_rows=3),
        {'valid': toy_task.make_eval_data(batch_size=16)}, config, workdir, 'fp',
        mesh=mesh8)
  run(4)
  run(6)
  state, _ = training.restore_latest(workdir)
  report['loop_params_diff'] = _max_diff(state1.params, state['params'])
  print(json.dumps(report))


if __name__ == '__main__':
  main(sys.argv[1])
