"""Checkpoints with orbax: the latest few and the best one, with data position and vocabulary.

Layout under `<workdir>/checkpoints/`:

  latest/<step>/{state,data,meta}   the last `keep` checkpoints (for resuming)
  best/<step>/{state,data,meta}     the one with the lowest validation metric
  best.json                         step and metrics of the best checkpoint (for people)

`state` is the TrainState pytree, `data` the train iterator's `state()` dict and
`meta` a JSON dict with the vocabulary fingerprint, the step and the metrics.
orbax writes atomically and coordinates processes; every process must call
save/restore, and only process 0 writes `best.json`.
"""

import json
import math
import os
from typing import Any

from absl import logging
import jax
import orbax.checkpoint as ocp

from vae_jax import errors
from vae_jax.training import mesh as mesh_lib

ITEMS = ('state', 'data', 'meta')


# A checkpoint was trained with a different vocabulary than the current run.
VocabMismatchError = errors.VocabMismatchError
# No checkpoint of the requested kind exists in the workdir.
CheckpointNotFoundError = errors.CheckpointNotFoundError


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.fspath(workdir), 'checkpoints')


def _check_fingerprint(meta: dict, expected: str | None, where: str) -> None:
  found = meta.get('vocab_fingerprint')
  if expected is not None and found != expected:
    raise VocabMismatchError(
        f'The checkpoint {where} was trained with vocabulary fingerprint '
        f'{found!r}, but this run has {expected!r}. Use the vocabulary the run was '
        'trained with (the vocab file saved in its workdir), or start a fresh run '
        'in a new --workdir.')


def _write_json_atomic(path: str, obj: Any) -> None:
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _processes(name: str) -> ocp.options.MultiprocessingOptions:
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


