"""DELLA: the latent chain, its densities in prior coordinates, the KL, the injections and
the encoder, each checked against an independent computation (a float64 numpy chain on the
numpy GPT-2 of tests/numpy_gpt2.py, quadrature over the code, or Monte Carlo)."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import numpy_gpt2
from vae_jax import (della_metrics, evaluation, kl_terms, losses, metrics, objectives,
                     posteriors)
from vae_jax.data.vocab import BOS, PAD
from vae_jax.models.della import Della, DellaConfig
from vae_jax.nn.transformer import TransformerConfig

V, D, L, H = 15, 8, 2, 2
TC = TransformerConfig(vocab_size=V, num_layers=L, num_heads=H, model_dim=D, max_length=8,
                       embed_dropout=0.0, attention_dropout=0.0, residual_dropout=0.0)
LAYER_WISE_1D = DellaConfig(TC, latent_dim=1, fusion_rank=2)   # u ∈ R², for quadrature
LAYER_WISE = DellaConfig(TC, latent_dim=2, fusion_rank=2)
SINGLE = DellaConfig(TC, latent_dim=2, fusion_rank=2, layer_wise=False)  # chain prior, n = 1
CONDITIONAL = dataclasses.replace(LAYER_WISE, conditional=True)
TOKENS = jnp.array([[5, 6, 7, 2, PAD, PAD],
                    [8, 2, PAD, PAD, PAD, PAD],
                    [4, 5, 6, 7, 8, 2]], jnp.int32)
CONDITION = jnp.array([[9, 10, 2, PAD], [11, 2, PAD, PAD], [4, 4, 12, 2]], jnp.int32)
LOG_2PI = np.log(2 * np.pi)


def random_variables(config, seed=5, scale=0.3, inputs=(TOKENS,)):
  """Spread-out random parameters in the model's tree (LayerNorm scales near 1, everything else
  scale · N(0, 1)), so that priors and posteriors are far from N(0, I) and every path of the
  computation matters numerically. The tree comes from `eval_shape`: nothing is compiled."""
  init = functools.partial(Della(config).init, deterministic=True)
  shapes = jax.eval_shape(init, {"params": jax.random.PRNGKey(0),
                                 "latent": jax.random.PRNGKey(1)}, *inputs)
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes)
  rng = np.random.default_rng(seed)
  new = []
  for path, leaf in leaves:
    noise = rng.normal(size=leaf.shape)
    new.append(jnp.asarray(1.0 + 0.1 * noise if path[-1].key == "scale" else scale * noise,
                           jnp.float32))
  return jax.tree_util.tree_unflatten(tree, new)


@functools.cache
def terms_fn(config):
  """Jitted `(variables, latent rng, *inputs) -> DellaTerms`."""
  model = Della(config)
  return jax.jit(lambda v, rng, *inputs: model.apply(v, *inputs, deterministic=True,
                                                      rngs={"latent": rng}))


# -- an independent float64 reference -------------------------------------------------------


def f64(x):
  return np.asarray(x, np.float64)


def np_dense(p, x):
  return x @ f64(p["kernel"]) + f64(p["bias"])


def np_head(p, x, clamp):
  out = np.clip(np_dense(p, x), -clamp, clamp)
  d = out.shape[-1] // 2
  return out[..., :d], out[..., d:]


def np_gaussian_kl(mq, lq, mp, lp):
  """KL(N(mq, e^lq) || N(mp, e^lp)) per dimension."""
  return 0.5 * (lp - lq + (np.exp(lq) + (mq - mp) ** 2) / np.exp(lp) - 1.0)


def np_log_normal(x, m, lv):
  return -0.5 * np.sum(LOG_2PI + lv + (x - m) ** 2 / np.exp(lv), axis=-1)


def np_pool(h, mask, w):
  """Σ_t softmax_t(gelu_tanh(w · h_t)) h_t over the real positions; h `[B, T, D]`."""
  scores = numpy_gpt2.gelu_new(h @ f64(w))
  scores = np.where(mask, scores, -np.inf)
  a = np.exp(scores - scores.max(-1, keepdims=True))
  a = a / a.sum(-1, keepdims=True)
  return np.einsum("bt,btd->bd", a, h)


def np_encoder_layers(params, tokens):
  """The non-causal encoder pass of the numpy GPT-2: block outputs `[L, B, T, D]`."""
  tokens = np.asarray(tokens)
  tensors = numpy_gpt2.tensors_from_params(params["transformer"])
  return numpy_gpt2.forward(tensors, tokens, H, padding_mask=tokens != PAD, causal=False)[1]


def np_pooled(config, params, tokens, prefix="pool"):
  """`[B, n, D]`: layer l's pooled states (layer-wise), or the last layer's (one latent)."""
  layers = np_encoder_layers(params, tokens)
  if not config.layer_wise:
    layers = layers[-1:]
  mask = np.asarray(tokens) != PAD
  return np.stack([np_pool(h, mask, params[f"{prefix}_{l}"]["w"])
                   for l, h in enumerate(layers)], axis=1)


def np_chain(config, params, u, r=None, c=None):
  """Walks the latent chain with z_l = μ_p + σ_p u_l for codes u `[..., n, d]`:
  s_l = tanh(W_hh s_{l-1} + W_ih z_{l-1}), prior and posterior heads of layer l, clamped.
  r, c: `[B, n, D]` pooled states of the sentence and of the condition (broadcast against u's
  leading axes). Returns a dict of `[..., n, d]` arrays z, mp, lp (and mq, lq given r)."""
  u = f64(u)
  n, d, clamp = config.num_latents, config.latent_dim, config.clamp
  batch = np.broadcast_shapes(u.shape[:-2], *[x.shape[:1] for x in (r, c) if x is not None])
  u = np.broadcast_to(u, (*batch, n, d))
  s = z = np.zeros((*batch, d))
  out = {k: [] for k in ("z", "mp", "lp", "mq", "lq")}
  for l in range(n):
    if config.prior == "chain":
      s = np.tanh(np_dense(params[f"w_hh_{l}"], s) + np_dense(params[f"w_ih_{l}"], z))
    extra = [] if c is None else [np.broadcast_to(c[:, l], (*batch, c.shape[-1]))]
    if config.prior == "standard":
      mp, lp = np.zeros((*batch, d)), np.zeros((*batch, d))
    else:
      mp, lp = np_head(params[f"prior_{l}"], np.concatenate([s, *extra], -1), clamp)
    if r is not None:
      r_l = np.broadcast_to(r[:, l], (*batch, r.shape[-1]))
      mq, lq = np_head(params[f"posterior_{l}"], np.concatenate([r_l, s, *extra], -1), clamp)
      out["mq"].append(mq)
      out["lq"].append(lq)
    z = mp + np.exp(lp / 2) * u[..., l, :]
    out["z"].append(z)
    out["mp"].append(mp)
    out["lp"].append(lp)
  return {k: np.stack(v, axis=-2) for k, v in out.items() if v}


def np_log_q(chain):
  """log q(u|x) = Σ_l log q(z_l|z_{<l}, x) + ½ Σ log σ_p² (the whitening Jacobian)."""
  flat = lambda x: x.reshape(*x.shape[:-2], -1)
  return (np_log_normal(flat(chain["z"]), flat(chain["mq"]), flat(chain["lq"]))
          + 0.5 * np.sum(flat(chain["lp"]), axis=-1))


def np_chain_of_means(config, params, r):
  """The chain with z_l = μ_q(z_{<l}, x) at every layer: found layer by layer, since the code
  of layer l in prior coordinates is (μ_q − μ_p)/σ_p and both depend on z_{<l} only."""
  n, d = config.num_latents, config.latent_dim
  u = np.zeros((r.shape[0], n, d))
  for l in range(n):
    c = np_chain(config, params, u, r)
    u[:, l] = ((c["mq"] - c["mp"]) * np.exp(-c["lp"] / 2))[:, l]
  chain = np_chain(config, params, u, r)
  np.testing.assert_allclose(chain["z"], chain["mq"], atol=1e-9)
  return chain


def np_log_likelihood(config, params, tokens, u):
  """log p(x|u) by the numpy GPT-2, with each injection of z written out in its plainest form
  (the low-rank fusion one factor at a time, as the official DELLA LMF layer)."""
  tokens = np.asarray(tokens)
  b = tokens.shape[0]
  z = np_chain(config, params, f64(u).reshape(b, config.num_latents, config.latent_dim))["z"]
  t = params["transformer"]
  kwargs = {}
  if config.injection == "fusion":
    per_layer = z if config.layer_wise else np.repeat(z, L, axis=1)
    if config.fusion == "low_rank":
      def value_fn(l, v):
        f = t[f"h_{l}"]["attn"]["fusion"]
        v1 = np.concatenate([v, np.ones((*v.shape[:-1], 1))], -1)
        z1 = np.concatenate([per_layer[:, l], np.ones((b, 1))], -1)
        text = sum(v1 @ a for a in f64(f["value_factors"]))
        latent = sum(z1 @ bb for bb in f64(f["latent_factors"]))
        return text * latent[:, None, :]
    else:
      def value_fn(l, v):
        f = t[f"h_{l}"]["attn"]["fusion"]
        return v + (per_layer[:, l] @ f64(f["kernel"]) + f64(f["bias"]))[:, None, :]
    kwargs["value_fn"] = value_fn
  elif config.injection == "embedding":
    kwargs["embedding_offset"] = np_dense(params["inject"], z[:, 0])
  elif config.injection == "memory":
    kwargs["memory"] = np_dense(params["inject"], z[:, 0]).reshape(b, L, 1, D)
  inputs = np.concatenate([np.full((b, 1), BOS), tokens[:, :-1]], axis=1)
  tensors = numpy_gpt2.tensors_from_params(t)
  hidden, _ = numpy_gpt2.forward(tensors, inputs, H, causal=True, **kwargs)
  if config.injection == "softmax":
    hidden = hidden + np_dense(params["inject"], z[:, 0])[:, None, :]
  logits = numpy_gpt2.logits(tensors, hidden)
  m = logits.max(-1, keepdims=True)
  log_p = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_p, tokens[..., None], -1)[..., 0]
  return np.sum(np.where(tokens != PAD, picked, 0.0), axis=-1)


def np_posterior_chain(config, params, r, eps):
  """The posterior chain drawn ancestrally with noise eps `[..., n, d]` (unconditional):
  z_l = μ_q + σ_q ε_l with the clamped heads; also the heads' raw (unclamped) means `mq_raw`.
  Returns a dict of `[..., n, d]` arrays z, mp, lp, mq, lq, mq_raw."""
  eps = f64(eps)
  n, d, clamp = config.num_latents, config.latent_dim, config.clamp
  batch = eps.shape[:-2]
  s = z = np.zeros((*batch, d))
  out = {k: [] for k in ("z", "mp", "lp", "mq", "lq", "mq_raw")}
  for l in range(n):
    if config.prior == "chain":
      s = np.tanh(np_dense(params[f"w_hh_{l}"], s) + np_dense(params[f"w_ih_{l}"], z))
      mp, lp = np_head(params[f"prior_{l}"], s, clamp)
    else:
      mp, lp = np.zeros((*batch, d)), np.zeros((*batch, d))
    raw = np_dense(params[f"posterior_{l}"],
                   np.concatenate([np.broadcast_to(r[:, l], (*batch, r.shape[-1])), s], -1))
    mq, lq = np.clip(raw[..., :d], -clamp, clamp), np.clip(raw[..., d:], -clamp, clamp)
    z = mq + np.exp(lq / 2) * eps[..., l, :]
    for key, value in (("z", z), ("mp", mp), ("lp", lp), ("mq", mq), ("lq", lq),
                       ("mq_raw", raw[..., :d])):
      out[key].append(value)
  return {k: np.stack(v, axis=-2) for k, v in out.items()}


def np_log_weights(config, params, tokens, eps):
  """Importance weights of the chains drawn with eps `[K, B, n, d]` for `tokens` `[B, T]`:
  (joint `[K, B]`: log p(x|z) + Σ_l log p(z_l|z_<l) − Σ_l log q(z_l|z_<l, x), the paper's
  `[K, B]`: the same with the layers averaged (OpenVLG/DELLA `iw_sample`), log q − log p of
  the joint `[K, B]`)."""
  tokens = np.asarray(tokens)
  k, b = eps.shape[:2]
  chain = np_posterior_chain(config, params, np_pooled(config, params, tokens), eps)
  log_p = np_log_normal(chain["z"], chain["mp"], chain["lp"])         # [K, B, n]
  log_q = np_log_normal(chain["z"], chain["mq"], chain["lq"])
  u = (chain["z"] - chain["mp"]) * np.exp(-chain["lp"] / 2)
  ll = np_log_likelihood(config, params, np.tile(tokens, (k, 1)), u.reshape(k * b, -1))
  ll = ll.reshape(k, b)
  return (ll + log_p.sum(-1) - log_q.sum(-1), ll + log_p.mean(-1) - log_q.mean(-1),
          log_q.sum(-1) - log_p.sum(-1))


def sample_codes(model, v, post, rng, n):
  """(u, log q(u|x), log p(u)) of n samples of the model's posterior object."""
  u, log_q = posteriors.call(model, v, post, lambda q, r: q.sample(r, n), rng)
  return u, log_q, objectives.standard_normal_log_prob(u)


