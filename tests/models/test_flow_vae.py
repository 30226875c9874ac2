"""The flow-based VRAE: flow and KL-preserving posteriors, skip connections and amortised
regularisation, each checked against an independent computation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vae_jax import (evaluation, generation, kl_terms, losses, metrics, mutual_information,
                     objectives, posteriors)
from vae_jax.data.vocab import PAD
from vae_jax.models.vae import SeqVAE, VAEConfig
from vae_jax.nn import decoders, flows

D = 3
BASE = VAEConfig(vocab_size=11, embed_dim=8, hidden_dim=12, latent_dim=D)


def flow_config(kind="iaf", amortized=True, num_layers=2):
  return flows.FlowConfig(kind=kind, num_layers=num_layers, hidden_dim=8, amortized=amortized,
                          context_dim=4)


def batch():
  return jnp.array([[5, 6, 7, 2, PAD, PAD],
                    [8, 2, PAD, PAD, PAD, PAD],
                    [4, 5, 6, 7, 8, 2],
                    [9, 9, 2, PAD, PAD, PAD]], jnp.int32)


def init(model, tokens):
  return model.init({"params": jax.random.PRNGKey(0), "latent": jax.random.PRNGKey(1)},
                    tokens, deterministic=True)


def perturb(variables, scale=0.3, seed=3):
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(
      tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def affine_iaf(variables, shift, log_scale):
  """Sets a one-layer IAF's MADE to a constant output: f(z) = shift + exp(log_scale) z."""
  made = dict(variables["params"]["flow"]["made_0"])
  made["out_kernel"] = jnp.zeros_like(made["out_kernel"])
  made["out_bias"] = jnp.concatenate([shift, log_scale])
  params = dict(variables["params"])
  params["flow"] = {**params["flow"], "made_0": made}
  return {**variables, "params": params}


SHIFT = jnp.array([0.5, -1.0, 0.2])
RAW_LOG_SCALE = jnp.array([0.3, -0.4, 0.1])
LOG_SCALE = 3.0 * jnp.tanh(RAW_LOG_SCALE / 3.0)  # soft-clamped to ±max_log_scale = 3


def known_density_model():
  """A flow posterior whose density is known: q(z|x) = N(SHIFT + e^s μ(x), e^{2s} σ²(x))."""
  model = SeqVAE(dataclasses.replace(BASE, posterior="flow",
                                     flow=flow_config(num_layers=1)))
  tokens = batch()
  variables = affine_iaf(perturb(init(model, tokens)), SHIFT, RAW_LOG_SCALE)
  post = model.apply(variables, tokens, method=SeqVAE.encode)
  mean = SHIFT + jnp.exp(LOG_SCALE) * post.mean
  logvar = post.logvar + 2 * LOG_SCALE
  return model, variables, tokens, post, mean, logvar


def test_flow_posterior_density_and_samples_match_the_known_gaussian():
  model, variables, _, post, mean, logvar = known_density_model()
  z, log_q = posteriors.call(model, variables, post, lambda q, r: q.sample(r, 7),
                             jax.random.PRNGKey(5))
  assert z.shape == (7, 4, D) and log_q.shape == (7, 4)
  np.testing.assert_allclose(log_q, objectives.gaussian_log_prob(z, mean, logvar), atol=1e-4)
  # Density at arbitrary points, by inverting the flow.
  points = jax.random.normal(jax.random.PRNGKey(6), (5, 4, D)) * 2
  np.testing.assert_allclose(
      posteriors.call(model, variables, post, lambda q, u: q.log_prob(u), points),
      objectives.gaussian_log_prob(points, mean, logvar), atol=1e-4)


def test_flow_mutual_information_matches_the_gaussian_estimator():
  """Same samples (same key), same density: the flow MI equals the Gaussian MI estimator."""
  model, variables, _, post, mean, logvar = known_density_model()
  rng = jax.random.PRNGKey(8)
  mi = jnp.mean(evaluation.posterior_mi_terms(model, variables, post, rng))
  expected = mutual_information.gaussian_mutual_information(rng, mean, logvar, analytic_entropy=False)
  np.testing.assert_allclose(mi, expected, atol=1e-4)
  # Per batch too (He et al.'s length-sorted batches; lengths 3, 3, 5, 5 make two batches of
  # two), and the whole-set key: the flow's densities and the closed form agree term by term.
  lengths = np.array([5, 3, 5, 3])
  got = evaluation.mutual_information_metrics(evaluation.mi_terms_fn(model, variables),
                                              post, lengths, rng)
  gaussian = lambda p, r, m: mutual_information.gaussian_mi_terms(r, *p, mask=m)
  want = evaluation.mutual_information_metrics(gaussian, (mean, logvar), lengths, rng)
  for key in ("mi_per_batch", "mi_set", "mi_per_batch_se", "mi_set_se"):
    np.testing.assert_allclose(got[key], want[key], atol=1e-4)
  batches = mutual_information.length_sorted_batches(lengths, 32)
  np.testing.assert_array_equal(batches[:, :2], [[1, 3], [0, 2]])
  assert got["mi"] == got["mi_per_batch"] and got["mi_set"] > got["mi_per_batch"] - 0.05


