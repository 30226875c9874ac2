"""Tests of vae_jax.marginal_holes against independent computations.

Marginal KLs are checked against the closed-form KL between two 1-D Gaussians and against
float64 numpy quadrature of Gaussian mixtures on grids ~100x finer. numpy only (no scipy).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax import marginal_holes

from gaussian_testing import analytic_kl_prior_to_gaussian, f32


def brute_force_marginal_kl(mean, logvar, limit=12.0, grid_size=200_001):
  """KL(N(0,1) || (1/N) sum_n N(mu_nk, sigma_nk^2)) per dimension, float64 trapezoid."""
  mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
  t = np.linspace(-limit, limit, grid_size)
  log_p = -0.5 * (math.log(2 * math.pi) + t ** 2)
  out = []
  for k in range(mean.shape[1]):
    log_n = -0.5 * (math.log(2 * math.pi) + logvar[:, k, None]
                    + (t[None] - mean[:, k, None]) ** 2 * np.exp(-logvar[:, k, None]))
    top = log_n.max(axis=0)
    log_q = top + np.log(np.exp(log_n - top).sum(axis=0)) - math.log(mean.shape[0])
    f = np.exp(log_p) * (log_p - log_q)
    out.append(np.sum(0.5 * (f[1:] + f[:-1])) * (t[1] - t[0]))
  return np.array(out)


# ---------------------------------------------------------------------------------------------
# Per-dimension marginal KL by quadrature.
# ---------------------------------------------------------------------------------------------


def test_marginal_kl_single_gaussian_matches_closed_form():
  m = np.array([0.0, 0.7, -1.5, 2.0, 0.3])
  s = np.array([1.0, 0.5, 1.3, 0.2, 3.0])
  kl = marginal_holes.gaussian_marginal_prior_kl(f32(m[None]), f32(2 * np.log(s)[None]))
  assert kl.shape == (5,)
  np.testing.assert_allclose(np.asarray(kl), analytic_kl_prior_to_gaussian(m, s),
                             rtol=1e-5, atol=1e-4)


def test_marginal_kl_of_prior_mixture_is_zero_and_matched():
  n, d = 6, 4
  mean = np.zeros((n, d))
  logvar = np.zeros((n, d))
  # Dimension 2 is a hole: far narrow posteriors; dimension 3 is slightly off the prior.
  mean[:, 2] = np.linspace(-3, 3, n)
  logvar[:, 2] = 2 * np.log(0.1)
  logvar[:, 3] = 2 * np.log(1.3)
  kl = np.asarray(marginal_holes.gaussian_marginal_prior_kl(f32(mean), f32(logvar)))
  np.testing.assert_allclose(kl[:2], 0.0, atol=1e-6)
  assert kl[2] > 1.0
  np.testing.assert_allclose(kl[3], analytic_kl_prior_to_gaussian(0.0, 1.3), atol=1e-5)
  assert 0.03 < kl[3]
  assert int(marginal_holes.count_prior_matched_dimensions(kl)) == 2
  assert int(marginal_holes.count_prior_matched_dimensions(kl, threshold=0.1)) == 3


@pytest.mark.parametrize("sigma, rtol", [(0.5, 1e-5), (0.05, 2e-5), (0.003, 1e-3)])
def test_marginal_kl_of_mixtures_matches_brute_force(sigma, rtol):
  rng = np.random.default_rng(0)
  # Dimension 0: two well-separated components; dimensions 1-2: random mixtures of width sigma.
  mean = np.stack([np.array([-2.0] * 3 + [2.5] * 2), rng.normal(size=5),
                   rng.normal(scale=0.5, size=5)], axis=1)
  logvar = np.stack([np.log(np.array([0.5, 0.5, 0.5, 0.3, 0.3]) ** 2),
                     np.full(5, 2 * np.log(sigma)), np.full(5, 2 * np.log(sigma))], axis=1)
  ref = brute_force_marginal_kl(mean, logvar)
  kl = np.asarray(marginal_holes.gaussian_marginal_prior_kl(f32(mean), f32(logvar)))
  np.testing.assert_allclose(kl, ref, rtol=rtol, atol=1e-4)


def test_marginal_kl_mask_chunks_and_jit():
  rng = np.random.default_rng(1)
  n, d = 11, 3
  mean, logvar = rng.normal(size=(n, d)), rng.normal(scale=0.5, size=(n, d))
  ref = np.asarray(marginal_holes.gaussian_marginal_prior_kl(f32(mean), f32(logvar)))
  np.testing.assert_allclose(ref, brute_force_marginal_kl(mean, logvar), rtol=1e-5, atol=1e-5)
  # Padding rows with garbage, several chunk sizes (dividing N + pad or not), under jit.
  pad_mean = np.concatenate([mean, rng.normal(size=(5, d)) * 10], axis=0)
  pad_logvar = np.concatenate([logvar, np.full((5, d), -8.0)], axis=0)
  mask = f32(np.r_[np.ones(n), np.zeros(5)])
  for chunk_size in (1, 4, 16, 64):
    fn = jax.jit(functools.partial(marginal_holes.gaussian_marginal_prior_kl, chunk_size=chunk_size))
    got = np.asarray(fn(f32(pad_mean), f32(pad_logvar), mask=mask))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
  # A finer grid gives the same values (the default grid is converged).
  finer = marginal_holes.gaussian_marginal_prior_kl(f32(mean), f32(logvar), grid_size=8001)
  np.testing.assert_allclose(np.asarray(finer), ref, rtol=1e-5, atol=1e-6)


def test_marginal_log_prob_is_exact_mixture_density():
  rng = np.random.default_rng(2)
  mean, logvar = rng.normal(size=(7, 2)), rng.normal(scale=0.3, size=(7, 2))
  t = np.linspace(-4, 4, 9)
  got = marginal_holes.gaussian_marginal_log_prob(f32(t), f32(mean), f32(logvar), chunk_size=3)
  dens = np.exp(-0.5 * (t[:, None, None] - mean[None]) ** 2 / np.exp(logvar)[None]) / np.sqrt(
      2 * np.pi * np.exp(logvar)[None])
  np.testing.assert_allclose(np.asarray(got), np.log(dens.mean(axis=1)), rtol=1e-5, atol=1e-5)


def test_quadrature_grid_weights():
  t, w = marginal_holes.quadrature_grid(2001, 10.0)
  assert t.shape == w.shape == (2001,)
  np.testing.assert_allclose(float(t[1] - t[0]), 0.01, rtol=1e-4)
  np.testing.assert_allclose(float(jnp.sum(w)), 20.0, rtol=1e-5)
  np.testing.assert_allclose(float(jnp.sum(w * jnp.exp(-0.5 * t ** 2)) / math.sqrt(2 * math.pi)),
                             1.0, rtol=1e-6)
