"""Optimisers from the config and the halve-on-plateau controller."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vae_jax.training import optim


def _grads():
  return {'w': jnp.asarray([3.0, -4.0]), 'b': jnp.asarray([0.5])}


def _params():
  return {'w': jnp.asarray([1.0, 2.0]), 'b': jnp.asarray([0.0])}


def _apply(tx, steps=3):
  params, opt_state = _params(), tx.init(_params())
  for _ in range(steps):
    updates, opt_state = tx.update(_grads(), opt_state, params)
    params = optax.apply_updates(params, updates)
  return params, opt_state


def _assert_equal(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(x, y)


def test_adam_without_clipping_is_plain_adam():
  params, _ = _apply(optim.make_optimizer(optim.OptimizerConfig(learning_rate=0.1)))
  expected, _ = _apply(optax.adam(0.1))
  _assert_equal(params, expected)


def test_sgd_with_clipping_matches_optax():
  cfg = optim.OptimizerConfig(name='sgd', learning_rate=1.0, grad_clip_norm=2.5)
  params, opt_state = _apply(optim.make_optimizer(cfg))
  expected, _ = _apply(optax.chain(optax.clip_by_global_norm(2.5), optax.sgd(1.0)))
  _assert_equal(params, expected)
  assert float(optim.get_learning_rate(opt_state)) == 1.0


def test_learning_rate_is_changed_in_the_state():
  cfg = optim.OptimizerConfig(name='sgd', learning_rate=1.0)
  tx = optim.make_optimizer(cfg)
  opt_state = optim.apply_config(tx.init(_params()), cfg, lr_scale=0.25)
  updates, _ = tx.update(_grads(), opt_state, _params())
  np.testing.assert_allclose(updates['w'], [-0.75, 1.0])
  with pytest.raises(KeyError, match='learning_rate'):
    optim.set_hyperparams(opt_state, lr=0.1)


def test_weight_decay_and_momentum_build():
  for cfg in (optim.OptimizerConfig(weight_decay=0.01),
              optim.OptimizerConfig(name='sgd', momentum=0.9, weight_decay=0.01)):
    params, _ = _apply(optim.make_optimizer(cfg))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize('kwargs, match', [
    (dict(name='rmsprop'), 'adam, sgd'),
    (dict(learning_rate=0.0), 'learning_rate'),
    (dict(grad_clip_norm=-1.0), 'grad_clip_norm'),
])
def test_bad_optimizer_config_is_a_clear_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.OptimizerConfig(**kwargs)


@pytest.mark.parametrize('kwargs, match', [
    (dict(patience=0), 'patience'), (dict(factor=1.5), 'factor'),
    (dict(max_decays=0), 'max_decays'), (dict(min_delta=-1.0), 'min_delta'),
])
def test_bad_plateau_config_is_a_clear_error(kwargs, match):
  with pytest.raises(ValueError, match=match):
    optim.PlateauConfig(**kwargs)


def _reference_plateau(losses, patience, factor, max_decays):
  """He et al. (2019)'s controller, written as their training script does it."""
  best, not_improved, lr, decays, trace = float('inf'), 0, 1.0, 0, []
  for loss in losses:
    if loss > best:
      not_improved += 1
      if not_improved >= patience:
        best, not_improved, lr, decays = loss, 0, lr * factor, decays + 1
    else:
      not_improved, best = 0, loss
    trace.append((lr, decays, decays == max_decays))
    if decays == max_decays:
      break
  return trace


def test_plateau_update_follows_he_et_al():
  losses = [5.0, 4.0, 4.5, 4.2, 4.1, 3.9, 4.0, 4.0, 3.95, 3.9, 3.95, 4.0]
  cfg = optim.PlateauConfig(patience=2, factor=0.5, max_decays=3)
  state, trace = optim.init_plateau(), []
  update = jax.jit(lambda s, v: optim.plateau_update(s, v, cfg))
  for loss in losses:
    state = update(state, loss)
    stop = optim.should_stop(state, cfg)
    trace.append((float(state.lr_scale), int(state.num_decays), stop))
    if stop:
      break
  assert trace == _reference_plateau(losses, 2, 0.5, 3)
  assert trace[-1][2]


def test_plateau_min_delta_and_non_finite_loss():
  cfg = optim.PlateauConfig(patience=1, min_delta=0.1)
  state = optim.plateau_update(optim.init_plateau(), 2.0, cfg)
  state = optim.plateau_update(state, 1.95, cfg)  # Not better by more than 0.1.
  assert int(state.num_decays) == 1 and float(state.lr_scale) == 0.5
  state = optim.plateau_update(state, float('nan'), cfg)
  assert int(state.num_decays) == 2 and float(state.best) == pytest.approx(1.95)


def test_plateau_off_is_identity():
  state = optim.plateau_update(optim.init_plateau(), 1.0, optim.PlateauConfig())
  assert float(state.best) == float('inf') and not optim.should_stop(
      state, optim.PlateauConfig())
