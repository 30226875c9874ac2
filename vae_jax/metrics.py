"""Evaluation metrics of sequence VAEs (METHODS.md §6), as model-agnostic pure functions.

Every metric is a function of per-example quantities a model returns (posterior parameters,
log-likelihoods of samples), never of a model object, so that all methods are scored by the
same code:

- **NLL** by importance weighting (Burda et al. 2016), `iw_log_likelihood`, computed in chunks
  of samples so that memory is bounded by the chunk rather than by K (K = 500 for reported
  numbers);
- **KL** per sentence, analytic for a Gaussian posterior (`gaussian_kl_per_example`) or Monte
  Carlo for any other (`monte_carlo_kl`);
- **MI** I_q(x; z) (He et al. 2019) as per-example terms with standard errors: over the whole
  evaluation set (`gaussian_mi_terms`), and per batch as in He et al.'s code, with their
  length-sorted batches (`length_sorted_batches`, `gaussian_mi_terms_per_batch`); the generic
  pieces `aggregate_posterior_log_prob`, `mutual_information_terms`, `per_batch_terms` serve
  every posterior family;
- **AU**, the number of active units (Burda et al. 2016), `active_units`.

Everything except the host-side helpers (`mean_and_stderr`, `length_sorted_batches`,
`per_batch_terms` and the per-batch estimators) is jit-able; sizes such as the number of samples
or the chunk size are Python ints (static under `jax.jit`).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from vae_jax.objectives import (LOG_2PI, gaussian_kl, gaussian_log_prob, reparameterize,
                                standard_normal_log_prob)

LogWeightsFn = Callable[[jax.Array, int], jax.Array]
PairwiseLogProbFn = Callable[[Any], jax.Array]


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
# Mutual information I_q(x; z).
# ---------------------------------------------------------------------------------------------


def gaussian_pairwise_log_prob(mean: jax.Array, logvar: jax.Array) -> PairwiseLogProbFn:
  """`z [c, d] -> [c, N]` log q(z_i | x_j) for a set of N diagonal Gaussian posteriors.

  Memory of one call: O(c * N * d) (the difference z_i - mean_j is formed explicitly rather than
  expanded into matrix products, which would cancel catastrophically for small variances).
  """

  def pairwise(z: jax.Array) -> jax.Array:
    return gaussian_log_prob(z[:, None, :], mean[None], logvar[None])

  return pairwise


def _chunked_rows(fn: Callable[[Any], jax.Array], xs: Any, chunk_size: int) -> jax.Array:
  """Applies `fn` (`[c, ...] -> [c, ...]`) to the leading axis of the pytree `xs` in chunks."""
  num_rows = jax.tree.leaves(xs)[0].shape[0]
  if chunk_size >= num_rows:
    return fn(xs)
  num_chunks = -(-num_rows // chunk_size)
  pad = num_chunks * chunk_size - num_rows

  def to_chunks(a):
    a = jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1))
    return a.reshape(num_chunks, chunk_size, *a.shape[1:])

  out = jax.lax.map(fn, jax.tree.map(to_chunks, xs))
  return out.reshape(num_chunks * chunk_size, *out.shape[2:])[:num_rows]


def aggregate_posterior_log_prob(z: Any, pairwise_log_q_fn: PairwiseLogProbFn, *,
                                 mask: jax.Array | None = None,
                                 chunk_size: int = 128) -> jax.Array:
  """log q(z_m) under the aggregate posterior of a set of N examples, for M query points.

    q(z) = (1/N) sum_j q(z|x_j),   log q(z_m) = logsumexp_j log q(z_m|x_j) - log N.

  The queries are processed `chunk_size` at a time (`lax.map`), so memory is that of one call
  of `pairwise_log_q_fn` on a chunk, O(chunk_size * N * d) for Gaussians, never O(M * N).

  Args:
    z: a pytree whose leaves have the M query points on the leading axis (an array `[M, d]` for
      Gaussian posteriors; any representation the posterior family uses otherwise).
    pairwise_log_q_fn: `z chunk [c, ...] -> [c, N]` log q(z_i|x_j) of each query under each of
      the N posteriors (e.g. `gaussian_pairwise_log_prob(mean, logvar)`).
    mask: `[N]` 1 for the posteriors of real examples, 0 for padding rows (excluded from the
      mixture); all real when `None`.
    chunk_size: queries per chunk (static).

  Returns:
    `[M]` log q(z_m).
  """

  def chunk_log_q(z_chunk):
    log_q = pairwise_log_q_fn(z_chunk).astype(jnp.float32)
    if mask is None:
      return jax.nn.logsumexp(log_q, axis=-1) - math.log(log_q.shape[-1])
    real = mask.astype(bool)
    log_q = jnp.where(real, log_q, -jnp.inf)
    return jax.nn.logsumexp(log_q, axis=-1) - jnp.log(jnp.sum(real.astype(jnp.float32)))

  return _chunked_rows(chunk_log_q, z, chunk_size)


def mutual_information_terms(log_q_self: jax.Array, log_q_aggregate: jax.Array) -> jax.Array:
  """Per-example terms of the Monte Carlo mutual information (He et al. 2019, Eq. 6).

    I_q(x; z) = E_x E_{q(z|x)}[log q(z|x)] - E_{q(z)}[log q(z)]
             ~= mean_i t_i,   t_i = mean_s [log q(z_si|x_i) - log q(z_si)],  z_si ~ q(z|x_i),

  with q(z) the aggregate posterior of a set (`aggregate_posterior_log_prob`). The first term
  may be the analytic negative entropy E_{q(z|x_i)} log q(z|x_i) instead of its sampled value
  (as in He et al.'s code, for Gaussians); both give unbiased estimates of the same quantity.
  The sampled ("paired") form has far lower variance where it matters: near collapse,
  log q(z_si|x_i) and log q(z_si) are nearly equal sample by sample, so t_i ~ 0 with a tiny
  spread, whereas the analytic form subtracts two independent quantities (measured on a
  collapsed model, N = 500: standard deviation ~0.2 nats for the analytic form); and each
  sampled term is at most log N, the bound of I_q over a set of N.

  Args:
    log_q_self: `[S, N]` log q(z_si|x_i), or `[N]` the analytic negative entropy.
    log_q_aggregate: `[S, N]` log q(z_si) of the same samples.

  Returns:
    `[N]` the terms t_i (their mean is the estimate; see `mean_and_stderr`).
  """
  diff = jnp.broadcast_to(log_q_self, log_q_aggregate.shape) - log_q_aggregate
  return jnp.mean(diff.reshape(-1, diff.shape[-1]), axis=0)


def mutual_information(log_q_self: jax.Array, log_q_aggregate: jax.Array,
                       mask: jax.Array | None = None) -> jax.Array:
  """The mean of `mutual_information_terms` over the real examples (`mask`), in nats."""
  terms = mutual_information_terms(log_q_self, log_q_aggregate)
  if mask is None:
    return jnp.mean(terms)
  real = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(real > 0, terms, 0.0)) / jnp.maximum(jnp.sum(real), 1.0)


def mean_and_stderr(values: np.ndarray) -> tuple[float, float]:
  """The mean of per-example values and its standard error std(ddof=1) / sqrt(n) (0 when n < 2).

  For MI terms this treats the terms as independent; they share the mixture q(z) of the set,
  so the error is approximate (the covariance through the mixture is of order 1/N)."""
  values = np.asarray(values, np.float64)
  if values.size < 2:
    return float(values.mean()) if values.size else float("nan"), 0.0
  return float(values.mean()), float(values.std(ddof=1) / math.sqrt(values.size))


def length_sorted_batches(lengths: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """He et al. 2019's evaluation batches (`create_data_batch` in their `text_data.py`).

  The examples are sorted by length and cut into batches of at most `batch_size` examples of
  *equal* length: every length's run is cut separately, so a batch ends at each change of length
  (e.g. lengths 5, 5, 5, 6 with batch_size 2 give [5, 5], [5], [6]). Their per-batch MI uses
  each batch's posteriors as the mixture q(z); the small batches at the ends of runs pull it
  down (a batch of one example estimates 0).

  Args:
    lengths: `[N]` sequence lengths (any monotone function of the true length, e.g. tokens with
      EOS: only equality and order matter).
    batch_size: the largest batch (32 in their PTB and Yahoo runs).

  Returns:
    int64 `[B, batch_size]` example indices, -1 padding the shorter batches.
  """
  lengths = np.asarray(lengths)
  order = np.argsort(lengths, kind="stable")
  rows = []
  start = 0
  while start < len(order):
    end = start
    while end < len(order) and lengths[order[end]] == lengths[order[start]]:
      end += 1
    for chunk in range(start, end, batch_size):
      row = order[chunk:min(chunk + batch_size, end)]
      rows.append(np.pad(row, (0, batch_size - len(row)), constant_values=-1))
    start = end
  return np.stack(rows).astype(np.int64) if rows else np.zeros((0, batch_size), np.int64)


def per_batch_terms(batch_terms_fn: Callable[[np.ndarray, np.ndarray, int], Any],
                    batches: np.ndarray, num_examples: int) -> np.ndarray:
  """Per-example terms computed batch by batch: `batch_terms_fn(indices, mask, b)` returns the
  `[batch_size]` terms of batch b (indices padded with 0 where `mask` is False, whose terms are
  ignored); row i of the result is example i's term. Every batch has the same padded shape, so
  a jitted `batch_terms_fn` compiles once."""
  out = np.full(num_examples, np.nan)
  for b, row in enumerate(np.asarray(batches)):
    mask = row >= 0
    terms = np.asarray(batch_terms_fn(np.where(mask, row, 0), mask, b), np.float64)
    out[row[mask]] = terms[mask]
  return out


def gaussian_mi_terms(rng: jax.Array, mean: jax.Array, logvar: jax.Array, *,
                      mask: jax.Array | None = None, num_samples: int = 1,
                      chunk_size: int = 128, analytic_entropy: bool = False) -> jax.Array:
  """`mutual_information_terms` of diagonal Gaussian posteriors, with the mixture q(z) of all N.

    t_i = (1/S) sum_s [log q(z_si|x_i) - log q(z_si)],  z_si ~ q(z|x_i),
    log q(z) = logsumexp_{j=1..N} log q(z|x_j) - log N

  (`analytic_entropy=True`: the first term is -d/2 log(2 pi) - 1/2 sum_k (1 + logvar_ik), as in
  He et al.'s `calc_mi`). Memory O(chunk_size * N * d), time O(S N^2 d).

  Args:
    rng: PRNG key for the samples z_si.
    mean, logvar: `[N, d]` posterior parameters.
    mask: `[N]` 1 for real examples, 0 for padding rows (excluded from the mixture; their terms
      are meaningless).
    num_samples: S samples per example (static).
    chunk_size: query samples per chunk (static).
    analytic_entropy: which first term (see `mutual_information_terms`).
  """
  num_examples, dim = mean.shape
  z = reparameterize(rng, mean, logvar, num_samples)  # [S, N, d]
  log_q_agg = aggregate_posterior_log_prob(
      z.reshape(num_samples * num_examples, dim), gaussian_pairwise_log_prob(mean, logvar),
      mask=mask, chunk_size=chunk_size).reshape(num_samples, num_examples)
  if analytic_entropy:
    log_q_self = -0.5 * jnp.sum(LOG_2PI + 1.0 + logvar, axis=-1)  # [N]
  else:
    log_q_self = gaussian_log_prob(z, mean, logvar)  # [S, N]
  return mutual_information_terms(log_q_self, log_q_agg)


def gaussian_mutual_information(rng: jax.Array, mean: jax.Array, logvar: jax.Array, *,
                                mask: jax.Array | None = None, num_samples: int = 1,
                                chunk_size: int = 128,
                                analytic_entropy: bool = False) -> jax.Array:
  """I_q(x; z) of diagonal Gaussian posteriors over the whole evaluation set (the mean of
  `gaussian_mi_terms` over real examples).

  All N posteriors form the mixture q(z), as in the whole-set `calc_mi` of the code of Li et
  al. 2019 and of Optimus (Li et al. 2020), rather than the posteriors of one batch as in He et
  al.'s code (`gaussian_mi_terms_per_batch`). With the whole set, q(z) is the exact aggregate
  posterior of the empirical data distribution, so the estimate is unbiased for I_q over that
  distribution, and 0 <= I_q <= log N; the per-batch average is biased down by
  I(batch; z) >= 0 and its target is at most log B (= 3.47 nats for B = 32). The estimate
  grows with N towards the population MI. Every sampled term (the default) is at most log N.
  """
  terms = gaussian_mi_terms(rng, mean, logvar, mask=mask, num_samples=num_samples,
                            chunk_size=chunk_size, analytic_entropy=analytic_entropy)
  if mask is None:
    return jnp.mean(terms)
  real = mask.astype(jnp.float32)
  return jnp.sum(jnp.where(real > 0, terms, 0.0)) / jnp.maximum(jnp.sum(real), 1.0)


def gaussian_mi_terms_per_batch(rng: jax.Array, mean: jax.Array, logvar: jax.Array,
                                batches: np.ndarray, *, num_samples: int = 1,
                                analytic_entropy: bool = False) -> np.ndarray:
  """He et al. 2019's per-batch MI terms: example i's term uses only the posteriors of its own
  batch (a row of `batches`, e.g. `length_sorted_batches`) as the mixture q(z). The size-
  weighted average of their batch estimates (`calc_mi` in their `text.py`) is the mean of these
  terms over all examples. Batch b uses the key `jax.random.fold_in(rng, b)`.

  Returns:
    float64 `[N]` numpy terms (host-side: the batches are looped over, one compiled program).
  """
  mean, logvar = jnp.asarray(mean), jnp.asarray(logvar)

  @jax.jit
  def batch_terms(indices, mask, b):
    return gaussian_mi_terms(jax.random.fold_in(rng, b), mean[indices], logvar[indices],
                             mask=mask, num_samples=num_samples,
                             chunk_size=num_samples * indices.shape[0],
                             analytic_entropy=analytic_entropy)

  return per_batch_terms(batch_terms, batches, mean.shape[0])


def gaussian_mutual_information_per_batch(rng: jax.Array, mean: jax.Array, logvar: jax.Array,
                                          batch_size: int, *, num_samples: int = 1,
                                          analytic_entropy: bool = False,
                                          batches: np.ndarray | None = None) -> float:
  """He et al.'s per-batch MI: the size-weighted average over batches of each batch's MI with
  its own posteriors as the mixture. `batches` defaults to consecutive batches of
  `batch_size`; He et al. batch by length (`length_sorted_batches`). For comparison with
  published numbers: each batch estimate targets an MI of at most log B, and the average is
  biased down by I(batch; z) >= 0 relative to `gaussian_mutual_information`."""
  if batches is None:
    n = mean.shape[0]
    batches = np.pad(np.arange(n), (0, -n % batch_size), constant_values=-1).reshape(
        -1, batch_size)
  terms = gaussian_mi_terms_per_batch(rng, mean, logvar, batches, num_samples=num_samples,
                                      analytic_entropy=analytic_entropy)
  return float(np.mean(terms))


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
