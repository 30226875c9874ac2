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


# A tiny quadratic f(theta) = sum_i a_i theta_i^2 / 2, whose gradient is a * theta.
_A = np.array([2.0, 0.5])
_THETA0 = np.array([1.0, -2.0])


def _descend(cfg, steps):
  """`steps` updates of the optimiser of `cfg` on the quadratic, from _THETA0."""
  tx = optim.make_optimizer(cfg)
  theta = jnp.asarray(_THETA0, jnp.float32)
  opt_state = tx.init(theta)
  trace = []
  for _ in range(steps):
    updates, opt_state = tx.update(jnp.asarray(_A, jnp.float32) * theta, opt_state, theta)
    theta = optax.apply_updates(theta, updates)
    trace.append(np.asarray(theta))
  return trace


def test_sgd_with_momentum_and_weight_decay_by_hand():
  # SGD with momentum mu = 0.9 and L2 weight decay lambda = 0.5 (PyTorch's SGD and optax's
  # add_decayed_weights + sgd alike): g_t = a theta_t + lambda theta_t,
  # m_t = g_t + mu m_{t-1} (m_0 = 0), theta_{t+1} = theta_t - lr m_t, lr = 0.1.
  #   theta_0 = ( 1,     -2   )
  #   g_0     = ( 2.5,   -2   )   m_0 = ( 2.5,   -2   )   theta_1 = ( 0.75,   -1.8  )
  #   g_1     = ( 1.875, -1.8 )   m_1 = ( 4.125, -3.6 )   theta_2 = ( 0.3375, -1.44 )
  cfg = optim.OptimizerConfig(name='sgd', learning_rate=0.1, momentum=0.9, weight_decay=0.5)
  theta_1, theta_2 = _descend(cfg, 2)
  np.testing.assert_allclose(theta_1, [0.75, -1.8], rtol=1e-6)
  np.testing.assert_allclose(theta_2, [0.3375, -1.44], rtol=1e-6)
  # Without momentum and decay: theta_{t+1} = (1 - lr a) theta_t.
  theta_1, theta_2 = _descend(optim.OptimizerConfig(name='sgd', learning_rate=0.1), 2)
  np.testing.assert_allclose(theta_1, [0.8, -1.9], rtol=1e-6)
  np.testing.assert_allclose(theta_2, [0.64, -1.805], rtol=1e-6)


def test_adam_with_decoupled_weight_decay_by_hand():
  # AdamW (Loshchilov & Hutter 2019): theta <- theta - lr (m^ / (sqrt(v^) + eps) + wd theta),
  # m^ and v^ the bias-corrected moments of the gradient a theta (no decay in it).
  # Step 1: m^ = g, v^ = g^2, so the Adam direction is g / (|g| + eps) = sign(g):
  #   g_0 = (2, -1); theta_1 = (1 - 0.1 (1 + 0.01), -2 - 0.1 (-1 - 0.02)) = (0.899, -1.898).
  lr, wd, b1, b2, eps = 0.1, 0.01, 0.9, 0.999, 1e-8
  cfg = optim.OptimizerConfig(learning_rate=lr, weight_decay=wd)
  theta_1, theta_2 = _descend(cfg, 2)
  np.testing.assert_allclose(theta_1, [0.899, -1.898], rtol=1e-6)
  # Step 2 from Adam's definition (Kingma & Ba 2015, Algorithm 1), in float64 (float32's
  # b2 = 0.999 is off by 1.3e-8, which 1 - b2 turns into 1e-5 relative, mostly cancelled by
  # the bias correction: hence rtol 1e-5).
  g0, g1 = _A * _THETA0, _A * np.array([0.899, -1.898])
  m = (1 - b1) * (b1 * g0 + g1)
  v = (1 - b2) * (b2 * g0 ** 2 + g1 ** 2)
  direction = (m / (1 - b1 ** 2)) / (np.sqrt(v / (1 - b2 ** 2)) + eps)
  np.testing.assert_allclose(theta_2, np.array([0.899, -1.898]) * (1 - lr * wd) - lr * direction,
                             rtol=1e-5)


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


def _reference_plateau(losses, patience, factor, max_decays, first_epoch=0):
  """He et al. (2019)'s controller, written as their training script does it
  (jxhe/vae-lagging-encoder text.py: `not_improved >= decay_epoch and epoch >= 15`, with
  `first_epoch` for their 15 and one loss per epoch)."""
  best, not_improved, lr, decays, trace = float('inf'), 0, 1.0, 0, []
  for epoch, loss in enumerate(losses):
    if loss > best:
      not_improved += 1
      if not_improved >= patience and epoch >= first_epoch:
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


def test_plateau_min_epochs_follows_he_et_al():
  """No decay before epoch index 4 (min_epochs = 5 with one evaluation per epoch); the counter
  runs before, so the first allowed evaluation decays at once, as in their script."""
  losses = [5.0, 4.0, 4.5, 4.6, 4.7, 4.8, 3.9, 4.0, 4.1, 4.2, 4.3, 4.4]
  cfg = optim.PlateauConfig(patience=2, factor=0.5, max_decays=3, min_epochs=5)
  state, trace = optim.init_plateau(), []
  update = jax.jit(lambda s, v, may: optim.plateau_update(s, v, cfg, may))
  for epoch, loss in enumerate(losses):
    state = update(state, loss, epoch + 1 >= cfg.min_epochs)  # evaluated after epoch + 1
    stop = optim.should_stop(state, cfg)
    trace.append((float(state.lr_scale), int(state.num_decays), stop))
    if stop:
      break
  want = _reference_plateau(losses, 2, 0.5, 3, first_epoch=4)
  assert trace == want
  assert [t[1] for t in trace][:5] == [0, 0, 0, 0, 1]   # the 3 bad evaluations wait for epoch 4
  assert trace != _reference_plateau(losses, 2, 0.5, 3)


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
