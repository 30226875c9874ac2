"""The dialogue CVAE: its terms, the conditional prior, the flow recognition network and the
decoding interface, each checked against an independent computation."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from vae_jax import evaluation, losses, objectives, posteriors
from vae_jax.data.vocab import PAD
from vae_jax.models.cvae import CVAE, CVAEConfig

from cvae_testing import BASE, IAF, V, init, make_batch, perturb


def np_gaussian_kl(mq, lq, mp, lp):
  return 0.5 * (lp - lq + (np.exp(lq) + (mq - mp) ** 2) / np.exp(lp) - 1.0)


def test_kl_against_the_learned_prior_and_whitened_code():
  tokens, context, speakers = make_batch()
  model = CVAE(BASE)
  v = perturb(init(model, tokens, context, speakers))
  terms = model.apply(v, tokens, context, speakers, deterministic=True,
                      rngs={"latent": jax.random.PRNGKey(5)})
  post = model.apply(v, tokens, context, speakers, method=CVAE.encode)
  mq, lq, mp, lp = (np.asarray(a, np.float64) for a in
                    (post.mean, post.logvar, post.prior_mean, post.prior_logvar))
  np.testing.assert_allclose(terms.kl_dims, np_gaussian_kl(mq, lq, mp, lp), rtol=1e-4,
                             atol=1e-6)
  # Prior coordinates: u = (z - μ_p) / σ_p has posterior N((μ_q - μ_p)/σ_p, σ_q²/σ_p²).
  np.testing.assert_allclose(terms.mean, (mq - mp) / np.exp(lp / 2), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(terms.logvar, lq - lp, rtol=1e-5, atol=1e-6)
  # The analytic KL against a Monte Carlo estimate over the prior network's density.
  z = mq + np.exp(lq / 2) * np.random.default_rng(0).standard_normal((200_000, *mq.shape))
  log_n = lambda z, m, lv: -0.5 * np.sum(np.log(2 * np.pi) + lv + (z - m) ** 2 / np.exp(lv), -1)
  mc = np.mean(log_n(z, mq, lq) - log_n(z, mp, lp), axis=0)
  np.testing.assert_allclose(terms.kl, mc, atol=0.03)


def test_seq2seq_likelihood_against_step_by_step_decoding():
  tokens, context, speakers = make_batch()
  model = CVAE(dataclasses.replace(BASE, latent_dim=0))
  v = perturb(init(model, tokens, context, speakers))
  terms = model.apply(v, tokens, context, speakers, deterministic=True)
  np.testing.assert_array_equal(terms.kl, 0.0)
  c = model.apply(v, context, speakers, method=CVAE.encode_context)
  state = model.apply(v, c, method=CVAE.initial_state)
  prev = jnp.full((3,), 1, jnp.int32)  # BOS
  total = np.zeros(3)
  for t in range(tokens.shape[1]):
    state, logits = model.apply(v, state, prev, c, method=CVAE.decode_step)
    log_p = np.asarray(jax.nn.log_softmax(logits))
    real = np.asarray(tokens[:, t]) != PAD
    total -= np.where(real, log_p[np.arange(3), np.asarray(tokens[:, t])], 0.0)
    prev = tokens[:, t]
  np.testing.assert_allclose(terms.rec_nll, total, rtol=1e-5)


def test_context_encoder_ignores_empty_slots_and_reads_speakers():
  tokens, context, speakers = make_batch()
  model = CVAE(BASE)
  v = perturb(init(model, tokens, context, speakers))
  encode = lambda ctx, spk: model.apply(v, ctx, spk, method=CVAE.encode_context)
  c = encode(context, speakers)
  # Row 0 has two turns: the same vector from a window of two slots.
  np.testing.assert_allclose(encode(context[:1, :2], speakers[:1, :2]), c[:1], rtol=1e-5,
                             atol=1e-6)
  # A speaker flag on an empty slot is ignored; on a real turn it changes c.
  np.testing.assert_allclose(encode(context, speakers.at[0, 2].set(1)), c, rtol=1e-6)
  assert not np.allclose(encode(context, speakers.at[0, 0].set(1))[0], c[0])


def test_bow_log_likelihood_against_numpy():
  tokens, context, speakers = make_batch()
  model = CVAE(dataclasses.replace(BASE, bow_hidden_dim=7))
  v = perturb(init(model, tokens, context, speakers))
  cond = jax.random.normal(jax.random.PRNGKey(2), (3, BASE.context_dim + BASE.latent_dim))
  got = model.apply(v, tokens, cond, method=CVAE.bow_log_likelihood)
  p = v["params"]
  h = np.tanh(np.asarray(cond) @ p["bow_hidden"]["kernel"] + p["bow_hidden"]["bias"])
  logits = h @ np.asarray(p["bow_output"]["kernel"]) + np.asarray(p["bow_output"]["bias"])
  log_p = logits - np.log(np.sum(np.exp(logits), -1, keepdims=True))
  t = np.asarray(tokens)
  want = np.sum(np.where(t != PAD, np.take_along_axis(log_p, t, -1), 0.0), -1)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # The loss adds bow_weight times its batch mean.
  batch = {"tokens": tokens, "context": context, "context_speakers": speakers,
           "weights": jnp.ones(3)}
  rng = jax.random.PRNGKey(4)
  loss = lambda w: losses.make_vae_loss(model, optax.constant_schedule(1.0), bow_weight=w)(
      v["params"], {}, batch, rng, 0)
  (l0, _), (l2, (sums, _)) = loss(0.0), loss(2.0)
  np.testing.assert_allclose(l2 - l0, 2.0 * sums["bow"] / 3, rtol=1e-5)


@pytest.mark.parametrize("posterior", ["flow", "kl_preserving"])
def test_flow_recognition_density_is_consistent(posterior):
  """log q(u|x,c) of `Posterior.sample` (forward pass, change of variables) equals
  `Posterior.log_prob` (inverse pass) at the same codes, and both equal the density of the
  model's code z = μ_p + σ_p u computed here by inverting the flow, plus the whitening's
  ½ Σ log σ_p²; in the KL-preserving mode u is the whitened z_0 and the decoder reads
  [c; f(z_0)]."""
  tokens, context, speakers = make_batch()
  flow = IAF if posterior == "flow" else dataclasses.replace(IAF, amortized=False)
  model = CVAE(dataclasses.replace(BASE, posterior=posterior, flow=flow))
  v = perturb(init(model, tokens, context, speakers), scale=0.2)
  params = model.apply(v, tokens, context, speakers, method=CVAE.encode)
  u, log_q = posteriors.call(model, v, params, lambda q, r: q.sample(r, 4),
                             jax.random.PRNGKey(7))
  lp = np.asarray(params.prior_logvar, np.float64)
  z = np.asarray(params.prior_mean) + np.exp(lp / 2) * np.asarray(u)
  whitening = 0.5 * lp.sum(-1)
  if posterior == "flow":
    np.testing.assert_allclose(
        posteriors.call(model, v, params, lambda q, u: q.log_prob(u), u), log_q, rtol=1e-4,
        atol=1e-4)
    z0, ildj = model.apply(v, jnp.asarray(z, jnp.float32), params,
                           method=lambda m, z, p: m.flow(p.context).inverse_and_log_det(z))
    want = objectives.gaussian_log_prob(z0, params.mean, params.logvar) + ildj + whitening
  else:  # densities of z_0, pushed through one shared bijection
    want = objectives.gaussian_log_prob(jnp.asarray(z, jnp.float32), params.mean,
                                        params.logvar) + whitening
    cond = posteriors.call(model, v, params, lambda q, u: q.to_decoder(u), u)
    f_z = model.apply(v, jnp.asarray(z, jnp.float32), method=lambda m, z: m.flow(None).forward(z))
    np.testing.assert_allclose(cond[..., -BASE.latent_dim:], f_z, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(cond[..., :-BASE.latent_dim],
                               np.broadcast_to(params.condition, (4, *params.condition.shape)))
  np.testing.assert_allclose(log_q, want, rtol=1e-4, atol=1e-4)
  terms = model.apply(v, tokens, context, speakers, deterministic=True,
                      rngs={"latent": jax.random.PRNGKey(1)})
  assert (terms.kl_dims is None) == (posterior == "flow")


def test_importance_weighted_nll_against_quadrature():
  """With a 1-D code, log p(x|c) = log ∫ p(x|c,z) p(z|c) dz by quadrature on a fine grid,
  against the importance-weighted estimate of the one evaluation with the model's own
  weights."""
  tokens, context, speakers = make_batch()
  model = CVAE(dataclasses.replace(BASE, latent_dim=1))
  v = perturb(init(model, tokens, context, speakers), scale=0.2)
  prior = model.apply(v, context, speakers, method=CVAE.condition_params)
  sd = np.exp(np.asarray(prior.prior_logvar[:, 0]) / 2)
  grid = np.linspace(-8, 8, 801)
  z = np.asarray(prior.prior_mean[:, 0])[None] + sd[None] * grid[:, None]    # [G, B]
  c = np.broadcast_to(np.asarray(prior.condition)[None], (len(grid), *prior.condition.shape))
  cond = jnp.asarray(np.concatenate([c, z[..., None]], -1), jnp.float32)
  ll = jax.vmap(lambda cd: model.apply(v, tokens, cd, method=CVAE.log_likelihood))(cond)
  log_prior = -0.5 * (np.log(2 * np.pi) + grid ** 2)[:, None] - np.log(sd)[None]
  step = (grid[1] - grid[0]) * sd
  exact = np.log(np.sum(np.exp(np.asarray(ll, np.float64) + log_prior), 0) * step)
  batch_eval = evaluation.make_batch_eval(model, k_samples=4000, chunk_size=500)
  out = batch_eval(v, tokens, context, speakers, jax.random.PRNGKey(0))
  np.testing.assert_allclose(out["log_px"], exact, atol=0.02)
  assert np.all(np.asarray(out["elbo"]) <= np.asarray(out["log_px"]) + 1e-4)


def test_conditional_prior_helpers():
  prior = posteriors.Prior(jnp.array([[1.0, -2.0]]), jnp.log(jnp.array([[4.0, 0.25]])))
  z = prior.unwhiten(jnp.array([[1.0, 2.0]]))
  np.testing.assert_allclose(z, [[3.0, -1.0]])
  np.testing.assert_allclose(prior.whiten(z), [[1.0, 2.0]])
  np.testing.assert_allclose(prior.whiten_log_det(), -0.5 * np.log(4.0 * 0.25))
  with pytest.raises(ValueError, match="latent_dim"):
    CVAEConfig(vocab_size=V, latent_dim=-1)
  with pytest.raises(ValueError, match="needs a flow"):
    CVAEConfig(vocab_size=V, posterior="flow")
