"""One process of a (possibly multi-process) toy training run, shaped like a main.

  python multihost_worker.py --workdir=W --out=OUT.json \
      [--coordinator_address=localhost:1234 --num_processes=2 --process_id=0]

Like experiments/*.py: join the distributed program first, build the mesh,
read only this process's rows of every global batch, train_and_evaluate, then
restore the final state; process 0 writes the params and the train losses to
--out for comparison. The device count comes from XLA_FLAGS set by the caller.
"""

import json

from absl import app
from absl import flags

from vae_jax.training import distributed

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Run directory.', required=True)
flags.DEFINE_string('out', None, 'Where process 0 writes params and losses (JSON).')
flags.DEFINE_string('coordinator_address', None, 'host:port of process 0.')
flags.DEFINE_integer('num_processes', None, 'Number of processes.')
flags.DEFINE_integer('process_id', None, 'This process.')
flags.DEFINE_integer('num_steps', 6, 'Train steps.')
flags.DEFINE_integer('batch_size', 8, 'Global batch size.')


def main(argv):
  del argv
  # First, before anything touches JAX.
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes,
                         FLAGS.process_id)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import toy_task  # pylint: disable=g-import-not-at-top
  from vae_jax import training  # pylint: disable=g-import-not-at-top
  from vae_jax.training import writers  # pylint: disable=g-import-not-at-top

  process, count = jax.process_index(), jax.process_count()
  mesh = training.make_mesh()
  task = toy_task.make_task()
  train_iter = toy_task.ToyIterator(batch_size=FLAGS.batch_size,
                                    process_index=process, process_count=count)
  eval_data = {'valid': toy_task.make_eval_data(
      batch_size=FLAGS.batch_size, process_index=process, process_count=count)}
  optimizer = training.OptimizerConfig(
      learning_rate=0.05, grad_clip_norm=2.0,
      plateau=training.PlateauConfig(patience=1))
  config = training.TrainConfig(num_steps=FLAGS.num_steps, log_every=1, eval_every=2,
                                checkpoint_every=3, progress_bar=False,
                                optimizer=optimizer)
  result = training.train_and_evaluate(task, train_iter, eval_data, config,
                                       FLAGS.workdir, 'toy-vocab', mesh=mesh)
  target = training.abstract_train_state(
      task, optimizer, toy_task.process_rows(toy_task.global_batch(0, 0, FLAGS.batch_size),
                                             process, count), mesh)
  state, _ = training.restore_latest(FLAGS.workdir, target, 'toy-vocab')
  params = jax.device_get(state.params)
  if process == 0 and FLAGS.out:
    losses = [r['metrics']['loss'] for r in writers.read_metrics(FLAGS.workdir)
              if r['split'] == 'train']
    with open(FLAGS.out, 'w') as f:
      json.dump({
          'process_count': count, 'device_count': jax.device_count(),
          'losses': losses, 'valid_nll': result['valid']['nll'],
          'params': [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(params)],
      }, f)
  distributed.shutdown()


if __name__ == '__main__':
  app.run(main)
