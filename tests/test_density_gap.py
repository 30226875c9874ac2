"""DG-VAE's density gap (objectives.density_gap_kl) against a brute-force computation, and its
place in the loss."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vae_jax import losses, objectives
from vae_jax.data.vocab import EOS, PAD
from vae_jax.models.vae import SeqVAE, VAEConfig


def brute_force(z, mean, logvar, weights, chunk):
  """Loops over chunks, samples, rows, dimensions; the mixture density summed directly in
  float64 (no log-sum-exp)."""
  z, mean, logvar, weights = (np.asarray(a, np.float64) for a in (z, mean, logvar, weights))
  num_samples, batch, dim = z.shape
  total, count = 0.0, 0.0
  for start in range(0, batch, chunk):
    rows = range(start, start + chunk)
    real = [j for j in rows if weights[j] > 0]
    for i in real:
      for m in range(num_samples):
        for k in range(dim):
          t = z[m, i, k]
          q = np.mean([np.exp(-0.5 * (t - mean[j, k]) ** 2 / np.exp(logvar[j, k]))
                       / np.sqrt(2 * np.pi * np.exp(logvar[j, k])) for j in real])
          p = np.exp(-0.5 * t * t) / np.sqrt(2 * np.pi)
          total += (np.log(q) - np.log(p)) / num_samples
      count += 1
  return total / count


@pytest.mark.parametrize("chunk", [0, 3])
def test_density_gap_matches_brute_force(chunk):
  rng = np.random.default_rng(0)
  batch, dim, samples = 6, 3, 5
  mean = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
  logvar = jnp.asarray(rng.normal(scale=0.5, size=(batch, dim)) - 1.0, jnp.float32)
  weights = jnp.array([1, 1, 0, 1, 1, 1], jnp.float32)   # row 2 is padding
  key = jax.random.PRNGKey(3)
  got = objectives.density_gap_kl(key, mean, logvar, weights, num_samples=samples,
                                  chunk_size=chunk)
  b = batch if chunk == 0 else chunk
  # The same reparameterised samples, rebuilt from the key in the function's layout.
  eps = jax.random.normal(key, (samples, batch // b, b, dim))
  z = (mean.reshape(batch // b, b, dim) + jnp.exp(0.5 * logvar.reshape(batch // b, b, dim))
       * eps).reshape(samples, batch, dim)
  np.testing.assert_allclose(float(got), brute_force(z, mean, logvar, weights, b), rtol=1e-4)


def test_density_gap_is_near_zero_when_the_aggregate_is_the_prior():
  # Every posterior is N(0, 1): q_agg = p exactly, so every term is 0.
  mean, logvar = jnp.zeros((8, 4)), jnp.zeros((8, 4))
  gap = objectives.density_gap_kl(jax.random.PRNGKey(0), mean, logvar, jnp.ones(8))
  assert abs(float(gap)) < 1e-5
  # A collapsed-to-a-point aggregate far from the prior has a large gap.
  gap = objectives.density_gap_kl(jax.random.PRNGKey(0), mean + 3.0, logvar - 6.0, jnp.ones(8))
  assert float(gap) > 10.0


def test_density_gap_gradients_are_finite_with_a_chunk_of_padding():
  mean = jnp.ones((4, 2))
  weights = jnp.array([1.0, 1.0, 0.0, 0.0])   # the second chunk of 2 is all padding
  grad = jax.grad(lambda m: objectives.density_gap_kl(
      jax.random.PRNGKey(0), m, jnp.zeros((4, 2)), weights, num_samples=3, chunk_size=2))(mean)
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_array_equal(np.asarray(grad[2:]), 0.0)
  with pytest.raises(ValueError, match="divide"):
    objectives.density_gap_kl(jax.random.PRNGKey(0), mean, mean, weights, chunk_size=3)


def test_density_gap_is_the_kl_term_of_the_loss():
  cfg = VAEConfig(vocab_size=11, embed_dim=8, hidden_dim=12, latent_dim=3)
  model = SeqVAE(cfg)
  tokens = jnp.array([[5, 6, EOS, PAD], [7, 8, 9, EOS], [4, EOS, PAD, PAD], [5, EOS, PAD, PAD]])
  batch = {"tokens": tokens, "weights": jnp.ones(4)}
  variables = model.init({"params": jax.random.PRNGKey(0), "latent": jax.random.PRNGKey(1)},
                         tokens, deterministic=True)
  term = losses.KLTermConfig(kind="density_gap", density_gap_samples=4)
  loss_fn = losses.make_vae_loss(model, optax.constant_schedule(0.3), term)
  rng = jax.random.PRNGKey(5)
  loss, (sums, _) = loss_fn(variables["params"], {}, batch, rng, 0)
  latent_rng, dropout_rng, gap_rng = jax.random.split(rng, 3)
  terms = model.apply(variables, tokens, deterministic=False,
                      rngs={"latent": latent_rng, "dropout": dropout_rng})
  gap = objectives.density_gap_kl(gap_rng, terms.mean, terms.logvar, batch["weights"],
                                  num_samples=4)
  np.testing.assert_allclose(float(loss), float(jnp.mean(terms.rec_nll) + 0.3 * gap),
                             rtol=1e-5)
  np.testing.assert_allclose(float(sums["density_gap"]), 4 * float(gap), rtol=1e-5)
  with pytest.raises(ValueError, match="free bits"):
    losses.KLTermConfig(kind="density_gap", free_bits=1.0)
  with pytest.raises(ValueError, match="unknown KL term"):
    losses.KLTermConfig(kind="mmd")
  assert math.isfinite(float(loss))
