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
