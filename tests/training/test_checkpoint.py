"""Latest and best checkpoints: contents, retention, vocabulary check, restore targets,
fallback past damaged checkpoints."""

import json
import logging
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax import errors
from vae_jax.training import checkpoint as checkpoint_lib


def _state(value):
  return {'params': {'w': jnp.full((3,), value, jnp.float32)},
          'step': jnp.asarray(int(value), jnp.int32)}


@pytest.fixture
def ckpt(tmp_path):
  c = checkpoint_lib.Checkpointer(str(tmp_path), vocab_fingerprint='v1', keep=2,
                                  best_metric='nll')
  yield c
  c.close()


def test_latest_keeps_a_few_and_restores_state_and_data(ckpt, tmp_path):
  for step in (1, 2, 3):
    ckpt.save_latest(step, _state(step), {'position': step * 10}, {'loss': 1.0})
  ckpt.wait()
  assert ckpt.latest_step() == 3
  assert sorted(p.name for p in (tmp_path / 'checkpoints' / 'latest').iterdir()
                if p.name.isdigit()) == ['2', '3']
  state, data, meta = ckpt.restore_latest(_state(0))
  np.testing.assert_array_equal(state['params']['w'], [3.0, 3.0, 3.0])
  assert data == {'position': 30}
  assert meta['vocab_fingerprint'] == 'v1' and meta['step'] == 3
  state, _, _ = ckpt.restore_latest(step=2)
  np.testing.assert_array_equal(state['params']['w'], [2.0, 2.0, 2.0])


def test_best_keeps_only_the_lowest_metric(ckpt, tmp_path):
  assert ckpt.maybe_save_best(1, _state(1), {}, {'nll': 3.0})
  assert ckpt.maybe_save_best(2, _state(2), {}, {'nll': 2.0})
  assert not ckpt.maybe_save_best(3, _state(3), {}, {'nll': 2.5})
  assert not ckpt.maybe_save_best(4, _state(4), {}, {'nll': float('nan')})
  ckpt.wait()
  assert ckpt.best_step() == 2 and ckpt.best_value() == 2.0
  best = json.loads((tmp_path / 'checkpoints' / 'best.json').read_text())
  assert best['step'] == 2 and best['value'] == 2.0
  # The evaluator restores with only a target structure (abstract arrays here).
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
  state, meta = checkpoint_lib.restore_best(str(tmp_path), target, 'v1')
  np.testing.assert_array_equal(state['params']['w'], [2.0, 2.0, 2.0])
  assert meta['metrics'] == {'nll': 2.0}
  with pytest.raises(KeyError, match='best_metric'):
    ckpt.maybe_save_best(5, _state(5), {}, {'elbo': 1.0})


def test_best_selected_by_another_metric_is_replaced(ckpt, tmp_path):
  ckpt.maybe_save_best(1, _state(1), {}, {'nll': 1.0})
  ckpt.wait()
  other = checkpoint_lib.Checkpointer(str(tmp_path), best_metric='elbo')
  try:
    assert other.best_value() is None
    assert other.maybe_save_best(2, _state(2), {}, {'elbo': 5.0})
    other.wait()
    assert other.best_step() == 2 and other.best_value() == 5.0
  finally:
    other.close()


def test_discard_after_removes_newer_best(ckpt):
  ckpt.maybe_save_best(4, _state(4), {}, {'nll': 1.0})
  ckpt.wait()
  ckpt.discard_after(3)
  assert ckpt.best_step() is None and ckpt.best_value() is None


def test_vocabulary_mismatch_is_a_clear_error(ckpt, tmp_path):
  ckpt.save_latest(1, _state(1), {})
  ckpt.wait()
  with pytest.raises(checkpoint_lib.VocabMismatchError,
                     match="'v1'.*'v2'.*vocabulary the run was trained with"):
    checkpoint_lib.restore_latest(str(tmp_path), vocab_fingerprint='v2')
  state, _ = checkpoint_lib.restore_latest(str(tmp_path))  # None: not checked.
  assert int(state['step']) == 1


def test_missing_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(checkpoint_lib.CheckpointNotFoundError, match='No best checkpoint'):
    checkpoint_lib.restore_best(str(tmp_path / 'nothing'))


