"""Tests of vae_jax.objectives and vae_jax.schedules against independent computations
(distrax distributions, Monte Carlo, direct numpy loops, the reference construction of the
cyclical schedule of Fu et al. 2019). The batch-level KL terms built on these functions (free
bits, the density gap) are tested in test_kl_terms.py and test_density_gap.py."""

from __future__ import annotations

import math

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax import objectives, schedules


def _posterior(seed: int, shape=(5, 4)):
  r = np.random.default_rng(seed)
  mean = r.normal(size=shape).astype(np.float32)
  logvar = (r.normal(size=shape) * 0.7).astype(np.float32)
  return mean, logvar


# ---------------------------------------------------------------------------------------------
# Gaussian helpers.
# ---------------------------------------------------------------------------------------------


def test_gaussian_kl_matches_distrax():
  mean, logvar = _posterior(0)
  want = distrax.Normal(mean, np.exp(0.5 * logvar)).kl_divergence(distrax.Normal(0.0, 1.0))
  np.testing.assert_allclose(objectives.gaussian_kl(mean, logvar), want, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(objectives.gaussian_kl(np.zeros(3), np.zeros(3)), 0.0)


def test_gaussian_kl_matches_monte_carlo():
  mean, logvar = _posterior(1, (3, 4))
  num = 200000

  @jax.jit
  def mc(rng):
    z = objectives.reparameterize(rng, mean, logvar, num)
    diff = objectives.gaussian_log_prob(z, mean, logvar) - objectives.standard_normal_log_prob(z)
    return diff.mean(0), diff.std(0)

  estimate, sd = mc(jax.random.key(2))
  kl = np.sum(objectives.gaussian_kl(mean, logvar), -1)
  np.testing.assert_array_less(np.abs(np.asarray(estimate) - kl),
                               5 * np.asarray(sd) / math.sqrt(num))


def test_gaussian_log_prob_matches_distrax():
  mean, logvar = _posterior(3, (2, 3))
  z = np.random.default_rng(4).normal(size=(5, 2, 3)).astype(np.float32) * 2
  want = distrax.MultivariateNormalDiag(mean, np.exp(0.5 * logvar)).log_prob(z)
  np.testing.assert_allclose(objectives.gaussian_log_prob(z, mean, logvar), want, rtol=1e-5)
  want_std = distrax.MultivariateNormalDiag(np.zeros(3, np.float32)).log_prob(z)
  np.testing.assert_allclose(objectives.standard_normal_log_prob(z), want_std, rtol=1e-5)
  np.testing.assert_allclose(
      objectives.standard_normal_log_prob(z),
      objectives.gaussian_log_prob(z, np.zeros(3), np.zeros(3)), rtol=1e-6)


def test_reparameterize_shapes_moments_and_gradient():
  mean, logvar = _posterior(5, (2, 3))
  rng = jax.random.key(6)
  assert objectives.reparameterize(rng, mean, logvar).shape == (2, 3)
  z = objectives.reparameterize(rng, mean, logvar, 50000)
  assert z.shape == (50000, 2, 3)
  sd = np.exp(0.5 * logvar)
  np.testing.assert_array_less(np.abs(np.asarray(z.mean(0)) - mean), 5 * sd / math.sqrt(50000))
  np.testing.assert_allclose(z.std(0), sd, rtol=0.02)
  np.testing.assert_array_equal(objectives.reparameterize(rng, mean, logvar, 4),
                                objectives.reparameterize(rng, mean, logvar, 4))
  # dz/dmean = 1, dz/dlogvar = eps * sd / 2.
  g_mean, g_logvar = jax.grad(
      lambda m, lv: objectives.reparameterize(rng, m, lv, 3).sum(), argnums=(0, 1))(mean, logvar)
  np.testing.assert_allclose(g_mean, np.full((2, 3), 3.0))
  z3 = objectives.reparameterize(rng, mean, logvar, 3)
  np.testing.assert_allclose(g_logvar, 0.5 * np.sum(z3 - mean, 0), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Token NLL.
# ---------------------------------------------------------------------------------------------


def test_token_nll_matches_numpy_loop():
  r = np.random.default_rng(7)
  lead, t, v = (2, 3), 6, 9
  logits = (r.normal(size=lead + (t, v)) * 3).astype(np.float32)
  targets = r.integers(0, v, size=lead + (t,))
  lengths = r.integers(1, t + 1, size=lead)
  mask = (np.arange(t) < lengths[..., None]).astype(np.float32)
  want = np.zeros(lead)
  for idx in np.ndindex(*lead):
    for step in range(lengths[idx]):
      row = logits[idx][step].astype(np.float64)
      want[idx] -= row[targets[idx][step]] - np.log(np.sum(np.exp(row)))
  got = objectives.token_nll(logits, targets, mask)
  assert got.shape == lead and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # Padding positions contribute nothing whatever their logits.
  noisy = np.where(mask[..., None] > 0, logits, 1e4).astype(np.float32)
  np.testing.assert_allclose(objectives.token_nll(noisy, targets, mask), want, rtol=1e-5)
  # Half-precision logits are upcast.
  half = objectives.token_nll(jnp.asarray(logits, jnp.bfloat16), targets, mask)
  assert half.dtype == jnp.float32
  np.testing.assert_allclose(half, want, rtol=0.02)


# ---------------------------------------------------------------------------------------------
# Per-sentence free-bits penalties (the batch-level forms: test_kl_terms.py).
# ---------------------------------------------------------------------------------------------


def test_per_sentence_free_bits_at_the_target_are_free():
  # Li et al. compare with a strict `>`: a KL exactly at the target pays nothing and gets no
  # gradient; just above it pays all of its KL (not the excess).
  kl_dims = np.array([[0.5, 0.5, 0.5, 0.5],      # sum 2.0: at the sentence target
                      [0.5, 0.5, 0.5, 0.5625],   # sum 2.0625: above
                      [0.25, 0.25, 0.125, 0.0]],  # sum 0.625: below
                     np.float32)
  sentence = objectives.sentence_free_bits_kl(kl_dims.sum(1), 2.0)
  np.testing.assert_array_equal(sentence, [0.0, 2.0625, 0.0])
  dims = objectives.sentence_dimension_free_bits_kl(kl_dims, 0.25)  # 0.25 = 8 / 32
  np.testing.assert_array_equal(dims, [2.0, 2.0625, 0.0])
  # The mask is a constant of the gradient: d penalty / d KL is the mask itself.
  g = jax.grad(lambda k: objectives.sentence_free_bits_kl(k, 2.0).sum())(kl_dims.sum(1))
  np.testing.assert_array_equal(g, [0.0, 1.0, 0.0])
  g = jax.grad(lambda k: objectives.sentence_dimension_free_bits_kl(k, 0.25).sum())(kl_dims)
  np.testing.assert_array_equal(g, [[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0]])


# ---------------------------------------------------------------------------------------------
# KL schedules.
# ---------------------------------------------------------------------------------------------


def _fu_cyclical_reference(n_iter, start, stop, n_cycle, ratio):
  """The cyclical linear schedule constructed as Fu et al. 2019 describe it: in each of
  `n_cycle` periods, beta climbs from `start` by equal increments to `stop` during the first
  `ratio` of the period, and is `stop` everywhere else."""
  beta = np.full(n_iter, stop, np.float64)
  period = n_iter / n_cycle
  increment = (stop - start) / (period * ratio)
  for cycle in range(n_cycle):
    value, i = start, 0
    while value <= stop and int(i + cycle * period) < n_iter:
      beta[int(i + cycle * period)] = value
      value += increment
      i += 1
  return beta


@pytest.mark.parametrize("n_iter,n_cycle,ratio,start,stop", [
    (1000, 4, 0.5, 0.0, 1.0),
    (600, 3, 1.0, 0.0, 1.0),
    (800, 2, 0.25, 0.2, 0.8),
])
def test_cyclical_matches_fu_et_al_construction(n_iter, n_cycle, ratio, start, stop):
  schedule = schedules.cyclical(n_iter, n_cycle, ratio, start=start, end=stop)
  got = np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(n_iter)))
  np.testing.assert_allclose(got, _fu_cyclical_reference(n_iter, start, stop, n_cycle, ratio),
                             atol=1e-5)


