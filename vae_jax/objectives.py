"""Pure loss terms for sequence VAEs.

Every function here works on per-example (or per-token) arrays and returns per-example arrays
(the density gap's row terms read the posteriors of their whole chunk); reductions over the
batch live in `vae_jax.kl_terms` (a batch's KL term) and `vae_jax.losses` (the loss, weights
such as beta), never inside models. Notation follows METHODS.md: a diagonal Gaussian
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


def _above(kl: jax.Array, threshold: float) -> jax.Array:
  """The mask 1[kl > threshold] as a constant of the gradient (a comparison has none)."""
  return jax.lax.stop_gradient((kl > threshold).astype(kl.dtype))


def sentence_free_bits_kl(kl: jax.Array, target: float) -> jax.Array:
  """Free bits per sentence (Li et al. 2019, `text_anneal_fb.py --fb 1` of
  bohanli/vae-pretraining-encoder).

      penalty(x) = 1[KL(x) > target] · KL(x)

  Each sentence's KL is compared with the target on its own: a sentence whose KL exceeds
  `target` nats pays all of it (not only the excess), one at or below it pays nothing and its
  KL gets no gradient. The mask is a constant of the gradient. The loss averages the
  penalties over the real rows (Li et al.: `loss_rc + kl_mask * kl_weight * loss_kl`, then the
  batch mean).

  Args:
    kl: `[B]` per-example KL(q(z|x) || p(z)).
    target: free nats per sentence (Li et al.'s `--target_kl`).

  Returns:
    `[B]` per-example penalty.
  """
  return _above(kl, target) * kl


def sentence_dimension_free_bits_kl(kl_dims: jax.Array, target: float) -> jax.Array:
  """Free bits per sentence and dimension (Li et al. 2019, `text_anneal_fb.py --fb 2` of
  bohanli/vae-pretraining-encoder, the form of their published results).

      penalty(x) = Σ_k 1[KL_k(x) > target] · KL_k(x)

  with KL_k(x) = ½(μ_k² + σ_k² − log σ_k² − 1) the k-th dimension's KL of sentence x. Each
  (sentence, dimension) pair is compared with the target on its own; the pairs above it pay
  their whole KL and receive its gradient, the others pay nothing. The mask is a constant of
  the gradient. Li et al. set the per-dimension threshold from a per-sentence target,
  `dim_target_kl = target_kl / nz` (their README: `--target_kl 8` with nz = 32, 0.25 nats per
  dimension); pass that quotient here.

  Args:
    kl_dims: `[B, d]` per-example, per-dimension KL.
    target: free nats per dimension (Li et al.'s target_kl / d).

  Returns:
    `[B]` per-example penalty.
  """
  return jnp.sum(_above(kl_dims, target) * kl_dims, axis=-1)


def _row_normal(rng: jax.Array, num_samples: int, batch: int, dim: int,
                dtype=jnp.float32) -> jax.Array:
  """ε `[num_samples, batch, dim]` ~ N(0, I), row i's drawn from `fold_in(rng, i)`: a row's
  draws do not depend on how many rows the batch has (appended padding leaves them alone)."""
  draw = lambda i: jax.random.normal(jax.random.fold_in(rng, i), (num_samples, dim), dtype)
  return jnp.swapaxes(jax.vmap(draw)(jnp.arange(batch)), 0, 1)


def density_gap(rng: jax.Array, mean: jax.Array, logvar: jax.Array, weights: jax.Array, *,
                num_samples: int = 32, chunk_size: int = 0) -> jax.Array:
  """Per-example terms of the dimension-wise density-gap estimate of KL(q_agg(z) || p(z))
  (DG-VAE, Zhang et al. 2022, the "narrow" form of the official code; METHODS.md §2).

  The batch is cut into chunks of b consecutive rows (`chunk_size`; 0: the whole batch is one
  chunk). Every posterior i of a chunk draws M = `num_samples` reparameterised samples
  z_{i,m} = μ_i + σ_i ε_{i,m} (row i's noise from `fold_in(rng, i)`); in each dimension k the
  chunk's aggregate posterior is the 1-D mixture q_agg,k(t) = (1/b) Σ_j N(t; μ_jk, σ_jk²) over
  the chunk's real rows, and row i's term is

      DG_i = Σ_k mean_m [ log q_agg,k(z_{i,m,k}) − log N(z_{i,m,k}; 0, 1) ].

  The density gap of the batch is their mean over the real rows (the `density_gap` entry of
  `vae_jax.kl_terms`). DG_i depends on the whole chunk through q_agg: a per-example array, not
  a per-example quantity. log q_agg,k is a log-sum-exp of log densities (never a product of
  densities), so it is stable for very narrow posteriors. Unlike the per-sentence KL, DG
  penalises only the mismatch of the aggregate posterior with the prior: single posteriors may
  be narrow (informative codes) as long as together they cover N(0, 1) in every dimension.

  Args:
    rng: key of the samples.
    mean, logvar: `[B, d]` diagonal Gaussian posteriors.
    weights: `[B]` 1 for real rows, 0 for padding rows (excluded from the mixtures).
    num_samples: M samples per posterior (static).
    chunk_size: rows per mixture (static); must divide B. 0: the whole batch.

  Returns:
    `[B]` DG_i, 0 for padding rows.
  """
  batch, dim = mean.shape
  b = batch if chunk_size <= 0 or chunk_size >= batch else chunk_size
  if batch % b:
    raise ValueError(f"density_gap: chunk_size {chunk_size} must divide the batch {batch}")
  chunks = batch // b
  w = weights.astype(jnp.float32).reshape(chunks, b)
  mu = mean.reshape(chunks, b, dim)
  lv = logvar.reshape(chunks, b, dim)
  eps = _row_normal(rng, num_samples, batch, dim, mean.dtype).reshape(num_samples, chunks, b,
                                                                        dim)
  z = mu + jnp.exp(0.5 * lv) * eps                                 # [M, C, b, d]
  # log N(z_{c,i,m,k}; μ_{c,j,k}, σ²_{c,j,k}) for every pair (i, j) of a chunk: [M, C, b, b, d].
  diff = z[:, :, :, None, :] - mu[None, :, None, :, :]
  log_n = -0.5 * (LOG_2PI + lv[None, :, None] + jnp.square(diff) * jnp.exp(-lv)[None, :, None])
  real_j = (w > 0)[None, :, None, :, None]
  n_real = jnp.maximum(jnp.sum(w, axis=-1), 1.0)                   # [C]
  # Padding rows get a finite -1e30 (not -inf), so a chunk of padding only has finite gradients.
  log_q_agg = (jax.nn.logsumexp(jnp.where(real_j, log_n, -1e30), axis=3)
               - jnp.log(n_real)[None, :, None, None])              # [M, C, b, d]
  log_p = -0.5 * (LOG_2PI + jnp.square(z))
  gap = jnp.mean(jnp.sum(log_q_agg - log_p, axis=-1), axis=0)      # [C, b]
  return jnp.where(w > 0, gap, 0.0).reshape(batch)
