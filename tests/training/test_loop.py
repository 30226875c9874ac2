"""The training loop: metrics, checkpoints, exact resume, NaN guard, plateau stop."""

import json
import logging
import os

import jax
import numpy as np
import pytest

import toy_task
from vae_jax import training
from vae_jax.training import checkpoint as checkpoint_lib
from vae_jax.training import writers


TASK = toy_task.make_task()
TASK_WITH_SAMPLES = toy_task.make_task(with_samples=True)
TASK_CONSTANT_EVAL = toy_task.make_task(constant_eval=True)


def _config(**kwargs):
  defaults = dict(num_steps=8, log_every=2, eval_every=4, checkpoint_every=4,
                  progress_bar=False,
                  optimizer=training.OptimizerConfig(learning_rate=0.05))
  defaults.update(kwargs)
  return training.TrainConfig(**defaults)


def _run(workdir, config, task=None, fingerprint='vocab-1', **iterator_kwargs):
  return training.train_and_evaluate(
      task or TASK, toy_task.ToyIterator(**iterator_kwargs),
      {'valid': toy_task.make_eval_data()}, config, str(workdir), fingerprint)


def _params(workdir):
  state, _ = training.restore_latest(str(workdir))
  return state['params']


def _assert_trees_equal(a, b):
  flat_a, tree_a = jax.tree.flatten(a)
  flat_b, tree_b = jax.tree.flatten(b)
  assert tree_a == tree_b
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_run_writes_metrics_checkpoints_and_samples(tmp_path):
  result = _run(tmp_path, _config(), task=TASK_WITH_SAMPLES)
  assert result['step'] == 8 and not result['stopped_early']
  assert set(result['valid']) == {'nll', 'rec', 'kl', 'ppl'}
  assert np.isfinite(result['train']['loss'])
  records = writers.read_metrics(tmp_path)
  train_steps = [r['step'] for r in records if r['split'] == 'train']
  valid_steps = [r['step'] for r in records if r['split'] == 'valid']
  assert train_steps == [2, 4, 6, 8] and valid_steps == [4, 8]
  samples = [r for r in records if r['split'] == 'samples']
  assert len(samples) == 2 and all(isinstance(t, str) for t in samples[0]['texts'])
  assert os.listdir(tmp_path / 'tensorboard')
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
  try:
    assert ckpt.latest_step() == 8 and ckpt.best_step() in (4, 8)
  finally:
    ckpt.close()
  best = json.loads((tmp_path / 'checkpoints' / 'best.json').read_text())
  assert best['metric'] == 'nll' and best['step'] in (4, 8)


@pytest.fixture(scope='module')
def straight(tmp_path_factory):
  """The workdir of a run of 12 steps that never stopped (checkpoints every 4)."""
  workdir = tmp_path_factory.mktemp('straight')
  _run(workdir, _config(num_steps=12, checkpoint_every=4))
  return workdir


def test_resume_is_exact(tmp_path, straight):
  config = _config(num_steps=12, checkpoint_every=4, keep=1)
  # Killed after 6 batches: the last checkpoint is step 4.
  with pytest.raises(RuntimeError, match='killed'):
    _run(tmp_path / 'resumed', config, fail_after=6)
  assert _params(tmp_path / 'resumed') is not None
  resumed = _run(tmp_path / 'resumed', config)
  assert resumed['step'] == 12
  _assert_trees_equal(_params(straight), _params(tmp_path / 'resumed'))
  # Stopped by num_steps, then continued with a larger num_steps.
  _run(tmp_path / 'extended', _config(num_steps=6, checkpoint_every=4))
  _run(tmp_path / 'extended', config)
  _assert_trees_equal(_params(straight), _params(tmp_path / 'extended'))
  # The metric log reads as if the run never stopped.
  def steps(workdir):
    return [(r['step'], r['split']) for r in writers.read_metrics(workdir)]
  assert steps(tmp_path / 'resumed') == steps(straight)


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_resume_past_a_damaged_checkpoint_and_a_torn_log_is_exact(tmp_path, straight, capfd,
                                                                  caplog):
  config = _config(num_steps=12, checkpoint_every=4)
  # Killed after 10 batches (checkpoints 4 and 8), in the middle of writing a metrics
  # record, and the arrays of checkpoint 8 were cut short.
  workdir = tmp_path / 'resumed'
  with pytest.raises(RuntimeError, match='killed'):
    _run(workdir, config, fail_after=10)
  latest = workdir / 'checkpoints' / 'latest'
  for path in (latest / '8' / 'state').glob('**/d/*'):
    with open(path, 'r+b') as f:
      f.truncate(path.stat().st_size // 2)
  with open(workdir / 'metrics.jsonl', 'a') as f:
    f.write('{"step": 12, "split": "tra')
  capfd.readouterr()
  caplog.set_level(logging.WARNING)

  resumed = _run(workdir, config)
  assert resumed['step'] == 12
  warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  assert len(warnings) == 2, warnings
  assert warnings[0].startswith(f'Skipped the damaged checkpoint {latest / "8"} (state: ')
  assert warnings[0].endswith('restored latest/4 instead.')
  assert warnings[1].startswith(f'Dropped line 8 of {workdir / "metrics.jsonl"}, its last')
  output = capfd.readouterr()
  assert 'Traceback' not in output.out + output.err
  # Checkpoint 8 was saved again, and the run ends as if it had never stopped.
  assert sorted(int(p.name) for p in latest.iterdir() if p.name.isdigit()) == [8, 12]
  _assert_trees_equal(_params(straight), _params(workdir))
  def records(workdir):
    return [(r['step'], r['split'], r.get('metrics', {}).get('nll'))
            for r in writers.read_metrics(workdir)]
  assert records(workdir) == records(straight)


def test_rerun_of_finished_run_changes_nothing(tmp_path):
  first = _run(tmp_path, _config())
  records = writers.read_metrics(tmp_path)
  again = _run(tmp_path, _config())
  assert again['step'] == 8
  assert again['valid'] == pytest.approx(first['valid'])
  assert writers.read_metrics(tmp_path) == records


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
  config = _config(num_steps=12, log_every=3, checkpoint_every=2, eval_every=100)
  with pytest.raises(training.NonFiniteLossError) as info:
    _run(tmp_path, config, nan_from=7)  # The batch of step 7 has a NaN weight.
  message = str(info.value)
  assert 'at step 7' in message
  assert 'last good checkpoint is step 6' in message
  assert 'learning_rate' in message and 'grad_clip_norm' in message
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
  try:
    assert ckpt.latest_step() == 6
    state, data, _ = ckpt.restore_latest()
  finally:
    ckpt.close()
  assert data['position'] == 6
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(state['params']))


