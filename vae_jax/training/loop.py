"""The training loop every method uses: train, evaluate, checkpoint, resume.

A method hands the loop a `Task` (init, loss, eval and summary functions); the
loop owns the mesh, the optimiser, the jitted steps (`steps`), checkpoints, metric
writers, the plateau and aggressive-training controllers and the NaN guard.
`train_and_evaluate` is resumable: rerunning the same command in the same workdir
continues from the latest checkpoint and ends with the same parameters, bit for bit,
as a run that never stopped.

Steps are counted in optimiser updates: metrics, evaluations and checkpoints
at step s describe the state after s updates; `loss_fn` receives the number of
updates applied before its own (0 for the first batch).

On accelerators the step loop keeps the devices busy: between logging, evaluation and
checkpoint steps it neither reads a device value on the host nor sends one (the step counter
is the host's, the state is donated to each step), and the next train batches are already on
the devices (`mesh_lib.Prefetcher`). The only exception is aggressive training's convergence
check, once per `check_every` inner steps. tests/training/test_accelerator_ready.py runs the
loop under `jax.transfer_guard` to keep it so.
"""

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import hashlib
import json
import time
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from vae_jax import errors
from vae_jax.training import aggressive as aggressive_lib
from vae_jax.training import checkpoint as checkpoint_lib
from vae_jax.training import guard as guard_lib
from vae_jax.training import mesh as mesh_lib
from vae_jax.training import optim
from vae_jax.training import steps
from vae_jax.training import writers

