"""Checkpoints with orbax: the latest few and the best one, with data position and vocabulary.

Layout under `<workdir>/checkpoints/`:

  latest/<step>/{state,data,meta}   the last `keep` checkpoints (for resuming)
  best/<step>/{state,data,meta}     the one with the lowest validation metric
  best.json                         step and metrics of the best checkpoint (for people)

`state` is the TrainState pytree, `data` the train iterator's `state()` dict and
`meta` a JSON dict with the vocabulary fingerprint, the step and the metrics.
orbax writes atomically and coordinates processes; every process must call
save/restore, and only process 0 writes `best.json`.

A checkpoint can still be damaged afterwards (a file truncated, zero-filled or
deleted, a disk that filled up while something else was written). Restoring
tries the checkpoints of a kind newest first: one that cannot be read is
skipped with one warning line naming its folder and the cause (orbax's own
reports of the failure kept quiet: `checkpoint_damage`), and the next older
one is used. Only when none can be read is it an error
(`errors.CheckpointError`, one line). A vocabulary mismatch is not damage: it
is raised at once. Every process must see the same files, so that all of them
fall back to the same checkpoint.
"""

from collections.abc import Iterator, Sequence
import contextlib
import logging as pylogging
import math
import os

from absl import logging
import jax
import orbax.checkpoint as ocp

from vae_jax import errors
from vae_jax import fileio
from vae_jax.training import mesh as mesh_lib
from vae_jax.training.checkpoint_damage import Damaged, describe_error, quiet_restore

ITEMS = ('state', 'data', 'meta')
KINDS = ('latest', 'best')


# A checkpoint was trained with a different vocabulary than the current run.
VocabMismatchError = errors.VocabMismatchError
# No checkpoint of the requested kind exists in the workdir.
CheckpointNotFoundError = errors.CheckpointNotFoundError


def checkpoint_dir(workdir: str) -> str:
  """`<workdir>/checkpoints` as an absolute path (orbax refuses relative ones)."""
  return os.path.join(os.path.abspath(os.fspath(workdir)), 'checkpoints')


def _check_fingerprint(meta: dict, expected: str | None, where: str) -> None:
  found = meta.get('vocab_fingerprint')
  if expected is not None and found != expected:
    raise VocabMismatchError(
        f'The checkpoint {where} was trained with vocabulary fingerprint '
        f'{found!r}, but this run has {expected!r}. Use the vocabulary the run was '
        'trained with (the vocab file saved in its workdir), or start a fresh run '
        'in a new --workdir.')


def _processes(name: str) -> ocp.options.MultiprocessingOptions:
  return ocp.options.MultiprocessingOptions(barrier_sync_key_prefix=name)


