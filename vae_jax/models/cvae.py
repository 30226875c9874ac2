"""The conditional variational recurrent autoencoder for dialogue (METHODS.md §3; Zhao et al. 2017,
"Learning discourse-level diversity for neural dialog models using conditional variational
autoencoders"), with the flow posteriors of the flow-based VRAE.

Given a context c (the previous turns) and a response x, the model is

    context encoder:   u_j = [LSTM_utt(turn_j); onehot(speaker_j)],  c = LSTM_ctx(u_1..u_W)[-1]
    prior network:     p(z|c)   = N(μ_p(c), σ_p²(c)),  μ_p, log σ_p² = Linear(tanh(Linear(c)))
    recognition:       q(z|x,c) = N(μ_q, σ_q²) from [LSTM_resp(x); c]   ('gaussian'),
                       or z_K = f_{x,c}(z_0) with an amortised flow      ('flow'),
                       or z = f(z_0), one global bijection on both sides  ('kl_preserving')
    decoder:           p(x|c,z) = LSTM decoder conditioned on [c; z] (initial state and every step)
    bag of words:      p_bow(w|c,z) = softmax(Linear(tanh(Linear([c; z])))), scoring the response's
                       tokens without order (Zhao et al.'s auxiliary loss)

and the ELBO of log p(x|c) is  E_q[log p(x|c,z)] - KL(q(z|x,c) || p(z|c)).  With
`latent_dim = 0` it is the seq2seq baseline: a hierarchical encoder-decoder, exact log p(x|c).

**The code in prior coordinates.** The learned prior differs per context, so the quantities
that measure how much the code says about the response beyond the context are computed for
the whitened code  u = (z - μ_p(c)) / σ_p(c),  whose prior is N(0, I) for every c: the
Gaussian posterior of u is N((μ_q - μ_p)/σ_p, σ_q²/σ_p²), and KL(q(z|x,c) || p(z|c)) equals
KL(q(u|x,c) || N(0, I)) exactly (the KL is invariant under the shared affine map). `CVAETerms`
reports `mean` and `logvar` in these coordinates, so the free bits, the density gap, the mutual
information and the active units of the rest of the library apply unchanged and all read zero
when the posterior collapses onto the conditional prior (while raw posterior means would still
vary with c).

Randomness: 'latent' samples z, 'dropout' drives dropout and word dropout.
"""

from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vae_jax import metrics, objectives
from vae_jax.data.vocab import PAD
from vae_jax.models.vae import PosteriorParams, Posterior, token_mask
from vae_jax.nn.decoders import LSTMDecoder, State
from vae_jax.nn.encoders import GaussianHead, LSTMEncoder, Pooling
from vae_jax.nn.flows import Flow, FlowConfig
from vae_jax.nn.lstm import LSTM

NUM_SPEAKERS = 2  # the responder, and the other speaker


