"""Tests of vae_jax.mutual_information against independent computations.

The estimators are checked against entropies of Gaussian mixtures computed by quadrature, their
0 / log N limits, a numpy transcription of He et al. 2019's single-batch formula, and
transcriptions of their `create_data_batch` and `calc_mi` for the per-batch estimate. Monte
Carlo tolerances are a few standard errors, estimated from the same samples.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from vae_jax import metrics
from vae_jax import mutual_information as mi_lib
from vae_jax.objectives import reparameterize

# Jitted once per shape and reused across tests (compilation dominates the cost of these tests).
_mi = jax.jit(mi_lib.gaussian_mutual_information,
              static_argnames=("num_samples", "chunk_size", "analytic_entropy"))
_mi_per_batch = mi_lib.gaussian_mutual_information_per_batch  # loops over batches on the host


def _mixture_mi_by_quadrature(mean: np.ndarray, sd: np.ndarray, lo: float, hi: float,
                              n: int) -> float:
  """I = H(q(z)) - mean_i H(q(z|x_i)) for Gaussian posteriors, H(q(z)) by quadrature."""
  dim = mean.shape[1]
  axis = np.linspace(lo, hi, n)
  grid = np.stack(np.meshgrid(*[axis] * dim, indexing="ij"), -1).reshape(-1, dim)
  log_comp = -0.5 * np.sum(np.log(2 * np.pi * sd**2)[None]
                           + (grid[:, None] - mean[None])**2 / sd[None]**2, -1)
  log_q = special.logsumexp(log_comp, axis=1) - math.log(len(mean))
  h_mix = -np.sum(np.exp(log_q) * log_q) * (axis[1] - axis[0])**dim
  h_comp = np.mean(0.5 * np.sum(np.log(2 * np.pi * math.e * sd**2), -1))
  return h_mix - h_comp


@pytest.mark.parametrize("dim", [1, 2])
def test_mi_matches_quadrature(dim):
  r = np.random.default_rng(11 + dim)
  n = 6
  mean = r.normal(size=(n, dim)) * 1.5
  sd = np.exp(r.uniform(-1.2, 0.2, size=(n, dim)))
  exact = _mixture_mi_by_quadrature(mean, sd, -15.0, 15.0, 30001 if dim == 1 else 801)
  mean_j, logvar_j = jnp.asarray(mean, jnp.float32), jnp.asarray(2 * np.log(sd), jnp.float32)
  rng, s = jax.random.key(12), 4000

  @jax.jit
  def estimate_and_terms(rng):
    # The estimate, and the same estimate from the generic pieces for the standard error.
    mi = mi_lib.gaussian_mutual_information(rng, mean_j, logvar_j, num_samples=s,
                                             chunk_size=512, analytic_entropy=True)
    z = reparameterize(rng, mean_j, logvar_j, s).reshape(s * n, dim)
    log_q_agg = mi_lib.aggregate_posterior_log_prob(
        z, mi_lib.gaussian_pairwise_log_prob(mean_j, logvar_j), chunk_size=512)
    return mi, log_q_agg

  got, log_q_agg = estimate_and_terms(rng)
  neg_entropy = -0.5 * np.sum(np.log(2 * np.pi * math.e * sd**2), -1)
  terms = np.tile(neg_entropy, s) - np.asarray(log_q_agg, np.float64)
  np.testing.assert_allclose(got, terms.mean(), rtol=1e-5)
  se = terms.std() / math.sqrt(terms.size)
  assert 0.1 < exact < math.log(n)
  assert abs(float(got) - exact) < 5 * se + 1e-4, (float(got), exact, se)


def test_mi_matches_he_et_al_single_batch_formula():
  # He et al.'s calc_mi on one batch, written out in numpy: analytic negative entropy, one sample
  # per example, log q(z_i) = logsumexp_j log N(z_i; mu_j, var_j) - log B.
  r = np.random.default_rng(13)
  b, d = 40, 3
  mu = r.normal(size=(b, d)).astype(np.float32)
  logvar = (r.normal(size=(b, d)) * 0.3 - 1.0).astype(np.float32)
  rng = jax.random.key(14)
  z = np.asarray(reparameterize(rng, mu, logvar, 1)[0], np.float64)  # [B, d]
  neg_entropy = np.mean(-0.5 * d * np.log(2 * np.pi) - 0.5 * np.sum(1 + logvar, -1))
  dev = z[:, None, :] - mu[None]
  log_density = (-0.5 * np.sum(dev**2 / np.exp(logvar)[None], -1)
                 - 0.5 * (d * np.log(2 * np.pi) + np.sum(logvar, -1))[None])
  want = neg_entropy - np.mean(special.logsumexp(log_density, axis=1) - np.log(b))
  got = _mi(rng, jnp.asarray(mu), jnp.asarray(logvar), analytic_entropy=True)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Chunking the queries changes nothing.
  np.testing.assert_allclose(_mi(rng, jnp.asarray(mu), jnp.asarray(logvar), chunk_size=7,
                                 analytic_entropy=True), got, rtol=1e-5)


def test_mi_bounds_and_limits():
  r = np.random.default_rng(15)
  rng = jax.random.key(16)
  n, d = 40, 3  # one shape throughout, so that `_mi` compiles once per flag set
  # Identical posteriors: I = 0, exactly with the sample-based first term.
  same = jnp.tile(jnp.asarray(r.normal(size=(1, d)), jnp.float32), (n, 1))
  mi0 = _mi(rng, same, same * 0 - 1.0, analytic_entropy=False)
  assert abs(float(mi0)) < 1e-5
  mi0_analytic = _mi(rng, same, same * 0 - 1.0, analytic_entropy=True)
  assert abs(float(mi0_analytic)) < 0.5  # one draw per example; zero in expectation
  # Posteriors far apart: I = log N.
  far = jnp.asarray(np.arange(n)[:, None] * 100.0 * np.ones((1, d)), jnp.float32)
  mi_far = _mi(rng, far, jnp.zeros_like(far), analytic_entropy=False)
  np.testing.assert_allclose(mi_far, math.log(n), atol=1e-4)
  # In between: 0 <= I <= log N, the upper bound holding term by term.
  for scale in [0.3, 1.0, 3.0]:
    mean = jnp.asarray(r.normal(size=(n, d)) * scale, jnp.float32)
    logvar = jnp.asarray(r.normal(size=(n, d)) * 0.2 - 1.0, jnp.float32)
    mi = float(_mi(rng, mean, logvar, analytic_entropy=False))
    assert 0.0 <= mi <= math.log(n) + 1e-5, (scale, mi)


def test_mi_mask_excludes_padding_rows():
  r = np.random.default_rng(17)
  mean = jnp.asarray(r.normal(size=(34, 3)), jnp.float32)
  logvar = jnp.asarray(r.normal(size=(34, 3)) * 0.2 - 0.5, jnp.float32)
  # Padding rows (garbage posteriors, mask 0) leave the mixture and the average unchanged.
  pad_mean = jnp.concatenate([mean, jnp.full((6, 3), 1e3)])
  pad_logvar = jnp.concatenate([logvar, jnp.full((6, 3), 30.0)])
  mask = jnp.arange(40) < 34
  z = jnp.asarray(r.normal(size=(20, 3)), jnp.float32)

  @jax.jit
  def both():
    want = mi_lib.aggregate_posterior_log_prob(
        z, mi_lib.gaussian_pairwise_log_prob(mean, logvar), chunk_size=8)
    got = mi_lib.aggregate_posterior_log_prob(
        z, mi_lib.gaussian_pairwise_log_prob(pad_mean, pad_logvar), mask=mask, chunk_size=8)
    return want, got

  want, got = both()
  np.testing.assert_allclose(got, want, rtol=1e-6)
  log_q_self = jnp.concatenate([jnp.zeros(34), jnp.full((6,), jnp.nan)])
  log_q_agg = jnp.concatenate([jnp.ones(34), jnp.full((6,), jnp.nan)])
  np.testing.assert_allclose(mi_lib.mutual_information(log_q_self, log_q_agg, mask), -1.0)
  masked = _mi(jax.random.key(18), pad_mean, pad_logvar, mask=mask)
  assert np.isfinite(masked) and 0.0 < float(masked) < math.log(34) + 0.5


def test_per_batch_mi_is_he_et_al_average_and_biased_down():
  r = np.random.default_rng(19)
  # Four clusters of posteriors, one per batch of 10: the batch identity tells a lot about z.
  centres = np.repeat(np.arange(4) * 20.0, 10)[:, None] * np.ones((1, 3))
  mean = jnp.asarray(centres + r.normal(size=(40, 3)), jnp.float32)
  logvar = jnp.full((40, 3), -1.0, jnp.float32)
  rng = jax.random.key(20)
  # One batch holding the whole set is the whole-set estimate.
  np.testing.assert_allclose(_mi_per_batch(rng, mean, logvar, batch_size=40),
                             _mi(jax.random.fold_in(rng, 0), mean, logvar), rtol=1e-5)
  # Batches of 10: the size-weighted average of the batch estimates, batch b with fold_in(rng, b).
  per_batch = _mi_per_batch(rng, mean, logvar, batch_size=10, num_samples=20)
  manual = np.mean([_mi(jax.random.fold_in(rng, b), mean[10 * b:10 * b + 10],
                        logvar[10 * b:10 * b + 10], num_samples=20) for b in range(4)])
  np.testing.assert_allclose(per_batch, manual, rtol=1e-5)
  # The per-batch average misses I(batch; z) = log 4 here, and is bounded by log B.
  whole = _mi(rng, mean, logvar, num_samples=20)
  np.testing.assert_allclose(whole - per_batch, math.log(4), atol=0.1)
  assert per_batch <= math.log(10) + 0.1
  # A ragged last batch (padded inside) is fine.
  assert np.isfinite(_mi_per_batch(rng, mean, logvar, batch_size=16))


def he_et_al_batches(lengths, batch_size):
  """A transcription of He et al.'s `create_data_batch` (data/text_data.py): sort by length,
  then cut every run of equal length into batches of at most `batch_size` (their argsort is
  numpy's default; a stable sort is used here so the tie order is defined)."""
  sort_idx = np.argsort(lengths, kind="stable")
  sort_len = lengths[sort_idx]
  change_loc = [i for i in range(1, len(sort_len)) if sort_len[i] != sort_len[i - 1]]
  change_loc.append(len(sort_len))
  batches, curr = [], 0
  for idx in change_loc:
    while curr < idx:
      nxt = min(curr + batch_size, idx)
      batches.append(sort_idx[curr:nxt])
      curr = nxt
  return batches


def he_et_al_calc_mi(batches, mean, logvar, samples):
  """A transcription of He et al.'s `calc_mi` (text.py) and `encoder.calc_mi` in numpy: per
  batch, the analytic negative entropy averaged over the batch minus the mean of
  log q(z_i) = logsumexp_j log N(z_i; mu_j, var_j) - log B over one sample per example; the
  batch values averaged weighted by batch size."""
  mi, num_examples = 0.0, 0
  for rows, z in zip(batches, samples):
    mu, lv = mean[rows].astype(np.float64), logvar[rows].astype(np.float64)
    b, nz = mu.shape
    neg_entropy = np.mean(-0.5 * nz * math.log(2 * math.pi) - 0.5 * np.sum(1 + lv, -1))
    dev = z[:, None, :] - mu[None]
    log_density = (-0.5 * np.sum(dev**2 / np.exp(lv)[None], -1)
                   - 0.5 * (nz * math.log(2 * math.pi) + np.sum(lv, -1))[None])
    log_qz = special.logsumexp(log_density, axis=1) - math.log(b)
    mi += (neg_entropy - log_qz.mean()) * b
    num_examples += b
  return mi / num_examples


def test_per_batch_mi_against_a_transcription_of_he_et_al():
  r = np.random.default_rng(23)
  n, d = 150, 4
  lengths = r.integers(3, 9, size=n)  # runs of equal length end batches early
  mean = (r.normal(size=(n, d)) * np.where(np.arange(d) < 2, 1.5, 0.05)).astype(np.float32)
  logvar = (r.normal(size=(n, d)) * 0.2 - 1.0).astype(np.float32)
  batches = mi_lib.length_sorted_batches(lengths, 32)
  want_batches = he_et_al_batches(lengths, 32)
  assert [list(row[row >= 0]) for row in batches] == [list(b) for b in want_batches]
  assert len(want_batches) > n // 32 + 1  # the runs of equal length cut batches short
  rng = jax.random.key(24)
  # The same draws for both: batch b's one sample per example, from fold_in(rng, b).
  samples = [np.asarray(reparameterize(jax.random.fold_in(rng, b), jnp.asarray(mean[rows]),
                                       jnp.asarray(logvar[rows]), 1)[0], np.float64)
             for b, rows in enumerate(want_batches)]
  want = he_et_al_calc_mi(want_batches, mean, logvar, samples)
  terms = mi_lib.gaussian_mi_terms_per_batch(rng, mean, logvar, batches, analytic_entropy=True)
  np.testing.assert_allclose(terms.mean(), want, rtol=1e-5, atol=1e-5)
  # The paired form estimates the same quantity with a smaller spread: on posteriors that
  # carry no information it is exactly 0, where the analytic form is only 0 on average.
  same = np.tile(mean[:1], (n, 1)), np.tile(logvar[:1], (n, 1))
  paired = mi_lib.gaussian_mi_terms_per_batch(rng, *same, batches)
  analytic = mi_lib.gaussian_mi_terms_per_batch(rng, *same, batches, analytic_entropy=True)
  assert np.abs(paired).max() < 1e-5 and analytic.std() > 0.3
  mi, se = metrics.mean_and_stderr(analytic)
  assert abs(mi) < 3 * se