def test_flow_code_mean_converges_to_the_known_mean():
  model, variables, tokens, _, mean, _ = known_density_model()
  code_mean = generation.features(model, variables, (tokens,), jax.random.PRNGKey(9), 20000)
  np.testing.assert_allclose(code_mean, mean, atol=0.05)


def test_iw_nll_is_exact_when_the_flow_is_the_true_posterior():
  """Linear-Gaussian model p(z) = N(0, I), p(x|z) = N(x; a z, s^2 I): the posterior is
  N(m, v) with v = 1 / (1 + a^2 / s^2), m = v a x / s^2. A constant-affine IAF on a standard
  normal base reproduces it exactly, so every importance weight equals p(x)."""
  a, s = jnp.array([1.5, -0.5, 2.0]), 0.7
  x = jnp.array([[0.3, -1.2, 2.0], [1.0, 0.1, -0.4]])
  v = 1.0 / (1.0 + a ** 2 / s ** 2)
  m = v * a * x / s ** 2
  exact = jnp.sum(-0.5 * jnp.log(2 * jnp.pi * (a ** 2 + s ** 2)) -
                  0.5 * x ** 2 / (a ** 2 + s ** 2), axis=-1)
  bij = flows.InverseAutoregressive(lambda z: (m, jnp.broadcast_to(0.5 * jnp.log(v), m.shape)),
                                    D)
  zeros = jnp.zeros_like(x)

  def sample(rng, n):
    z0 = objectives.reparameterize(rng, zeros, zeros, n)
    z, log_det = bij.forward_and_log_det(z0)
    return z, objectives.standard_normal_log_prob(z0) - log_det, \
        objectives.standard_normal_log_prob(z)

  def log_lik(z):
    return objectives.gaussian_log_prob(x, a * z, jnp.full_like(z, 2 * jnp.log(s)))

  log_weights = metrics.posterior_log_weights_fn(sample, log_lik)
  for k in (1, 10):
    np.testing.assert_allclose(
        metrics.iw_log_likelihood(log_weights, jax.random.PRNGKey(0), k), exact, atol=1e-4)


def test_iw_nll_with_a_planar_posterior_approaches_the_exact_value():
  """The same model with an inexact posterior (the true one bent by a planar layer): L_K rises
  towards log p(x) with K and is close to it at K = 20,000."""
  a, s = jnp.array([1.5, -0.5, 2.0]), 0.7
  x = jnp.array([[0.3, -1.2, 2.0]])
  exact = jnp.sum(-0.5 * jnp.log(2 * jnp.pi * (a ** 2 + s ** 2)) -
                  0.5 * x ** 2 / (a ** 2 + s ** 2), axis=-1)
  v = 1.0 / (1.0 + a ** 2 / s ** 2)
  m, log_v = v * a * x / s ** 2, jnp.broadcast_to(jnp.log(v), x.shape)
  bij = flows.Planar(jnp.array([[0.3, 0.2, -0.3]]), jnp.array([[1.0, -1.0, 0.5]]),
                     jnp.array([0.1]))

  def sample(rng, n):
    z0 = objectives.reparameterize(rng, m, log_v, n)
    z, log_det = bij.forward_and_log_det(z0)
    return z, objectives.gaussian_log_prob(z0, m, log_v) - log_det, \
        objectives.standard_normal_log_prob(z)

  log_lik = lambda z: objectives.gaussian_log_prob(x, a * z, jnp.full_like(z, 2 * jnp.log(s)))
  log_weights = metrics.posterior_log_weights_fn(sample, log_lik)
  estimate = lambda k: metrics.iw_log_likelihood(log_weights, jax.random.PRNGKey(1), k,
                                                 min(k, 2000))
  elbo = jnp.mean(log_weights(jax.random.PRNGKey(2), 20000))
  assert float(elbo) < float(exact[0]) - 0.05       # the posterior is not exact
  np.testing.assert_allclose(estimate(20000), exact, atol=0.01)
  assert float(estimate(10)[0]) > float(elbo)


