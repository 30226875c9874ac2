"""Latest and best checkpoints: contents, retention, vocabulary check, restore targets."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

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
