"""Flows: a contract that every family of the registry `flows.FLOWS` meets, global and
amortised, driven by a table with one row per family; then family-specific tests (MADE's
autoregressive structure, the planar invertibility constraint, the chain's order, errors).

The contract, for a flow whose parameters are moved away from the identity it starts as:
log-det against log|det| of the Jacobian (jax.jacfwd) per example, round trips both ways with
opposite log-dets, identity at initialisation, jit against eager with finite gradients, batch
shapes (S samples per example, and the mutual information's pairwise codes [n, 1, d] against
the flows of B examples), and the change of variables: the density of the pushed-forward
standard Gaussian, log N(f⁻¹(y)) + log|det ∂f⁻¹/∂y|, sums to 1 over a grid of the plane.
"""

import dataclasses

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax.nn import flows

C, B, S = 3, 4, 2   # context size, examples, samples per example


@dataclasses.dataclass(frozen=True)
class Row:
  """What a family needs for the contract. dim: the latent size of the checks (the change of
  variables is checked in d = 2 for every family); num_layers: K (> 1, so that layers compose)."""
  dim: int
  num_layers: int = 3


# One row per entry of flows.FLOWS: adding a family means adding its row here.
TABLE = {
    "planar": Row(dim=3),
    "iaf": Row(dim=3),
    "coupling": Row(dim=3),   # odd d: the two halves of the mask differ in size
}
CASES = [(kind, amortized) for kind in flows.FLOWS for amortized in (True, False)]


def _flow(kind, amortized, dim, num_layers=3):
  cfg = flows.FlowConfig(kind=kind, num_layers=num_layers, hidden_dim=8, amortized=amortized,
                         context_dim=C)
  return flows.Flow(cfg, dim)


def _perturbed_params(module, context, scale=0.4, seed=0):
  """Initialised parameters moved away from the identity (zero-initialised output layers)."""
  params = module.init(jax.random.PRNGKey(seed), context)
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
  return jax.tree.unflatten(
      tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _context(amortized, shape=(B,)):
  return jax.random.normal(jax.random.PRNGKey(7), (*shape, C)) if amortized else None


@dataclasses.dataclass(frozen=True)
class Case:
  kind: str
  amortized: bool
  dim: int
  module: flows.Flow
  context: jax.Array | None   # [B, C] or None
  params: dict                # perturbed

  def bijector(self, params=None, context=None):
    return self.module.apply(self.params if params is None else params,
                             self.context if context is None else context)


def make_case(kind: str, amortized: bool) -> Case:
  """The contract's case of a registered family, from its row of TABLE."""
  assert kind in TABLE, f"flow family {kind!r} has no row in the contract's TABLE"
  row = TABLE[kind]
  module, ctx = _flow(kind, amortized, row.dim, row.num_layers), _context(amortized)
  return Case(kind, amortized, row.dim, module, ctx, _perturbed_params(module, ctx))


@pytest.fixture(scope="module", params=CASES,
                ids=[f"{k}-{'amortised' if a else 'global'}" for k, a in CASES])
def case(request):
  return make_case(*request.param)


def _codes(case, seed, shape=(B,)):
  return jax.random.normal(jax.random.PRNGKey(seed), (*shape, case.dim))


def _to64(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), tree)


def test_table_has_one_row_per_registry_entry():
  assert set(TABLE) == set(flows.FLOWS)


# ---------------------------------------------------------------------------------------------
# The contract.
# ---------------------------------------------------------------------------------------------


def test_log_det_matches_jacobian(case):
  """log|det ∂f/∂z| of forward_and_log_det equals slogdet of jax.jacfwd, example by example
  (each with its own context when amortised)."""
  with jax.enable_x64(True):  # the Jacobian's determinant is ill-conditioned in float32
    params, ctx, z = _to64(case.params), _to64(case.context), _to64(_codes(case, 2))
    y, log_det = case.bijector(params, ctx).forward_and_log_det(z)
    assert y.shape == (B, case.dim) and log_det.shape == (B,)
    forward_one = lambda zi, ci: case.module.apply(params, ci).forward(zi)
    jac = jax.vmap(jax.jacfwd(forward_one))(z, ctx)
    assert jac.shape == (B, case.dim, case.dim)
    sign, expected = jnp.linalg.slogdet(jac)
    assert bool(jnp.all(sign != 0))
    np.testing.assert_allclose(log_det, expected, atol=1e-9, rtol=1e-9)
    assert float(jnp.max(jnp.abs(log_det))) > 1e-2   # a non-trivial map