@pytest.mark.parametrize("kind", ["planar", "iaf", "coupling"])
def test_flow_terms_kl_is_log_q_minus_log_p_of_the_sample(kind):
  """With one sample, the model's KL is log q(z|x) - log p(z) at the code it decodes, log q
  computed independently by inverting the flow at that code."""
  cfg = dataclasses.replace(BASE, posterior="flow", flow=flow_config(kind), kl_samples=1)
  model, tokens = SeqVAE(cfg), batch()
  variables = perturb(init(model, tokens))
  terms = model.apply(variables, tokens, deterministic=True,
                      rngs={"latent": jax.random.PRNGKey(4)})
  assert terms.kl_dims is None and terms.kl.shape == (4,)
  post = model.apply(variables, tokens, method=SeqVAE.encode)
  log_q = posteriors.call(model, variables, post, lambda q, z: q.log_prob(z), terms.z)
  np.testing.assert_allclose(terms.kl, log_q - objectives.standard_normal_log_prob(terms.z),
                             atol=2e-3)


def test_flow_kl_averages_its_samples():
  cfg = dataclasses.replace(BASE, posterior="flow", flow=flow_config("iaf"), kl_samples=4000)
  model, tokens = SeqVAE(cfg), batch()
  variables = perturb(init(model, tokens))
  terms = model.apply(variables, tokens, deterministic=True,
                      rngs={"latent": jax.random.PRNGKey(4)})
  post = model.apply(variables, tokens, method=SeqVAE.encode)
  z, log_q = posteriors.call(model, variables, post, lambda q, r: q.sample(r, 4000),
                             jax.random.PRNGKey(5))
  log_p = objectives.standard_normal_log_prob(z)
  np.testing.assert_allclose(terms.kl, jnp.mean(log_q - log_p, axis=0), atol=0.1)


