"""The KL terms of vae_jax.kl_terms: one contract for every entry of the registry, each entry
against an independent numpy computation, their options and config, and the free-bits forms
against Kingma et al. 2016 and Li et al. 2019 (transcribed).

Adding a KL term: add its row to ROWS (example options, the value at q = p, a numpy reference,
bad option values); every test below then runs it.
"""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from experiment_configs import load_config
from vae_jax import configs, errors, kl_terms, losses, objectives
from vae_jax.kl_terms import KL_TERMS, DensityGap, FreeBits, LayerHinge, PlainKL
from vae_jax.models.della import Della, DellaConfig
from vae_jax.models.vae import SeqVAE, VAEConfig
from vae_jax.nn.flows import FlowConfig
from vae_jax.nn.transformer import TransformerConfig

LAYERS = 2   # the test terms' `kl_layers` group the d dimensions into this many layers


# ---------------------------------------------------------------------------------------------
# Independent numpy computations (float64) from the posteriors' mean and logvar.
# ---------------------------------------------------------------------------------------------


def np_kl_dims(mean, logvar):
  mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
  return 0.5 * (mean ** 2 + np.exp(logvar) - logvar - 1.0)


def ref_kl(mean, logvar, weights, key, o):
  return np_kl_dims(mean, logvar)[weights > 0].sum(1).mean()


def ref_free_bits(mean, logvar, weights, key, o):
  kl_dims = np_kl_dims(mean, logvar)[weights > 0]
  if o.per_dimension:
    return np.sum(np.maximum(kl_dims.mean(0), o.target))
  return max(kl_dims.sum(1).mean(), o.target)


def ref_free_bits_sentence(mean, logvar, weights, key, o):
  kl_dims = np_kl_dims(mean, logvar)[weights > 0]
  if o.per_dimension:
    return np.where(kl_dims > o.target, kl_dims, 0.0).sum(1).mean()
  kl = kl_dims.sum(1)
  return np.where(kl > o.target, kl, 0.0).mean()


def row_noise(key, num_samples, batch, dim):
  """`[M, B, d]`: row i's standard normal draws from `fold_in(key, i)`."""
  return np.stack([np.asarray(jax.random.normal(jax.random.fold_in(key, i), (num_samples, dim)),
                              np.float64) for i in range(batch)], axis=1)


def ref_density_gap(mean, logvar, weights, key, o):
  """Mixture densities summed directly (no log-sum-exp), chunk by chunk, row by row."""
  mean, logvar = np.asarray(mean, np.float64), np.asarray(logvar, np.float64)
  batch, dim = mean.shape
  b = batch if o.chunk == 0 else o.chunk
  z = mean + np.exp(0.5 * logvar) * row_noise(key, o.samples, batch, dim)   # [M, B, d]
  gaps = []
  for start in range(0, batch, b):
    real = [j for j in range(start, start + b) if weights[j] > 0]
    var = np.exp(logvar[real])
    for i in real:
      t = z[:, i, None, :]                                                   # [M, 1, d]
      q = np.mean(np.exp(-0.5 * (t - mean[real]) ** 2 / var) / np.sqrt(2 * np.pi * var), 1)
      p = np.exp(-0.5 * z[:, i] ** 2) / np.sqrt(2 * np.pi)
      gaps.append(np.sum(np.log(q) - np.log(p), -1).mean())
  return np.mean(gaps)


def ref_layer_hinge(mean, logvar, weights, key, o):
  kl_dims = np_kl_dims(mean, logvar)
  layers = kl_dims.reshape(len(kl_dims), LAYERS, -1).sum(-1)
  hinged = np.maximum(layers, o.threshold)
  per_example = hinged.sum(-1) if o.reduction == "sum" else hinged.mean(-1)
  return per_example[weights > 0].mean()


# ---------------------------------------------------------------------------------------------
# The table: one row per registry entry.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Row:
  """examples: options the contract runs with; floor(options, d): the value at q = p;
  reference: the numpy value; bad: (field, value) pairs its options must refuse; monte_carlo:
  the term samples (its gradient at q = p is zero in expectation)."""
  examples: tuple
  floor: Callable[[Any, int], float]
  reference: Callable[..., float]
  bad: tuple = ()
  monte_carlo: bool = False