def log_prob(model, v, post, u):
  """log q(u|x) of codes u (batch shape broadcast against the posteriors)."""
  return posteriors.call(model, v, post, lambda q, u: q.log_prob(u), u)


def decoded_log_likelihood(model, v, tokens):
  """`u [n, B, d] -> [n, B]` log p(x|u), the n·B codes decoded at once."""

  def log_likelihood(u):
    n, b, d = u.shape
    tiled = jnp.broadcast_to(tokens[None], (n, *tokens.shape)).reshape(n * b, -1)
    return model.apply(v, tiled, u.reshape(n * b, d), method="log_likelihood").reshape(n, b)

  return log_likelihood


def np_logmeanexp(a):
  m = a.max(0)
  return m + np.log(np.mean(np.exp(a - m), axis=0))


def batch_keys(rng, index):
  """The two keys of batch `index` of an evaluation: `evaluation.collect` and
  `della_metrics.paper_metrics` fold the batch index into their key, and the batch functions
  (`evaluation.make_batch_eval`, `della_metrics.make_paper_batch_eval`) split it into
  (importance-weighting key, other key)."""
  return jax.random.split(jax.random.fold_in(rng, index))


def iw_noise(key, k, chunk_size, shape):
  """The noise `[K, *shape]` of K importance samples drawn with `key`: `metrics.iw_log_likelihood`
  draws chunk i (the last one shorter when chunk_size does not divide K) with
  `fold_in(key, i)`, and `Della.sample_chain` (like `della_metrics.paper_log_weights_fn`)
  draws `jax.random.normal(chunk key, (chunk, *shape))`."""
  chunk_size = min(chunk_size, k)
  sizes = [chunk_size] * (k // chunk_size) + ([k % chunk_size] if k % chunk_size else [])
  return np.concatenate([f64(jax.random.normal(jax.random.fold_in(key, i), (c, *shape)))
                         for i, c in enumerate(sizes)])


# -- the encoder -------------------------------------------------------------------------------


def test_attention_pooling_against_numpy_and_padding_invariance():
  model = Della(LAYER_WISE)
  v = random_variables(LAYER_WISE)
  params = v["params"]

  @jax.jit
  def encoder(v, tokens):
    layers = model.apply(v, tokens, method=lambda m, t: m.transformer(
        t, padding_mask=t != PAD, causal=False).layers)
    return layers, model.apply(v, tokens, method="encoder_features")

  layers, features = encoder(v, TOKENS)
  assert features.shape == (3, L * D)
  np_layers = np_encoder_layers(params, TOKENS)
  real = np.asarray(TOKENS) != PAD
  np.testing.assert_allclose(np.asarray(layers)[:, real], np_layers[:, real], rtol=1e-4,
                             atol=1e-5)
  # Pooling recomputed from the Transformer's own layers, and from the numpy GPT-2's.
  pooled = np.stack([np_pool(f64(layers[l]), real, params[f"pool_{l}"]["w"])
                     for l in range(L)], axis=1)
  np.testing.assert_allclose(features, pooled.reshape(3, -1), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(features, np_pooled(LAYER_WISE, params, TOKENS).reshape(3, -1),
                             rtol=1e-4, atol=1e-5)

  # What sits in the padded positions (here: the PAD embedding) changes their states but not
  # the features.
  wte = params["transformer"]["wte"]["embedding"]
  moved = jax.tree.map(lambda x: x, v)
  moved["params"]["transformer"]["wte"]["embedding"] = wte.at[PAD].add(3.0)
  moved_layers, moved_features = encoder(moved, TOKENS)
  assert np.linalg.norm(np.asarray(moved_layers - layers)[:, ~real], axis=-1).min() > 1e-2
  np.testing.assert_allclose(moved_features, features, rtol=1e-6, atol=1e-7)
  # Neither the amount of padding nor the batch-mates matter.
  longer = jnp.pad(TOKENS[::-1], ((0, 0), (0, 2)), constant_values=PAD)
  _, longer_features = encoder(v, longer)
  np.testing.assert_allclose(longer_features[::-1], features, rtol=1e-5, atol=1e-6)


# -- densities in prior coordinates ------------------------------------------------------------


def test_posterior_log_prob_against_numpy_sample_codes_and_pairwise_form():
  config = LAYER_WISE
  model = Della(config)
  v = random_variables(config)
  params = v["params"]
  code_dim = config.code_dim
  queries = 2.0 * jax.random.normal(jax.random.PRNGKey(3), (4, code_dim))

  @jax.jit
  def run(v, tokens, rng, queries):
    post = model.apply(v, tokens, method="encode")
    u, log_q, log_p = sample_codes(model, v, post, rng, 5)
    again = log_prob(model, v, post, u)
    pairwise = log_prob(model, v, post, queries[:, None, :])
    # The same pairs one by one: row i·N + j holds query i and posterior j.
    n = tokens.shape[0]
    tiled = jax.tree.map(lambda x: jnp.tile(x, (queries.shape[0],) + (1,) * (x.ndim - 1)),
                         post)
    per_pair = log_prob(model, v, tiled, jnp.repeat(queries, n, axis=0)).reshape(-1, n)
    point = posteriors.call(model, v, post, lambda q: q.point())
    return post, u, log_q, log_p, again, pairwise, per_pair, point

  out = run(v, TOKENS, jax.random.PRNGKey(4), queries)
  post, u, log_q, log_p, again, pairwise, per_pair, point = out
  assert u.shape == (5, 3, code_dim) and log_q.shape == (5, 3) and pairwise.shape == (4, 3)
  np.testing.assert_allclose(again, log_q, rtol=1e-5, atol=1e-4)
  np.testing.assert_allclose(log_p, -0.5 * np.sum(LOG_2PI + f64(u) ** 2, -1), rtol=1e-5)
  np.testing.assert_allclose(pairwise, per_pair, rtol=1e-5, atol=1e-5)

  r = np_pooled(config, params, TOKENS)
  unflat = lambda x: f64(x).reshape(*x.shape[:-1], config.num_latents, config.latent_dim)
  np.testing.assert_allclose(log_q, np_log_q(np_chain(config, params, unflat(u), r)),
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(pairwise, np_log_q(np_chain(config, params,
                                                         unflat(queries)[:, None], r)),
                             rtol=1e-4, atol=1e-4)

  # encode: u's Gaussian along the chain of posterior means (z_l = μ_q), whose whitened
  # means are the point code.
  means_chain = np_chain_of_means(config, params, r)
  whiten = lambda c: (c["mq"] - c["mp"]) * np.exp(-c["lp"] / 2)
  np.testing.assert_allclose(post.mean, whiten(means_chain).reshape(3, -1), rtol=1e-4,
                             atol=1e-5)
  np.testing.assert_allclose(post.logvar, (means_chain["lq"] - means_chain["lp"]).reshape(3, -1),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(point, post.mean, rtol=1e-5, atol=1e-6)


def test_iw_nll_against_quadrature_over_the_code():
  """u ∈ R² (two layers, d = 1): log p(x) = log ∫ p(x|u) N(u; 0, I) du by a Riemann sum on a
  121 × 121 grid over [−9, 9]² (spacing 0.15, where the integrands vary on scales of about 1,
  so the sum is accurate far beyond the tolerances), against the importance-weighted estimate
  of the evaluation (`metrics.iw_log_likelihood` on the model's own samples and densities),
  K = 20,000. The tolerance is the estimator's own standard error,
  sqrt(χ²(p(u|x) || q(u|x)) / K), with χ² also by quadrature. On the same grid q(u|x)
  integrates to 1 (the whitening Jacobian), and the K-sample ELBO and the Monte Carlo KL match
  their quadrature values."""
  config = LAYER_WISE_1D
  model = Della(config)
  # Parameters for which q(u|x) covers p(u|x) (χ² about 1, found on the grid below), so that
  # the estimator converges at the 1/sqrt(K) rate the tolerance assumes.
  v = random_variables(config, seed=15, scale=0.25)
  g = np.linspace(-9.0, 9.0, 121)        # q(u_1|x) has a standard deviation of about 2
  h = g[1] - g[0]
  grid = np.stack(np.meshgrid(g, g, indexing="ij"), -1).reshape(-1, 2)
  k = 20_000

  @jax.jit
  def run(v, tokens, u, rng):
    iw_rng, kl_rng = jax.random.split(rng)
    post = model.apply(v, tokens, method="encode")
    log_likelihood = decoded_log_likelihood(model, v, tokens)
    # On the grid: log p(x|u) and log q(u|x), [G, B].
    log_q = log_prob(model, v, post, u[:, None, :])
    ll = log_likelihood(jnp.broadcast_to(u[:, None, :], (u.shape[0], *log_q.shape[1:], 2)))
    # Importance weighting and Monte Carlo KL with the model's samples.
    sample = lambda r, n: sample_codes(model, v, post, r, n)
    log_weights = metrics.posterior_log_weights_fn(sample, log_likelihood)
    log_px, mean_log_w = metrics.iw_log_likelihood(log_weights, iw_rng, k, 2_000,
                                                   return_elbo=True)
    _, log_q_s, log_p_s = sample(kl_rng, k)
    return ll, log_q, log_px, mean_log_w, metrics.monte_carlo_kl(log_q_s, log_p_s)

  out = run(v, TOKENS, jnp.asarray(grid, jnp.float32), jax.random.PRNGKey(0))
  ll, log_q, log_px, mean_log_w, mc_kl = (f64(a) for a in out)
  log_prior = -0.5 * np.sum(LOG_2PI + grid ** 2, -1)[:, None]
  log_joint = ll + log_prior
  log_area = 2 * np.log(h)
  lse = lambda a: a.max(0) + np.log(np.exp(a - a.max(0)).sum(0))
  exact = lse(log_joint) + log_area                                     # log p(x)  [B]
  q = np.exp(log_q) * h ** 2
  np.testing.assert_allclose(q.sum(0), 1.0, atol=1e-3)
  # Without the whitening Jacobian Π σ_p the integral would be off: the check has teeth.
  log_jacobian = 0.5 * np_chain(config, v["params"], grid[:, :, None])["lp"].sum((-2, -1))
  assert np.all(np.abs(np.sum(q * np.exp(-log_jacobian)[:, None], 0) - 1.0) > 0.02)

  log_w = log_joint - log_q                                             # log p(x, u) − log q
  chi2 = np.exp(lse(2 * log_joint - log_q) + log_area - 2 * exact) - 1.0
  se = np.sqrt(chi2 / k)
  assert np.all(se < 0.01), se                                          # a tight comparison
  elbo = np.sum(q * log_w, 0)
  kl = np.sum(q * (log_q - log_prior), 0)
  log_w_sd = np.sqrt(np.sum(q * (log_w - elbo) ** 2, 0))
  kl_sd = np.sqrt(np.sum(q * (log_q - log_prior - kl) ** 2, 0))
  assert np.all(kl > 0.5), kl
  assert np.all(exact - elbo > 0.5), exact - elbo       # the ELBO is far from log p(x)
  # Five standard errors, plus 2e-3 for float32 sums over 20,000 weights.
  assert np.all(np.abs(log_px - exact) < 5 * se + 2e-3), (log_px, exact, se)
  assert np.all(np.abs(mean_log_w - elbo) < 5 * log_w_sd / np.sqrt(k) + 2e-3), (mean_log_w, elbo)
  assert np.all(np.abs(mc_kl - kl) < 5 * kl_sd / np.sqrt(k) + 2e-3), (mc_kl, kl)


# -- the KL --------------------------------------------------------------------------------------


def test_single_latent_kl_is_the_analytic_kl_of_the_heads():
  config = SINGLE
  model = Della(config)
  v = random_variables(config)
  params = v["params"]

  @jax.jit
  def run(v, tokens, rng):
    terms_rng, mc_rng = jax.random.split(rng)
    terms = model.apply(v, tokens, deterministic=True, rngs={"latent": terms_rng})
    post = model.apply(v, tokens, method="encode")
    u, log_q, log_p = sample_codes(model, v, post, mc_rng, 20_000)
    return terms, u, log_q - log_p

  terms, u, diff = run(v, TOKENS, jax.random.PRNGKey(6))
  chain = np_chain(config, params, np.zeros((3, 1, 2)), np_pooled(config, params, TOKENS))
  kl_dims = np_gaussian_kl(chain["mq"], chain["lq"], chain["mp"], chain["lp"])[:, 0]
  np.testing.assert_allclose(terms.kl_dims, kl_dims, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(terms.kl, kl_dims.sum(-1), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(terms.kl_layers[:, 0], terms.kl, rtol=1e-6)
  assert np.all(terms.kl > 0.1)
  mean = ((chain["mq"] - chain["mp"]) * np.exp(-chain["lp"] / 2))[:, 0]
  logvar = (chain["lq"] - chain["lp"])[:, 0]
  np.testing.assert_allclose(terms.mean, mean, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(terms.logvar, logvar, rtol=1e-4, atol=1e-5)
  # Monte Carlo over the model's own samples and densities; the samples are N(mean, e^logvar).
  diff, u = f64(diff), f64(u)
  se = diff.std(0) / np.sqrt(len(diff))
  assert np.all(np.abs(diff.mean(0) - kl_dims.sum(-1)) < 5 * se), (diff.mean(0), kl_dims)
  sd = np.exp(logvar / 2)
  assert np.all(np.abs(u.mean(0) - mean) < 5 * sd / np.sqrt(len(u)))
  np.testing.assert_allclose(u.std(0), sd, rtol=0.03)


def test_layer_wise_kl_layers_against_numpy_and_monte_carlo():
  """kl_layers: the analytic KL of each layer given the sampled z_{<l} (read back from the
  whitened code); their sum over latent draws and the Monte Carlo E_q[log q − log p] of
  `sample_codes` both estimate KL(q(z|x) || p(z))."""
  config = LAYER_WISE
  model = Della(config)
  v = random_variables(config)
  params = v["params"]
  terms = terms_fn(config)(v, jax.random.PRNGKey(2), TOKENS)
  r = np_pooled(config, params, TOKENS)
  chain = np_chain(config, params, f64(terms.z).reshape(3, L, 2), r)
  kl_dims = np_gaussian_kl(chain["mq"], chain["lq"], chain["mp"], chain["lp"])
  np.testing.assert_allclose(terms.kl_layers, kl_dims.sum(-1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(terms.kl_dims, kl_dims.reshape(3, -1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.sum(terms.kl_layers, -1), terms.kl, rtol=1e-5)
  np.testing.assert_allclose(np.sum(terms.kl_dims, -1), terms.kl, rtol=1e-5)
  np.testing.assert_allclose(terms.mean, ((chain["mq"] - chain["mp"])
                                          * np.exp(-chain["lp"] / 2)).reshape(3, -1),
                             rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(terms.logvar, (chain["lq"] - chain["lp"]).reshape(3, -1),
                             rtol=1e-4, atol=1e-5)
  assert np.all(terms.kl_layers > 0.05)

  @jax.jit
  def estimates(v, tokens, rng):
    draw_rng, mc_rng = jax.random.split(rng)
    post = model.apply(v, tokens, method="encode")
    kls = jax.vmap(lambda k: model.apply(v, tokens, deterministic=True,
                                         rngs={"latent": k}).kl)(
                                             jax.random.split(draw_rng, 4_000))
    _, log_q, log_p = sample_codes(model, v, post, mc_rng, 20_000)
    return kls, log_q - log_p

  kls, diff = (f64(a) for a in estimates(v, TOKENS, jax.random.PRNGKey(8)))
  assert kls.std(0).min() > 0.01        # the second layer's KL depends on the sampled z_1
  se = np.sqrt(kls.var(0) / len(kls) + diff.var(0) / len(diff))
  assert np.all(np.abs(kls.mean(0) - diff.mean(0)) < 5 * se), (kls.mean(0), diff.mean(0), se)


def test_loss_reduces_and_hinges_layers():
  config = LAYER_WISE
  model = Della(config)
  v = random_variables(config)
  batch = {"tokens": TOKENS, "weights": jnp.array([1.0, 0.0, 1.0])}     # a padding row
  rng, beta = jax.random.PRNGKey(11), 0.7
  # The loss draws the latents with the first of three keys split from its rng; the sums it
  # returns confirm that the terms below are those of its forward pass.
  terms = terms_fn(config)(v, jax.random.split(rng, 3)[0], TOKENS)
  w = np.asarray(batch["weights"])
  kl_layers = f64(terms.kl_layers)
  threshold = float(np.median(kl_layers[w > 0]))
  hinged = kl_layers[w > 0] < threshold
  assert hinged.any() and (~hinged).any()

  def loss(options):
    return losses.make_vae_loss(model, optax.constant_schedule(beta), "layer_hinge", options)

  mean_loss = loss(kl_terms.LayerHinge(threshold=threshold, reduction="mean"))
  sum_loss = loss(kl_terms.LayerHinge(threshold=0.0, reduction="sum"))
  both = jax.jit(lambda p, b, r: (mean_loss(p, {}, b, r, 0), sum_loss(p, {}, b, r, 0)))
  (l_mean, (sums, _)), (l_sum, _) = both(v["params"], batch, rng)

  rec = f64(terms.rec_nll)
  np.testing.assert_allclose(sums["rec"], np.sum(w * rec), rtol=1e-5)
  np.testing.assert_allclose(sums["kl"], np.sum(w * f64(terms.kl)), rtol=1e-5)
  n = w.sum()
  per_example = np.maximum(kl_layers, threshold).mean(-1)
  np.testing.assert_allclose(l_mean, np.sum(w * rec) / n + beta * np.sum(w * per_example) / n,
                             rtol=1e-5)
  np.testing.assert_allclose(l_sum, np.sum(w * (rec + beta * f64(terms.kl))) / n, rtol=1e-5)


# -- decoding ----------------------------------------------------------------------------------


INJECTIONS = {
    "fusion_low_rank": LAYER_WISE,
    "fusion_add": dataclasses.replace(LAYER_WISE, fusion="add"),
    "single_fusion": SINGLE,
    "embedding": DellaConfig(TC, latent_dim=2, injection="embedding", layer_wise=False,
                             prior="standard"),
    "memory": DellaConfig(TC, latent_dim=2, injection="memory", layer_wise=False,
                          prior="standard"),
    "softmax": DellaConfig(TC, latent_dim=2, injection="softmax", layer_wise=False,
                           prior="standard"),
}


@pytest.mark.parametrize("name", list(INJECTIONS))
def test_step_decoding_and_log_likelihood_against_numpy(name):
  """Teacher-forced stepping through `initial_state` / `decode_step` gives
  `log_likelihood`, which equals the numpy GPT-2 with the injection written out; the code
  matters."""
  config = INJECTIONS[name]
  model = Della(config)
  v = random_variables(config)

  @jax.jit
  def run(v, tokens, u, other):
    def step(carry, target):
      state, prev = carry
      state, logits = model.apply(v, state, prev, u, method="decode_step")
      log_p = jnp.take_along_axis(jax.nn.log_softmax(logits), target[:, None], -1)[:, 0]
      return (state, target), jnp.where(target != PAD, log_p, 0.0)

    start = (model.apply(v, u, method="initial_state"), jnp.full(tokens.shape[:1], BOS))
    _, log_p = jax.lax.scan(step, start, tokens.T)
    ll = model.apply(v, jnp.concatenate([tokens, tokens]), jnp.concatenate([u, other]),
                     method="log_likelihood")
    return log_p.sum(0), ll[:len(u)], ll[len(u):]

  u = 1.5 * jax.random.normal(jax.random.PRNGKey(1), (3, config.code_dim))
  stepped, ll, moved = run(v, TOKENS, u, -u)
  np.testing.assert_allclose(stepped, ll, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ll, np_log_likelihood(config, v["params"], TOKENS, u), rtol=1e-4,
                             atol=1e-4)
  assert np.abs(f64(moved) - f64(ll)).max() > 0.05


# -- the conditional variant -------------------------------------------------------------------


def test_conditional_prior_reads_the_condition():
  config = CONDITIONAL
  model = Della(config)
  assert model.input_keys == ("tokens", "condition")
  v = random_variables(config, inputs=(TOKENS, CONDITION))
  params = v["params"]
  run = terms_fn(config)
  rng = jax.random.PRNGKey(2)
  other = CONDITION[jnp.array([1, 2, 0])]
  terms = run(v, rng, TOKENS, CONDITION)
  r = np_pooled(config, params, TOKENS)
  for cond, t in ((CONDITION, terms), (other, run(v, rng, TOKENS, other))):
    c = np_pooled(config, params, cond, prefix="cond_pool")
    chain = np_chain(config, params, f64(t.z).reshape(3, L, 2), r, c)
    np.testing.assert_allclose(
        t.kl_layers, np_gaussian_kl(chain["mq"], chain["lq"], chain["mp"], chain["lp"]).sum(-1),
        rtol=1e-4, atol=1e-5)

  # With the posterior heads blind to the condition, the first layer's posterior is fixed and
  # only the prior can move its KL.
  blind = jax.tree.map(lambda x: x, v)
  for l in range(L):
    kernel = blind["params"][f"posterior_{l}"]["kernel"]
    blind["params"][f"posterior_{l}"]["kernel"] = kernel.at[-D:].set(0.0)
  a, b = run(blind, rng, TOKENS, CONDITION), run(blind, rng, TOKENS, other)
  assert np.abs(f64(a.kl_layers[:, 0]) - f64(b.kl_layers[:, 0])).min() > 1e-3

  u = jnp.zeros((3, config.code_dim))
  with pytest.raises(ValueError, match="prior depends on the condition"):
    model.apply(v, u, method="latents")
  with pytest.raises(ValueError, match="needs the `condition` tokens"):
    model.apply(v, TOKENS, deterministic=True, rngs={"latent": rng})


# -- configuration -------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, message", [
    (dict(latent_dim=0), "latent_dim must be positive"),
    (dict(injection="cross"), "unknown injection"),
    (dict(fusion="mlp"), "unknown fusion"),
    (dict(prior="flow"), "unknown prior"),
    (dict(prior="standard"), "single unconditional latent"),
    (dict(prior="standard", layer_wise=False, conditional=True), "single unconditional latent"),
    (dict(injection="memory"), "needs layer_wise=False"),
    (dict(injection="softmax", layer_wise=True), "needs layer_wise=False"),
])
def test_config_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    DellaConfig(TC, **kwargs)


def test_config_sizes_and_transformer_switches():
  assert (LAYER_WISE.num_latents, LAYER_WISE.code_dim) == (L, 2 * L)
  assert (SINGLE.num_latents, SINGLE.code_dim) == (1, 2)
  fused = dataclasses.replace(LAYER_WISE, fusion="add").transformer_config()
  assert (fused.latent_dim, fused.value_fusion) == (2, "add")
  plain = INJECTIONS["memory"].transformer_config()
  assert (plain.latent_dim, plain.value_fusion) == (0, "none")


# -- the generic evaluation ----------------------------------------------------------------------


def np_monte_carlo_kl(config, params, r, eps):
  """`[B]` the mean over the chains drawn with eps `[S, B, n, d]` of log q(z|x) − log p(z)."""
  chain = np_posterior_chain(config, params, r, eps)
  return np.mean(np_log_normal(chain["z"], chain["mq"], chain["lq"]).sum(-1)
                 - np_log_normal(chain["z"], chain["mp"], chain["lp"]).sum(-1), axis=0)


def np_code_means(config, params, r, eps):
  """Two estimates `[2, B, n·d]` of E_q[u|x], each the mean of half of the whitened chains
  drawn with eps `[2S, B, n, d]` (the halves of `evaluation.make_batch_eval`)."""
  chain = np_posterior_chain(config, params, r, eps)
  u = (chain["z"] - chain["mp"]) * np.exp(-chain["lp"] / 2)
  return u.reshape(2, -1, *u.shape[1:-2], config.code_dim).mean(1)


def test_generic_evaluation_on_della_against_numpy():
  """`evaluation.evaluate` on DELLA, its values against the numpy chain on the numpy GPT-2
  with the same draws: IW-NLL, ELBO, PPL, the Monte Carlo KL, and AU (from the covariance of
  two independent sample means of E_q[u|x]; per layer from the variance of the chain of
  posterior means). evaluate gives the first of the four keys split from its own to
  `collect`; a batch's function draws the importance samples with its first key
  (`batch_keys`, `iw_noise`), the two halves of 32 chains with the second, and the KL's chains
  with the second folded with 1."""
  config = LAYER_WISE
  model = Della(config)
  v = random_variables(config)
  params = v["params"]
  batches = [
      {"tokens": TOKENS, "weights": jnp.ones(3)},
      {"tokens": TOKENS[jnp.array([0, 2, 1])], "weights": jnp.array([1.0, 1.0, 0.0])},
  ]
  rng, k = jax.random.PRNGKey(0), 8
  out = evaluation.evaluate(model, v, batches, rng, k_samples=k, chunk_size=8,
                            hole_samples=64, num_prior_samples=4, max_decode_length=6)
  # The per-layer counts come with DELLA's own keys (della_metrics.layer_active_units).
  out.update({key: value for key, value in della_metrics.paper_metrics(
      model, v, batches, jax.random.split(rng, 4)[0], k_samples=k, chunk_size=8).items()
              if key.startswith("au_layer") or key.startswith("au_z")})
  assert out["n_sentences"] == 5
  lengths = np.sum(np.asarray(TOKENS) != PAD, -1)
  n_tokens = lengths.sum() + lengths[0] + lengths[2]
  assert out["n_tokens"] == n_tokens
  for key in ("mi", "hole_kl", "hole_kl_null", "hole_kl_excess", "hole_kl_excess_stderr",
              "dispersion", "prior_nll_per_token"):
    assert np.isfinite(out[key]), key
  assert out["mi"] <= np.log(5) + 1e-4                # every term is at most log N

  eval_rng = jax.random.split(rng, 4)[0]
  parts = {key: [] for key in ("log_px", "elbo", "kl", "means", "layer_means")}
  for i, batch in enumerate(batches):
    tokens, real = np.asarray(batch["tokens"]), np.asarray(batch["weights"]) > 0
    r = np_pooled(config, params, tokens)
    iw_key, other_key = batch_keys(eval_rng, i)
    joint, _, _ = np_log_weights(config, params, tokens, iw_noise(iw_key, k, 8, (3, L, 2)))
    noise = lambda key, n: f64(jax.random.normal(key, (n, 3, L, 2)))
    parts["log_px"].append(np_logmeanexp(joint)[real])
    parts["elbo"].append(joint.mean(0)[real])
    parts["kl"].append(np_monte_carlo_kl(config, params, r,
                                         noise(jax.random.fold_in(other_key, 1), k))[real])
    parts["means"].append(np_code_means(config, params, r, noise(other_key, 64))[:, real])
    parts["layer_means"].append(np_chain_of_means(config, params, r)["mq"][real])
  log_px, elbo, kl = (np.concatenate(parts[key]) for key in ("log_px", "elbo", "kl"))
  np.testing.assert_allclose(out["nll"], -log_px.mean(), rtol=1e-4)
  np.testing.assert_allclose(out["elbo"], elbo.mean(), rtol=1e-4)
  np.testing.assert_allclose(out["ppl"], np.exp(-log_px.sum() / n_tokens), rtol=1e-4)
  np.testing.assert_allclose(out["kl"], kl.mean(), rtol=1e-4)
  assert -log_px.mean() < -elbo.mean() - 0.1           # the IW bound is tighter here

  # AU in prior coordinates: the unbiased covariance over the 5 sentences of the two estimates.
  a, b = np.concatenate(parts["means"], axis=1)
  variances = np.sum((a - a.mean(0)) * (b - b.mean(0)), 0) / (len(a) - 1)
  np.testing.assert_allclose(out["au_variances"], variances, rtol=1e-3, atol=1e-6)
  assert np.abs(np.log(variances[variances > 0] / 0.01)).min() > 0.01  # none at the threshold
  assert out["au"] == np.sum(variances > 0.01) and 0 < out["au"] < config.code_dim
  # Per layer: the population variance of the z-space chain of means, > t.
  layer_variances = np.concatenate(parts["layer_means"]).var(0)      # [L, d]
  for t in (0.01, 0.2):
    assert np.abs(np.log(layer_variances / t)).min() > 0.01      # none at the threshold
    per_layer = np.sum(layer_variances > t, -1)
    assert out[f"au_layers_{t:g}"] == per_layer.tolist()
    assert out[f"au_z_{t:g}"] == per_layer.sum()
    np.testing.assert_allclose(out[f"au_layer_mean_{t:g}"], per_layer.mean())
  assert 0 < out["au_z_0.01"] < config.code_dim           # neither none nor all


# -- the official estimators (vae_jax.della_metrics) ---------------------------------------------


def paper_batches():
  """Two batches of the evaluation format, the second with a padding row."""
  return [{"tokens": TOKENS, "weights": jnp.ones(3)},
          {"tokens": TOKENS[jnp.array([0, 2, 1])], "weights": jnp.array([1.0, 1.0, 0.0])}]


def np_paper_weights(config, params, rng, k, chunk_size):
  """The joint's and the official log weights `[K, N]` of the 5 real sentences of
  `paper_batches`, drawn as `della_metrics.paper_metrics(..., rng, k_samples=k,
  chunk_size=chunk_size)` draws them (`batch_keys`, `iw_noise`)."""
  joint, paper = [], []
  for i, batch in enumerate(paper_batches()):
    real = np.asarray(batch["weights"]) > 0
    iw_key, _ = batch_keys(rng, i)
    eps = iw_noise(iw_key, k, chunk_size, (3, config.num_latents, config.latent_dim))
    j, p, _ = np_log_weights(config, params, batch["tokens"], eps)
    joint.append(j[:, real])
    paper.append(p[:, real])
  return np.concatenate(joint, 1), np.concatenate(paper, 1)


def test_paper_iw_nll_against_numpy():
  """nll_paper, its standard error and ppl_paper: the official estimator (OpenVLG/DELLA
  `calc_iwnll`, `iw_sample`) written out on the numpy chain with the same draws, K = 6 in
  chunks of 4 and 2: log w = log p(x|z) + mean_l log p(z_l|z_<l) − mean_l log q(z_l|z_<l, x),
  and PPL over Σ (|x| + 2) tokens (the official attention mask counts BOS). With two layers
  the estimate is well away from the joint's on the same draws."""
  config = LAYER_WISE
  model = Della(config)
  v = random_variables(config)
  rng, k = jax.random.PRNGKey(3), 6
  out = della_metrics.paper_metrics(model, v, paper_batches(), rng, k_samples=k, chunk_size=4)
  joint, paper = np_paper_weights(config, v["params"], rng, k, 4)
  log_px = np_logmeanexp(paper)
  np.testing.assert_allclose(out["nll_paper"], -log_px.mean(), rtol=1e-4)
  np.testing.assert_allclose(out["nll_paper_se"], log_px.std(ddof=1) / np.sqrt(5), rtol=1e-3)
  lengths = np.sum(np.asarray(TOKENS) != PAD, -1)[[0, 1, 2, 0, 2]]  # the real rows
  np.testing.assert_allclose(out["ppl_paper"], np.exp(-log_px.sum() / np.sum(lengths + 1)),
                             rtol=1e-4)
  assert abs(out["nll_paper"] + np_logmeanexp(joint).mean()) > 0.1


def test_paper_iw_nll_is_the_iw_nll_for_one_latent():
  """With one latent the layer average is the joint: nll_paper equals the evaluation's IW-NLL
  on the same draws (the key of `evaluation.collect`), and both the numpy joint estimate."""
  config = SINGLE
  model = Della(config)
  v = random_variables(config)
  rng, k = jax.random.PRNGKey(4), 5
  out = della_metrics.paper_metrics(model, v, paper_batches(), rng, k_samples=k, chunk_size=2)
  ours = evaluation.collect(evaluation.make_batch_eval(model, k, 2), paper_batches(), rng, v)
  np.testing.assert_allclose(out["nll_paper"], -ours["log_px"].mean(), rtol=1e-6)
  joint, paper = np_paper_weights(config, v["params"], rng, k, 2)
  np.testing.assert_allclose(paper, joint)
  np.testing.assert_allclose(out["nll_paper"], -np_logmeanexp(joint).mean(), rtol=1e-4)


def test_paper_active_units_against_numpy():
  """au_paper: OpenVLG/DELLA `calc_au` (transcribed: the mean of the stage-1 pass, the squared
  deviations of the stage-2 pass from it, summed batch by batch, / (N − 1), >= threshold,
  / n·d) on the posterior means of sampled chains with the draws of
  `della_metrics.make_paper_batch_eval` (second key: ε `[2, B, n, d]`, one chain per stage),
  the heads' raw means. The parameters push some raw means past the clamp, where the clamped
  means would count fewer units."""
  config = LAYER_WISE
  model = Della(config)
  v = random_variables(config, seed=7)
  for l in range(L):
    head = v["params"][f"posterior_{l}"]
    head["kernel"] = 6.0 * head["kernel"]
  params, rng, threshold = v["params"], jax.random.PRNGKey(1), 1.0
  stages = {"mq_raw": ([], []), "mq": ([], [])}
  for i, batch in enumerate(paper_batches()):
    real = np.asarray(batch["weights"]) > 0
    _, au_key = batch_keys(rng, i)
    eps = f64(jax.random.normal(au_key, (2, 3, L, 2)))
    chain = np_posterior_chain(config, params, np_pooled(config, params, batch["tokens"]), eps)
    for key, (first, second) in stages.items():
      first.append(chain[key][0, real].reshape(-1, config.code_dim))
      second.append(chain[key][1, real].reshape(-1, config.code_dim))

  def calc_au(first_batches, second_batches):
    means_sum, cnt = 0.0, 0
    for mean in first_batches:
      means_sum, cnt = means_sum + mean.sum(0, keepdims=True), cnt + len(mean)
    mean_mean = means_sum / cnt
    var_sum, cnt = 0.0, 0
    for mean in second_batches:
      var_sum, cnt = var_sum + ((mean - mean_mean) ** 2).sum(0), cnt + len(mean)
    au_var = var_sum / (cnt - 1)
    return au_var, int((au_var >= threshold).sum())

  variances, count = calc_au(*stages["mq_raw"])
  assert np.abs(np.log(variances / threshold)).min() > 0.01      # none at the threshold
  assert 0 < count < config.code_dim
  assert calc_au(*stages["mq"])[1] < count                       # the clamp would matter
  out = della_metrics.paper_metrics(model, v, paper_batches(), rng, k_samples=1, chunk_size=1,
                                    au_threshold=threshold)
  assert out["au_paper_count"] == count and out["au_paper_threshold"] == threshold
  np.testing.assert_allclose(out["au_paper"], count / config.code_dim)