class Checkpointer:
  """The latest and best checkpoints of one run.

  Args:
    workdir: the run's directory; checkpoints go to `<workdir>/checkpoints/`.
    vocab_fingerprint: a string identifying the vocabulary; stored with every
      checkpoint and compared on restore (None: neither stored nor checked).
    keep: how many latest checkpoints to keep.
    best_metric: the validation metric that selects the best checkpoint (lower
      is better).
    async_save: write in a background thread after copying arrays to host.
    read_only: open existing checkpoints for restoring only.
  """

  def __init__(self, workdir: str, *, vocab_fingerprint: str | None = None,
               keep: int = 2, best_metric: str = 'nll', async_save: bool = True,
               read_only: bool = False):
    if keep < 1:
      raise ValueError(f'keep={keep}: keep at least one latest checkpoint.')
    self.directory = checkpoint_dir(workdir)
    self.vocab_fingerprint = vocab_fingerprint
    self.best_metric = best_metric
    common = dict(create=not read_only, read_only=read_only,
                  enable_async_checkpointing=async_save,
                  cleanup_tmp_directories=not read_only)
    # Distinct barrier prefixes: both managers may save the same step at once.
    self._latest = ocp.CheckpointManager(
        os.path.join(self.directory, 'latest'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, multiprocessing_options=_processes('latest'), **common),
        item_names=ITEMS)
    self._best = ocp.CheckpointManager(
        os.path.join(self.directory, 'best'),
        options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m[best_metric], best_mode='min',
            keep_checkpoints_without_metrics=False,
            multiprocessing_options=_processes('best'), **common),
        item_names=ITEMS)
    self._best_value = None
    self._best_value_step = None

  # Queries.

  def latest_step(self) -> int | None:
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    steps = self._best.all_steps()
    return max(steps) if steps else None

  def best_value(self) -> float | None:
    """The best checkpoint's `best_metric` (None when there is none)."""
    step = self.best_step()
    if step is None:
      return None
    if self._best_value_step != step:
      meta = self._restore_items(self._best, step, None, ('meta',)).meta
      value = meta['metrics'].get(self.best_metric)
      if value is None:
        logging.warning(
            'The best checkpoint (step %d) has no %r (it was selected by %s); the '
            'next evaluation replaces it.', step, self.best_metric,
            sorted(meta['metrics']))
      self._best_value = None if value is None else float(value)
      self._best_value_step = step
    return self._best_value

  # Saving (every process calls these).

  def _meta(self, step: int, metrics: dict | None) -> dict:
    return {'step': int(step), 'vocab_fingerprint': self.vocab_fingerprint,
            'metrics': {k: float(v) for k, v in (metrics or {}).items()}}

  def _args(self, state, data_state, meta):
    return ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state if data_state is not None else {}),
        meta=ocp.args.JsonSave(meta))

  def save_latest(self, step: int, state, data_state: dict | None,
                  metrics: dict | None = None) -> None:
    """Saves `state` and the iterator position as the latest checkpoint of `step`."""
    if step in self._latest.all_steps():
      return
    self._latest.save(step, args=self._args(state, data_state, self._meta(step, metrics)),
                      force=True)

  def maybe_save_best(self, step: int, state, data_state: dict | None,
                      metrics: dict) -> bool:
    """Saves a best checkpoint if `metrics[best_metric]` beats the best so far."""
    if self.best_metric not in metrics:
      raise KeyError(
          f'The best-checkpoint metric {self.best_metric!r} is not among the '
          f'validation metrics {sorted(metrics)}; set best_metric to one of them.')
    value = float(metrics[self.best_metric])
    best = self.best_value()
    if not math.isfinite(value) or (best is not None and not value < best):
      return False
    if step in self._best.all_steps():
      return False
    if best is None and self.best_step() is not None:
      self._best.delete(self.best_step())  # Selected by another metric.
    meta = self._meta(step, metrics)
    self._best.save(step, args=self._args(state, data_state, meta),
                    metrics={self.best_metric: value}, force=True)
    self._best_value, self._best_value_step = value, step
    if jax.process_index() == 0:
      _write_json_atomic(os.path.join(self.directory, 'best.json'),
                         {'step': int(step), 'metric': self.best_metric,
                          'value': value, 'metrics': meta['metrics']})
    return True

  def discard_after(self, step: int) -> None:
    """Deletes best checkpoints newer than `step` (left by a run that was stopped

    before its next latest checkpoint; the resumed run recomputes them exactly).
    """
    for s in self._best.all_steps():
      if s > step:
        logging.info('Discarding best checkpoint %d newer than the resumed step %d.', s, step)
        self._best.delete(s)
    self._best_value_step = None

  # Restoring.

  def _restore_items(self, manager, step, target, items):
    args = {}
    if 'state' in items:
      if target is None:
        target = _saved_tree_replicated(manager, step)
      args['state'] = ocp.args.StandardRestore(target)
    if 'data' in items:
      args['data'] = ocp.args.JsonRestore()
    if 'meta' in items:
      args['meta'] = ocp.args.JsonRestore()
    return manager.restore(step, args=ocp.args.Composite(**args))

  def _restore(self, manager, kind, step, target):
    if step is None:
      step = manager.latest_step() if kind == 'latest' else self.best_step()
    if step is None:
      raise CheckpointNotFoundError(
          f'No {kind} checkpoint under {os.path.join(self.directory, kind)}. '
          'Check --workdir, or train the run first.')
    where = f'{os.path.join(self.directory, kind, str(step))}'
    meta = self._restore_items(manager, step, None, ('meta',)).meta
    _check_fingerprint(meta, self.vocab_fingerprint, where)
    restored = self._restore_items(manager, step, target, ('state', 'data'))
    return restored.state, dict(restored.data or {}), meta

  def restore_latest(self, target=None, step: int | None = None):
    """Returns (state, iterator state, meta) of the latest (or given) checkpoint.

    `target` is a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings)
    giving the structure to restore into; None restores the saved tree (nested
    dicts) replicated over this run's devices, whatever devices saved it.
    """
    return self._restore(self._latest, 'latest', step, target)

  def restore_best(self, target=None):
    """Returns (state, iterator state, meta) of the best checkpoint."""
    return self._restore(self._best, 'best', None, target)

  def wait(self) -> None:
    """Blocks until background saves are written."""
    self._latest.wait_until_finished()
    self._best.wait_until_finished()

  def close(self) -> None:
    self._latest.close()
    self._best.close()


def _saved_tree_replicated(manager: ocp.CheckpointManager, step: int):
  """The saved state's shapes and dtypes, replicated over this run's devices.

  Restoring into it works whatever devices wrote the checkpoint (orbax refuses to
  restore without a target onto devices other than the saving ones, e.g. a
  4-device or 2-process run read back in a 1-device process).
  """
  path = ocp.step.standard_name_format().find_step(manager.directory, step).path
  tree = ocp.StandardCheckpointHandler().metadata(path / 'state').tree
  rep = mesh_lib.replicated(mesh_lib.make_mesh())
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=rep), tree,
      is_leaf=lambda x: isinstance(x, ocp.metadata.ArrayMetadata))


def restore_latest(workdir: str, target=None, vocab_fingerprint: str | None = None):
  """Restores the latest checkpoint of a run: returns (state, meta)."""
  ckpt = Checkpointer(workdir, vocab_fingerprint=vocab_fingerprint, read_only=True)
  try:
    state, _, meta = ckpt.restore_latest(target)
  finally:
    ckpt.close()
  return state, meta


def restore_best(workdir: str, target=None, vocab_fingerprint: str | None = None,
                 best_metric: str = 'nll'):
  """Restores the best checkpoint of a run: returns (state, meta)."""
  ckpt = Checkpointer(workdir, vocab_fingerprint=vocab_fingerprint,
                      best_metric=best_metric, read_only=True)
  try:
    state, _, meta = ckpt.restore_best(target)
  finally:
    ckpt.close()
  return state, meta