FREE_BITS_BAD = (("target", -1.0), ("target", "4"), ("per_dimension", 1))

ROWS = {
    "kl": Row((PlainKL(),), lambda o, d: 0.0, ref_kl),
    "free_bits": Row((FreeBits(1.5), FreeBits(9.0), FreeBits(0.4, per_dimension=True)),
                     lambda o, d: o.target * (d if o.per_dimension else 1), ref_free_bits,
                     FREE_BITS_BAD),
    "free_bits_sentence": Row((FreeBits(1.5), FreeBits(0.4, per_dimension=True)),
                              lambda o, d: 0.0, ref_free_bits_sentence, FREE_BITS_BAD),
    "density_gap": Row((DensityGap(samples=3), DensityGap(samples=2, chunk=2)),
                       lambda o, d: 0.0, ref_density_gap,
                       (("samples", 0), ("samples", 2.5), ("chunk", -1)), monte_carlo=True),
    "layer_hinge": Row((LayerHinge(), LayerHinge(0.8, "mean"), LayerHinge(0.8, "sum")),
                       lambda o, d: o.threshold * (LAYERS if o.reduction == "sum" else 1),
                       ref_layer_hinge, (("threshold", -1.0), ("reduction", "max"))),
}

EXAMPLES = [pytest.param(name, options, id=f"{name}-{i}")
            for name, row in ROWS.items() for i, options in enumerate(row.examples)]


def test_every_entry_has_a_row():
  assert set(ROWS) == set(KL_TERMS)
  for name, row in ROWS.items():
    assert all(isinstance(o, KL_TERMS[name].options) for o in row.examples), name


def terms_of(mean, logvar):
  """Gaussian posteriors' per-example terms, as the models return them."""
  kl_dims = objectives.gaussian_kl(mean, logvar)
  return SimpleNamespace(kl=jnp.sum(kl_dims, -1), kl_dims=kl_dims, mean=mean, logvar=logvar,
                         kl_layers=kl_dims.reshape(len(mean), LAYERS, -1).sum(-1))


def term_fn(name, options):
  """(mean, logvar, weights, key) -> the entry's scalar."""
  return lambda m, lv, w, key: KL_TERMS[name].fn(terms_of(m, lv), w, key, options)


def value_and_grads(f, mean, logvar, weights, key):
  return jax.value_and_grad(f, argnums=(0, 1))(mean, logvar, weights, key)


def posteriors(seed, batch=6, dim=4):
  r = np.random.default_rng(seed)
  mean = r.normal(size=(batch, dim)).astype(np.float32)
  logvar = r.normal(scale=0.6, size=(batch, dim)).astype(np.float32)
  return mean, logvar


KEY = jax.random.PRNGKey(7)
WEIGHTS = np.array([1, 1, 1, 0, 1, 1], np.float32)   # row 3 is padding