class _DropLibraryInfo(pylogging.Filter):
  """Keeps checkpointing libraries' INFO chatter out of the experiment's log."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname


def quiet_library_logs() -> None:
  """Drops orbax's INFO lines from the absl log (its warnings stay); idempotent."""
  logger = pylogging.getLogger('absl')
  if not any(isinstance(f, _DropLibraryInfo) for f in logger.filters):
    logger.addFilter(_DropLibraryInfo())


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
    # lightweight_initialize: orbax does not read every step's metadata and
    # metrics files when it opens a folder, so a damaged one cannot stop a run
    # before restoring (which skips it) even starts.
    common = dict(create=not read_only, read_only=read_only,
                  enable_async_checkpointing=async_save,
                  cleanup_tmp_directories=not read_only, lightweight_initialize=True)
    # Read-only managers warn that they change options nobody set; not worth a line.
    with quiet_restore(collect=False) if read_only else contextlib.nullcontext():
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
    self._managers = {'latest': self._latest, 'best': self._best}
    self._best_value = None
    self._best_value_step = None

  # Queries.

  def latest_step(self) -> int | None:
    """The newest latest checkpoint's step (it may be damaged: see `restore_latest`)."""
    return self._latest.latest_step()

  def best_step(self) -> int | None:
    steps = self._best.all_steps()
    return max(steps) if steps else None

  def steps(self, kind: str) -> list[int]:
    """The steps of the `kind` ('latest' or 'best') checkpoints, newest first."""
    return sorted(self._managers[kind].all_steps(), reverse=True)

  def folder(self, kind: str, step: int) -> str:
    """The folder of one checkpoint, `<workdir>/checkpoints/<kind>/<step>`."""
    return os.path.join(self.directory, kind, str(step))

  def best_value(self) -> float | None:
    """The best checkpoint's `best_metric` (None when there is none, or when it
    cannot be read: then the next evaluation replaces it)."""
    step = self.best_step()
    if step is None:
      return None
    if self._best_value_step != step:
      try:
        with quiet_restore():
          meta = self._read('meta', lambda: self._restore_items(
              self._best, step, None, ('meta',)).meta)
          metrics = meta.get('metrics', {})
      except Damaged as e:
        logging.warning('Cannot read the best checkpoint %s (%s); the next evaluation '
                        'replaces it.', self.folder('best', step), e.cause)
        metrics = None
      value = None if metrics is None else metrics.get(self.best_metric)
      if value is None and metrics is not None:
        logging.warning(
            'The best checkpoint (step %d) has no %r (it was selected by %s); the '
            'next evaluation replaces it.', step, self.best_metric, sorted(metrics))
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
      self._best.delete(self.best_step())  # Selected by another metric, or unreadable.
    meta = self._meta(step, metrics)
    self._best.save(step, args=self._args(state, data_state, meta),
                    metrics={self.best_metric: value}, force=True)
    self._best_value, self._best_value_step = value, step
    if jax.process_index() == 0:
      fileio.write_json_atomic(os.path.join(self.directory, 'best.json'),
                               {'step': int(step), 'metric': self.best_metric,
                                'value': value, 'metrics': meta['metrics']},
                               sort_keys=True)
    return True

  def discard_after(self, step: int) -> None:
    """Deletes the checkpoints newer than the resumed `step`.

    Best checkpoints newer than it were left by a run stopped before its next
    latest checkpoint; latest ones newer than it could not be restored
    (damaged). The resumed run recomputes both exactly, and saves them again
    under the same step numbers.
    """
    for kind in KINDS:
      for s in self.steps(kind):
        if s > step:
          logging.info('Discarding %s checkpoint %d newer than the resumed step %d.',
                       kind, s, step)
          with quiet_restore():
            self._managers[kind].delete(s)
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

  def _read(self, part: str, read):
    """`read()`, or `Damaged` naming `part` and the error if it raises."""
    try:
      value = read()
    except Exception as e:  # pylint: disable=broad-except
      raise Damaged(f'{part}: {describe_error(e, self.directory)}') from e
    if part in ('meta', 'data') and not isinstance(value, dict):
      raise Damaged(f'{part}: holds {type(value).__name__}, not a JSON object')
    return value

  def _restore_one(self, kind: str, step: int, target):
    """(state, data, meta) of one checkpoint; `Damaged` if a part cannot be read,
    VocabMismatchError if it was trained with another vocabulary."""
    manager = self._managers[kind]
    meta = self._read('meta', lambda: self._restore_items(
        manager, step, None, ('meta',)).meta)
    _check_fingerprint(meta, self.vocab_fingerprint, self.folder(kind, step))
    data = self._read('data', lambda: self._restore_items(
        manager, step, None, ('data',)).data)
    state = self._read('state', lambda: self._restore_items(
        manager, step, target, ('state',)).state)
    return state, data, {**meta, 'step': int(step)}

  def restore_first(self, candidates: Sequence[tuple[str, int]], target=None):
    """Restores the first of `candidates` ((kind, step) pairs) that can be read.

    Returns (state, iterator state, meta, used): `meta['step']` is the step
    restored and `used` names it, e.g. 'latest/1250'. Every candidate skipped
    before it is logged as one warning line (its folder, the cause and what was
    used instead); orbax's own reports are kept quiet. Raises CheckpointError
    (one line, every folder and cause) when none can be read, and
    VocabMismatchError at once for a checkpoint of another vocabulary.
    """
    failures = []
    with quiet_restore() as quiet:
      for kind, step in candidates:
        try:
          state, data, meta = self._restore_one(kind, step, target)
        except Damaged as e:
          failures.append((kind, step, e.cause))
          quiet.failed = True
          continue
        break
      else:
        raise self._unrestorable(failures)
    used = f'{kind}/{step}'
    for bad_kind, bad_step, cause in failures:
      logging.warning('Skipped the damaged checkpoint %s (%s); restored %s instead.',
                      self.folder(bad_kind, bad_step), cause, used)
    return state, data, meta, used

  def _unrestorable(self, failures) -> errors.CheckpointError:
    if not failures:
      return CheckpointNotFoundError(
          f'No checkpoint under {self.directory}. Check --workdir, or train the run first.')
    listed = '; '.join(f'{kind}/{step} ({cause})' for kind, step, cause in failures)
    return errors.CheckpointError(
        f'No checkpoint under {self.directory} can be restored: {listed}. If these '
        'files are damaged, delete those step folders (a run then resumes from an older '
        'checkpoint, or starts over) or use a fresh --workdir; if the model config '
        'changed since they were saved, use the config they were trained with.')

  def _restore_kind(self, kind: str, step: int | None, target):
    steps = self.steps(kind)
    if step is not None:
      steps = [s for s in steps if s == step]
    if not steps:
      which = kind if step is None else f'{kind} step {step}'
      raise CheckpointNotFoundError(
          f'No {which} checkpoint under {os.path.join(self.directory, kind)}. '
          'Check --workdir, or train the run first.')
    state, data, meta, _ = self.restore_first([(kind, s) for s in steps], target)
    return state, data, meta

  def restore_latest(self, target=None, step: int | None = None):
    """Returns (state, iterator state, meta) of the newest latest checkpoint that
    can be restored (`meta['step']` says which), or of the given `step`.

    `target` is a pytree of arrays or `jax.ShapeDtypeStruct`s (with shardings)
    giving the structure to restore into; None restores the saved tree (nested
    dicts) replicated over this run's devices, whatever devices saved it. Damaged
    checkpoints are skipped as in `restore_first`.
    """
    return self._restore_kind('latest', step, target)

  def restore_best(self, target=None):
    """Returns (state, iterator state, meta) of the newest best checkpoint that can
    be restored (`meta['step']` says which); damaged ones are skipped as in
    `restore_first`."""
    return self._restore_kind('best', None, target)

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