def test_relative_workdir_works(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  ckpt = checkpoint_lib.Checkpointer('run', keep=1)
  try:
    ckpt.save_latest(1, _state(1), {})
    ckpt.wait()
  finally:
    ckpt.close()
  assert ckpt.directory == str(tmp_path / 'run' / 'checkpoints')
  state, meta = checkpoint_lib.restore_latest('run')
  assert int(state['step']) == 1 and meta['step'] == 1


# Damage as a kill, a full disk or a bad copy leaves it, to the files of a saved step
# (`find checkpoints/latest/2`): state/ holds orbax's OCDBT store, whose manifest.ocdbt
# points into the data files under state/d/ (small arrays live there); _METADATA is its
# tree; meta/ and data/ hold our JSON.


def _truncate(path):
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)


def _zero_fill(path):
  path.write_bytes(bytes(path.stat().st_size))


def _data_files(folder):
  files = sorted((folder / 'state').glob('**/d/*'))
  assert files, f'no OCDBT data files under {folder}'
  return files


DAMAGE = {
    'truncated array file': lambda folder: [_truncate(p) for p in _data_files(folder)],
    'zero-filled array file': lambda folder: [_zero_fill(p) for p in _data_files(folder)],
    'deleted array file': lambda folder: [p.unlink() for p in _data_files(folder)],
    'deleted manifest': lambda folder: (folder / 'state' / 'manifest.ocdbt').unlink(),
    'deleted _METADATA': lambda folder: (folder / 'state' / '_METADATA').unlink(),
    'corrupt meta JSON': lambda folder: (folder / 'meta' / 'metadata').write_text('{"st'),
    'corrupt data JSON': lambda folder: (folder / 'data' / 'metadata').write_bytes(b'\0' * 8),
}


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def _assert_quiet(capfd, caplog, recwarn, expected_warnings):
  """Only the expected warning lines: no traceback, no orbax, asyncio or Python reports."""
  assert not [str(w.message) for w in recwarn], 'Python warnings'
  captured = capfd.readouterr()
  output = captured.out + captured.err
  assert 'Traceback' not in output and 'Event loop is closed' not in output
  assert len(output.splitlines()) <= expected_warnings, output
  assert len(_warnings(caplog)) == expected_warnings, _warnings(caplog)
  assert all('\n' not in w for w in _warnings(caplog))


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
@pytest.mark.parametrize('damage', sorted(DAMAGE))
def test_damaged_latest_falls_back_to_the_previous_step(tmp_path, damage, capfd, caplog,
                                                       recwarn):
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), vocab_fingerprint='v1', keep=2)
  try:
    for step in (1, 2):
      ckpt.save_latest(step, _state(step), {'position': step * 10})
    ckpt.wait()
  finally:
    ckpt.close()
  latest = tmp_path / 'checkpoints' / 'latest'
  DAMAGE[damage](latest / '2')
  capfd.readouterr()
  caplog.set_level(logging.WARNING)

  # With a target (resuming) and without one (evaluating: the saved tree is read).
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), vocab_fingerprint='v1', read_only=True)
  try:
    state, data, meta = ckpt.restore_latest(_state(0))
  finally:
    ckpt.close()
  restored, meta_again = checkpoint_lib.restore_latest(str(tmp_path), vocab_fingerprint='v1')
  np.testing.assert_array_equal(restored['params']['w'], [1.0, 1.0, 1.0])
  assert meta_again['step'] == 1
  if damage != 'deleted _METADATA':  # Only restoring without a target reads _METADATA.
    np.testing.assert_array_equal(state['params']['w'], [1.0, 1.0, 1.0])
    assert int(state['step']) == 1 and data == {'position': 10} and meta['step'] == 1
  warnings = _warnings(caplog)
  assert all(f'Skipped the damaged checkpoint {latest / "2"} (' in w and
             w.endswith('restored latest/1 instead.') for w in warnings), warnings
  part = 'meta' if 'meta' in damage else 'data' if 'data' in damage else 'state'
  assert all(f'({part}: ' in w for w in warnings), warnings
  _assert_quiet(capfd, caplog, recwarn, 1 if damage == 'deleted _METADATA' else 2)

  # Every checkpoint damaged: one line saying which, why and what to do.
  caplog.clear()
  DAMAGE[damage](latest / '1')
  with pytest.raises(errors.CheckpointError) as info:
    checkpoint_lib.restore_latest(str(tmp_path), vocab_fingerprint='v1')
  message = str(info.value)
  assert '\n' not in message and len(message) < 1500, message
  assert message.startswith(f'No checkpoint under {tmp_path / "checkpoints"} can be restored: '
                            f'latest/2 ({part}: ')
  assert f'; latest/1 ({part}: ' in message and 'delete those step folders' in message
  _assert_quiet(capfd, caplog, recwarn, 0)