def test_cyclical_key_steps_and_shape():
  schedule = schedules.cyclical(1000, num_cycles=4, ratio=0.5)  # period 250, ramp 125 steps
  for step, want in [(0, 0.0), (50, 0.4), (124, 0.992), (125, 1.0), (249, 1.0), (250, 0.0),
                     (375, 1.0), (750, 0.0), (999, 1.0), (1000, 1.0), (10**6, 1.0)]:
    np.testing.assert_allclose(schedule(step), want, atol=1e-6, err_msg=str(step))
  values = np.asarray(jax.vmap(schedule)(jnp.arange(1000)))
  assert np.sum(np.diff(values) < 0) == 3  # a restart at the start of cycles 2, 3 and 4
  for cycle in range(4):
    ramp = values[250 * cycle:250 * cycle + 126]
    assert np.all(np.diff(ramp) > 0) and ramp[0] == 0.0 and ramp[-1] == 1.0
  with pytest.raises(ValueError):
    schedules.cyclical(0)
  with pytest.raises(ValueError):
    schedules.cyclical(100, num_cycles=0)
  with pytest.raises(ValueError):
    schedules.cyclical(100, ratio=0.0)


def test_linear_sigmoid_constant():
  lin = schedules.linear(100, start=0.1, end=0.9)
  for step, want in [(0, 0.1), (50, 0.5), (100, 0.9), (1000, 0.9)]:
    np.testing.assert_allclose(lin(step), want, atol=1e-6)
  np.testing.assert_allclose(schedules.linear(0, end=0.7)(0), 0.7)
  sig = schedules.sigmoid(1000, steepness=0.01, end=0.8)
  np.testing.assert_allclose(sig(1000), 0.4, atol=1e-6)
  np.testing.assert_allclose(sig(1100), 0.8 / (1 + math.exp(-1.0)), atol=1e-6)
  assert float(sig(0)) < 1e-4 and abs(float(sig(10**5)) - 0.8) < 1e-6
  np.testing.assert_allclose(schedules.constant(0.3)(12345), 0.3)
  # Schedules trace under jit with the step as an array.
  np.testing.assert_allclose(jax.jit(lin)(jnp.int32(50)), 0.5, atol=1e-6)


def test_from_name():
  steps = jnp.array([0, 10, 250, 400, 999])
  pairs = [
      (schedules.from_name("constant", total_steps=1000, value=0.5), schedules.constant(0.5)),
      (schedules.from_name("linear", total_steps=1000, warmup_steps=400),
       schedules.linear(400)),
      (schedules.from_name("sigmoid", total_steps=1000, warmup_steps=400),
       schedules.sigmoid(200)),
      (schedules.from_name("cyclical", total_steps=1000, num_cycles=2, ratio=0.5),
       schedules.cyclical(1000, 2, 0.5)),
  ]
  for got, want in pairs:
    np.testing.assert_allclose(jax.vmap(got)(steps), jax.vmap(want)(steps), atol=1e-6)
  with pytest.raises(ValueError):
    schedules.from_name("exponential", total_steps=10)