def test_round_trips_and_opposite_log_dets(case):
  """inverse(forward(z)) = z and forward(inverse(y)) = y, the inverse's log-det the opposite of
  the forward one at the corresponding point."""
  with jax.enable_x64(True):
    bij = case.bijector(_to64(case.params), _to64(case.context))
    z = _to64(_codes(case, 2))
    y, log_det = bij.forward_and_log_det(z)
    assert float(jnp.max(jnp.abs(y - z))) > 1e-2
    z_back, inv_log_det = bij.inverse_and_log_det(y)
    np.testing.assert_allclose(z_back, z, atol=1e-8)
    np.testing.assert_allclose(inv_log_det, -log_det, atol=1e-8)
    y2 = _to64(_codes(case, 3))
    z2, inv_log_det2 = bij.inverse_and_log_det(y2)
    y2_back, log_det2 = bij.forward_and_log_det(z2)
    np.testing.assert_allclose(y2_back, y2, atol=1e-8)
    np.testing.assert_allclose(inv_log_det2, -log_det2, atol=1e-8)


def test_fresh_flow_is_identity(case):
  params = case.module.init(jax.random.PRNGKey(0), case.context)
  bij = case.bijector(params)
  z = _codes(case, 1)
  for y, log_det in (bij.forward_and_log_det(z), bij.inverse_and_log_det(z)):
    np.testing.assert_allclose(y, z, atol=1e-6)
    np.testing.assert_allclose(log_det, 0.0, atol=1e-6)


def test_jit_matches_eager_and_gradients_are_finite(case):
  z = _codes(case, 4)

  def objective(p, z, ctx):
    bij = case.module.apply(p, ctx)
    y, log_det = bij.forward_and_log_det(z)
    x, inv_log_det = bij.inverse_and_log_det(z)
    return jnp.sum(jnp.square(y)) - jnp.sum(log_det) + jnp.sum(x) + jnp.sum(inv_log_det)

  eager = objective(case.params, z, case.context)
  np.testing.assert_allclose(jax.jit(objective)(case.params, z, case.context), eager,
                             rtol=1e-5)
  # Training differentiates the forward direction, with respect to parameters, codes and the
  # encoder's context.
  def forward_objective(p, z, ctx):
    y, log_det = case.module.apply(p, ctx).forward_and_log_det(z)
    return jnp.sum(jnp.square(y)) - jnp.sum(log_det)

  grads = jax.grad(forward_objective, argnums=(0, 1, 2))(case.params, z, case.context)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  assert any(float(jnp.max(jnp.abs(g))) > 0 for g in jax.tree.leaves(grads[0]))


def test_batch_shapes(case):
  """Codes [S, B, d] against one context per example [B, C] (S samples each): every slice is
  the flow of [B, d]; a single event [d] against a global flow. (Equal up to float32 rounding:
  batched and sliced matrix products may sum in another order, and codes of order 100 differ
  by a few units in the last place, hence the relative tolerance.)"""
  bij = case.bijector()
  z = _codes(case, 5, (S, B))
  for method in ("forward_and_log_det", "inverse_and_log_det"):
    y, log_det = getattr(bij, method)(z)
    assert y.shape == (S, B, case.dim) and log_det.shape == (S, B)
    for s in range(S):
      y_s, log_det_s = getattr(bij, method)(z[s])
      np.testing.assert_allclose(y[s], y_s, atol=1e-5, rtol=4e-6)
      np.testing.assert_allclose(log_det[s], log_det_s, atol=1e-5, rtol=4e-6)
    if not case.amortized:
      y_0, log_det_0 = getattr(bij, method)(z[0, 0])
      assert y_0.shape == (case.dim,) and log_det_0.shape == ()
      np.testing.assert_allclose(y_0, y[0, 0], atol=1e-5, rtol=4e-6)
      np.testing.assert_allclose(log_det_0, log_det[0, 0], atol=1e-5, rtol=4e-6)


