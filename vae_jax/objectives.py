"""Pure loss terms for sequence VAEs.

Every function here works on per-example (or per-token) arrays and returns per-example arrays;
reductions over the batch and weights such as beta live in the loss functions of
`vae_jax.losses`, never inside models. Notation follows METHODS.md: a diagonal Gaussian
posterior q(z|x) = N(mean, exp(logvar)), the standard normal prior p(z) = N(0, I).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

LOG_2PI = math.log(2.0 * math.pi)


def token_nll(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
  """Negative log-likelihood of `targets` summed over the real tokens of each sequence.

  -log p(x|z) = -sum_t m_t log softmax(logits_t)[x_t].

  Args:
    logits: `[..., T, V]` unnormalised log-probabilities.
    targets: `[..., T]` integer token ids.
    mask: `[..., T]` 1 for real tokens (EOS included), 0 for padding.

  Returns:
    `[...]` summed NLL per sequence.
  """
  logits = logits.astype(jnp.float32)
  log_z = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  return jnp.sum((log_z - target_logit) * mask, axis=-1)


def gaussian_kl(mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """Per-dimension KL(N(mean, exp(logvar)) || N(0, 1)).

  KL_k = 0.5 (mean_k^2 + exp(logvar_k) - logvar_k - 1)   (Kingma & Welling 2014, App. B).
  Sum over the last axis for the KL of the diagonal Gaussian.
  """
  return 0.5 * (jnp.square(mean) + jnp.exp(logvar) - logvar - 1.0)


def gaussian_log_prob(z: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
  """log N(z; mean, diag(exp(logvar))), summed over the last axis."""
  return -0.5 * jnp.sum(
      LOG_2PI + logvar + jnp.square(z - mean) * jnp.exp(-logvar), axis=-1)


def standard_normal_log_prob(z: jax.Array) -> jax.Array:
  """log N(z; 0, I), summed over the last axis."""
  return -0.5 * jnp.sum(LOG_2PI + jnp.square(z), axis=-1)


def reparameterize(rng: jax.Array, mean: jax.Array, logvar: jax.Array,
                   num_samples: int | None = None) -> jax.Array:
  """z = mean + exp(logvar / 2) * eps, eps ~ N(0, I); `[num_samples, ...]` if given."""
  shape = mean.shape if num_samples is None else (num_samples, *mean.shape)
  eps = jax.random.normal(rng, shape, mean.dtype)
  return mean + jnp.exp(0.5 * logvar) * eps


def free_bits_kl(kl_dims: jax.Array, target: float, weights: jax.Array,
                 per_dimension: bool) -> jax.Array:
  """The free-bits KL penalty of a batch (Kingma et al. 2016; Li et al. 2019 `target_kl`).

  The KL is averaged over the batch (rows weighted by `weights`) and only the part above the
  target is penalised, so the encoder is free to spend `target` nats without cost:

  - batch level (`per_dimension=False`): max(target, mean_x sum_k KL_k(x)), with `target` the
    total nats per sentence (Li et al. 2019 `target_kl` semantics for the whole code);
  - per dimension (`per_dimension=True`): sum_k max(target, mean_x KL_k(x)), with `target` nats
    per dimension (Kingma et al. 2016, "free bits" with one group per dimension).

  The clamp is applied to the batch mean, as in both references; the value returned is the
  batch-mean penalty (a scalar), to be multiplied by beta and the number of real rows if a sum
  is wanted. Gradient flows only through the terms above the target.

  Args:
    kl_dims: `[B, d]` per-example, per-dimension KL.
    target: free nats (per sentence, or per dimension).
    weights: `[B]` 1 for real rows, 0 for padding rows.
    per_dimension: which of the two forms.
  """
  denom = jnp.maximum(jnp.sum(weights), 1.0)
  mean_dims = jnp.sum(kl_dims * weights[:, None], axis=0) / denom  # [d]
  if per_dimension:
    return jnp.sum(jnp.maximum(mean_dims, target))
  return jnp.maximum(jnp.sum(mean_dims), target)


def density_gap_kl(rng: jax.Array, mean: jax.Array, logvar: jax.Array, weights: jax.Array, *,
                   num_samples: int = 32, chunk_size: int = 0) -> jax.Array:
  """The dimension-wise density-gap estimate of KL(q_agg(z) || p(z)) (DG-VAE, Zhang et al.
  2022, the "narrow" form of the official code; METHODS.md §2).

  The batch is cut into chunks of b consecutive rows (`chunk_size`; 0: the whole batch is one
  chunk). Every posterior i of a chunk draws M = `num_samples` reparameterised samples
  z_{i,m} ~ N(μ_i, σ_i²); in each dimension k the chunk's aggregate posterior is the 1-D
  mixture q_agg,k(t) = (1/b) Σ_j N(t; μ_jk, σ_jk²) over the chunk's real rows, and

      DG = Σ_k mean_{i,m} [ log q_agg,k(z_{i,m,k}) − log N(z_{i,m,k}; 0, 1) ],

  the mean running over the real rows of all chunks and the M samples. log q_agg,k is a
  log-sum-exp of log densities (never a product of densities), so it is stable for very narrow
  posteriors. Unlike the per-sentence KL, DG penalises only the mismatch of the aggregate
  posterior with the prior: single posteriors may be narrow (informative codes) as long as
  together they cover N(0, 1) in every dimension.

  Args:
    rng: key of the samples.
    mean, logvar: `[B, d]` diagonal Gaussian posteriors.
    weights: `[B]` 1 for real rows, 0 for padding rows (excluded from mixtures and averages).
    num_samples: M samples per posterior (static).
    chunk_size: rows per mixture (static); must divide B. 0: the whole batch.

  Returns:
    The scalar estimate (summed over dimensions, averaged over real rows and samples).
  """
  batch, dim = mean.shape
  b = batch if chunk_size <= 0 or chunk_size >= batch else chunk_size
  if batch % b:
    raise ValueError(f"density_gap_kl: chunk_size {chunk_size} must divide the batch {batch}")
  chunks = batch // b
  w = weights.astype(jnp.float32).reshape(chunks, b)
  mu = mean.reshape(chunks, b, dim)
  lv = logvar.reshape(chunks, b, dim)
  z = reparameterize(rng, mu, lv, num_samples)                    # [M, C, b, d]
  # log N(z_{c,i,m,k}; μ_{c,j,k}, σ²_{c,j,k}) for every pair (i, j) of a chunk: [M, C, b, b, d].
  diff = z[:, :, :, None, :] - mu[None, :, None, :, :]
  log_n = -0.5 * (LOG_2PI + lv[None, :, None] + jnp.square(diff) * jnp.exp(-lv)[None, :, None])
  real_j = (w > 0)[None, :, None, :, None]
  n_real = jnp.maximum(jnp.sum(w, axis=-1), 1.0)                   # [C]
  # Padding rows get a finite -1e30 (not -inf), so a chunk of padding only has finite gradients.
  log_q_agg = (jax.nn.logsumexp(jnp.where(real_j, log_n, -1e30), axis=3)
               - jnp.log(n_real)[None, :, None, None])              # [M, C, b, d]
  log_p = -0.5 * (LOG_2PI + jnp.square(z))
  gap = jnp.sum(log_q_agg - log_p, axis=-1)                        # [M, C, b]
  gap = jnp.where(w[None] > 0, gap, 0.0)
  return jnp.sum(jnp.mean(gap, axis=0)) / jnp.maximum(jnp.sum(w), 1.0)