@dataclasses.dataclass(frozen=True)
class CVAEConfig:
  """Sizes and switches of the conditional VRAE.

  latent_dim: size of z; 0 gives the seq2seq baseline (no z, no KL).
  utterance_dim, context_dim, response_dim: the utterance encoder, the context RNN and the
    response encoder of the recognition network (their LSTM sizes).
  hidden_dim: the decoder LSTM; prior_hidden_dim: the prior network's hidden layer.
  bow_hidden_dim: the bag-of-words head's hidden layer; 0: no head (`bow_nll` is None).
  posterior, flow, kl_samples: as in `VAEConfig` (METHODS.md §3), against the learned prior.
  pooling: how the utterance and response encoders summarise their states.
  share_embedding: one embedding for the encoders and the decoder (Zhao et al. share it).
  """
  vocab_size: int
  embed_dim: int = 200
  utterance_dim: int = 300
  context_dim: int = 600
  response_dim: int = 300
  hidden_dim: int = 400
  latent_dim: int = 64
  prior_hidden_dim: int = 200
  bow_hidden_dim: int = 0
  pooling: Pooling = "last"
  dropout_in: float = 0.0
  dropout_out: float = 0.0
  word_dropout: float = 0.0
  share_embedding: bool = True
  posterior: Posterior = "gaussian"
  flow: FlowConfig | None = None
  kl_samples: int = 1

  def __post_init__(self):
    if self.vocab_size <= 4:
      raise ValueError(f"vocab_size must exceed the 4 special tokens, got {self.vocab_size}")
    if self.latent_dim < 0:
      raise ValueError(f"latent_dim must be >= 0 (0 = seq2seq), got {self.latent_dim}")
    for name in ("dropout_in", "dropout_out", "word_dropout"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")
    if self.posterior not in ("gaussian", "flow", "kl_preserving"):
      raise ValueError(f"unknown posterior {self.posterior!r}; use 'gaussian', 'flow' or "
                       "'kl_preserving'")
    if self.posterior != "gaussian" and self.flow is None:
      raise ValueError(f"posterior {self.posterior!r} needs a flow (model.flow.kind)")
    if self.posterior == "kl_preserving" and self.flow.amortized:
      raise ValueError("the KL-preserving mode applies one bijection to prior and posterior, "
                       "so its flow cannot depend on (x, c): set flow.amortized=False")
    if self.kl_samples < 1:
      raise ValueError(f"kl_samples must be >= 1, got {self.kl_samples}")


@flax.struct.dataclass
class ConditionalPrior:
  """p(z|c) = N(mean, exp(logvar)) per context (`[B, d]` each)."""
  mean: jax.Array
  logvar: jax.Array

  def whiten(self, z: jax.Array) -> jax.Array:
    """u = (z - μ_p) / σ_p: codes in the coordinates where the prior is N(0, I)."""
    return (z - self.mean) * jnp.exp(-0.5 * self.logvar)

  def log_prob(self, z: jax.Array) -> jax.Array:
    return objectives.gaussian_log_prob(z, self.mean, self.logvar)

  def sample(self, eps: jax.Array) -> jax.Array:
    return self.mean + jnp.exp(0.5 * self.logvar) * eps


@flax.struct.dataclass
class CVAETerms:
  """Per-example terms of one CVAE pass (all `[B]` unless noted); the fields of
  `vae_jax.models.vae.VAETerms`, read by the same losses, plus the bag-of-words NLL.

  rec_nll: -log p(x|c,z), z ~ q(z|x,c) (exact -log p(x|c) for the seq2seq baseline).
  kl: KL(q(z|x,c) || p(z|c)) (analytic, or Monte Carlo for a flow posterior).
  kl_dims: `[B, d]` its per-dimension form for a Gaussian base, None for a flow posterior.
  z: `[B, d]` the code fed to the decoder.
  mean, logvar: `[B, d]` the (base) posterior in prior coordinates (module docstring).
  smoothness: zeros (no amortised regulariser here).
  features: `[B, F]` the response encoder's feature (the dispersion diagnostic).
  bow_nll: -sum_t log p_bow(x_t|c,z) over the response's tokens, or None without the head.
  """
  rec_nll: jax.Array
  kl: jax.Array
  kl_dims: jax.Array | None
  n_tokens: jax.Array
  z: jax.Array
  mean: jax.Array
  logvar: jax.Array
  smoothness: jax.Array
  features: jax.Array
  bow_nll: jax.Array | None = None


def turn_mask(context: jax.Array) -> jax.Array:
  """`[B, W]` 1 for the context slots that hold a turn (empty slots are all PAD)."""
  return jnp.any(context != PAD, axis=-1).astype(jnp.float32)


class ContextEncoder(nn.Module):
  """The hierarchical context encoder: every turn is summarised by the utterance LSTM and
  tagged with its speaker; a context LSTM reads the turns in order (empty slots, at the end,
  are masked) and its last state is the context vector c."""
  embed: nn.Module
  utterance_dim: int
  context_dim: int
  pooling: Pooling = "last"

  @nn.compact
  def __call__(self, context: jax.Array, speakers: jax.Array) -> jax.Array:
    b, w, length = context.shape
    turns = context.reshape(b * w, length)
    utt = LSTMEncoder(self.embed, self.utterance_dim, pooling=self.pooling,
                      name="utterance")(turns, token_mask(turns)).reshape(b, w, -1)
    who = jax.nn.one_hot(speakers, NUM_SPEAKERS, dtype=utt.dtype)
    _, (_, c) = LSTM(self.context_dim, name="context")(jnp.concatenate([utt, who], -1),
                                                       turn_mask(context))
    return c


class CVAE(nn.Module):
  """Context encoder -> p(z|c); response encoder + c -> q(z|x,c) (Gaussian or flow);
  decoder and bag-of-words head conditioned on [c; z]. See the module docstring."""
  config: CVAEConfig

  # The batch entries the model reads, in the order of `__call__`'s arguments.
  input_keys = ("tokens", "context", "context_speakers")

  def setup(self):
    c = self.config
    self.embed = nn.Embed(c.vocab_size, c.embed_dim, name="embed")
    decoder_embed = (self.embed if c.share_embedding else
                     nn.Embed(c.vocab_size, c.embed_dim, name="decoder_embed"))
    self.context_encoder = ContextEncoder(self.embed, c.utterance_dim, c.context_dim,
                                          pooling=c.pooling)
    self.decoder = LSTMDecoder(decoder_embed, c.vocab_size, c.hidden_dim,
                               c.context_dim + c.latent_dim, dropout_in=c.dropout_in,
                               dropout_out=c.dropout_out, word_dropout=c.word_dropout)
    if c.latent_dim:
      self.response_encoder = LSTMEncoder(self.embed, c.response_dim, pooling=c.pooling)
      self.prior_hidden = nn.Dense(c.prior_hidden_dim, name="prior_hidden")
      self.prior_head = GaussianHead(c.latent_dim, name="prior_head")
      self.posterior_head = GaussianHead(c.latent_dim, name="posterior_head")
      if c.posterior != "gaussian":
        self.flow = Flow(c.flow, c.latent_dim)
        if c.flow.amortized:
          self.flow_context = nn.Dense(c.flow.context_dim, name="flow_context")
    if c.bow_hidden_dim:
      self.bow_hidden = nn.Dense(c.bow_hidden_dim, name="bow_hidden")
      self.bow_output = nn.Dense(c.vocab_size, name="bow_output")

  # -- context and prior -------------------------------------------------------------------------

  def encode_context(self, context: jax.Array, speakers: jax.Array) -> jax.Array:
    """`[B, context_dim]` the context vector c."""
    return self.context_encoder(context, speakers)

  def prior(self, c: jax.Array) -> ConditionalPrior:
    mean, logvar = self.prior_head(jnp.tanh(self.prior_hidden(c)))
    return ConditionalPrior(mean, logvar)

  def prior_code(self, prior: ConditionalPrior, eps: jax.Array) -> jax.Array:
    """Decoder-space samples of p(z|c) from ε ~ N(0, I) (`[..., B, d]`): μ_p + σ_p ε, or its
    image under the global bijection in the KL-preserving mode."""
    z = prior.sample(eps)
    if self.config.posterior == "kl_preserving":
      return self.flow(None).forward(z)
    return z

  # -- the posterior -----------------------------------------------------------------------------

  def response_features(self, tokens: jax.Array) -> jax.Array:
    return self.response_encoder(tokens, token_mask(tokens))

  def encode(self, tokens: jax.Array, c: jax.Array,
             features: jax.Array | None = None) -> PosteriorParams:
    """q(z|x,c): the base Gaussian (`[B, d]`) and, for an amortised flow, its context."""
    if features is None:
      features = self.response_features(tokens)
    h = jnp.concatenate([features, c], axis=-1)
    mean, logvar = self.posterior_head(h)
    context = None
    if self.config.posterior != "gaussian" and self.config.flow.amortized:
      context = jnp.tanh(self.flow_context(h))
    return PosteriorParams(mean, logvar, context)

  def sample_codes(self, post: PosteriorParams, prior: ConditionalPrior, rng: jax.Array,
                   num_samples: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`num_samples` codes per example: (z `[n, B, d]` for the decoder, log q, log p `[n, B]`)
    such that log p(x|c,z) + log p - log q is an importance weight of log p(x|c). In the
    KL-preserving mode both densities are those of z_0 (prior and posterior share f)."""
    z0 = objectives.reparameterize(rng, post.mean, post.logvar, num_samples)
    log_q0 = objectives.gaussian_log_prob(z0, post.mean, post.logvar)
    mode = self.config.posterior
    if mode == "gaussian":
      return z0, log_q0, prior.log_prob(z0)
    z, log_det = self.flow(post.context).forward_and_log_det(z0)
    if mode == "flow":
      return z, log_q0 - log_det, prior.log_prob(z)
    return z, log_q0, prior.log_prob(z0)

  def posterior_log_prob(self, z: jax.Array, post: PosteriorParams) -> jax.Array:
    """log q(z|x,c) of decoder-space codes (batch shape broadcast against `post`); in the
    KL-preserving mode, of base codes z_0."""
    if self.config.posterior != "flow":
      return objectives.gaussian_log_prob(z, post.mean, post.logvar)
    z = jnp.broadcast_to(z, jnp.broadcast_shapes(z.shape, post.mean.shape))
    z0, inverse_log_det = self.flow(post.context).inverse_and_log_det(z)
    return objectives.gaussian_log_prob(z0, post.mean, post.logvar) + inverse_log_det

  def point_code(self, post: PosteriorParams) -> jax.Array:
    if self.config.posterior == "gaussian":
      return post.mean
    return self.flow(post.context).forward(post.mean)

  # -- the decoder -------------------------------------------------------------------------------

  def condition(self, c: jax.Array, z: jax.Array | None) -> jax.Array:
    """The decoder's conditioning vector [c; z] (c alone for the seq2seq baseline)."""
    return c if z is None or not self.config.latent_dim else jnp.concatenate([c, z], -1)

  def log_likelihood(self, tokens: jax.Array, cond: jax.Array,
                     deterministic: bool = True) -> jax.Array:
    """log p(x|c,z) `[B]` for the conditioning vector `cond` = `condition(c, z)`."""
    return -self.decoder.nll(tokens, token_mask(tokens), cond, deterministic=deterministic)

  def bow_log_likelihood(self, tokens: jax.Array, cond: jax.Array) -> jax.Array:
    """sum_t log p_bow(x_t|c,z) over the real tokens (EOS included, as Zhao et al.)."""
    logits = self.bow_output(jnp.tanh(self.bow_hidden(cond)))
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.take_along_axis(log_p, tokens, axis=-1) * token_mask(tokens), axis=-1)

  def __call__(self, tokens: jax.Array, context: jax.Array, speakers: jax.Array,
               deterministic: bool = False) -> CVAETerms:
    cfg = self.config
    c = self.encode_context(context, speakers)
    n_tokens = jnp.sum(token_mask(tokens), axis=-1)
    batch = tokens.shape[0]
    if not cfg.latent_dim:
      zeros = jnp.zeros((batch, 0), jnp.float32)
      rec_nll = -self.log_likelihood(tokens, c, deterministic)
      bow = None if not cfg.bow_hidden_dim else -self.bow_log_likelihood(tokens, c)
      return CVAETerms(rec_nll=rec_nll, kl=jnp.zeros_like(rec_nll), kl_dims=zeros,
                       n_tokens=n_tokens, z=zeros, mean=zeros, logvar=zeros,
                       smoothness=jnp.zeros_like(rec_nll), features=c, bow_nll=bow)
    features = self.response_features(tokens)
    post = self.encode(tokens, c, features)
    prior = self.prior(c)
    z, log_q, log_p = self.sample_codes(post, prior, self.make_rng("latent"), cfg.kl_samples)
    cond = self.condition(c, z[0])
    rec_nll = -self.log_likelihood(tokens, cond, deterministic)
    mean, logvar = prior.whiten(post.mean), post.logvar - prior.logvar
    if cfg.posterior == "flow":
      kl_dims, kl = None, metrics.monte_carlo_kl(log_q, log_p)
    else:
      kl_dims = objectives.gaussian_kl(mean, logvar)
      kl = jnp.sum(kl_dims, axis=-1)
    bow = None if not cfg.bow_hidden_dim else -self.bow_log_likelihood(tokens, cond)
    return CVAETerms(rec_nll=rec_nll, kl=kl, kl_dims=kl_dims, n_tokens=n_tokens, z=z[0],
                     mean=mean, logvar=logvar, smoothness=jnp.zeros_like(kl),
                     features=features, bow_nll=bow)

  # Decoding interface (vae_jax.nn.decoding), over the conditioning vector [c; z].
  def initial_state(self, cond: jax.Array) -> State:
    return self.decoder.initial_state(cond, cond.shape[0])

  def decode_step(self, state: State, token: jax.Array,
                  cond: jax.Array) -> tuple[State, jax.Array]:
    return self.decoder.step(state, token, cond)