def test_vocabulary_mismatch_is_not_damage(tmp_path):
  for step, fingerprint in ((1, 'v1'), (2, 'v2')):
    ckpt = checkpoint_lib.Checkpointer(str(tmp_path), vocab_fingerprint=fingerprint, keep=2)
    try:
      ckpt.save_latest(step, _state(step), {})
      ckpt.wait()
    finally:
      ckpt.close()
  # Step 2 is intact but of another vocabulary: an error, not a fallback to step 1.
  with pytest.raises(checkpoint_lib.VocabMismatchError, match='latest/2'):
    checkpoint_lib.restore_latest(str(tmp_path), vocab_fingerprint='v1')


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_evaluation_falls_back_from_a_damaged_best_to_the_latest(ckpt, tmp_path, capfd,
                                                                 caplog, recwarn):
  for step in (1, 2):
    ckpt.save_latest(step, _state(step), {})
  ckpt.maybe_save_best(2, _state(2), {}, {'nll': 1.0})
  ckpt.wait()
  target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), _state(0))
  state, meta, used = checkpoint_lib.restore_for_evaluation(str(tmp_path), target, 'v1')
  assert used == 'best/2' and meta['step'] == 2 and meta['metrics'] == {'nll': 1.0}
  state, meta, used = checkpoint_lib.restore_for_evaluation(str(tmp_path), which='latest')
  assert used == 'latest/2' and int(state['step']) == 2

  checkpoints = tmp_path / 'checkpoints'
  DAMAGE['truncated array file'](checkpoints / 'best' / '2')
  capfd.readouterr()
  caplog.set_level(logging.WARNING)
  state, meta, used = checkpoint_lib.restore_for_evaluation(str(tmp_path), target, 'v1')
  assert used == 'latest/2' and meta['step'] == 2
  np.testing.assert_array_equal(state['params']['w'], [2.0, 2.0, 2.0])
  [warning] = _warnings(caplog)
  assert warning.startswith(f'Skipped the damaged checkpoint {checkpoints / "best" / "2"} '
                            '(state: ValueError: ')
  assert warning.endswith('restored latest/2 instead.')
  # The best checkpoint alone cannot be restored: one line, no fallback to latest.
  with pytest.raises(errors.CheckpointError, match=r'can be restored: best/2 \(state: '):
    checkpoint_lib.restore_best(str(tmp_path), target, 'v1')
  _assert_quiet(capfd, caplog, recwarn, 1)

  # Without any best checkpoint, one line says so and which was used instead.
  caplog.clear()
  shutil.rmtree(checkpoints / 'best' / '2')
  state, meta, used = checkpoint_lib.restore_for_evaluation(str(tmp_path), target, 'v1')
  assert used == 'latest/2'
  [warning] = _warnings(caplog)
  assert warning == (f'The run has no best checkpoint under {checkpoints / "best"} (it is '
                     'saved at evaluations); restored latest/2 instead.')
  with pytest.raises(checkpoint_lib.CheckpointNotFoundError, match='No best or latest'):
    checkpoint_lib.restore_for_evaluation(str(tmp_path / 'nothing'))


def test_unreadable_best_is_replaced_by_the_next_best(ckpt, tmp_path, caplog):
  ckpt.maybe_save_best(2, _state(2), {}, {'nll': 1.0})
  ckpt.wait()
  DAMAGE['corrupt meta JSON'](tmp_path / 'checkpoints' / 'best' / '2')
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), vocab_fingerprint='v1')
  try:
    caplog.set_level(logging.WARNING)
    assert ckpt.best_value() is None
    assert ckpt.maybe_save_best(3, _state(3), {}, {'nll': 5.0})
    ckpt.wait()
    assert ckpt.steps('best') == [3]
  finally:
    ckpt.close()
  [warning] = _warnings(caplog)
  assert 'Cannot read the best checkpoint' in warning and '(meta: JSONDecodeError' in warning