def test_pairwise_codes_against_every_example(case):
  """The mutual information's use: codes [n, 1, d] against contexts [B, C] give every code
  under every example's flow, [n, B, d]; column j is the flow of context j alone. The flows of
  different examples differ (the map depends on the context)."""
  if not case.amortized:
    pytest.skip("a global flow has no per-example context")
  bij = case.bijector()
  z = _codes(case, 6, (S, 1))
  for method in ("forward_and_log_det", "inverse_and_log_det"):
    y, log_det = getattr(bij, method)(z)
    assert y.shape == (S, B, case.dim) and log_det.shape == (S, B)
    for j in range(B):
      y_j, log_det_j = getattr(case.bijector(context=case.context[j]), method)(z[:, 0])
      np.testing.assert_allclose(y[:, j], y_j, atol=1e-5, rtol=4e-6)
      np.testing.assert_allclose(log_det[:, j], log_det_j, atol=1e-5, rtol=4e-6)
    assert float(jnp.max(jnp.abs(y[:, 0] - y[:, 1]))) > 1e-3


def test_pushed_forward_density_integrates_to_one(case):
  """Change of variables in d = 2: p(y) = N(f⁻¹(y); 0, I) |det ∂f⁻¹/∂y| summed over a grid of
  [-L, L]² (the Riemann sum of a smooth, fast-decaying density) is 1."""
  module = _flow(case.kind, case.amortized, 2, TABLE[case.kind].num_layers)
  ctx = _context(case.amortized, shape=())
  bij = module.apply(_perturbed_params(module, ctx, scale=0.3), ctx)
  half, n = 16.0, 321   # spacing 0.1; the tails beyond ±16 are negligible
  axis = jnp.linspace(-half, half, n)
  grid = jnp.stack(jnp.meshgrid(axis, axis), axis=-1).reshape(-1, 2)
  z0, inv_log_det = bij.inverse_and_log_det(grid)
  log_p = -0.5 * jnp.sum(jnp.square(z0), axis=-1) - jnp.log(2 * jnp.pi) + inv_log_det
  cell = (axis[1] - axis[0]) ** 2
  assert float(jnp.max(jnp.abs(inv_log_det))) > 1e-2   # not volume preserving
  # The sums are within 3e-4 of 1 for every family; leaving out the log-det moves them by 4 %
  # or more.
  np.testing.assert_allclose(float(jnp.sum(jnp.exp(log_p)) * cell), 1.0, atol=1e-3)


# ---------------------------------------------------------------------------------------------
# Family-specific tests.
# ---------------------------------------------------------------------------------------------


CONTRACT = (test_log_det_matches_jacobian, test_round_trips_and_opposite_log_dets,
            test_fresh_flow_is_identity, test_jit_matches_eager_and_gradients_are_finite,
            test_batch_shapes, test_pairwise_codes_against_every_example,
            test_pushed_forward_density_integrates_to_one)


def run_contract(kind: str) -> None:
  """Every check of the contract on the family `kind`, global and amortised (what the
  parametrised tests run for each entry of FLOWS), outside pytest's parametrisation: for a
  family registered at run time (docs/extending.md)."""
  for amortized in (True, False):
    case = make_case(kind, amortized)
    for check in CONTRACT:
      try:
        check(case)
      except pytest.skip.Exception:
        pass


def test_made_is_autoregressive():
  """Output i of the MADE conditioner depends on inputs 0..i-1 only: strictly lower-triangular
  Jacobian of (shift, log_scale), so the IAF Jacobian is triangular."""
  d = 5
  module = flows._MLPConditioner(d, (16, 16), tuple(flows.made_masks(d, (16, 16))), 3.0)
  ctx = jnp.ones((C,))
  params = _perturbed_params(module, ctx)
  z = jax.random.normal(jax.random.PRNGKey(6), (d,))
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
  with pytest.raises(ValueError, match="unknown flow kind 'maf'; use one of planar, iaf"):
    flows.FlowConfig(kind="maf")
  with pytest.raises(ValueError, match="num_layers"):
    flows.FlowConfig(num_layers=0)
  module = _flow("iaf", True, 3)
  with pytest.raises(ValueError, match="needs a context"):
    module.init(jax.random.PRNGKey(0), None)
  with pytest.raises(ValueError, match="latent_dim >= 2"):
    _flow("coupling", False, 1).init(jax.random.PRNGKey(0), None)
