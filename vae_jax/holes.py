"""The "hole problem" of VAEs: how well the aggregated posterior covers the prior (METHODS.md §2).

Over an evaluation set of N examples the aggregated posterior is the mixture

  q_agg(z) = (1/N) sum_n q(z|x_n).

A hole is a region where the prior p(z) = N(0, I) has mass but q_agg has almost none: codes
drawn there from the prior decode to text the decoder never saw. Following DG-VAE (Zhang et al.,
"Improving VAE-based Representation Learning", NeurIPS 2022, hole-problem analysis), two
measurements:

(a) the joint hole estimate `prior_hole_kl`,

      KL(p || q_agg) = E_{z~p}[log p(z) - log q_agg(z)]
                    ~= (1/S) sum_s [log p(z_s) - log q_agg(z_s)],  z_s ~ N(0, I),

    Monte Carlo over S prior samples, with log q_agg by
    `mutual_information.aggregate_posterior_log_prob` (a chunked logsumexp over the N
    posteriors), returned with its Monte Carlo standard error.
    Generic over posterior families: a flow posterior passes its own pairwise log-density.
    KL(p || q) (not KL(q || p)) is the direction that is large when q misses mass of p.

(a') its calibration `null_calibrated_hole_kl`. q_agg of N posteriors is a finite mixture, so
    (a) is positive even when the population aggregate is exactly the prior, by an amount that
    grows with the posteriors' KL and falls with N. The same estimator on R null sets (the same
    N and widths, means redrawn so that the population aggregate is the prior) gives that bias,
    `hole_kl_null`; `hole_kl_excess` = hole_kl - hole_kl_null is the hole beyond it, with a
    standard error that counts the Monte Carlo error and the draw of the N posteriors.

(b) per-dimension marginals `gaussian_marginal_prior_kl`, for diagonal Gaussian posteriors, and
    `count_prior_matched_dimensions`, the number of dimensions whose marginal KL is below
    delta = 0.03 nats (`PRIOR_MATCH_THRESHOLD`), by quadrature (`vae_jax.marginal_holes`,
    whose names stay importable from here).

`gaussian_hole_metrics` computes both, (a') and (b), for diagonal Gaussian posteriors.

Everything except the host-side `gaussian_hole_metrics` is jit-able; sizes (sample counts,
grid sizes, chunk sizes) are Python ints (static under `jax.jit`).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from vae_jax.marginal_holes import (PRIOR_MATCH_THRESHOLD, count_prior_matched_dimensions,
                                    gaussian_marginal_prior_kl)
from vae_jax.mutual_information import (PairwiseLogProbFn, aggregate_posterior_log_prob,
                                        gaussian_pairwise_log_prob)
from vae_jax.objectives import standard_normal_log_prob

# R, the null sets of `null_calibrated_hole_kl` (the default of evaluation's hole metrics).
DEFAULT_NULL_SETS = 8


# ---------------------------------------------------------------------------------------------
# (a) Joint hole estimate KL(p || q_agg), Monte Carlo over prior samples.
# ---------------------------------------------------------------------------------------------


def hole_log_ratios(z: jax.Array, pairwise_log_q_fn: PairwiseLogProbFn, *,
                    mask: jax.Array | None = None, chunk_size: int = 128) -> jax.Array:
  """log p(z_s) - log q_agg(z_s) at given points `z [S, d]`, `[S]` (the terms of the estimate).

  log q_agg by `mutual_information.aggregate_posterior_log_prob` (chunked logsumexp over the N
  posteriors, `mask [N]` excluding padding rows); p = N(0, I).
  """
  log_q = aggregate_posterior_log_prob(z, pairwise_log_q_fn, mask=mask, chunk_size=chunk_size)
  return standard_normal_log_prob(z) - log_q


def prior_hole_kl(rng: jax.Array, pairwise_log_q_fn: PairwiseLogProbFn, latent_dim: int, *,
                  num_samples: int = 10_000, mask: jax.Array | None = None,
                  chunk_size: int = 128) -> tuple[jax.Array, jax.Array]:
  """Monte Carlo KL(p || q_agg) of the prior N(0, I) from the aggregated posterior.

    KL ~= mean_s [log p(z_s) - log q_agg(z_s)],  z_s ~ N(0, I),  s = 1..S,
    standard error = std_s(log p(z_s) - log q_agg(z_s)) / sqrt(S)  (ddof = 1).

  The estimate is unbiased for KL(p || q_agg) of the given set (q_agg is exact, a mixture over
  all N posteriors). Memory is that of one call of `pairwise_log_q_fn` on `chunk_size` samples,
  O(chunk_size * N * d) for Gaussians; time O(S N d).

  Args:
    rng: PRNG key for the prior samples (`jax.random.normal(rng, (S, d))`).
    pairwise_log_q_fn: `z [c, d] -> [c, N]` log q(z_i|x_n) of each sample under each of the N
      posteriors (`mutual_information.gaussian_pairwise_log_prob(mean, logvar)` for Gaussians;
      a flow posterior passes its own).
    latent_dim: d (static).
    num_samples: S prior samples (static).
    mask: `[N]` 1 for real examples, 0 for padding rows (excluded from the mixture).
    chunk_size: prior samples per chunk (static).

  Returns:
    (estimate, standard error), float32 scalars, in nats.
  """
  if num_samples < 2:
    raise ValueError(f"num_samples must be at least 2, got {num_samples}")
  z = jax.random.normal(rng, (num_samples, latent_dim), jnp.float32)
  diff = hole_log_ratios(z, pairwise_log_q_fn, mask=mask, chunk_size=chunk_size)  # [S]
  estimate = jnp.mean(diff)
  stderr = jnp.std(diff, ddof=1) / math.sqrt(num_samples)
  return estimate, stderr


# ---------------------------------------------------------------------------------------------
# (a') The finite-mixture bias of (a), calibrated by null sets of the same widths.
# ---------------------------------------------------------------------------------------------


def null_posterior_means(rng: jax.Array, logvar: jax.Array) -> jax.Array:
  """Means `[N, d]` of a null set: posteriors of the given widths whose population aggregate is
  the prior.

    mu_nk = sqrt(max(1 - sigma_nk^2, 0)) eps_nk,   eps_nk ~ N(0, 1) independently,

  so that, over the draw of the means, E_mu[N(t; mu_nk, sigma_nk^2)] = N(t; 0, 1) in every cell:
  a set of such posteriors has aggregate N(0, I) in expectation (its population aggregate is
  exactly the prior) while each posterior keeps its width. A cell with sigma_nk^2 > 1 (wider
  than the prior, `count_wide_cells`) gets mu = 0 and contributes N(0, sigma_nk^2), wider than
  the prior, to the aggregate of its dimension.
  """
  scale = jnp.sqrt(jnp.maximum(1.0 - jnp.exp(logvar.astype(jnp.float32)), 0.0))
  return scale * jax.random.normal(rng, logvar.shape, jnp.float32)


def count_wide_cells(logvar: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Number of cells (n, k) of real rows with sigma_nk^2 > 1, where the null set cannot match
  the prior (int32 scalar)."""
  wide = logvar > 0.0
  if mask is not None:
    wide = wide & mask.astype(bool)[:, None]
  return jnp.sum(wide).astype(jnp.int32)