# ---------------------------------------------------------------------------------------------
# The contract, for every entry.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,options", EXAMPLES)
def test_matches_the_independent_computation(name, options):
  mean, logvar = posteriors(1)
  got = term_fn(name, options)(mean, logvar, WEIGHTS, KEY)
  want = ROWS[name].reference(mean, logvar, WEIGHTS, KEY, options)
  np.testing.assert_allclose(float(got), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,options", EXAMPLES)
def test_jit_equals_eager_and_gradients_are_finite(name, options):
  mean, logvar = posteriors(2)
  f = term_fn(name, options)
  eager, eager_grads = value_and_grads(f, mean, logvar, WEIGHTS, KEY)
  jitted, jit_grads = jax.jit(lambda *a: value_and_grads(f, *a))(mean, logvar, WEIGHTS, KEY)
  np.testing.assert_allclose(jitted, eager, rtol=1e-5)
  for got, want in zip(jit_grads, eager_grads):
    assert np.isfinite(np.asarray(want)).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("name,options", EXAMPLES)
def test_padding_rows_change_nothing(name, options):
  mean, logvar = posteriors(3)
  r = np.random.default_rng(4)
  pad_mean = (r.normal(size=(2, 4)) * 5).astype(np.float32)          # arbitrary values
  pad_logvar = r.uniform(-3, 3, size=(2, 4)).astype(np.float32)
  f = term_fn(name, options)
  value, grads = value_and_grads(f, mean, logvar, WEIGHTS, KEY)
  padded, padded_grads = value_and_grads(
      f, np.concatenate([mean, pad_mean]), np.concatenate([logvar, pad_logvar]),
      np.concatenate([WEIGHTS, np.zeros(2, np.float32)]), KEY)
  np.testing.assert_allclose(padded, value, rtol=1e-5, atol=1e-6)
  for got, want in zip(padded_grads, grads):
    got = np.asarray(got)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got[:6], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(got[6:], 0.0)     # padding rows get no gradient
    np.testing.assert_array_equal(got[3], 0.0)


@pytest.mark.parametrize("name,options", EXAMPLES)
def test_at_q_equals_p_the_term_is_its_floor_with_zero_gradient(name, options):
  zeros = np.zeros((6, 4), np.float32)
  f = term_fn(name, options)
  value, grads = value_and_grads(f, zeros, zeros, WEIGHTS, KEY)
  np.testing.assert_allclose(float(value), ROWS[name].floor(options, 4), atol=1e-5)
  if not ROWS[name].monte_carlo:
    for g in grads:
      np.testing.assert_allclose(g, 0.0, atol=1e-7)
    return
  # A Monte Carlo term's gradient at q = p is noise around zero: its mean over many keys is
  # within five standard errors of zero.
  keys = jax.random.split(KEY, 256)
  per_key = jax.vmap(lambda k: value_and_grads(f, zeros, zeros, WEIGHTS, k)[1])(keys)
  for g in per_key:
    g = np.asarray(g, np.float64)
    stderr = g.std(0) / math.sqrt(len(g))
    assert np.all(np.abs(g.mean(0)) <= 5 * stderr + 1e-7)


CONTRACT = (test_matches_the_independent_computation,
            test_jit_equals_eager_and_gradients_are_finite, test_padding_rows_change_nothing,
            test_at_q_equals_p_the_term_is_its_floor_with_zero_gradient)


def run_contract(name: str) -> None:
  """Every check of the contract on entry `name` with each of its row's example options (what
  the parametrised tests run), for an entry registered at run time (docs/extending.md)."""
  for options in ROWS[name].examples:
    for check in CONTRACT:
      check(name, options)


# ---------------------------------------------------------------------------------------------
# Options and the config.
# ---------------------------------------------------------------------------------------------


BAD = [pytest.param(name, field, value, id=f"{name}-{field}={value!r}")
       for name, row in ROWS.items() for field, value in row.bad]


@pytest.mark.parametrize("name,field,value", BAD)
def test_options_refuse_bad_values_naming_the_field(name, field, value):
  with pytest.raises(ValueError, match=rf"^{field} must") as info:
    KL_TERMS[name].options(**{field: value})
  assert "\n" not in str(info.value)


def vanilla_config():
  cfg = load_config("vae", "smoke,vanilla")
  cfg.unlock()
  return cfg


# The values of the option's type (the command line refuses the others itself).
CONFIG_BAD = [p for p in BAD
              if type(p.values[2]) is type(kl_terms.option_defaults()[p.values[1]])]


@pytest.mark.parametrize("name,field,value", CONFIG_BAD)
def test_config_errors_name_the_option(name, field, value):
  cfg = vanilla_config()
  cfg.kl.kind = name
  cfg.kl.options[field] = value
  with pytest.raises(errors.ConfigError, match=rf"^--config.kl.options.{field}={value}: "
                                               rf"{field} must"):
    configs.check_config(cfg)


def test_config_reads_the_chosen_terms_options_and_refuses_the_others():
  assert dict(vanilla_config().kl.options) == kl_terms.option_defaults()
  cfg = vanilla_config()
  cfg.kl.kind, cfg.kl.options.samples, cfg.kl.options.chunk = "density_gap", 8, 4
  assert configs.kl_term_config(cfg) == DensityGap(samples=8, chunk=4)
  cfg = vanilla_config()
  cfg.kl.options.target = 2.0        # forgotten kl.kind: an option nothing would read
  with pytest.raises(errors.ConfigError, match=r"^--config.kl.options.target=2.0: an option of "
                                               r"free_bits and free_bits_sentence, not read by "
                                               r"kl.kind=kl; set --config.kl.kind to one of them"):
    configs.check_config(cfg)
  cfg.kl.kind = "free_bits_sentence"
  assert configs.kl_term_config(cfg) == FreeBits(2.0)
  cfg.kl.kind = "mmd"
  with pytest.raises(errors.ConfigError, match=r"^--config.kl.kind=mmd: not a KL term"):
    configs.check_config(cfg)


def test_the_configs_choose_their_terms():
  assert configs.kl_term_config(load_config("vae")) == FreeBits(4.0)
  assert configs.kl_term_config(load_config("vae", "ae_free_bits")) == FreeBits(
      0.25, per_dimension=True)
  cfg = load_config("vae", "ae_free_bits")
  assert cfg.kl.kind == "free_bits_sentence"
  assert load_config("dg_vae").kl.kind == "density_gap"
  della = load_config("della")
  assert della.kl.kind == "layer_hinge"
  assert configs.kl_term_config(della) == LayerHinge(0.0, "sum")
  assert configs.kl_term_config(load_config("della", "official_kl")) == LayerHinge(
      0.0, "mean")


# ---------------------------------------------------------------------------------------------
# Which posteriors a term needs.
# ---------------------------------------------------------------------------------------------


def seq_vae(posterior="gaussian"):
  flow = None if posterior == "gaussian" else FlowConfig(
      kind="iaf", num_layers=1, hidden_dim=4, amortized=posterior == "flow", context_dim=4)
  return SeqVAE(VAEConfig(vocab_size=11, embed_dim=4, hidden_dim=5, latent_dim=2,
                          posterior=posterior, flow=flow))


def test_gaussian_codes_of_the_models():
  assert losses._gaussian_codes(seq_vae("gaussian"))
  assert losses._gaussian_codes(seq_vae("kl_preserving"))
  assert not losses._gaussian_codes(seq_vae("flow"))
  della = Della(DellaConfig(TransformerConfig(vocab_size=11, num_layers=2, num_heads=1,
                                              model_dim=4, max_length=8), latent_dim=2))
  assert not losses._gaussian_codes(della)     # 'hierarchical': not a family of POSTERIORS


@pytest.mark.parametrize("name,options", EXAMPLES)
def test_terms_that_need_gaussian_posteriors_refuse_other_models(name, options):
  schedule = optax.constant_schedule(1.0)
  losses.make_vae_loss(seq_vae("gaussian"), schedule, name, options)
  if KL_TERMS[name].needs_gaussian(options):
    with pytest.raises(ValueError, match="needs Gaussian posteriors"):
      losses.make_vae_loss(seq_vae("flow"), schedule, name, options)
  else:
    losses.make_vae_loss(seq_vae("flow"), schedule, name, options)


def test_the_loss_checks_the_term_and_its_options():
  schedule = optax.constant_schedule(1.0)
  with pytest.raises(ValueError, match="unknown KL term 'mmd'"):
    losses.make_vae_loss(seq_vae(), schedule, "mmd")
  with pytest.raises(TypeError, match="are a DensityGap, not FreeBits"):
    losses.make_vae_loss(seq_vae(), schedule, "density_gap", FreeBits(1.0))
  mean, logvar = posteriors(5)
  terms = terms_of(mean, logvar)
  del terms.kl_layers
  with pytest.raises(ValueError, match="needs per-layer KLs"):
    kl_terms.layer_hinge(terms, WEIGHTS, KEY, LayerHinge())


# ---------------------------------------------------------------------------------------------
# Free bits: Kingma et al.'s batch-mean form, Li et al.'s per-sentence forms.
# ---------------------------------------------------------------------------------------------


def _posterior(seed: int, shape):
  r = np.random.default_rng(seed)
  mean = r.normal(size=shape).astype(np.float32)
  logvar = (r.normal(size=shape) * 0.7).astype(np.float32)
  return mean, logvar


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
    got = kl_terms.batch_mean_free_bits_kl(kl_dims, target, weights, per_dimension)
    want = _numpy_batch_mean_free_bits(kl_dims, target, weights, per_dimension)
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("per_dimension", [False, True])
def test_batch_mean_free_bits_gradient_is_zero_below_target(per_dimension):
  mean, logvar = _posterior(9, (4, 3))
  mean, logvar = mean * 0.1, logvar * 0.1  # small KL: ~0.01 nats per dimension
  weights = np.array([1, 1, 1, 0], np.float32)

  def penalty(m, lv, target):
    return kl_terms.batch_mean_free_bits_kl(objectives.gaussian_kl(m, lv), target, weights,
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
  g = jax.grad(kl_terms.batch_mean_free_bits_kl)(kl_dims, 0.5, weights, True)
  np.testing.assert_allclose(g, [[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]])
  g_batch = jax.grad(kl_terms.batch_mean_free_bits_kl)(kl_dims, 4.0, weights, False)
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
  options = FreeBits(target_kl / d if fb == 2 else target_kl, per_dimension=fb == 2)

  def loss(m, lv):  # the loss as make_vae_loss assembles it from the free-bits term
    return (jnp.sum(rec * weights) / weights.sum()
            + beta * kl_terms.free_bits_sentence(_terms(m, lv), weights, KEY, options))

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


def test_sentence_free_bits_term_at_the_target():
  # Li et al. compare with a strict `>`: a KL exactly at the target pays nothing and gets no
  # gradient; just above it pays all of its KL (not the excess).
  kl_dims = np.array([[0.5, 0.5, 0.5, 0.5],      # sum 2.0: at the sentence target
                      [0.5, 0.5, 0.5, 0.5625],   # sum 2.0625: above
                      [0.25, 0.25, 0.125, 0.0],  # sum 0.625: below
                      [9.0, 9.0, 9.0, 9.0]],     # a padding row
                     np.float32)
  weights = np.array([1, 1, 1, 0], np.float32)

  def mean_penalty(k, per_dimension):
    options = FreeBits(0.25 if per_dimension else 2.0, per_dimension=per_dimension)
    return kl_terms.free_bits_sentence(SimpleNamespace(kl=jnp.sum(k, -1), kl_dims=k), weights,
                                       KEY, options)

  np.testing.assert_allclose(mean_penalty(kl_dims, False), 2.0625 / 3)
  np.testing.assert_allclose(mean_penalty(kl_dims, True), 4.0625 / 3)
  # Which entries receive gradient: those strictly above the threshold, in real rows only.
  g = jax.grad(mean_penalty)(kl_dims, False)
  np.testing.assert_allclose(g, np.array([[0] * 4, [1] * 4, [0] * 4, [0] * 4]) / 3)
  g = jax.grad(mean_penalty)(kl_dims, True)
  np.testing.assert_allclose(g, np.array([[1, 1, 1, 1], [1, 1, 1, 1], [0, 0, 0, 0],
                                          [0, 0, 0, 0]]) / 3)


def test_free_bits_forms_and_flow_posteriors():
  # The four forms through the registry's entries, against numpy; a flow posterior's terms
  # have no per-dimension KL, so only the whole-code forms apply to them.
  r = np.random.default_rng(5)
  kl_dims = r.uniform(0, 1.0, size=(6, 3)).astype(np.float32)
  weights = np.array([1, 1, 1, 1, 1, 0], np.float32)
  real = kl_dims[:5].astype(np.float64)
  terms = SimpleNamespace(kl=jnp.sum(kl_dims, -1), kl_dims=kl_dims)
  flow_terms = SimpleNamespace(kl=jnp.sum(kl_dims, -1), kl_dims=None)
  for per_dimension, name, target, want in [
      (False, "free_bits", 1.6, max(real.sum(1).mean(), 1.6)),
      (True, "free_bits", 0.5, np.maximum(real.mean(0), 0.5).sum()),
      (False, "free_bits_sentence", 1.6, np.mean(np.where(real.sum(1) > 1.6, real.sum(1), 0.0))),
      (True, "free_bits_sentence", 0.5, np.mean(np.where(real > 0.5, real, 0.0).sum(1)))]:
    term, options = KL_TERMS[name], FreeBits(target, per_dimension=per_dimension)
    np.testing.assert_allclose(term.fn(terms, weights, KEY, options), want, rtol=1e-6)
    assert term.needs_gaussian(options) == per_dimension
    if not per_dimension:
      np.testing.assert_allclose(term.fn(flow_terms, weights, KEY, options), want, rtol=1e-6)