def test_kl_preserving_kl_equals_the_pushed_forward_kl():
  """KL-preserving mode: the decoder reads z_K = f(z_0) with one global bijection f, and the
  model's densities are those of the pushed-forward posterior and prior,

    log f#q(z_K) = log N(z_0; μ, σ²) - log |det J_f(z_0)|,
    log f#p(z_K) = log N(z_0; 0, I) - log |det J_f(z_0)|.

  Here z_0 = μ + σ ε is drawn directly, f is applied through `decoder_input` (the same f as
  the posterior's: the flow is not amortised, `flow(None)` for both), and log |det J_f| comes
  from the Jacobian built by forward-mode differentiation (slogdet), not from the flow's own
  log-det. Checked: the model's latent code is z_0, whose posterior density (`log_prob`) is
  log f#q(z_K) + log |det J_f(z_0)| and whose prior density is log f#p(z_K) + log |det J_f|;
  the decoder reads f of the reparameterised base samples; and the Monte Carlo mean of
  log f#q - log f#p matches the reported KL, which is the analytic KL(q || p) (the Jacobians
  cancel, KL(f#q || f#p) = KL(q || p)), within 4 standard errors."""
  cfg = dataclasses.replace(BASE, posterior="kl_preserving",
                            flow=flow_config("coupling", amortized=False))
  model, tokens = SeqVAE(cfg), batch()
  variables = perturb(init(model, tokens))
  # Posteriors away from the prior (shifted means, σ ≈ 0.6): a KL of about 2 nats each.
  head = variables["params"]["head"]
  head["mean"]["bias"] = head["mean"]["bias"] + jnp.array([1.0, -0.6, 0.8])
  head["logvar"]["bias"] = head["logvar"]["bias"] - 1.0
  terms = model.apply(variables, tokens, deterministic=True,
                      rngs={"latent": jax.random.PRNGKey(2)})
  post = model.apply(variables, tokens, method=SeqVAE.encode)
  mean, std = np.asarray(post.mean), np.exp(0.5 * np.asarray(post.logvar))   # [B, d]
  num = 4000
  eps = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (num, 4, D)))
  z0 = mean + std * eps                                                      # [n, B, d]

  f = lambda z: model.apply(variables, z[None], method=SeqVAE.decoder_input)[0]  # noqa: E731
  flat = jnp.asarray(z0.reshape(-1, D))
  z_k = np.asarray(jax.vmap(f)(flat)).reshape(z0.shape)
  sign, log_det = jnp.linalg.slogdet(jax.jit(jax.vmap(jax.jacfwd(f)))(flat))  # [n B], [n B]
  assert bool(jnp.all(sign > 0))                         # an orientation-preserving bijection
  log_det = np.asarray(log_det, np.float64).reshape(num, 4)
  assert float(np.std(log_det)) > 0.05                    # f is not volume-preserving
  assert float(np.max(np.abs(z_k - z0))) > 0.1            # and not the identity

  def log_normal(x, m, s):
    x, m, s = (np.asarray(a, np.float64) for a in (x, m, s))
    return np.sum(-0.5 * np.log(2 * np.pi * s ** 2) - 0.5 * ((x - m) / s) ** 2, axis=-1)

  log_fq = log_normal(z0, mean, std) - log_det                                # [n, B]
  log_fp = log_normal(z0, 0.0, 1.0) - log_det
  u = jnp.asarray(z0, jnp.float32)
  np.testing.assert_allclose(
      posteriors.call(model, variables, post, lambda q, u: q.log_prob(u), u),
      log_fq + log_det, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(objectives.standard_normal_log_prob(u), log_fp + log_det,
                             rtol=1e-4, atol=1e-4)
  # The decoder's codes are f of the reparameterised base samples.
  key = jax.random.PRNGKey(4)
  z_model = posteriors.call(model, variables, post,
                            lambda q, r: q.to_decoder(q.sample(r, 3)[0]), key)
  base = objectives.reparameterize(key, post.mean, post.logvar, 3)
  np.testing.assert_allclose(z_model, model.apply(variables, base, method=SeqVAE.decoder_input),
                             rtol=1e-5, atol=1e-6)

  # KL(f#q || f#p) by Monte Carlo against the reported KL, per sentence.
  diff = log_fq - log_fp
  estimate, stderr = diff.mean(axis=0), diff.std(axis=0, ddof=1) / np.sqrt(num)
  analytic = np.sum(0.5 * (mean ** 2 + std ** 2 - 1.0) - np.log(std), axis=-1)
  np.testing.assert_allclose(terms.kl, analytic, rtol=1e-5)
  assert np.all(analytic > 1.0) and np.all(stderr < 0.05)
  np.testing.assert_array_less(np.abs(estimate - np.asarray(terms.kl)), 4 * stderr)
  # The pushed-forward prior is not N(0, I) in z_K: KL(f#q || N(0, I)) differs from
  # KL(f#q || f#p) by E_f#q[log f#p(z_K) - log N(z_K; 0, I)], which these samples resolve.
  shift = log_fp - log_normal(z_k, 0.0, 1.0)
  z_score = shift.mean(axis=0) / (shift.std(axis=0, ddof=1) / np.sqrt(num))
  assert float(np.max(np.abs(z_score))) > 8


def test_skip_connection_step_decoding_matches_teacher_forcing():
  cfg = dataclasses.replace(BASE, latent_to_output=True)
  model, tokens = SeqVAE(cfg), batch()
  variables = perturb(init(model, tokens))
  assert "latent_to_logits" in variables["params"]["decoder"]
  z = jax.random.normal(jax.random.PRNGKey(1), (4, D))
  ll = model.apply(variables, tokens, z, method=SeqVAE.log_likelihood)
  state = model.apply(variables, z, method=SeqVAE.initial_state)
  prev = decoders.shift_right(tokens)
  expected = np.zeros(4)
  for t in range(tokens.shape[1]):
    state, logits = model.apply(variables, state, prev[:, t], z, method=SeqVAE.decode_step)
    logp = np.asarray(jax.nn.log_softmax(logits))
    for b in range(4):
      if tokens[b, t] != PAD:
        expected[b] += logp[b, tokens[b, t]]
  np.testing.assert_allclose(ll, expected, rtol=1e-5)
  # The output layer sees z directly: W_z z shifts every step's logits.
  skip = variables["params"]["decoder"]["latent_to_logits"]["kernel"]
  no_skip = jax.tree.map(lambda p: p, variables)
  no_skip["params"]["decoder"]["latent_to_logits"]["kernel"] = jnp.zeros_like(skip)
  assert float(jnp.max(jnp.abs(
      ll - model.apply(no_skip, tokens, z, method=SeqVAE.log_likelihood)))) > 1e-4


def test_amortised_regulariser_enters_the_loss_with_its_weight():
  cfg = dataclasses.replace(BASE, smoothness_dropout=0.3)
  model, tokens = SeqVAE(cfg), batch()
  variables = perturb(init(model, tokens))
  data = {"tokens": tokens, "weights": jnp.array([1.0, 1.0, 1.0, 0.0])}
  rng = jax.random.PRNGKey(5)
  schedule = optax.constant_schedule(1.0)
  off = losses.make_vae_loss(model, schedule)
  on = losses.make_vae_loss(model, schedule, smoothness_weight=2.0)
  loss_off, _ = off(variables["params"], {}, data, rng, 0)
  loss_on, (sums, _) = on(variables["params"], {}, data, rng, 0)
  terms = model.apply(variables, tokens, deterministic=False,
                      rngs=dict(zip(("latent", "dropout"), jax.random.split(rng))))
  penalty = jnp.sum(terms.smoothness[:3]) / 3
  assert float(penalty) > 0
  np.testing.assert_allclose(loss_on - loss_off, 2.0 * penalty, rtol=1e-4)
  np.testing.assert_allclose(sums["smoothness"], jnp.sum(terms.smoothness[:3]), rtol=1e-5)
  # Off in evaluation.
  det = model.apply(variables, tokens, deterministic=True, rngs={"latent": rng})
  np.testing.assert_array_equal(det.smoothness, 0.0)


def test_flow_posterior_free_bits_forms():
  cfg = dataclasses.replace(BASE, posterior="flow", flow=flow_config())
  model, tokens = SeqVAE(cfg), batch()
  variables = init(model, tokens)
  data = {"tokens": tokens, "weights": jnp.ones(4)}
  schedule = optax.constant_schedule(1.0)
  # A flow has no per-dimension KL: only the whole-code forms apply, to its Monte Carlo KL.
  for name in ("free_bits", "free_bits_sentence"):
    with pytest.raises(ValueError, match="needs Gaussian posteriors"):
      losses.make_vae_loss(model, schedule, name, kl_terms.FreeBits(1.0, per_dimension=True))
  batch_level = losses.make_vae_loss(model, schedule, "free_bits", kl_terms.FreeBits(100.0))
  loss, (sums, _) = batch_level(variables["params"], {}, data, jax.random.PRNGKey(0), 0)
  np.testing.assert_allclose(loss, sums["rec"] / 4 + 100.0, rtol=1e-5)


@pytest.mark.parametrize("posterior,kind", [("flow", "planar"), ("flow", "coupling"),
                                            ("kl_preserving", "iaf")])
def test_evaluation_of_flow_models(posterior, kind):
  cfg = dataclasses.replace(BASE, posterior=posterior,
                            flow=flow_config(kind, amortized=posterior == "flow"))
  model, tokens = SeqVAE(cfg), batch()
  variables = perturb(init(model, tokens))
  batches = [{"tokens": tokens, "weights": jnp.array([1.0, 1.0, 1.0, 0.0])}]
  out = evaluation.evaluate(model, variables, batches, jax.random.PRNGKey(0), k_samples=16,
                            chunk_size=4)
  assert out["n_sentences"] == 3
  assert np.isfinite([out[k] for k in ("nll", "elbo", "kl", "mi", "hole_kl", "hole_kl_null",
                                         "hole_kl_excess", "hole_kl_excess_stderr")]).all()
  np.testing.assert_allclose(out["hole_kl_excess"], out["hole_kl"] - out["hole_kl_null"],
                             rtol=1e-4, atol=1e-5)
  assert out["nll"] <= -out["elbo"] + 1e-4          # L_K >= the K-sample ELBO
  assert 0 <= out["au"] <= D
  ids = generation.reconstruct(model, variables, tokens, jax.random.PRNGKey(1), 5)
  assert ids.shape == (4, 5)
  samples = generation.sample_prior(model, variables, jax.random.PRNGKey(2), 3, D, 5)
  assert samples.shape == (3, 5)


def test_config_errors():
  with pytest.raises(ValueError, match="needs a flow"):
    VAEConfig(vocab_size=11, posterior="flow")
  with pytest.raises(ValueError, match="amortized=False"):
    VAEConfig(vocab_size=11, posterior="kl_preserving", flow=flow_config(amortized=True))
  with pytest.raises(ValueError, match="unknown posterior"):
    VAEConfig(vocab_size=11, posterior="vamp")
