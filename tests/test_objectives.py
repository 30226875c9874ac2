"""Tests of vae_jax.objectives and vae_jax.schedules against independent computations
(distrax distributions, Monte Carlo, direct numpy loops, the reference construction of the
cyclical schedule of Fu et al. 2019)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import distrax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax import losses, objectives, schedules


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
# Free bits.
# ---------------------------------------------------------------------------------------------


def _numpy_batch_mean_free_bits(kl_dims, target, weights, per_dimension):
  real = weights > 0
  mean_dims = kl_dims[real].mean(0)
  if per_dimension:
    return np.sum(np.maximum(mean_dims, target))
  return max(np.sum(mean_dims), target)


@pytest.mark.parametrize("per_dimension", [False, True])
def test_batch_mean_free_bits_value_and_padding(per_dimension):
  r = np.random.default_rng(8)
  kl_dims = r.uniform(0, 0.5, size=(6, 4)).astype(np.float32)
  weights = np.array([1, 1, 1, 1, 0, 0], np.float32)
  kl_dims[4:] = 1e3  # padding rows: must not count
  for target in [0.05, 0.2, 0.3, 5.0]:
    got = objectives.batch_mean_free_bits_kl(kl_dims, target, weights, per_dimension)
    want = _numpy_batch_mean_free_bits(kl_dims, target, weights, per_dimension)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("per_dimension", [False, True])
def test_batch_mean_free_bits_gradient_is_zero_below_target(per_dimension):
  mean, logvar = _posterior(9, (4, 3))
  mean, logvar = mean * 0.1, logvar * 0.1  # small KL: ~0.01 nats per dimension
  weights = np.array([1, 1, 1, 0], np.float32)

  def penalty(m, lv, target):
    return objectives.batch_mean_free_bits_kl(objectives.gaussian_kl(m, lv), target, weights,
                                              per_dimension)

  grad = jax.grad(penalty, argnums=(0, 1))
  g_mean, g_logvar = grad(mean, logvar, 10.0)  # every term below the target
  np.testing.assert_array_equal(g_mean, 0.0)
  np.testing.assert_array_equal(g_logvar, 0.0)
  # With a zero target the penalty is the plain batch-mean KL, gradient included.
  def plain(m, lv):
    return jnp.sum(objectives.gaussian_kl(m, lv) * weights[:, None]) / weights.sum()
  for got, want in zip(grad(mean, logvar, 0.0), jax.grad(plain, argnums=(0, 1))(mean, logvar)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-8)
  # Padding rows never get a gradient.
  assert np.all(np.asarray(grad(mean, logvar, 0.0)[0])[3] == 0.0)


def test_batch_mean_free_bits_per_dimension_clamps_each_dimension():
  kl_dims = np.array([[0.1, 2.0, 0.5], [0.3, 4.0, 0.7]], np.float32)  # means 0.2, 3.0, 0.6
  weights = np.ones(2, np.float32)
  g = jax.grad(objectives.batch_mean_free_bits_kl)(kl_dims, 0.5, weights, True)
  np.testing.assert_allclose(g, [[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]])
  g_batch = jax.grad(objectives.batch_mean_free_bits_kl)(kl_dims, 4.0, weights, False)
  np.testing.assert_array_equal(g_batch, 0.0)  # mean of the sums 3.8 < 4


def _li_text_anneal_fb_loss(loss_rc, mu, logvar, kl_weight, fb, target_kl):
  """The training loss of one batch in Li et al. 2019's `text_anneal_fb.py`
  (bohanli/vae-pretraining-encoder), transcribed in numpy from its `--fb` branches, together
  with its gradient with respect to (mu, logvar) derived by hand. Their batches have no
  padding rows, so this takes only the real rows.

    fb 1: loss_kl = Σ_k KL_k; kl_mask = (loss_kl > target_kl).float()
          loss = loss_rc + kl_mask * kl_weight * loss_kl
    fb 2: dim_target_kl = target_kl / nz; loss_kl = KL_k per dimension
          kl_mask = (loss_kl > dim_target_kl).float(); fake_loss_kl = (kl_mask * loss_kl).sum(1)
          loss = loss_rc + kl_weight * fake_loss_kl
    then loss = loss.mean(dim=-1), the mean over the batch.

  The mask comes from a comparison, which has no gradient, so
  d(mask KL_k)/dmu_k = mask mu_k and d(mask KL_k)/dlogvar_k = mask (exp(logvar_k) - 1) / 2.
  """
  batch, nz = mu.shape
  loss_kl = 0.5 * (mu ** 2 + np.exp(logvar) - logvar - 1)  # [batch, nz]
  if fb == 1:
    kl_mask = (loss_kl.sum(axis=1) > target_kl).astype(np.float64)[:, None]
    kl_mask = np.repeat(kl_mask, nz, axis=1)
  elif fb == 2:
    kl_mask = (loss_kl > target_kl / nz).astype(np.float64)
  else:
    raise ValueError(fb)
  loss = loss_rc + kl_weight * (kl_mask * loss_kl).sum(axis=1)
  d_mu = kl_weight * kl_mask * mu / batch
  d_logvar = kl_weight * kl_mask * 0.5 * (np.exp(logvar) - 1) / batch
  return loss.mean(), d_mu, d_logvar


def _terms(mean, logvar):
  kl_dims = objectives.gaussian_kl(mean, logvar)
  return SimpleNamespace(kl=jnp.sum(kl_dims, axis=-1), kl_dims=kl_dims)


@pytest.mark.parametrize("fb", [1, 2])
def test_per_sentence_free_bits_match_li_et_al(fb):
  # 12 real rows whose KLs fall below, near and above the target, then 4 padding rows.
  r = np.random.default_rng(31)
  d, real, target_kl = 4, 12, 2.0
  scale = np.repeat([0.15, 0.5, 0.8, 1.2], 3)[:, None]
  mean = (r.normal(size=(real + 4, d)) * np.concatenate([scale, np.ones((4, 1))])).astype(
      np.float32)
  logvar = (r.normal(size=(real + 4, d)) * 0.3).astype(np.float32)
  mean[real:] *= 30.0  # padding rows with huge KLs: no value, no gradient
  weights = np.r_[np.ones(real), np.zeros(4)].astype(np.float32)
  rec = r.uniform(20, 40, size=real + 4).astype(np.float32)
  beta = 0.7
  kl_term = losses.KLTermConfig(free_bits=target_kl / d if fb == 2 else target_kl,
                                free_bits_per_dimension=fb == 2, free_bits_per_sentence=True)

  def loss(m, lv):  # the loss as make_vae_loss assembles it from the free-bits term
    return (jnp.sum(rec * weights) / weights.sum()
            + beta * losses.free_bits_term(_terms(m, lv), kl_term, weights))

  m64, lv64 = mean[:real].astype(np.float64), logvar[:real].astype(np.float64)
  want, want_d_mean, want_d_logvar = _li_text_anneal_fb_loss(rec[:real], m64, lv64, beta, fb,
                                                             target_kl)
  kl = 0.5 * (m64 ** 2 + np.exp(lv64) - lv64 - 1)
  compared = kl.sum(1) if fb == 1 else kl.ravel()
  threshold = target_kl if fb == 1 else target_kl / d
  assert np.any(compared > threshold) and np.any(compared < threshold)  # both sides covered
  np.testing.assert_allclose(loss(mean, logvar), want, rtol=1e-5)
  d_mean, d_logvar = jax.grad(loss, argnums=(0, 1))(mean, logvar)
  np.testing.assert_allclose(d_mean[:real], want_d_mean, rtol=1e-5, atol=1e-9)
  np.testing.assert_allclose(d_logvar[:real], want_d_logvar, rtol=1e-5, atol=1e-9)
  np.testing.assert_array_equal(d_mean[real:], 0.0)
  np.testing.assert_array_equal(d_logvar[real:], 0.0)


def test_per_sentence_free_bits_at_the_target_are_free():
  # Li et al. compare with a strict `>`: a KL exactly at the target pays nothing and gets no
  # gradient; just above it pays all of its KL (not the excess).
  kl_dims = np.array([[0.5, 0.5, 0.5, 0.5],      # sum 2.0: at the sentence target
                      [0.5, 0.5, 0.5, 0.5625],   # sum 2.0625: above
                      [0.25, 0.25, 0.125, 0.0],  # sum 0.625: below
                      [9.0, 9.0, 9.0, 9.0]],     # a padding row
                     np.float32)
  weights = np.array([1, 1, 1, 0], np.float32)
  sentence = objectives.sentence_free_bits_kl(kl_dims.sum(1), 2.0)
  np.testing.assert_array_equal(sentence, [0.0, 2.0625, 0.0, 36.0])
  dims = objectives.sentence_dimension_free_bits_kl(kl_dims, 0.25)  # 0.25 = 8 / 32
  np.testing.assert_array_equal(dims, [2.0, 2.0625, 0.0, 36.0])

  def mean_penalty(k, per_dimension):
    kl_term = losses.KLTermConfig(free_bits=0.25 if per_dimension else 2.0,
                                  free_bits_per_dimension=per_dimension,
                                  free_bits_per_sentence=True)
    return losses.free_bits_term(SimpleNamespace(kl=jnp.sum(k, -1), kl_dims=k), kl_term,
                                 weights)

  np.testing.assert_allclose(mean_penalty(kl_dims, False), 2.0625 / 3)
  np.testing.assert_allclose(mean_penalty(kl_dims, True), 4.0625 / 3)
  # Which entries receive gradient: those strictly above the threshold, in real rows only.
  g = jax.grad(mean_penalty)(kl_dims, False)
  np.testing.assert_allclose(g, np.array([[0] * 4, [1] * 4, [0] * 4, [0] * 4]) / 3)
  g = jax.grad(mean_penalty)(kl_dims, True)
  np.testing.assert_allclose(g, np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0],
                                          [0, 0, 0, 0]]) / 3)


def test_free_bits_term_forms_and_flow_posteriors():
  # The four forms through the loss's free-bits term, against numpy; a flow posterior's
  # terms have no per-dimension KL, so only the whole-code forms apply to them.
  r = np.random.default_rng(5)
  kl_dims = r.uniform(0, 1.0, size=(6, 3)).astype(np.float32)
  weights = np.array([1, 1, 1, 1, 1, 0], np.float32)
  real = kl_dims[:5].astype(np.float64)
  terms = SimpleNamespace(kl=jnp.sum(kl_dims, -1), kl_dims=kl_dims)
  flow_terms = SimpleNamespace(kl=jnp.sum(kl_dims, -1), kl_dims=None)
  for per_dimension, per_sentence, target, want in [
      (False, False, 1.6, max(real.sum(1).mean(), 1.6)),
      (True, False, 0.5, np.maximum(real.mean(0), 0.5).sum()),
      (False, True, 1.6, np.mean(np.where(real.sum(1) > 1.6, real.sum(1), 0.0))),
      (True, True, 0.5, np.mean(np.where(real > 0.5, real, 0.0).sum(1)))]:
    kl_term = losses.KLTermConfig(free_bits=target, free_bits_per_dimension=per_dimension,
                                  free_bits_per_sentence=per_sentence)
    np.testing.assert_allclose(losses.free_bits_term(terms, kl_term, weights), want, rtol=1e-6)
    if per_dimension:
      with pytest.raises(ValueError, match="per-dimension free bits"):
        losses.free_bits_term(flow_terms, kl_term, weights)
    else:
      np.testing.assert_allclose(losses.free_bits_term(flow_terms, kl_term, weights), want,
                                 rtol=1e-6)


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
