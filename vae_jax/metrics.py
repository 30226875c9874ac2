"""Evaluation metrics of sequence VAEs (METHODS.md §6), as model-agnostic pure functions.

Every metric is a function of per-example quantities a model returns (posterior parameters,
log-likelihoods of samples), never of a model object, so that all methods are scored by the
same code:

- **NLL** by importance weighting (Burda et al. 2016), `iw_log_likelihood`, computed in chunks
  of samples so that memory is bounded by the chunk rather than by K (K = 500 for reported
  numbers);
- **KL** per sentence, analytic for a Gaussian posterior (`gaussian_kl_per_example`) or Monte
  Carlo for any other (`monte_carlo_kl`);
- **MI** I_q(x; z) (He et al. 2019): its estimators live in `vae_jax.mutual_information` (their
  names stay importable from here); `mean_and_stderr` gives the estimate and standard error of
  per-example terms;
- **AU**, the number of active units (Burda et al. 2016), `active_units`.

Everything except the host-side `mean_and_stderr` is jit-able; sizes such as the number of
samples or the chunk size are Python ints (static under `jax.jit`).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from vae_jax.objectives import (gaussian_kl, gaussian_log_prob, reparameterize,
                                standard_normal_log_prob)

LogWeightsFn = Callable[[jax.Array, int], jax.Array]


# ---------------------------------------------------------------------------------------------
# Importance-weighted log-likelihood.
# ---------------------------------------------------------------------------------------------


def iw_log_likelihood(log_weights_fn: LogWeightsFn, rng: jax.Array, num_samples: int,
                      chunk_size: int | None = None, *, return_elbo: bool = False):
  """Importance-weighted estimate of log p(x) (Burda et al. 2016, Eq. 8).

    log p(x) ~= L_K(x) = logsumexp_k [log p(x|z_k) + log p(z_k) - log q(z_k|x)] - log K,
    z_k ~ q(z|x), k = 1..K.

  L_K is a lower bound of log p(x) in expectation, nondecreasing in K, equal to the ELBO in
  expectation for K = 1, and converges to log p(x) as K -> inf (Burda et al. 2016, Thm. 1).
  The NLL reported by He et al. 2019 and METHODS.md §6 is -L_500.

  The K samples are drawn `chunk_size` at a time inside a `lax.scan` that carries a running
  log-sum-exp (`logaddexp` of the chunk's log-sum-exp into the total), so memory is that of
  one chunk whatever K. Chunk i (0-based) is drawn with `jax.random.fold_in(rng, i)`; when
  `chunk_size` does not divide K, the last, shorter chunk has index K // chunk_size. The
  estimate is therefore deterministic for a given (rng, K, chunk_size); other chunk sizes
  give other draws of the same estimator.

  Args:
    log_weights_fn: `(rng, n) -> [n, B]` log importance weights
      log p(x|z_k) + log p(z_k) - log q(z_k|x) of n fresh samples z_k ~ q(z|x) for each of the
      B examples. The model supplies it (see `gaussian_log_weights_fn`).
    rng: PRNG key.
    num_samples: K (static).
    chunk_size: samples per chunk (static); `None` or >= K draws all K at once.
    return_elbo: also return the mean log weight, the K-sample Monte Carlo ELBO.

  Returns:
    `[B]` L_K(x); with `return_elbo`, the pair (L_K(x) `[B]`, mean_k log w_k `[B]`).
  """
  if num_samples <= 0:
    raise ValueError(f"num_samples must be positive, got {num_samples}")
  if chunk_size is None or chunk_size >= num_samples:
    chunk_size = num_samples
  if chunk_size <= 0:
    raise ValueError(f"chunk_size must be positive, got {chunk_size}")
  num_full, remainder = divmod(num_samples, chunk_size)

  def chunk_stats(index, n):
    log_w = log_weights_fn(jax.random.fold_in(rng, index), n).astype(jnp.float32)
    return jax.nn.logsumexp(log_w, axis=0), jnp.sum(log_w, axis=0)

  def merge(carry, stats):
    return jnp.logaddexp(carry[0], stats[0]), carry[1] + stats[1]

  if num_full == 1:
    carry = chunk_stats(0, chunk_size)
  else:
    out_shape = jax.eval_shape(lambda: chunk_stats(0, chunk_size))[0].shape
    init = (jnp.full(out_shape, -jnp.inf, jnp.float32), jnp.zeros(out_shape, jnp.float32))

    def body(carry, index):
      return merge(carry, chunk_stats(index, chunk_size)), None

    carry, _ = jax.lax.scan(body, init, jnp.arange(num_full))
  if remainder:
    carry = merge(carry, chunk_stats(num_full, remainder))
  log_px = carry[0] - math.log(num_samples)
  if return_elbo:
    return log_px, carry[1] / num_samples
  return log_px


def posterior_log_weights_fn(
    sample_fn: Callable[[jax.Array, int], tuple[jax.Array, jax.Array, jax.Array]],
    log_likelihood_fn: Callable[[jax.Array], jax.Array],
) -> LogWeightsFn:
  """`log_weights_fn` for any posterior family that can sample and score its samples.

    log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x),  z_k ~ q(z|x).

  Args:
    sample_fn: `(rng, n) -> (z [n, B, d], log q [n, B], log p [n, B])`, e.g. a flow posterior
      with log q by the change of variables.
    log_likelihood_fn: `z [n, B, d] -> [n, B]` log p(x|z).
  """

  def log_weights(rng: jax.Array, num_samples: int) -> jax.Array:
    z, log_q, log_p = sample_fn(rng, num_samples)
    return log_likelihood_fn(z) + log_p - log_q

  return log_weights


def gaussian_log_weights_fn(
    mean: jax.Array, logvar: jax.Array,
    log_likelihood_fn: Callable[[jax.Array], jax.Array],
    log_prior_fn: Callable[[jax.Array], jax.Array] = standard_normal_log_prob,
) -> LogWeightsFn:
  """`log_weights_fn` for a diagonal Gaussian posterior q(z|x) = N(mean, diag(exp(logvar))).

    log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x),  z_k = mean + exp(logvar / 2) eps_k.

  Args:
    mean: `[B, d]` posterior means.
    logvar: `[B, d]` posterior log-variances.
    log_likelihood_fn: `z [n, B, d] -> [n, B]` log p(x|z) of each example under each sample
      (e.g. minus the summed token NLL of the decoder run on the n * B codes).
    log_prior_fn: `z [n, B, d] -> [n, B]` log p(z); the standard normal by default.

  Returns:
    `(rng, n) -> [n, B]` log weights, for `iw_log_likelihood`.
  """

  def sample(rng: jax.Array, num_samples: int):
    z = reparameterize(rng, mean, logvar, num_samples)  # [n, B, d]
    return z, gaussian_log_prob(z, mean, logvar), log_prior_fn(z)

  return posterior_log_weights_fn(sample, log_likelihood_fn)


# ---------------------------------------------------------------------------------------------
# Per-sentence terms: KL.
# ---------------------------------------------------------------------------------------------


def gaussian_kl_per_example(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """Analytic KL(N(mean, diag(exp(logvar))) || N(0, I)) per example, `[..., d] -> [...]`.

    KL = 0.5 sum_k (mean_k^2 + exp(logvar_k) - logvar_k - 1)   (Kingma & Welling 2014, App. B).
  """
  return jnp.sum(gaussian_kl(mean, logvar), axis=-1)


def monte_carlo_kl(log_q: jax.Array, log_p: jax.Array) -> jax.Array:
  """Monte Carlo KL(q(z|x) || p(z)) per example, for posteriors or priors without a closed form
  (flows, conditional priors; METHODS.md §6).

    KL ~= (1/S) sum_s [log q(z_s|x) - log p(z_s)],  z_s ~ q(z|x).

  Args:
    log_q: `[S, ...]` log q(z_s|x) of S samples from q(z|x).
    log_p: `[S, ...]` log p(z_s) of the same samples.

  Returns:
    `[...]` the per-example estimate (unbiased; it can be negative for small S).
  """
  return jnp.mean(log_q - log_p, axis=0)


# ---------------------------------------------------------------------------------------------
# Standard errors.
# ---------------------------------------------------------------------------------------------


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
  """The mean of per-example values and its standard error std(ddof=1) / sqrt(n) (0 when n < 2).

  For MI terms this treats the terms as independent; they share the mixture q(z) of the set,
  so the error is approximate (the covariance through the mixture is of order 1/N)."""
  values = np.asarray(values, np.float64)
  if values.size < 2:
    return float(values.mean()) if values.size else float("nan"), 0.0
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))



# ---------------------------------------------------------------------------------------------
# Active units.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("ddof",))
def active_units(means: jax.Array, *, threshold: float = 0.01, mask: jax.Array | None = None,
                 ddof: int = 1,
                 independent_means: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Number of active latent dimensions (Burda et al. 2016, §5.2).

    A_k = Cov_x(E_{q(z|x)}[z_k]),   active iff A_k > threshold (0.01).

  A_k is the variance over the evaluation set of the k-th posterior mean, computed in two passes
  (mean, then squared deviations). `ddof=1` (the unbiased variance, dividing by N - 1) follows
  He et al. 2019's `calc_au`, whose numbers the literature quotes; `ddof=0` gives the
  population variance. He et al. compare with `>=`; a dimension exactly at the threshold is
  a measure-zero event, so `>` (Burda et al.'s definition) gives the same counts.

  When E_q[z|x] has no closed form (flow posteriors) it is estimated by averaging S samples,
  and the variance of such estimates is inflated by their Monte Carlo noise (Var_q(z_k)/S per
  sentence, enough to make every unit look active). Pass a second, independent estimate as
  `independent_means`: A_k is then the covariance over the set of the two estimates, which is
  unbiased for Var_x(E_q[z_k|x]) because their noises are independent.

  Args:
    means: `[N, d]` posterior means E_{q(z|x)}[z] of the whole set.
    threshold: activity threshold on the variance.
    mask: `[N]` 1 for real examples, 0 for padding rows.
    ddof: delta degrees of freedom of the variance.
    independent_means: `[N, d]` a second estimate of the posterior means with noise
      independent of that of `means` (None: `means` are exact).

  Returns:
    (number of active units, int32 scalar; per-dimension variances `[d]`).
  """
  means = means.astype(jnp.float32)
  other = means if independent_means is None else independent_means.astype(jnp.float32)
  if mask is None:
    weights = jnp.ones(means.shape[:1], jnp.float32)
  else:
    weights = mask.astype(jnp.float32)
  count = jnp.sum(weights)
  centre = lambda m: jnp.sum(m * weights[:, None], axis=0) / jnp.maximum(count, 1.0)
  products = (means - centre(means)) * (other - centre(other))
  variances = jnp.sum(products * weights[:, None], axis=0) / jnp.maximum(count - ddof, 1.0)
  return jnp.sum(variances > threshold).astype(jnp.int32), variances
