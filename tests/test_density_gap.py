"""DG-VAE's density gap (the per-example `objectives.density_gap` and the `density_gap` KL term
of `vae_jax.kl_terms`) against a brute-force computation and a quadrature, and its place in the
loss. The contract every KL term keeps is tested in test_kl_terms.py."""

import dataclasses
import math
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vae_jax import kl_terms, losses, objectives
from vae_jax.data.vocab import EOS, PAD
from vae_jax.models.vae import SeqVAE, VAEConfig
from vae_jax.nn.flows import FlowConfig


def brute_force_rows(z, mean, logvar, weights, chunk):
  """`[B]` per-row gaps (0 for padding rows): loops over chunks, samples, rows, dimensions; the
  mixture density summed directly in float64 (no log-sum-exp)."""
  z, mean, logvar, weights = (np.asarray(a, np.float64) for a in (z, mean, logvar, weights))
  num_samples, batch, dim = z.shape
  rows_gap = np.zeros(batch)
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
          rows_gap[i] += (np.log(q) - np.log(p)) / num_samples
  return rows_gap


def brute_force(z, mean, logvar, weights, chunk):
  """The batch's density gap: the mean of `brute_force_rows` over the real rows."""
  return brute_force_rows(z, mean, logvar, weights, chunk)[np.asarray(weights) > 0].mean()


def row_noise(key, num_samples, batch, dim):
  """The estimator's noise layout: `[M, B, d]`, row i's draws from `fold_in(key, i)`."""
  return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), (num_samples, dim)),
                              np.float64) for i in range(batch)], axis=1)


def gap_term(rng, mean, logvar, weights, samples=32, chunk=0):
  """The `density_gap` KL term on Gaussian posteriors."""
  terms = SimpleNamespace(mean=mean, logvar=logvar)
  return kl_terms.density_gap(terms, weights, rng, kl_terms.DensityGap(samples, chunk))


@pytest.mark.parametrize("chunk", [0, 3])
def test_density_gap_matches_brute_force(chunk):
  rng = np.random.default_rng(0)
  batch, dim, samples = 6, 3, 5
  mean = jnp.asarray(rng.normal(size=(batch, dim)), jnp.float32)
  logvar = jnp.asarray(rng.normal(scale=0.5, size=(batch, dim)) - 1.0, jnp.float32)
  weights = jnp.array([1, 1, 0, 1, 1, 1], jnp.float32)   # row 2 is padding
  key = jax.random.PRNGKey(3)
  got = objectives.density_gap(key, mean, logvar, weights, num_samples=samples,
                               chunk_size=chunk)
  b = batch if chunk == 0 else chunk
  # The same reparameterised samples, rebuilt from the key in the function's layout.
  z = np.asarray(mean, np.float64) + np.exp(0.5 * np.asarray(logvar, np.float64)) * row_noise(
      key, samples, batch, dim)
  expected = brute_force_rows(z, mean, logvar, weights, b)
  assert expected[np.asarray(weights) > 0].mean() > 0.3   # an aggregate apart from the prior
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(float(gap_term(key, mean, logvar, weights, samples, chunk)),
                             expected[np.asarray(weights) > 0].mean(), rtol=1e-4)


def test_density_gap_estimates_the_aggregate_kl_by_quadrature():
  """With many samples the estimate is Σ_k KL(q_agg,k || N(0, 1)), each a 1-D integral of the
  mixture over a fine grid (the estimator's expectation for one chunk)."""
  rng = np.random.default_rng(2)
  mean = jnp.asarray(rng.normal(size=(5, 2)) * 1.5, jnp.float32)
  logvar = jnp.asarray(rng.normal(scale=0.3, size=(5, 2)) - 1.0, jnp.float32)
  t = np.linspace(-12.0, 12.0, 48001)[:, None, None]
  m, v = np.asarray(mean, np.float64), np.exp(np.asarray(logvar, np.float64))
  q = np.mean(np.exp(-0.5 * (t - m) ** 2 / v) / np.sqrt(2 * np.pi * v), axis=1)   # [T, d]
  log_p = -0.5 * t[:, 0] ** 2 - 0.5 * np.log(2 * np.pi)
  kl = np.sum(np.trapezoid(q * (np.log(q) - log_p), t[:, 0, 0], axis=0))
  samples = 20000
  rows = objectives.density_gap(jax.random.PRNGKey(1), mean, logvar, jnp.ones(5),
                                num_samples=samples)
  # The standard error of the mean over 5 rows of 20,000 samples, bounded generously.
  assert kl > 1.0
  np.testing.assert_allclose(float(jnp.mean(rows)), kl, atol=0.03)