def test_plateau_decays_learning_rate_and_stops(tmp_path):
  plateau = training.PlateauConfig(patience=2, factor=0.5, max_decays=2)
  config = _config(num_steps=100, log_every=1, eval_every=1, checkpoint_every=50,
                   optimizer=training.OptimizerConfig(learning_rate=0.1,
                                                      plateau=plateau))
  result = _run(tmp_path, config, task=TASK_CONSTANT_EVAL)
  # Evaluation 1 sets the best; 2 and 3 do not improve -> decay; 4, 5 -> decay, stop.
  assert result['stopped_early'] and result['step'] == 5
  lrs = [r['metrics']['learning_rate'] for r in writers.read_metrics(tmp_path)
         if r['split'] == 'train']
  np.testing.assert_allclose(lrs, [0.1, 0.1, 0.1, 0.05, 0.05], rtol=1e-6)
  state, _ = training.restore_latest(str(tmp_path))
  assert int(state['plateau']['num_decays']) == 2
  # A rerun sees the stopped run and does not train on.
  again = _run(tmp_path, config, task=TASK_CONSTANT_EVAL)
  assert again['stopped_early'] and again['step'] == 5


def test_reload_best_on_decay_continues_from_best_params(tmp_path):
  plateau = training.PlateauConfig(patience=2, max_decays=1)
  config = _config(num_steps=100, log_every=1, eval_every=1, checkpoint_every=50,
                   reload_best_on_decay=True,
                   optimizer=training.OptimizerConfig(learning_rate=0.1,
                                                      plateau=plateau))
  result = _run(tmp_path, config, task=TASK_CONSTANT_EVAL)
  assert result['stopped_early'] and result['step'] == 3
  best, meta = training.restore_best(str(tmp_path))
  assert meta['step'] == 1
  latest, _ = training.restore_latest(str(tmp_path))
  assert int(latest['step']) == 3
  _assert_trees_equal(latest['params'], best['params'])


def test_resume_with_other_vocabulary_is_a_clear_error(tmp_path):
  _run(tmp_path, _config(num_steps=2))
  with pytest.raises(training.VocabMismatchError, match='vocab-1.*vocab-2'):
    _run(tmp_path, _config(num_steps=4), fingerprint='vocab-2')


def test_bad_eval_split_and_metric_are_clear_errors(tmp_path):
  with pytest.raises(ValueError, match='eval_split'):
    _run(tmp_path, _config(eval_split='test'))
  with pytest.raises(KeyError, match='best_metric'):
    _run(tmp_path / 'b', _config(best_metric='elbo'))
  with pytest.raises(ValueError, match='needs validation data'):
    training.train_and_evaluate(
        TASK, toy_task.ToyIterator(), {},
        _config(optimizer=training.OptimizerConfig(
            plateau=training.PlateauConfig(patience=2))), str(tmp_path / 'c'))


def test_plain_iterator_is_rejected(tmp_path):
  with pytest.raises(TypeError, match='resumable'):
    training.train_and_evaluate(TASK, iter([]), {}, _config(),
                                str(tmp_path))


def test_finite_train_iterator_is_a_clear_error(tmp_path):

  class Finite(toy_task.ToyIterator):

    def __next__(self):
      if self.position >= 3:
        raise StopIteration
      return super().__next__()

  with pytest.raises(ValueError, match='ended at step 3.*infinite'):
    training.train_and_evaluate(TASK, Finite(), {}, _config(), str(tmp_path))
