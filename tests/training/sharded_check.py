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
from vae_jax.training import loop


def _max_diff(a, b):
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _steps(task, optimizer, mesh, num_steps=3):
  """Initialises and runs `num_steps` train steps and one eval step on `mesh`."""
  state = loop.init_train_state(task, optimizer, toy_task.global_batch(0, 0, 16),
                                seed=0, mesh=mesh)
  train_step = loop.make_train_step(task, training.make_optimizer(optimizer), mesh)
  eval_step = loop.make_eval_step(task, mesh)
  losses = []
  for i in range(num_steps):
    batch = training.to_global(toy_task.global_batch(0, i, 16, pad_rows=3), mesh)
    state, out = train_step(state, batch)
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
      'eval_sums_diff': _max_diff(sums1, sums8),
  }
  try:
    training.to_global(toy_task.global_batch(0, 0, 12), mesh8)
    report['indivisible_error'] = None
  except ValueError as e:
    report['indivisible_error'] = str(e)

  # The loop on 8 devices, stopped at step 4 and resumed to 6, against 1 device.
  config = training.TrainConfig(num_steps=6, log_every=2, eval_every=3,
                                checkpoint_every=2, progress_bar=False,
                                optimizer=optimizer)
  def run(name, mesh, num_steps):
    return training.train_and_evaluate(
        task, toy_task.ToyIterator(batch_size=16),
        {'valid': toy_task.make_eval_data(batch_size=16)},
        config if num_steps == 6 else training.TrainConfig(
            **{**config.__dict__, 'num_steps': num_steps}),
        os.path.join(workdir, name), 'fp', mesh=mesh)
  r1 = run('one', mesh1, 6)
  run('eight', mesh8, 4)
  r8 = run('eight', mesh8, 6)
  p1, _ = training.restore_latest(os.path.join(workdir, 'one'))
  p8, _ = training.restore_latest(os.path.join(workdir, 'eight'))
  report['loop_params_diff'] = _max_diff(p1['params'], p8['params'])
  report['loop_nll'] = [r1['valid']['nll'], r8['valid']['nll']]
  print(json.dumps(report))


if __name__ == '__main__':
  main(sys.argv[1])