def test_density_gap_is_near_zero_when_the_aggregate_is_the_prior():
  # Every posterior is N(0, 1): q_agg = p exactly, so every term is 0.
  mean, logvar = jnp.zeros((8, 4)), jnp.zeros((8, 4))
  gap = gap_term(jax.random.PRNGKey(0), mean, logvar, jnp.ones(8))
  assert abs(float(gap)) < 1e-5
  # A collapsed-to-a-point aggregate far from the prior has a large gap.
  gap = gap_term(jax.random.PRNGKey(0), mean + 3.0, logvar - 6.0, jnp.ones(8))
  assert float(gap) > 10.0


def test_density_gap_gradients_are_finite_with_a_chunk_of_padding():
  mean = jnp.ones((4, 2))
  weights = jnp.array([1.0, 1.0, 0.0, 0.0])   # the second chunk of 2 is all padding
  grad = jax.grad(lambda m: gap_term(jax.random.PRNGKey(0), m, jnp.zeros((4, 2)), weights,
                                     samples=3, chunk=2))(mean)
  assert np.isfinite(np.asarray(grad)).all()
  np.testing.assert_array_equal(np.asarray(grad[2:]), 0.0)
  with pytest.raises(ValueError, match="divide"):
    objectives.density_gap(jax.random.PRNGKey(0), mean, mean, weights, chunk_size=3)


def test_validation_reports_the_methods_own_objective():
  """Zhang et al.'s code selects and decays on rec + density gap at full weight (not the
  ELBO): validation's `objective` is that, against the gap computed directly; for the plain
  KL term it is the negative ELBO."""
  model = SeqVAE(VAEConfig(vocab_size=11, embed_dim=8, hidden_dim=12, latent_dim=3))
  tokens = jnp.array([[5, 6, EOS, PAD], [7, 8, 9, EOS], [4, EOS, PAD, PAD], [5, EOS, PAD, PAD]])
  batch = {"tokens": tokens, "weights": jnp.array([1.0, 1.0, 1.0, 0.0])}
  variables = model.init({"params": jax.random.PRNGKey(0), "latent": jax.random.PRNGKey(1)},
                         tokens, deterministic=True)
  rng = jax.random.PRNGKey(3)
  out = losses.summarize(losses.make_vae_eval(model, "density_gap", kl_terms.DensityGap(
      samples=4))(variables["params"], {}, batch, rng))
  terms = model.apply(variables, tokens, deterministic=True,
                      rngs={"latent": jax.random.split(rng)[0]})
  gap = objectives.density_gap(jax.random.fold_in(rng, 2), terms.mean, terms.logvar,
                               batch["weights"], num_samples=4)
  real = np.asarray(batch["weights"]) > 0
  np.testing.assert_allclose(out["rec"], np.asarray(terms.rec_nll)[real].mean(), rtol=1e-5)
  np.testing.assert_allclose(out["objective"] - out["rec"], np.asarray(gap)[real].mean(),
                             rtol=1e-4, atol=1e-5)
  assert abs(out["objective"] - out["neg_elbo"]) > 1e-3   # here not the ELBO
  plain = losses.summarize(losses.make_vae_eval(model)(variables["params"], {}, batch, rng))
  np.testing.assert_allclose(plain["objective"], plain["neg_elbo"], rtol=1e-6)


def test_density_gap_is_the_kl_term_of_the_loss():
  cfg = VAEConfig(vocab_size=11, embed_dim=8, hidden_dim=12, latent_dim=3)
  model = SeqVAE(cfg)
  tokens = jnp.array([[5, 6, EOS, PAD], [7, 8, 9, EOS], [4, EOS, PAD, PAD], [5, EOS, PAD, PAD]])
  batch = {"tokens": tokens, "weights": jnp.ones(4)}
  variables = model.init({"params": jax.random.PRNGKey(0), "latent": jax.random.PRNGKey(1)},
                         tokens, deterministic=True)
  loss_fn = losses.make_vae_loss(model, optax.constant_schedule(0.3), "density_gap",
                                 kl_terms.DensityGap(samples=4))
  rng = jax.random.PRNGKey(5)
  loss, (sums, _) = loss_fn(variables["params"], {}, batch, rng, 0)
  latent_rng, dropout_rng, gap_rng = jax.random.split(rng, 3)
  terms = model.apply(variables, tokens, deterministic=False,
                      rngs={"latent": latent_rng, "dropout": dropout_rng})
  gap = jnp.mean(objectives.density_gap(gap_rng, terms.mean, terms.logvar, batch["weights"],
                                       num_samples=4))
  np.testing.assert_allclose(float(loss), float(jnp.mean(terms.rec_nll) + 0.3 * gap),
                             rtol=1e-5)
  np.testing.assert_allclose(float(sums["density_gap"]), 4 * float(gap), rtol=1e-5)
  assert math.isfinite(float(loss))
  flow = SeqVAE(dataclasses.replace(cfg, posterior="flow", flow=FlowConfig(hidden_dim=4,
                                                                            context_dim=4)))
  with pytest.raises(ValueError, match="needs Gaussian posteriors"):
    losses.make_vae_loss(flow, optax.constant_schedule(0.3), "density_gap")


