"""DELLA: layer-wise latent variables fused into a Transformer VAE (METHODS.md §4).

Hu et al., NAACL 2022, "Fuse It More Deeply! A Variational Transformer with Layer-Wise Latent
Variable Inference for Text Generation". One GPT-2-style Transformer (`vae_jax.nn.transformer`)
serves as encoder and decoder, sharing embeddings and blocks: the encoder pass is non-causal
over the sentence `w_1 … w_n EOS`, the decoder pass causal over `BOS w_1 … w_n`.

Latents. Encoder layer l's states are pooled into r_l = Σ_t a_t h_t^l with a_t = softmax_t
(gelu(w_l · h_t^l)) over real positions (a learned vector w_l per layer). The latents
z_1 … z_L ∈ R^d are chained through a recurrent summary

    s_l = tanh(W_hh s_{l−1} + W_ih z_{l−1}),   s_0 = z_0 = 0,
    p(z_l | z_{<l})    = N(μ_p, σ_p²) = N(prior_l(s_l [; c_l])),
    q(z_l | z_{<l}, x) = N(μ_q, σ_q²) = N(posterior_l([r_l; s_l] [; c_l])),

means and log-variances clamped to [−5, 5] as in the official code, z_{l−1} the posterior
sample during training. c_l is the pooled layer-l state of a condition sequence in the
conditional variant (`conditional`). The decoder reads z_l in layer l: its attention values
become the low-rank fusion (Σ_j A_j [v; 1]) ⊙ (Σ_j B_j [z_l; 1]) (rank r), or v + W z_l in the
ablation without fusion (`fusion='add'`).

KL. KL(q(z|x) ‖ p(z)) = Σ_l E_q[KL(q(z_l|z_{<l},x) ‖ p(z_l|z_{<l}))], each term analytic given
the sampled z_{<l} (`DellaTerms.kl_layers`). The official code averages the layers and hinges
each at a threshold; those are choices of the loss (the KL term `layer_hinge` of
`vae_jax.kl_terms`, options `reduction`, `threshold`), not of the model, which returns the KL
of the joint.

Codes in prior coordinates. The prior is a chain, not N(0, I), so the model's code is the
whitened u_l = (z_l − μ_p(z_{<l})) / σ_p(z_{<l}). The map u -> z is a triangular bijection that
does not depend on x, its prior is N(0, I), q(u|x) = q(z|x) Π_l σ_p, and importance weights,
KL and MI are the same in u as in z. So the evaluation suite of `vae_jax.evaluation` (IW-NLL,
KL, MI, AU, holes, prior samples) applies unchanged: `Della.posterior` returns a
`ChainPosterior` (the latent-model protocol of `vae_jax.posteriors`) over codes `[..., L·d]`
(layer-major), and `log_likelihood` decodes u. `layer_means` gives the z-space chain of
posterior means on which the paper counts active units.

The paper's comparisons are switches of the same model (`DellaConfig.injection`):
'fusion' (DELLA), 'embedding' (z added to every input embedding), 'memory' (z as one extra
key/value vector per layer, Optimus's memory), 'softmax' (z added to the final state before the
tied output layer); `layer_wise=False` keeps one latent, read from the last layer's pooled
state and, with fusion, fused into every layer. The single-latent injections use the standard
normal prior (`prior='standard'`) like Optimus.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vae_jax import objectives, posteriors
from vae_jax.data.vocab import PAD
from vae_jax.models.vae import VAETerms, token_mask
from vae_jax.posteriors import PosteriorParams, Prior
from vae_jax.nn.decoders import shift_right
from vae_jax.nn.transformer import Transformer, TransformerConfig

Injection = Literal["fusion", "embedding", "memory", "softmax"]


@dataclasses.dataclass(frozen=True)
class DellaConfig:
  """The Transformer and the latent structure.

  transformer: the GPT-2 sizes (its latent fields are set from the ones below).
  latent_dim: d, the size of each z_l (32 in the paper).
  injection: where z enters the decoder (module docstring).
  fusion: 'low_rank' (DELLA) or 'add' (the ablation without fusion), for injection='fusion'.
  fusion_rank: r of the low-rank fusion (4 in the paper).
  layer_wise: one latent per layer (DELLA) or a single latent.
  prior: 'chain' (the learned p(z_l|z_{<l})) or 'standard' (N(0, I); single latent only).
  conditional: prior and posterior also read the pooled states of a condition sequence
    (batch key `condition`).
  clamp: |μ| and |log σ²| are clamped at this value (the official code's 5).
  """
  transformer: TransformerConfig
  latent_dim: int = 32
  injection: Injection = "fusion"
  fusion: Literal["low_rank", "add"] = "low_rank"
  fusion_rank: int = 4
  layer_wise: bool = True
  prior: Literal["chain", "standard"] = "chain"
  conditional: bool = False
  clamp: float = 5.0

  def __post_init__(self):
    if self.latent_dim <= 0:
      raise ValueError(f"latent_dim must be positive, got {self.latent_dim}")
    if self.injection not in ("fusion", "embedding", "memory", "softmax"):
      raise ValueError(f"unknown injection {self.injection!r}")
    if self.fusion not in ("low_rank", "add"):
      raise ValueError(f"unknown fusion {self.fusion!r}")
    if self.prior not in ("chain", "standard"):
      raise ValueError(f"unknown prior {self.prior!r}")
    if self.prior == "standard" and (self.layer_wise or self.conditional):
      raise ValueError("prior='standard' is for a single unconditional latent "
                       "(layer_wise=False, conditional=False)")
    if self.layer_wise and self.injection != "fusion":
      raise ValueError(f"layer-wise latents enter through the value fusion; injection="
                       f"{self.injection!r} needs layer_wise=False")
    if self.clamp <= 0:
      raise ValueError(f"clamp must be positive, got {self.clamp}")
    self.transformer_config()  # the Transformer's own checks (e.g. fusion_rank), at config time

  @property
  def num_latents(self) -> int:
    return self.transformer.num_layers if self.layer_wise else 1

  @property
  def code_dim(self) -> int:
    return self.num_latents * self.latent_dim

  def transformer_config(self) -> TransformerConfig:
    fuse = self.injection == "fusion"
    return dataclasses.replace(
        self.transformer, latent_dim=self.latent_dim if fuse else 0,
        value_fusion=self.fusion if fuse else "none", fusion_rank=self.fusion_rank)


@flax.struct.dataclass
class DellaTerms(VAETerms):
  """`VAETerms` with codes u in prior coordinates (`[B, L·d]`), plus `kl_layers` `[B, L]`.

  mean, logvar: the posterior of u_l given the sampled z_{<l}: ((μ_q − μ_p)/σ_p, log σ_q² −
    log σ_p²), so `kl_dims` = objectives.gaussian_kl(mean, logvar) and Σ kl_dims = kl.
  features: the pooled encoder states `[B, L·D]`.
  The training logs' active units come from the variance of `mean`, which here also carries
  the noise of the sampled z_{<l}; evaluation counts them from E_q[u|x] and from the chain of
  posterior means (`layer_means`).
  """
  kl_layers: jax.Array | None = None


@flax.struct.dataclass
class Chain:
  """One pass through the latent chain, per layer `[..., L, d]`."""
  z: jax.Array
  prior_mean: jax.Array
  prior_logvar: jax.Array
  post_mean: jax.Array | None
  post_logvar: jax.Array | None

  def whitened(self) -> jax.Array:
    return (self.z - self.prior_mean) * jnp.exp(-0.5 * self.prior_logvar)


def _flat(x: jax.Array) -> jax.Array:
  return x.reshape(*x.shape[:-2], -1)


class AttentionPool(nn.Module):
  """r = Σ_t softmax_t(gelu(w · h_t)) h_t over the real positions (DELLA's pooling)."""
  init_std: float = 0.02

  @nn.compact
  def __call__(self, states: jax.Array, mask: jax.Array) -> jax.Array:
    w = self.param("w", nn.initializers.normal(self.init_std), (states.shape[-1],))
    scores = nn.gelu(states @ w, approximate=True)
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    return jnp.einsum("bt,btd->bd", jax.nn.softmax(scores, axis=-1), states)


class ChainPosterior(posteriors.Posterior):
  """DELLA's q(u|x) in prior coordinates: the layer-wise chain of Gaussians q(z_l|z_{<l}, x),
  whitened by the chained prior p(z_l|z_{<l}) (no closed form: Monte Carlo KL, densities by
  running the chain). `model` is the bound `Della` whose heads define the chain."""

  def __init__(self, params: PosteriorParams, prior: Prior, model: "Della"):
    super().__init__(params, prior)
    self.model = model

  def sample(self, rng, num_samples):
    return self.model.sample_chain(self.params, rng, num_samples)

  def log_prob(self, u):
    return self.model.chain_log_prob(u, self.params)

  def point(self):
    return self.model.chain_of_means(self.params)


CHAIN = posteriors.Family(
    ChainPosterior, kl_label="KL of u_d's Gaussian along the chain of means\n(not the exact KL)")


class Della(nn.Module):
  config: DellaConfig

  @property
  def input_keys(self) -> tuple[str, ...]:
    return ("tokens", "condition") if self.config.conditional else ("tokens",)

  def setup(self):
    c = self.config
    t = c.transformer_config()
    self.transformer = Transformer(t)
    n, d = c.num_latents, c.latent_dim
    dense = lambda k, name: nn.Dense(k, kernel_init=nn.initializers.normal(t.initializer_range),
                                     name=name)
    self.pool = [AttentionPool(t.initializer_range, name=f"pool_{l}") for l in range(n)]
    self.cond_pool = ([AttentionPool(t.initializer_range, name=f"cond_pool_{l}")
                       for l in range(n)] if c.conditional else [])
    self.w_ih = [dense(d, f"w_ih_{l}") for l in range(n)]
    self.w_hh = [dense(d, f"w_hh_{l}") for l in range(n)]
    self.prior_heads = [dense(2 * d, f"prior_{l}") for l in range(n)]
    self.post_heads = [dense(2 * d, f"posterior_{l}") for l in range(n)]
    if c.injection == "embedding" or c.injection == "softmax":
      self.inject = dense(t.model_dim, "inject")
    elif c.injection == "memory":
      self.inject = dense(t.num_layers * t.model_dim, "inject")

  # -- the encoder -----------------------------------------------------------------------------

  def _pooled(self, tokens: jax.Array, pools, deterministic: bool) -> jax.Array:
    """`[B, n, D]` pooled encoder states: every layer (layer-wise) or the last one."""
    mask = tokens != PAD
    layers = self.transformer(tokens, padding_mask=mask, causal=False,
                              deterministic=deterministic).layers
    if not self.config.layer_wise:
      layers = layers[-1:]
    return jnp.stack([pool(h, mask) for pool, h in zip(pools, layers)], axis=1)

  def encoder_features(self, tokens: jax.Array, condition: jax.Array | None = None,
                       deterministic: bool = True) -> jax.Array:
    """`[B, n·D]` (or `[B, 2·n·D]` with the condition's) pooled states: the posterior's input."""
    r = self._pooled(tokens, self.pool, deterministic)
    if self.config.conditional:
      r = jnp.concatenate([r, self._pooled(condition, self.cond_pool, deterministic)], axis=-1)
    return _flat(r)

  def _split(self, features: jax.Array):
    """(r `[.., n, D]`, c `[.., n, D]` or None) from `encoder_features`."""
    n = self.config.num_latents
    f = features.reshape(*features.shape[:-1], n, -1)
    if self.config.conditional:
      half = f.shape[-1] // 2
      return f[..., :half], f[..., half:]
    return f, None

  def _gaussian(self, head, x):
    c = self.config.clamp
    mean, logvar = jnp.split(head(x), 2, axis=-1)
    return jnp.clip(mean, -c, c), jnp.clip(logvar, -c, c)

  def _chain(self, batch_shape, features: jax.Array | None, pick) -> Chain:
    """Runs the chain over the n latents; `pick(l, prior, post) -> z_l` chooses each z_l
    from the layer's prior (μ, log σ²) and posterior (None without `features`)."""
    c = self.config
    r, cond = (None, None) if features is None else self._split(features)
    d = c.latent_dim
    s = z = jnp.zeros((*batch_shape, d))
    zs, priors, posts = [], [], []
    for l in range(c.num_latents):
      if c.prior == "chain":
        s = jnp.tanh(self.w_hh[l](s) + self.w_ih[l](z))
      extra = [] if cond is None else [jnp.broadcast_to(cond[..., l, :],
                                                        (*batch_shape, cond.shape[-1]))]
      if c.prior == "standard":
        prior = (jnp.zeros_like(s), jnp.zeros_like(s))
      else:
        prior = self._gaussian(self.prior_heads[l], jnp.concatenate([s, *extra], axis=-1))
      post = None
      if r is not None:
        r_l = jnp.broadcast_to(r[..., l, :], (*batch_shape, r.shape[-1]))
        post = self._gaussian(self.post_heads[l], jnp.concatenate([r_l, s, *extra], axis=-1))
      z = pick(l, prior, post)
      zs.append(z)
      priors.append(prior)
      posts.append(post)
    stack = lambda xs: jnp.stack(xs, axis=-2)
    return Chain(z=stack(zs), prior_mean=stack([p[0] for p in priors]),
                 prior_logvar=stack([p[1] for p in priors]),
                 post_mean=None if r is None else stack([p[0] for p in posts]),
                 post_logvar=None if r is None else stack([p[1] for p in posts]))

  def _unflat(self, u: jax.Array) -> jax.Array:
    return u.reshape(*u.shape[:-1], self.config.num_latents, self.config.latent_dim)

  def encode(self, tokens: jax.Array, condition: jax.Array | None = None,
             deterministic: bool = True,
             features: jax.Array | None = None) -> PosteriorParams:
    """The posterior of a sentence: `context` holds the pooled states that define it; `mean`,
    `logvar` are u's Gaussian along the chain of posterior means (z_{<l} = μ_q)."""
    if features is None:
      features = self.encoder_features(tokens, condition, deterministic)
    chain = self._chain(features.shape[:-1], features, lambda l, prior, post: post[0])
    mean = (chain.post_mean - chain.prior_mean) * jnp.exp(-0.5 * chain.prior_logvar)
    return PosteriorParams(_flat(mean), _flat(chain.post_logvar - chain.prior_logvar), features)

  # -- the latent-model protocol (vae_jax.posteriors): codes u in prior coordinates -----------

  posterior_family = property(lambda self: CHAIN)
  code_dim = property(lambda self: self.config.code_dim)

  def posterior(self, params: PosteriorParams) -> "ChainPosterior":
    return ChainPosterior(params, Prior(), self)

  def prior(self, params: PosteriorParams | None = None) -> Prior:
    """N(0, I) over u; the decoder maps u to z through the prior chain itself."""
    return Prior()

  def decoder_input(self, u: jax.Array, params: PosteriorParams | None = None) -> jax.Array:
    return u

  auxiliary_nlls = posteriors.LatentModel.auxiliary_nlls

  def sample_chain(self, post: PosteriorParams, rng: jax.Array,
                   num_samples: int) -> tuple[jax.Array, jax.Array]:
    """(u `[n, B, L·d]`, log q(u|x) `[n, B]`): ancestral samples of the posterior chain,
    whitened; log q(u|x) = Σ_l log q(z_l|z_{<l},x) + ½ Σ log σ_p²."""
    features = post.context
    shape = (num_samples, *features.shape[:-1])
    eps = jax.random.normal(rng, (*shape, self.config.num_latents, self.config.latent_dim))
    chain = self._chain(shape, features,
                        lambda l, prior, q: q[0] + jnp.exp(0.5 * q[1]) * eps[..., l, :])
    return self._densities(chain)

  def _densities(self, chain: Chain):
    log_q = objectives.gaussian_log_prob(_flat(chain.z), _flat(chain.post_mean),
                                         _flat(chain.post_logvar))
    return _flat(chain.whitened()), log_q + 0.5 * jnp.sum(_flat(chain.prior_logvar), axis=-1)

  def chain_log_prob(self, u: jax.Array, post: PosteriorParams) -> jax.Array:
    """log q(u|x) of codes `u [..., L·d]` (batch shape broadcast against `post`): the chain
    is run with z_l = μ_p + σ_p u_l, teacher-forced from u."""
    shape = jnp.broadcast_shapes(u.shape[:-1], post.context.shape[:-1])
    uu = jnp.broadcast_to(self._unflat(u), (*shape, *self._unflat(u).shape[-2:]))
    chain = self._chain(shape, post.context,
                        lambda l, p, q: p[0] + jnp.exp(0.5 * p[1]) * uu[..., l, :])
    return self._densities(chain)[1]

  def chain_of_means(self, post: PosteriorParams) -> jax.Array:
    """The whitened chain of posterior means (z_l = μ_q for every l)."""
    chain = self._chain(post.context.shape[:-1], post.context, lambda l, p, q: q[0])
    return _flat(chain.whitened())

  def layer_means(self, tokens: jax.Array) -> jax.Array:
    """`[B, L, d]` the z-space posterior means along the chain of means: what the paper counts
    active units on (per layer)."""
    post = self.encode(tokens)
    return self._chain(post.context.shape[:-1], post.context, lambda l, p, q: q[0]).post_mean

  def posterior_chain(self, features: jax.Array, eps: jax.Array) -> Chain:
    """The posterior chain drawn with standard normal noise `eps [..., n, d]` (its leading axes
    broadcast against the batch of `features`, the pooled states of `encoder_features`):

      z_l = μ_q(z_{<l}, x) + σ_q(z_{<l}, x) ε_l,   l = 1 … n,

    ancestrally, as training and `sample_chain` draw it (the official code's `post_dist.sample()`
    in every encoder pass). The official estimators of `vae_jax.della_metrics` read it."""
    return self._chain(eps.shape[:-2], features,
                       lambda l, prior, q: q[0] + jnp.exp(0.5 * q[1]) * eps[..., l, :])

  def layer_log_probs(self, features: jax.Array,
                      eps: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(z `[..., n, d]`, log p(z_l|z_{<l}) `[..., n]`, log q(z_l|z_{<l}, x) `[..., n]`) of the
    posterior chain drawn with `eps` (`posterior_chain`): each layer's Gaussian log-densities
    in z space, clamped parameters as everywhere. Their sums over l are the joint log p(z) and
    log q(z|x); the official IW estimate averages them over l instead
    (`vae_jax.della_metrics.paper_log_weights_fn`). With the same `eps` the codes are those of
    `sample_chain`, whose log q(u|x) and log p(u) differ from these sums by the same whitening
    Jacobian ½ Σ log σ_p², so log p − log q is the same in u and z."""
    chain = self.posterior_chain(features, eps)
    log_p = objectives.gaussian_log_prob(chain.z, chain.prior_mean, chain.prior_logvar)
    log_q = objectives.gaussian_log_prob(chain.z, chain.post_mean, chain.post_logvar)
    return chain.z, log_p, log_q

  def latents(self, u: jax.Array) -> jax.Array:
    """z `[..., L, d]` from codes u `[..., L·d]` (the prior chain, unconditional models)."""
    if self.config.conditional:
      raise ValueError("the conditional model's prior depends on the condition: decode its "
                       "latents with `decode_latents`")
    uu = self._unflat(u)
    return self._chain(u.shape[:-1], None,
                       lambda l, p, q: p[0] + jnp.exp(0.5 * p[1]) * uu[..., l, :]).z

  # -- the decoder -----------------------------------------------------------------------------

  def _injection(self, z: jax.Array) -> dict:
    """The Transformer's per-call arguments carrying z `[B, n, d]`."""
    c, t = self.config, self.config.transformer
    if c.injection == "fusion":
      return {"latents": z if c.layer_wise else jnp.repeat(z, t.num_layers, axis=-2)}
    v = self.inject(z[..., 0, :])
    if c.injection == "embedding":
      return {"embedding_offset": v}
    if c.injection == "memory":
      return {"memory": v.reshape(*v.shape[:-1], t.num_layers, 1, t.model_dim)}
    return {}

  def _logits(self, hidden: jax.Array, z: jax.Array) -> jax.Array:
    if self.config.injection == "softmax":
      hidden = hidden + self.inject(z[..., 0, :])[..., None, :]
    return self.transformer.logits(hidden)

  def decode_latents(self, tokens: jax.Array, z: jax.Array,
                     deterministic: bool = True) -> jax.Array:
    """log p(x|z) `[B]` for z `[B, n, d]` (teacher forcing, summed over tokens with EOS)."""
    mask = token_mask(tokens)
    out = self.transformer(shift_right(tokens), causal=True, deterministic=deterministic,
                           **self._injection(z))
    return -objectives.token_nll(self._logits(out.hidden, z), tokens, mask)

  def log_likelihood(self, tokens: jax.Array, u: jax.Array,
                     deterministic: bool = True) -> jax.Array:
    """log p(x|u) `[B]` for codes in prior coordinates (unconditional models)."""
    return self.decode_latents(tokens, self.latents(u), deterministic)

  def __call__(self, tokens: jax.Array, condition: jax.Array | None = None,
               deterministic: bool = False) -> DellaTerms:
    c = self.config
    if c.conditional and condition is None:
      raise ValueError("the conditional model needs the `condition` tokens")
    features = self.encoder_features(tokens, condition, deterministic)
    eps = jax.random.normal(self.make_rng("latent"),
                            (*features.shape[:-1], c.num_latents, c.latent_dim))
    chain = self._chain(features.shape[:-1], features,
                        lambda l, prior, q: q[0] + jnp.exp(0.5 * q[1]) * eps[..., l, :])
    mean = (chain.post_mean - chain.prior_mean) * jnp.exp(-0.5 * chain.prior_logvar)
    logvar = chain.post_logvar - chain.prior_logvar
    kl_dims = objectives.gaussian_kl(mean, logvar)
    rec_nll = -self.decode_latents(tokens, chain.z, deterministic)
    kl_layers = jnp.sum(kl_dims, axis=-1)
    return DellaTerms(rec_nll=rec_nll, kl=jnp.sum(kl_layers, axis=-1), kl_dims=_flat(kl_dims),
                      kl_layers=kl_layers, n_tokens=jnp.sum(token_mask(tokens), axis=-1),
                      z=_flat(chain.whitened()), mean=_flat(mean), logvar=_flat(logvar),
                      smoothness=jnp.zeros_like(rec_nll), features=features)

  # Decoding interface (vae_jax.nn.decoding): the cache plus the code, stepped with u.
  def initial_state(self, u: jax.Array) -> dict:
    return self.transformer.init_cache(u.shape[0], self.config.transformer.max_length)

  def decode_step(self, state: dict, token: jax.Array, u: jax.Array) -> tuple[dict, jax.Array]:
    z = self.latents(u)
    state, hidden = self.transformer.decode_step(state, token, **self._injection(z))
    return state, self._logits(hidden[:, None], z)[:, 0]