def jackknife_hole_terms(z: jax.Array, pairwise_log_q_fn: PairwiseLogProbFn, num_rows: int, *,
                         mask: jax.Array | None = None,
                         chunk_size: int = 128) -> tuple[jax.Array, jax.Array]:
  """The terms of the hole estimate at `z [S, d]` and the set-to-set variance of its value.

  Returns (g, tau^2): g `[S]` = log p(z_s) - log q_agg(z_s) (as `hole_log_ratios`) and the
  delete-one jackknife estimate of Var over the draw of the N posteriors of the exact
  KL(p || q_agg) (the value at S = infinity):

    delta_ns = log q_agg(z_s) - log q_agg^(-n)(z_s) + const = -log(1 - w_ns),
    w_ns = q(z_s|x_n) / sum_m q(z_s|x_m)                     (the responsibility of n at z_s),
    J    = (N-1)/N sum_n (Delta_n - mean_m Delta_m)^2,  Delta_n = mean_s delta_ns,
    J_s  = (N-1)/N sum_n (delta_ns - mean_m delta_ms)^2,
    tau^2 = max(J - mean_s J_s / S, 0).

  J is the jackknife variance of the estimate at these fixed samples (Efron & Stein: an
  overestimate in expectation); it includes the per-sample part mean_s J_s / S, which the Monte
  Carlo variance var_s(g) / S already counts, so that part is removed. delta is computed as
  -log1p(-w), and for the component of largest responsibility as the difference of two
  logsumexps (the mixture without it), so it stays exact when w is close to 1. Memory
  O(chunk_size * N * d), time about twice a pass of `prior_hole_kl`.

  Args:
    z: `[S, d]` evaluation points (prior samples).
    pairwise_log_q_fn: `z [c, d] -> [c, N]` log q(z | x_n) of the N posteriors (any family;
      `mutual_information.gaussian_pairwise_log_prob` for diagonal Gaussians).
    num_rows: N, the rows of the pairwise matrix (static).
    mask: `[N]` 1 for real examples, 0 for padding rows (excluded; N counts real rows).
    chunk_size: points per chunk (static).
  """
  num_samples, dim = z.shape
  real = jnp.ones((num_rows,), bool) if mask is None else mask.astype(bool)
  n_real = jnp.sum(real.astype(jnp.float32))
  chunk_size = max(1, min(chunk_size, num_samples))
  num_chunks = -(-num_samples // chunk_size)
  pad = num_chunks * chunk_size - num_samples
  zs = jnp.pad(z.astype(jnp.float32), [(0, pad), (0, 0)]).reshape(num_chunks, chunk_size, dim)
  valid = (jnp.arange(num_chunks * chunk_size) < num_samples).reshape(num_chunks, chunk_size)
  index = jnp.arange(num_rows)

  def body(delta_sum, chunk):
    zc, ok = chunk
    log_q = jnp.where(real[None], pairwise_log_q_fn(zc), -jnp.inf)  # [c, N]
    lse = jax.nn.logsumexp(log_q, axis=-1)  # [c]
    w = jnp.exp(log_q - lse[:, None])
    is_top = index[None] == jnp.argmax(log_q, axis=-1)[:, None]
    rest = jax.nn.logsumexp(jnp.where(is_top, -jnp.inf, log_q), axis=-1)
    delta = jnp.where(is_top, (lse - rest)[:, None], -jnp.log1p(-jnp.where(is_top, 0.0, w)))
    delta = jnp.where(real[None], delta, 0.0)
    centred = jnp.where(real[None], delta - (jnp.sum(delta, axis=-1) / n_real)[:, None], 0.0)
    jack_s = (n_real - 1.0) / n_real * jnp.sum(jnp.square(centred), axis=-1)
    g = standard_normal_log_prob(zc) - (lse - jnp.log(n_real))
    return delta_sum + jnp.sum(jnp.where(ok[:, None], delta, 0.0), axis=0), (g, jack_s)

  delta_sum, (g, jack_s) = jax.lax.scan(body, jnp.zeros((num_rows,), jnp.float32),
                                        (zs, valid))
  g = g.reshape(-1)[:num_samples]
  jack_s = jack_s.reshape(-1)[:num_samples]
  delta_mean = delta_sum / num_samples
  centred = jnp.where(real, delta_mean - jnp.sum(delta_mean) / n_real, 0.0)
  jack = (n_real - 1.0) / n_real * jnp.sum(jnp.square(centred))
  return g, jnp.maximum(jack - jnp.mean(jack_s) / num_samples, 0.0)


def null_calibrated_hole_kl(rng: jax.Array, pairwise_log_q_fn: PairwiseLogProbFn,
                            logvar: jax.Array, *, num_null_sets: int = DEFAULT_NULL_SETS,
                            num_samples: int = 10_000, mask: jax.Array | None = None,
                            chunk_size: int = 128) -> dict[str, jax.Array]:
  """KL(p || q_agg) of a set of N posteriors, beside the value the same estimator gives for R
  null sets of the same widths, and their difference.

  The given set is any posterior family, through its pairwise log-density (for diagonal
  Gaussians `mutual_information.gaussian_pairwise_log_prob(mean, logvar)` with these `logvar`:
  the null then has exactly the given widths; for a flow posterior, `logvar` are per-dimension
  log variances of its samples, and the null is the Gaussian set of those widths).

  Why. q_agg = (1/N) sum_n N(mu_n, diag sigma_n^2) is a finite mixture. Even when the population
  aggregate E_x q(z|x) is exactly the prior, KL(p || q_agg) > 0 (Jensen: E[log q_agg(z)] <=
  log E[q_agg(z)] = log p(z)), by an amount that grows steeply with the posteriors' KL (their
  narrowness) and falls with N (module docstring: 0.10 nats at a KL of 3.5 nats/sentence, 12.9
  at 19, d = 32, N = 1,000). Comparing `hole_kl` across models of different KLs compares this
  bias, not their holes.

  Null. Null set r (r = 1..R, own key) keeps N, the mask and every sigma_nk and redraws the
  means, mu^(r)_nk = sqrt(1 - sigma_nk^2) eps (`null_posterior_means`), so its population
  aggregate is exactly N(0, I): its true hole is 0 and its `hole_kl` is pure finite-mixture bias.
  All R + 1 sets are evaluated at the same S prior samples z_s ~ N(0, I) (common random numbers:
  the Monte Carlo errors of the sets are correlated and partly cancel in the difference). With
  g_r(z) = log p(z) - log q_agg^(r)(z) (r = 0 the given set), gbar = (1/R) sum_{r>=1} g_r,
  v_r = mean_s g_r(z_s):

    hole_kl        = v_0                        (= `prior_hole_kl` at these samples)
    hole_kl_null   = (1/R) sum_{r>=1} v_r
    hole_kl_excess = hole_kl - hole_kl_null = mean_s [g_0(z_s) - gbar(z_s)].

  Standard errors. Each value varies with the prior samples (Monte Carlo) and with the draw of
  the N posteriors (tau^2: the set-to-set variance of the exact KL(p || q_agg)). For the null
  sets, s_v^2 = var_r(v_r) (ddof 1) estimates tau_null^2 plus the per-sample part of their
  Monte Carlo spread, (1/(R-1)) sum_r var_s(g_r - gbar) / S; for the given set tau_0^2 is the
  jackknife over its N posteriors (`jackknife_hole_terms`). Then

    tau_null^2              = max(s_v^2 - (1/(R-1)) sum_r var_s(g_r - gbar) / S, 0),
    hole_kl_null_stderr^2   = tau_null^2 / R + var_s(gbar) / S,
    hole_kl_excess_stderr^2 = var_s(g_0 - gbar) / S + tau_0^2 + tau_null^2 / R.

  The excess counts the given set as one draw of N posteriors: it estimates the hole of the
  population of posteriors the N were drawn from, which is what a model is judged by (a second
  test set of N sentences would move `hole_kl` by about tau_0). tau_0 has to come from the set
  itself: at the null KL(p || q_agg) is at its minimum and varies only to second order in the
  draw, while a set with a hole varies to first order (measured: tau 0.023 for a 0.31-nat hole
  against 0.004 for the null of the same widths, d = 4, N = 1,000). The jackknife is
  conservative at the null (0.006 there). tau_null rests on R - 1 degrees of freedom.

  Caveat. The null calibrates the finite-mixture bias for posteriors of exactly these widths
  whose means are spread as the prior requires. For a null set the excess is unbiased for 0
  (the given set and the null sets are then draws of one distribution). For any other set it
  is approximate: the bias also depends on where the means sit. Measured (d = 4, two of the
  four dimensions with population aggregate N(0, 1/2), true hole 0.307 nats): the excess reads
  0.33 / 0.32 at N = 1,000 / 4,000 for sigma^2 = 0.2 (KL 2.7 nats), but 0.85 / 0.65 for
  sigma^2 = 0.05 (KL 5.5): posteriors narrow against the hole leave the prior's tails sparser
  than the null's, so the excess over-states such a hole; it is a comparison with a
  prior-matched encoder of the same widths and N, exact only at the null. Cells with
  sigma^2 > 1 (`hole_kl_null_wide_cells`) cannot be matched: there the null's aggregate is wider
  than the prior and its own hole is not 0 (small for sigma^2 near 1, e.g. the collapsed
  dimensions of a trained encoder; KL(N(0,1) || N(0, 1.1)) = 0.002 nats per dimension).

  Args:
    rng: PRNG key; split into the prior samples' key and the R null sets' keys.
    pairwise_log_q_fn: `z [c, d] -> [c, N]` log q(z | x_n) of the given set.
    logvar: `[N, d]` the posteriors' log-variances, the widths of the null sets.
    num_null_sets: R >= 2 (static).
    num_samples: S prior samples, shared by all R + 1 sets (static).
    mask: `[N]` 1 for real examples, 0 for padding rows (excluded from every mixture).
    chunk_size: prior samples per chunk (static).

  Returns:
    float32 scalars `hole_kl`, `hole_kl_stderr` (Monte Carlo, as `prior_hole_kl`),
    `hole_kl_null`, `hole_kl_null_stderr`, `hole_kl_excess`, `hole_kl_excess_stderr`,
    `hole_kl_tau` (tau_0), `hole_kl_null_tau` (tau_null), `[R]` `hole_kl_null_values` (v_r)
    and int32 `hole_kl_null_wide_cells`. Cost: R + 1 passes of `prior_hole_kl` plus the
    jackknife, O((R + 3) S N d) time; memory that of one pass.
  """
  if num_samples < 2:
    raise ValueError(f"num_samples must be at least 2, got {num_samples}")
  if num_null_sets < 2:
    raise ValueError(f"num_null_sets must be at least 2, got {num_null_sets}")
  num_sets = num_null_sets
  prior_rng, null_rng = jax.random.split(rng)
  logvar = logvar.astype(jnp.float32)
  z = jax.random.normal(prior_rng, (num_samples, logvar.shape[-1]), jnp.float32)
  g0, tau0_sq = jackknife_hole_terms(z, pairwise_log_q_fn, logvar.shape[0], mask=mask,
                                     chunk_size=chunk_size)
  null_means = jax.vmap(lambda key: null_posterior_means(key, logvar))(
      jax.random.split(null_rng, num_sets))
  g_null = jax.lax.map(
      lambda m: hole_log_ratios(z, gaussian_pairwise_log_prob(m, logvar), mask=mask,
                                chunk_size=chunk_size), null_means)  # [R, S]
  g_bar = jnp.mean(g_null, axis=0)  # [S]
  values = jnp.mean(g_null, axis=1)  # [R]

  def mc_var(x):  # variance of the mean over the S samples, ddof 1
    return jnp.var(x, axis=-1, ddof=1) / num_samples

  per_sample_spread = jnp.sum(mc_var(g_null - g_bar)) / (num_sets - 1)
  tau_null_sq = jnp.maximum(jnp.var(values, ddof=1) - per_sample_spread, 0.0)
  return {
      "hole_kl": jnp.mean(g0),
      "hole_kl_stderr": jnp.sqrt(mc_var(g0)),
      "hole_kl_null": jnp.mean(values),
      "hole_kl_null_stderr": jnp.sqrt(tau_null_sq / num_sets + mc_var(g_bar)),
      "hole_kl_excess": jnp.mean(g0 - g_bar),
      "hole_kl_excess_stderr": jnp.sqrt(mc_var(g0 - g_bar) + tau0_sq + tau_null_sq / num_sets),
      "hole_kl_tau": jnp.sqrt(tau0_sq),
      "hole_kl_null_tau": jnp.sqrt(tau_null_sq),
      "hole_kl_null_values": values,
      "hole_kl_null_wide_cells": count_wide_cells(logvar, mask),
  }


# ---------------------------------------------------------------------------------------------
# Both metrics of Gaussian posteriors, as host values ((b) is in `marginal_holes`).
# ---------------------------------------------------------------------------------------------


def host_values(values: dict[str, jax.Array]) -> dict[str, Any]:
  """`null_calibrated_hole_kl`'s output as JSON-ready host values (floats, ints, lists)."""
  out = {}
  for key, value in values.items():
    value = jax.device_get(value)
    if getattr(value, "ndim", 0):
      out[key] = [float(v) for v in value]
    elif key.endswith("_cells"):
      out[key] = int(value)
    else:
      out[key] = float(value)
  return out


def gaussian_hole_metrics(rng: jax.Array, mean: jax.Array, logvar: jax.Array, *,
                          mask: jax.Array | None = None, num_samples: int = 10_000,
                          num_null_sets: int = DEFAULT_NULL_SETS,
                          threshold: float = PRIOR_MATCH_THRESHOLD, chunk_size: int = 128,
                          grid_size: int = 2001, grid_limit: float = 10.0) -> dict[str, Any]:
  """Both hole metrics of diagonal Gaussian posteriors, as host values (not jit-able).

  Args:
    rng: PRNG key for the prior samples and null sets of `null_calibrated_hole_kl`.
    mean: `[N, d]` posterior means of the whole evaluation set.
    logvar: `[N, d]` posterior log-variances.
    mask: `[N]` 1 for real examples, 0 for padding rows.
    num_samples: S prior samples of the joint estimate.
    num_null_sets: R null sets of the joint estimate's calibration.
    threshold: delta of the matched-dimension count.
    chunk_size: prior samples per chunk of the joint estimate (the quadrature uses the default
      chunk of `gaussian_marginal_prior_kl`).
    grid_size, grid_limit: the quadrature grid of the marginal KLs.

  Returns:
    The keys of `null_calibrated_hole_kl` (`hole_kl`, `hole_kl_stderr`, `hole_kl_null`,
    `hole_kl_null_stderr`, `hole_kl_excess`, `hole_kl_excess_stderr`, ...) as host values, and
    `marginal_kl` (`[d]` floats) and `prior_matched_dims` (int).
  """
  joint = jax.jit(
      lambda key, m, lv, msk: null_calibrated_hole_kl(
          key, gaussian_pairwise_log_prob(m, lv), lv, num_null_sets=num_null_sets,
          num_samples=num_samples, mask=msk, chunk_size=chunk_size))(rng, mean, logvar, mask)
  marginal = jax.jit(
      lambda m, lv, msk: gaussian_marginal_prior_kl(
          m, lv, mask=msk, grid_size=grid_size, grid_limit=grid_limit))(mean, logvar, mask)
  return {
      **host_values(joint),
      "marginal_kl": [float(v) for v in marginal],
      "prior_matched_dims": int(count_prior_matched_dimensions(marginal, threshold)),
  }