def test_density_gap_gradient_in_the_loss_matches_brute_force():
  """The loss's gradient with respect to the posterior heads is the reconstruction's gradient
  plus β times the brute-force density gap's gradient (mixtures over chunks of 2 rows).

  The posterior heads are linear, μ = F W_μ + b_μ and log σ² = F W_σ + b_σ (F `[B, h]` the
  encoder features), so for DG(μ, log σ²), with the samples z = μ + σ ε moving with the
  posteriors (the same ε as the loss's key),

    ∂DG/∂W = Fᵀ ∂DG/∂(μ or log σ²),   ∂DG/∂b = Σ_i ∂DG/∂(μ_i or log σ²_i),

  where ∂DG/∂μ and ∂DG/∂log σ² are central differences of `brute_force` in float64. This
  fails if the gap is left out of the loss or its gradient stopped, weighted by anything but β,
  computed from other posteriors (the prior's, the sampled codes), other samples, other rows
  (padding included) or other chunks. The reconstruction's gradient is that of the weighted
  mean of `rec_nll` from `model.apply` with the loss's latent and dropout keys."""
  beta, num_samples, dim, chunk = 0.3, 3, 3, 2
  model = SeqVAE(VAEConfig(vocab_size=11, embed_dim=8, hidden_dim=12, latent_dim=dim))
  tokens = jnp.array([[5, 6, EOS, PAD], [7, 8, 9, EOS], [4, EOS, PAD, PAD], [5, EOS, PAD, PAD]])
  weights = jnp.array([1.0, 1.0, 1.0, 0.0])   # the last row is padding
  batch = {"tokens": tokens, "weights": weights}
  params = model.init({"params": jax.random.PRNGKey(0), "latent": jax.random.PRNGKey(1)},
                      tokens, deterministic=True)["params"]
  # Narrow posteriors with spread means: an aggregate clearly apart from N(0, 1).
  head = params["head"]
  head["mean"]["kernel"] = 4.0 * head["mean"]["kernel"]
  head["mean"]["bias"] = head["mean"]["bias"] + jnp.array([0.8, -0.5, 0.3])
  head["logvar"]["bias"] = head["logvar"]["bias"] - 2.5
  loss_fn = losses.make_vae_loss(model, optax.constant_schedule(beta), "density_gap",
                                 kl_terms.DensityGap(samples=num_samples, chunk=chunk))
  rng = jax.random.PRNGKey(5)
  loss, grads = jax.value_and_grad(lambda p: loss_fn(p, {}, batch, rng, 0)[0])(params)
  latent_rng, dropout_rng, gap_rng = jax.random.split(rng, 3)

  def apply(p):
    return model.apply({"params": p}, tokens, deterministic=False,
                       rngs={"latent": latent_rng, "dropout": dropout_rng})

  def rec(p):
    return jnp.sum(apply(p).rec_nll * weights) / jnp.sum(weights)

  rec_value, rec_grads = jax.value_and_grad(rec)(params)
  terms = apply(params)
  features, mean, logvar = (np.asarray(a, np.float64)
                            for a in (terms.features, terms.mean, terms.logvar))
  for layer, value in (("mean", mean), ("logvar", logvar)):
    np.testing.assert_allclose(
        value, features @ np.asarray(head[layer]["kernel"]) + np.asarray(head[layer]["bias"]),
        rtol=1e-5, atol=1e-5)

  # The loss's samples, rebuilt from its key in the layout of objectives.density_gap.
  eps = row_noise(gap_rng, num_samples, len(tokens), dim)

  def gap(m, lv):
    return brute_force(m + np.exp(0.5 * lv) * eps, m, lv, weights, chunk)

  value = gap(mean, logvar)
  assert value > 1.0
  np.testing.assert_allclose(float(loss), float(rec_value) + beta * value, rtol=1e-5)

  h = 1e-5
  d_mean, d_logvar = np.zeros_like(mean), np.zeros_like(logvar)
  for i in range(len(tokens)):
    for k in range(dim):
      step = np.zeros_like(mean)
      step[i, k] = h
      d_mean[i, k] = (gap(mean + step, logvar) - gap(mean - step, logvar)) / (2 * h)
      d_logvar[i, k] = (gap(mean, logvar + step) - gap(mean, logvar - step)) / (2 * h)
  np.testing.assert_array_equal(d_mean[3], 0.0)      # padding contributes nothing
  np.testing.assert_array_equal(d_logvar[3], 0.0)

  for layer, d in (("mean", d_mean), ("logvar", d_logvar)):
    expected = {"kernel": features.T @ d, "bias": d.sum(axis=0)}
    for name, want in expected.items():
      kl_part = np.asarray(grads["head"][layer][name] - rec_grads["head"][layer][name])
      scale = float(np.max(np.abs(want)))
      assert beta * scale > 1e-3              # a gradient well above the tolerance
      np.testing.assert_allclose(kl_part, beta * want, rtol=1e-4, atol=1e-4 * beta * scale)
