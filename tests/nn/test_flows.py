"""Flows: shapes under batching, round trips, log-det against slogdet of the Jacobian, jit vs no
jit, finite gradients, identity at initialisation, autoregressive structure."""

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax.nn import flows

D, C, B = 5, 3, 4
KINDS = ["planar", "iaf", "coupling"]


def _flow(kind, amortized, num_layers=3):
  cfg = flows.FlowConfig(kind=kind, num_layers=num_layers, hidden_dim=16, amortized=amortized,
                         context_dim=C)
  return flows.Flow(cfg, D)


def _perturbed_params(module, context, scale=0.4, seed=0):
  """Initialised parameters moved away from the identity (zero-initialised output layers)."""
  params = module.init(jax.random.PRNGKey(seed), context)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(
      tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _context(amortized, batch=B):
  return jax.random.normal(jax.random.PRNGKey(7), (batch, C)) if amortized else None


@pytest.mark.parametrize("amortized", [True, False])
@pytest.mark.parametrize("kind", KINDS)
def test_log_det_matches_jacobian_and_round_trip(kind, amortized):
  with jax.enable_x64(True):  # the Jacobian's determinant is ill-conditioned in float32
    _check_log_det_and_round_trip(kind, amortized)


def _check_log_det_and_round_trip(kind, amortized):
  module, ctx = _flow(kind, amortized), _context(amortized)
  to64 = lambda x: None if x is None else jnp.asarray(x, jnp.float64)
  params = jax.tree.map(to64, _perturbed_params(module, ctx))
  ctx = to64(ctx)
  z = to64(jax.random.normal(jax.random.PRNGKey(2), (B, D)))
  bij = module.apply(params, ctx)
  y, log_det = bij.forward_and_log_det(z)
  assert y.shape == (B, D) and log_det.shape == (B,)

  def forward_one(zi, ci):
    return module.apply(params, None if ci is None else ci).forward(zi)

  ctx_rows = ctx if amortized else [None] * B
  for i in range(B):
    jac = jax.jacobian(forward_one)(z[i], ctx_rows[i])
    np.testing.assert_allclose(log_det[i], jnp.linalg.slogdet(jac)[1], atol=1e-9, rtol=1e-9)
  x, inv_log_det = bij.inverse_and_log_det(y)
  np.testing.assert_allclose(x, z, atol=1e-8)
  np.testing.assert_allclose(inv_log_det, -log_det, atol=1e-8)


@pytest.mark.parametrize("kind", KINDS)
def test_broadcasting_over_extra_batch_axes(kind):
  """Events [S, B, d] against a context [B, C]: one flow per example, S samples each."""
  module, ctx = _flow(kind, True), _context(True)
  params = _perturbed_params(module, ctx)
  z = jax.random.normal(jax.random.PRNGKey(3), (6, B, D))
  y, log_det = module.apply(params, ctx).forward_and_log_det(z)
  assert y.shape == (6, B, D) and log_det.shape == (6, B)
  for s in range(6):
    y_s, ld_s = module.apply(params, ctx).forward_and_log_det(z[s])
    np.testing.assert_allclose(y[s], y_s, atol=1e-6)
    np.testing.assert_allclose(log_det[s], ld_s, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_flow_is_identity(kind):
  module, ctx = _flow(kind, True), _context(True)
  params = module.init(jax.random.PRNGKey(0), ctx)
  z = jax.random.normal(jax.random.PRNGKey(1), (B, D))
  y, log_det = module.apply(params, ctx).forward_and_log_det(z)
  np.testing.assert_allclose(y, z, atol=1e-6)
  np.testing.assert_allclose(log_det, 0.0, atol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_jit_matches_eager_and_gradients_are_finite(kind):
  module, ctx = _flow(kind, True), _context(True)
  params = _perturbed_params(module, ctx)
  z = jax.random.normal(jax.random.PRNGKey(4), (B, D))

  def objective(p, z):
    y, log_det = module.apply(p, ctx).forward_and_log_det(z)
    return jnp.sum(jnp.square(y)) - jnp.sum(log_det)

  eager = objective(params, z)
  np.testing.assert_allclose(jax.jit(objective)(params, z), eager, rtol=1e-5)
  grads = jax.grad(objective, argnums=(0, 1))(params, z)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads[0]))


@pytest.mark.parametrize("kind", KINDS)
def test_amortised_flow_depends_on_context(kind):
  module, ctx = _flow(kind, True), _context(True)
  params = _perturbed_params(module, ctx)
  z = jnp.broadcast_to(jax.random.normal(jax.random.PRNGKey(5), (D,)), (B, D))
  y = module.apply(params, ctx).forward(z)
  assert float(jnp.max(jnp.abs(y[0] - y[1]))) > 1e-3


def test_made_is_autoregressive():
  """Output i of the MADE conditioner depends on inputs 0..i-1 only: strictly lower-triangular
  Jacobian of (shift, log_scale), so the IAF Jacobian is triangular."""
  module = flows._MLPConditioner(D, (16, 16), tuple(flows.made_masks(D, (16, 16))), 3.0)
  ctx = jnp.ones((C,))
  params = _perturbed_params(module, ctx)
  z = jax.random.normal(jax.random.PRNGKey(6), (D,))
  for part in (0, 1):
    jac = jax.jacobian(lambda x: module.apply(params, ctx)(x)[part])(z)
    np.testing.assert_array_equal(np.triu(np.asarray(jac)) != 0, False)
    assert np.any(np.tril(np.asarray(jac), -1) != 0)


def test_planar_stays_invertible_for_any_parameters():
  """wᵀû > -1 by construction, so the inverse recovers z even for adversarial u."""
  w = jnp.array([[1.0, 0.0], [0.5, -2.0]])
  u = jnp.array([[-5.0, 0.0], [3.0, 1.0]])
  bij = flows.Planar(u, w, jnp.array([0.3, -0.2]))
  assert bool(jnp.all(jnp.sum(w * bij.u_hat, axis=-1) > -1))
  z = jnp.array([[0.4, -1.0], [2.0, 0.5]])
  x, _ = bij.inverse_and_log_det(bij.forward(z))
  np.testing.assert_allclose(x, z, atol=1e-4)


def test_chain_applies_layers_in_given_order():
  shift = distrax.ScalarAffine(shift=1.0)
  double = distrax.ScalarAffine(shift=0.0, scale=2.0)
  np.testing.assert_allclose(flows.chain([shift, double]).forward(jnp.array(1.0)), 4.0)


def test_permute_round_trip():
  p = flows.Permute(np.array([2, 0, 1]))
  z = jnp.array([1.0, 2.0, 3.0])
  np.testing.assert_allclose(p.forward(z), [3.0, 1.0, 2.0])
  np.testing.assert_allclose(p.inverse(p.forward(z)), z)


def test_config_errors():
  with pytest.raises(ValueError, match="unknown flow kind"):
    flows.FlowConfig(kind="maf")
  with pytest.raises(ValueError, match="num_layers"):
    flows.FlowConfig(num_layers=0)
  module = _flow("iaf", True)
  with pytest.raises(ValueError, match="needs a context"):
    module.init(jax.random.PRNGKey(0), None)