@contextlib.contextmanager
def _read_only(workdir: str, **options) -> Iterator[Checkpointer]:
  """A read-only `Checkpointer(workdir, **options)`, closed when the block ends."""
  ckpt = Checkpointer(workdir, read_only=True, **options)
  try:
    yield ckpt
  finally:
    ckpt.close()


def restore_latest(workdir: str, target=None, vocab_fingerprint: str | None = None):
  """Restores the newest latest checkpoint of a run that can be read: returns (state,
  meta), `meta['step']` its step. Damaged ones are skipped with a warning line."""
  with _read_only(workdir, vocab_fingerprint=vocab_fingerprint) as ckpt:
    state, _, meta = ckpt.restore_latest(target)
  return state, meta


def restore_best(workdir: str, target=None, vocab_fingerprint: str | None = None,
                 best_metric: str = 'nll'):
  """Restores the newest best checkpoint of a run that can be read: returns (state,
  meta), `meta['step']` its step. Damaged ones are skipped with a warning line."""
  with _read_only(workdir, vocab_fingerprint=vocab_fingerprint, best_metric=best_metric) as ckpt:
    state, _, meta = ckpt.restore_best(target)
  return state, meta


def restore_for_evaluation(workdir: str, target=None, vocab_fingerprint: str | None = None,
                           which: str = 'best'):
  """Restores the checkpoint of a run to evaluate: returns (state, meta, used).

  With which='best' the best checkpoints are tried newest first, then the
  latest ones newest first; with which='latest' only the latest ones. The first
  that can be read is used; `used` names it ('best/1200', 'latest/1250') and
  `meta['step']` is its step. When it is not the newest of the requested kind,
  one warning line says which was used and why: one per damaged checkpoint
  skipped, or one saying that the run has no best checkpoint. Raises
  CheckpointNotFoundError when the run has no checkpoint at all, CheckpointError
  when none can be read and VocabMismatchError for another vocabulary.
  """
  if which not in KINDS:
    raise ValueError(f'which={which!r}: restore the {" or the ".join(KINDS)} checkpoint.')
  kinds = ('best', 'latest') if which == 'best' else ('latest',)
  with _read_only(workdir, vocab_fingerprint=vocab_fingerprint) as ckpt:
    candidates = [(kind, step) for kind in kinds for step in ckpt.steps(kind)]
    if not candidates:
      raise CheckpointNotFoundError(
          f'No {" or ".join(kinds)} checkpoint under {ckpt.directory}. Check --workdir, or '
          'train the run first.')
    state, _, meta, used = ckpt.restore_first(candidates, target)
  if candidates[0][0] != which:
    logging.warning('The run has no best checkpoint under %s (it is saved at evaluations); '
                    'restored %s instead.', os.path.join(ckpt.directory, 'best'), used)
  return state, meta, used