Batch = steps.Batch
Task = steps.Task
TrainState = steps.TrainState


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Settings of the loop.

  Attributes:
    num_steps: total optimiser updates of the run (a resumed run counts from 0).
    log_every: write averaged train metrics every this many steps.
    eval_every: evaluate every eval split every this many steps (and at the end).
    checkpoint_every: save the latest checkpoint every this many steps (and at
      the end).
    seed: seeds initialisation, the per-step randomness and evaluation.
    eval_split: the split whose `best_metric` selects the best checkpoint and
      drives the plateau controller.
    best_metric: name of a `summarize` output, lower is better.
    keep: latest checkpoints to keep.
    progress_bar: show a tqdm bar; None shows it on process 0 when stderr is a
      terminal.
    optimizer: optimiser and plateau settings.
    reload_best_on_decay: on a plateau decay, continue from the best
      checkpoint's parameters (as He et al. 2019 do).
    plateau_start_step: no plateau decay at evaluations before this step (the
      optimiser's `plateau.min_epochs` in steps).
    async_checkpoints: write checkpoints in a background thread.
    aggressive: aggressive inference-network training (needs an optimiser with
      `param_labels` and an `encoder_iter`); None: every step updates everything.
  """
  num_steps: int
  log_every: int = 100
  eval_every: int = 1000
  checkpoint_every: int = 1000
  seed: int = 0
  eval_split: str = 'valid'
  best_metric: str = 'nll'
  keep: int = 2
  progress_bar: bool | None = None
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  reload_best_on_decay: bool = False
  plateau_start_step: int = 0
  async_checkpoints: bool = True
  aggressive: aggressive_lib.AggressiveConfig | None = None

  def __post_init__(self):
    for name in ('log_every', 'eval_every', 'checkpoint_every'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name}={getattr(self, name)} must be a positive number of steps.')
    if self.num_steps < 0:
      raise ValueError(f'num_steps={self.num_steps} must be >= 0.')
    if self.aggressive is not None and self.optimizer.param_labels is None:
      raise ValueError('Aggressive training updates the encoder and the decoder separately: '
                       'set optimizer.param_labels (e.g. vae_jax.models.vae.param_groups).')


# Training produced a NaN or Inf; the bad state was not saved.
NonFiniteLossError = guard_lib.NonFiniteLossError

# Train batches placed on the devices ahead of the step that uses them (`mesh_lib.Prefetcher`).
PREFETCH_DEPTH = 2


def _check_iterator(train_iter) -> None:
  for name in ('state', 'restore'):
    if not callable(getattr(train_iter, name, None)):
      raise TypeError(
          f'The train iterator {type(train_iter).__name__} has no {name}() method; '
          'the loop needs a resumable iterator (state() -> dict, restore(dict)), '
          'e.g. the one from vae_jax.data.pipeline.')


def _check_inputs(config: TrainConfig, train_iter, eval_data, encoder_iter) -> None:
  """Clear errors for iterators, eval data and settings the run cannot work with."""
  _check_iterator(train_iter)
  if config.aggressive is not None:
    if encoder_iter is None:
      raise ValueError('Aggressive training needs encoder_iter, a second train iterator for '
                       'the inner encoder steps.')
    _check_iterator(encoder_iter)
    if not eval_data:
      raise ValueError('Aggressive training stops when the validation '
                       f'{config.aggressive.stop_metric!r} stops rising, so it needs eval_data.')
  if eval_data and config.eval_split not in eval_data:
    raise ValueError(
        f'eval_split={config.eval_split!r} is not among the eval splits '
        f'{sorted(eval_data)}; set TrainConfig.eval_split to one of them.')
  if config.optimizer.plateau.enabled and not eval_data:
    raise ValueError(
        'The plateau schedule (optimizer.plateau.patience) needs validation data, '
        'but eval_data is empty; pass an eval split or set patience=None.')


def _next_batch(train_iter, step: int) -> Batch:
  try:
    return next(train_iter)
  except StopIteration:
    raise ValueError(
        f'The train iterator ended at step {step}; the loop needs an infinite '
        'iterator (one that repeats epochs) and stops at TrainConfig.num_steps.'
    ) from None


def _data_state(state: dict) -> dict:
  """An iterator position (`state()`) to checkpoint; checked to be the same on every process.

  Only process 0's copy is written, so the state must describe the position in
  the global batch stream, not this process's shard.
  """
  if jax.process_count() > 1:
    text = json.dumps(state, sort_keys=True, default=str).encode()
    digest = np.frombuffer(hashlib.sha256(text).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    if not (digests == digests[:1]).all():
      raise ValueError(
          f'The train iterator state differs between processes (process '
          f'{jax.process_index()}: {state}); state() must describe the position '
          'in the global batch stream, the same on every process.')
  return state


def _peek(train_iter) -> Batch:
  position = train_iter.state()
  batch = next(train_iter)
  train_iter.restore(position)
  return batch


def _train_metrics(summarize, host_acc: dict, learning_rate, steps_per_sec: float) -> dict:
  """The logged train metrics of the steps since the last log (sums fetched by `to_host`)."""
  metrics = dict(summarize(host_acc['sums']))
  metrics['loss'] = host_acc['loss'] / host_acc['steps']
  metrics['grad_norm'] = host_acc['grad_norm'] / host_acc['steps']
  metrics['learning_rate'] = float(learning_rate)
  metrics['steps_per_sec'] = steps_per_sec
  return metrics


def _plateau_step(state: TrainState, val_loss: float, step: int, programs: steps.Programs,
                  config: TrainConfig, ckpt: checkpoint_lib.Checkpointer,
                  restore_target: Callable[[], TrainState]) -> tuple[TrainState, bool]:
  """The plateau controller after an evaluation: the learning rate decays when the validation
  loss stopped improving (continuing from the best parameters with `reload_best_on_decay`).
  Returns the state and whether the run stops (`max_decays` used up)."""
  plateau_cfg = config.optimizer.plateau
  decays = int(jax.device_get(state.plateau.num_decays))
  state = programs.apply_plateau(state, val_loss, step >= config.plateau_start_step)
  if int(jax.device_get(state.plateau.num_decays)) > decays:
    lr = float(jax.device_get(optim.get_learning_rate(state.opt_state)))
    logging.info('Validation %s has not improved for %d evaluations: '
                 'learning rate decayed to %g (decay %d).',
                 config.best_metric, plateau_cfg.patience, lr, decays + 1)
    if config.reload_best_on_decay and ckpt.best_step() is not None:
      ckpt.wait()
      try:
        best, _, meta = ckpt.restore_best(restore_target())
        state = state.replace(params=best.params, model_state=best.model_state)
        logging.info('Continuing from the best parameters (step %d).', meta['step'])
      except errors.CheckpointError as e:
        logging.warning('Continuing from the current parameters: %s', e)
  stop = optim.should_stop(state.plateau, plateau_cfg)
  if stop:
    logging.info('Stopping early at step %d: the learning rate was decayed '
                 '%d times (max_decays).', step, plateau_cfg.max_decays)
  return state, stop


def train_and_evaluate(
    task: Task,
    train_iter: Iterator[Batch],
    eval_data: Mapping[str, Callable[[], Iterator[Batch]]],
    config: TrainConfig,
    workdir: str,
    vocab_fingerprint: str | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    encoder_iter: Iterator[Batch] | None = None,
) -> dict[str, Any]:
  """Trains `task` to `config.num_steps`, evaluating and checkpointing on the way.

  Resumes from `<workdir>/checkpoints/latest` when it exists (state and data
  position) from the newest checkpoint there that can be read: damaged newer
  ones are skipped with one warning line each, then deleted, and saved again
  when the run gets there. Otherwise initialises from `config.seed`.

  Args:
    task: the method's functions.
    train_iter: infinite iterator of this process's train batches with
      `state()` / `restore()`; `state()` must be the same on every process
      (the position in the global batch stream): process 0's is saved. The loop
      reads `PREFETCH_DEPTH` batches ahead (never past `num_steps`); checkpoints
      save the position after the batches trained on, and on return the iterator
      is put back there.
    eval_data: split name -> zero-argument callable returning a fresh finite
      iterator of this process's batches (every process the same number).
    config: loop settings.
    workdir: where checkpoints, metrics.jsonl and TensorBoard files go.
    vocab_fingerprint: identifies the vocabulary; checked on resume.
    mesh: device mesh (default: all devices on a `data` axis).
    encoder_iter: with `config.aggressive`, an infinite resumable iterator of
      train batches for the encoder's inner steps (a stream independent of
      `train_iter`, e.g. the same data with another seed).

  Returns:
    {'step': final step, 'stopped_early': bool, 'train': last train metrics,
     <split>: last metrics of each eval split}.
  """
  _check_inputs(config, train_iter, eval_data, encoder_iter)
  aggressive = config.aggressive
  with steps.intended_transfers():
    mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    opt_cfg, plateau_cfg = config.optimizer, config.optimizer.plateau
    programs = steps.programs(task, opt_cfg, mesh)
    _, _, eval_rng = steps.rngs(config.seed)
    ckpt = checkpoint_lib.Checkpointer(
        workdir, vocab_fingerprint=vocab_fingerprint, keep=config.keep,
        best_metric=config.best_metric, async_save=config.async_checkpoints)
  guard = guard_lib.Guard(ckpt, opt_cfg)
  writer = None
  bar = None
  # The batches on the devices ahead of the step that uses them; their positions are the
  # iterators' positions after the batches the model consumed (what checkpoints save).
  batches = encoder_batches = None
  # Aggressive training's controller (He et al. start from a previous MI of 0).
  controller = aggressive_lib.init() if aggressive is not None else None

  def saved_position():
    position = _data_state(batches.position())
    if aggressive is None:
      return position
    encoder = encoder_batches.position() if encoder_batches is not None else encoder_iter.state()
    return aggressive_lib.position(position, _data_state(encoder), controller)

  try:
    with steps.intended_transfers():
      example_batch = _peek(train_iter)
      restore_target = lambda: steps.abstract_train_state(task, opt_cfg, example_batch, mesh)
      resume_step = None
      if ckpt.latest_step() is None:
        state = steps.init_train_state(task, opt_cfg, example_batch, config.seed, mesh)
        if task.warm_start is not None:
          state = state.replace(params=jax.device_put(task.warm_start(state.params),
                                                      mesh_lib.replicated(mesh)))
        logging.info('Initialised a new run in %s.', workdir)
      else:
        # The newest latest checkpoint that can be read (damaged newer ones are
        # skipped with a warning, and deleted by discard_after below).
        state, data_state, meta = ckpt.restore_latest(restore_target())
        resume_step = meta['step']
        if aggressive is not None:
          data_state, encoder_position, controller = aggressive_lib.restore_position(data_state)
          encoder_iter.restore(encoder_position)
        train_iter.restore(data_state)
        ckpt.discard_after(resume_step)
        # The config's learning rate and clipping apply on resume (scaled by
        # the plateau controller), so a diverged run can resume with new ones.
        state = programs.apply_config(state)
        logging.info('Resumed from step %d of %s.', resume_step, workdir)
      writer = writers.MetricWriter(workdir, resume_step=resume_step)
      step = int(jax.device_get(state.step))
      if resume_step is not None and step != resume_step:
        raise ValueError(f'Checkpoint {resume_step} holds a state at step {step}; '
                         'the checkpoint directory is inconsistent.')

      results: dict[str, Any] = {}
      train_metrics: dict[str, float] = {}
      evaluated_at = None
      stopped_early = optim.should_stop(state.plateau, plateau_cfg)
      if stopped_early:
        logging.info('The run already stopped after %d learning-rate decays.',
                     plateau_cfg.max_decays)
      bar = writers.progress_bar(config.num_steps, step, config.progress_bar)
      acc = None
      inner_steps = 0
      tick, tick_step = time.time(), step
      first_step = step
      batches = mesh_lib.Prefetcher(
          train_iter, mesh, depth=PREFETCH_DEPTH,
          limit=0 if stopped_early else max(config.num_steps - step, 0),
          read=lambda i: _next_batch(train_iter, first_step + i))
      if controller is not None and controller.active:
        encoder_batches = mesh_lib.Prefetcher(
            encoder_iter, mesh, depth=PREFETCH_DEPTH, read=lambda _: _next_batch(encoder_iter, -1))

    def run_eval(state, step, write=True):
      nonlocal evaluated_at
      out = {}
      for split, make_iter in eval_data.items():
        metrics = steps.evaluate(programs.eval_step, state, make_iter, task.summarize,
                                 jax.random.fold_in(eval_rng, step), mesh)
        writers.log_metrics(step, split, metrics)
        if write:
          writer.write_scalars(step, split, metrics)
        out[split] = metrics
      if task.sample_fn is not None and write:
        texts = task.sample_fn(state.params, state.model_state,
                               jax.random.fold_in(eval_rng, step))
        writer.write_texts(step, 'samples', texts)
      evaluated_at = step
      return out

    # The step loop: nothing in it waits for the devices or reads a device value on the host
    # (checked by tests/training/test_accelerator_ready.py); the step counter is the host's
    # `step`, and device values are fetched only at logging, evaluation and checkpoint steps,
    # in the `intended_transfers` block.
    while step < config.num_steps and not stopped_early:
      batch = next(batches)
      if controller is not None and controller.active:
        state, out, taken = aggressive_lib.outer_step(programs, state, batch, encoder_batches,
                                                      aggressive, mesh)
        inner_steps += taken
      else:
        state, out = programs.train_step(state, batch)
      acc = programs.accumulate(acc, out, state.step)
      step += 1
      bar.update(1)
      is_last = step == config.num_steps
      is_log = step % config.log_every == 0 or is_last
      is_eval = bool(eval_data) and (step % config.eval_every == 0 or is_last)
      if not (is_log or is_eval or step % config.checkpoint_every == 0 or is_last):
        continue
      with steps.intended_transfers():
        if is_log:
          host = steps.to_host({'acc': acc, 'lr': optim.get_learning_rate(state.opt_state)})
          guard.check_host_acc(host['acc'])
          now = time.time()
          train_metrics = _train_metrics(task.summarize, host['acc'], host['lr'],
                                         (step - tick_step) / max(now - tick, 1e-9))
          if controller is not None:
            train_metrics.update(aggressive_lib.train_metrics(controller, inner_steps,
                                                              step - tick_step))
            inner_steps = 0
          tick, tick_step = now, step
          writer.write_scalars(step, 'train', train_metrics)
          writers.log_metrics(step, 'train', train_metrics)
          bar.set_postfix(loss=f'{train_metrics["loss"]:.4g}')
          acc = None
        if is_eval:
          guard.check_acc(acc)
          results.update(run_eval(state, step))
          val = results[config.eval_split]
          if config.best_metric not in val:
            raise KeyError(
                f'best_metric={config.best_metric!r} is not among the '
                f'{config.eval_split!r} metrics {sorted(val)}; set '
                'TrainConfig.best_metric to one of them.')
          guard.check_state(state, step)
          if controller is not None and controller.active:
            before, controller = controller, aggressive_lib.update(controller, val, aggressive)
            if not controller.active:
              logging.info('Validation %s did not rise (%.8g, then %.8g): aggressive training '
                           'ends at step %d.', aggressive.stop_metric, before.previous,
                           controller.previous, step)
          if ckpt.maybe_save_best(step, state, saved_position(), val):
            logging.info('New best %s=%.4f at step %d.', config.best_metric,
                         val[config.best_metric], step)
          if plateau_cfg.enabled:
            state, stopped_early = _plateau_step(state, val[config.best_metric], step,
                                                 programs, config, ckpt, restore_target)
        if step % config.checkpoint_every == 0 or is_last or stopped_early:
          guard.check_acc(acc)
          guard.check_state(state, step)
          ckpt.save_latest(step, state, saved_position(), train_metrics)

    with steps.intended_transfers():
      if eval_data and evaluated_at != step:
        # Nothing trained (already finished or stopped): report the final state;
        # its metrics are in the log already.
        results.update(run_eval(state, step, write=False))
    results.update(step=step, stopped_early=stopped_early, train=train_metrics)
    return results
  finally:
    with steps.intended_transfers():
      # The iterators stand after the batches the model consumed, as if nothing was read ahead.
      for prefetched in (batches, encoder_batches):
        if prefetched is not None:
          try:
            prefetched.rewind()
          except Exception as e:  # pylint: disable=broad-except  (never hide the real error)
            logging.warning('Could not put a data iterator back after the batches read '
                            'ahead: %s', e)
      if bar is not None:
        bar.close()
      ckpt.wait()
      ckpt.close()
      if writer is not None:
        writer.close()
