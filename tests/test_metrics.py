"""Tests of vae_jax.metrics against independent computations.

The importance-weighted likelihood is checked on tiny models whose latent can be integrated
out by dense quadrature (and on a linear-Gaussian model with a closed-form marginal); the mutual
the KL against its closed form; active units against direct numpy formulas. Monte Carlo
tolerances are a few standard errors, estimated from the same samples (the mutual information
is tested in test_mutual_information.py).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from vae_jax import metrics
from vae_jax.objectives import gaussian_log_prob, reparameterize, token_nll


# ---------------------------------------------------------------------------------------------
# A tiny latent-variable model over token sequences whose latent can be integrated numerically:
#   z ~ N(0, I_d),  p(x|z) = prod_t softmax(tanh(z) A_t + b_t)[x_t]  (factorised categorical),
# with T = 4 positions, V = 5 symbols, and a Gaussian q(z|x) that is deliberately *not* the
# posterior (shifted by 0.4 posterior standard deviations and 1.25 times wider).
# ---------------------------------------------------------------------------------------------

T, V = 4, 5


class TinyModel:
  """The model above, with its exact log-marginal and ELBO by dense quadrature (float64)."""

  def __init__(self, dim: int, seed: int):
    r = np.random.default_rng(seed)
    self.dim = dim
    self.a = r.normal(size=(dim, T, V)) * 1.5
    self.b = r.normal(size=(T, V)) * 0.5
    self.tokens = r.integers(0, V, size=(4, T))
    self.mask = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]], np.float32)
    # Dense grid over [-8, 8]^d: 20,001 points in 1-D, 501^2 in 2-D.
    n = 20001 if dim == 1 else 501
    axis = np.linspace(-8.0, 8.0, n)
    self.log_cell = dim * math.log(axis[1] - axis[0])
    self.grid = np.stack(np.meshgrid(*[axis] * dim, indexing="ij"), -1).reshape(-1, dim)
    log_prior = -0.5 * np.sum(np.log(2 * np.pi) + self.grid**2, axis=-1)
    self.log_joint = np.stack(
        [self.np_log_lik(self.grid, i) for i in range(len(self.tokens))], 0) + log_prior
    self.log_px = special.logsumexp(self.log_joint, axis=-1) + self.log_cell  # [B]
    post = np.exp(self.log_joint - self.log_px[:, None] + self.log_cell)  # [B, G], sums to 1
    post_mean = post @ self.grid
    post_sd = np.sqrt(post @ self.grid**2 - post_mean**2)
    self.q_mean = (post_mean + 0.4 * post_sd).astype(np.float32)
    self.q_logvar = (2 * np.log(1.25 * post_sd)).astype(np.float32)

  def np_log_lik(self, z: np.ndarray, i: int) -> np.ndarray:
    logits = np.einsum("gd,dtv->gtv", np.tanh(z), self.a) + self.b
    log_p = special.log_softmax(logits, axis=-1)[:, np.arange(T), self.tokens[i]]  # [G, T]
    return log_p @ self.mask[i]

  def exact_elbo(self) -> np.ndarray:
    """ELBO(x) = int q(z|x) [log p(x, z) - log q(z|x)] dz by quadrature."""
    out = []
    for i in range(len(self.tokens)):
      var = np.exp(self.q_logvar[i].astype(np.float64))
      log_q = -0.5 * np.sum(np.log(2 * np.pi * var) + (self.grid - self.q_mean[i])**2 / var, -1)
      out.append(np.sum(np.exp(log_q + self.log_cell) * (self.log_joint[i] - log_q)))
    return np.array(out)

  def log_lik(self, z: jax.Array) -> jax.Array:
    """log p(x|z) `[n, B]` for z `[n, B, d]`, through objectives.token_nll."""
    logits = jnp.einsum("nbd,dtv->nbtv", jnp.tanh(z), self.a.astype(np.float32)) + self.b
    shape = z.shape[:2] + (T,)
    return -token_nll(logits, jnp.broadcast_to(self.tokens, shape),
                      jnp.broadcast_to(self.mask, shape))

  def log_weights_fn(self):
    return metrics.gaussian_log_weights_fn(jnp.asarray(self.q_mean), jnp.asarray(self.q_logvar),
                                           self.log_lik)


@functools.lru_cache(maxsize=None)
def tiny_model(dim: int) -> TinyModel:
  return TinyModel(dim, seed=10 + dim)


def _repeated_estimates(fn, num_samples: int, num_reps: int, seed: int) -> np.ndarray:
  """`[R, B]` independent L_K estimates."""
  keys = jax.random.split(jax.random.key(seed), num_reps)
  estimate = jax.jit(jax.vmap(lambda k: metrics.iw_log_likelihood(fn, k, num_samples)))
  return np.asarray(estimate(keys), np.float64)


@functools.lru_cache(maxsize=None)
def _tiny_model_estimates(num_samples: int) -> np.ndarray:
  """`[2048, B]` independent L_K estimates on the 1-D tiny model (shared by two tests)."""
  return _repeated_estimates(tiny_model(1).log_weights_fn(), num_samples, 2048,
                             seed=100 + num_samples)


# ---------------------------------------------------------------------------------------------
# Importance-weighted log-likelihood.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [1, 2])
def test_iw_converges_to_exact_log_marginal(dim):
  model = tiny_model(dim)
  fn = model.log_weights_fn()
  rng = jax.random.key(0)
  num_samples, chunk = 20000, 2000
  estimate = np.asarray(jax.jit(
      lambda k: metrics.iw_log_likelihood(fn, k, num_samples, chunk))(rng), np.float64)
  # Standard error of log(mean w) by the delta method, std(w) / (sqrt(K) mean(w)), from the
  # very weights the estimate used. The bias of L_K, about -se^2 / 2, is negligible beside it.
  log_w = np.concatenate([np.asarray(fn(jax.random.fold_in(rng, i), chunk), np.float64)
                          for i in range(num_samples // chunk)])
  w = np.exp(log_w - log_w.max(0))
  se = w.std(0) / (math.sqrt(num_samples) * w.mean(0))
  assert np.all(se < 0.01), se  # the check below is a sharp one
  np.testing.assert_array_less(np.abs(estimate - model.log_px), 5 * se + 2e-4)
  # The proposal is not the posterior: the ELBO is strictly below log p(x).
  assert np.all(model.exact_elbo() < model.log_px - 0.01)


def test_iw_k1_is_elbo_in_expectation():
  model = tiny_model(1)
  l1 = _tiny_model_estimates(1)
  se = l1.std(0) / math.sqrt(len(l1))
  elbo = model.exact_elbo()
  np.testing.assert_array_less(np.abs(l1.mean(0) - elbo), 5 * se)
  assert np.all(elbo < model.log_px)


def test_iw_increases_with_k_on_average():
  model = tiny_model(1)
  means, ses = [], []
  for k in [1, 4, 32]:
    est = _tiny_model_estimates(k)
    means.append(est.mean(0))
    ses.append(est.std(0) / math.sqrt(len(est)))
  means, ses = np.array(means), np.array(ses)
  for lo, hi in [(0, 1), (1, 2)]:
    gap_se = np.sqrt(ses[lo]**2 + ses[hi]**2)
    assert np.all(means[hi] - means[lo] > 3 * gap_se), (means, ses)
  np.testing.assert_array_less(means[-1], model.log_px + 3 * ses[-1])


def test_chunked_equals_direct_log_sum_exp():
  model = tiny_model(1)
  fn = model.log_weights_fn()
  log_weights = jax.jit(fn, static_argnums=1)
  rng = jax.random.key(3)
  k = 50
  # chunk 7: a scan over 7 chunks of 7 and a last chunk of 1; None: all 50 at once.
  results = {}
  for chunk in [7, None]:
    got, elbo = jax.jit(functools.partial(
        metrics.iw_log_likelihood, fn, num_samples=k, chunk_size=chunk, return_elbo=True))(rng)
    results[chunk] = got
    # The documented key schedule: chunk i uses fold_in(rng, i), the remainder comes last.
    size = k if chunk is None else chunk
    sizes = [size] * (k // size) + ([k % size] if k % size else [])
    log_w = np.concatenate([np.asarray(log_weights(jax.random.fold_in(rng, i), n), np.float64)
                            for i, n in enumerate(sizes)])
    np.testing.assert_allclose(got, special.logsumexp(log_w, axis=0) - math.log(k), atol=2e-5)
    np.testing.assert_allclose(elbo, log_w.mean(0), atol=2e-5)
  # Numerically stable for log weights far from 0 (sentence log-likelihoods are ~ -1e2..-1e3).
  shifted = jax.jit(lambda r: metrics.iw_log_likelihood(
      lambda key, n: fn(key, n) - 5000.0, r, k, 7))(rng)
  np.testing.assert_allclose(shifted, results[7] - 5000.0, rtol=1e-6)


def test_iw_with_exact_posterior_has_zero_variance():
  # Linear-Gaussian model: z ~ N(0, I_2), x | z ~ N(z W, s^2 I_3), with orthogonal rows of W so
  # that the exact posterior is a diagonal Gaussian; then every weight equals p(x).
  w = np.array([[1.5, 0.0, 0.0], [0.0, 0.7, -0.4]])
  s2 = 0.3
  x = np.random.default_rng(5).normal(size=(3, 3)) * 1.5
  post_var = 1.0 / (1.0 + np.diag(w @ w.T) / s2)  # [2]
  post_mean = (x @ w.T / s2) * post_var  # [B, 2]
  cov = w.T @ w + s2 * np.eye(3)
  exact = -0.5 * (3 * np.log(2 * np.pi) + np.linalg.slogdet(cov)[1]
                  + np.einsum("bi,ij,bj->b", x, np.linalg.inv(cov), x))

  def log_lik(z):
    return gaussian_log_prob(x.astype(np.float32), z @ w.astype(np.float32),
                             jnp.full((3,), math.log(s2), jnp.float32))

  fn = metrics.gaussian_log_weights_fn(
      jnp.asarray(post_mean, jnp.float32),
      jnp.asarray(np.broadcast_to(np.log(post_var), post_mean.shape), jnp.float32), log_lik)
  estimates = _repeated_estimates(fn, 16, 32, seed=6)  # [R, B]
  assert np.all(estimates.std(0) < 2e-5), estimates.std(0)
  np.testing.assert_allclose(estimates, np.broadcast_to(exact, estimates.shape), atol=1e-4)


def test_iw_rejects_bad_sizes():
  fn = tiny_model(1).log_weights_fn()
  with pytest.raises(ValueError):
    metrics.iw_log_likelihood(fn, jax.random.key(0), 0)
  with pytest.raises(ValueError):
    metrics.iw_log_likelihood(fn, jax.random.key(0), 10, 0)


# ---------------------------------------------------------------------------------------------
# KL.
# ---------------------------------------------------------------------------------------------


def test_monte_carlo_kl_matches_analytic():
  r = np.random.default_rng(8)
  mean = r.normal(size=(3, 4)).astype(np.float32)
  logvar = (r.normal(size=(3, 4)) * 0.5).astype(np.float32)
  num = 100000

  @jax.jit
  def estimate(rng):
    z = reparameterize(rng, mean, logvar, num)
    log_q = gaussian_log_prob(z, mean, logvar)
    log_p = gaussian_log_prob(z, jnp.zeros(4), jnp.zeros(4))
    return (metrics.monte_carlo_kl(log_q, log_p), jnp.std(log_q - log_p, axis=0),
            metrics.gaussian_kl_per_example(mean, logvar))

  mc, sd, analytic = estimate(jax.random.key(9))
  exact = 0.5 * np.sum(np.square(mean) + np.exp(logvar) - logvar - 1, -1)
  np.testing.assert_allclose(analytic, exact, rtol=1e-5)
  np.testing.assert_array_less(np.abs(np.asarray(mc) - exact), 5 * np.asarray(sd) / math.sqrt(num))


# ---------------------------------------------------------------------------------------------
# Active units.
# ---------------------------------------------------------------------------------------------


def test_active_units_against_numpy():
  r = np.random.default_rng(21)
  target = np.array([0.5, 0.05, 0.0105, 0.0095, 0.001, 0.0])
  cols = r.normal(size=(2000, 6))
  cols = (cols - cols.mean(0)) / cols.std(0, ddof=1) * np.sqrt(target) + r.normal(size=6)
  means = jnp.asarray(cols, jnp.float32)
  count, variances = metrics.active_units(means)
  np.testing.assert_allclose(variances, np.var(cols, axis=0, ddof=1), rtol=1e-4, atol=1e-7)
  np.testing.assert_allclose(variances, target, rtol=1e-4, atol=1e-7)
  assert int(count) == 3
  count0, variances0 = metrics.active_units(means, ddof=0)
  np.testing.assert_allclose(variances0, np.var(cols, axis=0), rtol=1e-4, atol=1e-7)
  assert int(count0) == 3
  assert int(metrics.active_units(means, threshold=0.04)[0]) == 2
  assert int(metrics.active_units(means, threshold=1e-4)[0]) == 5
  # Padding rows are ignored.
  padded = jnp.concatenate([means, jnp.full((10, 6), 1e3)])
  mask = jnp.arange(2010) < 2000
  count_p, variances_p = jax.jit(metrics.active_units)(padded, mask=mask)
  assert int(count_p) == 3
  np.testing.assert_allclose(variances_p, variances, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# Perplexity and sums.
# ---------------------------------------------------------------------------------------------


def test_active_units_from_two_noisy_estimates_removes_the_noise_bias():
  """Sampled posterior means carry Monte Carlo noise (variance 1/32 here, above the 0.01
  threshold): their plain variance counts every unit, the covariance of two independent
  estimates recovers the true across-data variances (0, 0.005, 0.02, 0.5)."""
  rng = np.random.default_rng(0)
  true_var = np.array([0.0, 0.005, 0.02, 0.5])
  n = 20000
  exact = rng.normal(size=(n, 4)) * np.sqrt(true_var)
  noisy_a = exact + rng.normal(size=(n, 4)) / np.sqrt(32)
  noisy_b = exact + rng.normal(size=(n, 4)) / np.sqrt(32)
  count, _ = metrics.active_units(jnp.asarray(noisy_a))
  assert int(count) == 4
  count, cov = metrics.active_units(jnp.asarray(noisy_a), independent_means=jnp.asarray(noisy_b))
  np.testing.assert_allclose(cov, np.var(exact, axis=0, ddof=1), atol=3e-3)
  np.testing.assert_allclose(cov[:3], true_var[:3], atol=1e-3)
  assert int(count) == 2
  # With exact means, both forms agree.
  np.testing.assert_allclose(metrics.active_units(jnp.asarray(exact))[1],
                             metrics.active_units(jnp.asarray(exact),
                                                  independent_means=jnp.asarray(exact))[1],
                             rtol=1e-5)
