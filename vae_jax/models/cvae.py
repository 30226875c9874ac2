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

from vae_jax import posteriors
from vae_jax.data.vocab import PAD
from vae_jax.models.vae import LatentSettings, VAETerms, token_mask
from vae_jax.posteriors import PosteriorParams
from vae_jax.nn.decoders import LSTMDecoder, State
from vae_jax.nn.encoders import GaussianHead, LSTMEncoder, Pooling
from vae_jax.nn.flows import Flow
from vae_jax.nn.lstm import LSTM

NUM_SPEAKERS = 2  # the responder, and the other speaker


@dataclasses.dataclass(frozen=True)
class CVAEConfig(LatentSettings):
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
  latent_dim: int = 64
  embed_dim: int = 200
  utterance_dim: int = 300
  context_dim: int = 600
  response_dim: int = 300
  hidden_dim: int = 400
  prior_hidden_dim: int = 200
  bow_hidden_dim: int = 0
  share_embedding: bool = True

  def __post_init__(self):
    posteriors.check_latent_config(self, ("dropout_in", "dropout_out", "word_dropout"))


@flax.struct.dataclass
class CVAETerms(VAETerms):
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


class CVAE(posteriors.LatentModel, nn.Module):
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
      if self.posterior_family.needs_flow:
        self.flow = Flow(c.flow, c.latent_dim)
        if c.flow.amortized:
          self.flow_context = nn.Dense(c.flow.context_dim, name="flow_context")
    if c.bow_hidden_dim:
      self.bow_hidden = nn.Dense(c.bow_hidden_dim, name="bow_hidden")
      self.bow_output = nn.Dense(c.vocab_size, name="bow_output")

  # -- the latent-model protocol (vae_jax.posteriors) ---------------------------------------------

  def encode_context(self, context: jax.Array, speakers: jax.Array) -> jax.Array:
    """`[B, context_dim]` the context vector c."""
    return self.context_encoder(context, speakers)

  def response_features(self, tokens: jax.Array) -> jax.Array:
    return self.response_encoder(tokens, token_mask(tokens))

  def encoder_features(self, tokens: jax.Array, context: jax.Array,
                       speakers: jax.Array) -> jax.Array:
    """`[B, F]` the response encoder's feature (the context vector for seq2seq)."""
    if not self.config.latent_dim:
      return self.encode_context(context, speakers)
    return self.response_features(tokens)

  def condition_params(self, context: jax.Array, speakers: jax.Array,
                       c: jax.Array | None = None) -> PosteriorParams:
    """The conditional prior p(z|c) and the condition c of each context, as posterior
    parameters whose q is the prior itself (for decoding from prior codes)."""
    if c is None:
      c = self.encode_context(context, speakers)
    if not self.config.latent_dim:
      zeros = jnp.zeros((c.shape[0], 0), c.dtype)
      return PosteriorParams(zeros, zeros, condition=c)
    mean, logvar = self.prior_head(jnp.tanh(self.prior_hidden(c)))
    return PosteriorParams(mean, logvar, prior_mean=mean, prior_logvar=logvar, condition=c)

  def encode(self, tokens: jax.Array, context: jax.Array, speakers: jax.Array,
             deterministic: bool = True, features: jax.Array | None = None) -> PosteriorParams:
    """q(z|x,c) (the base Gaussian `[B, d]` and, for an amortised flow, its context), with
    the prior p(z|c) and the condition c it is measured against."""
    del deterministic  # no batch statistics here
    if not self.config.latent_dim:  # seq2seq: its feature is the context vector c itself
      return self.condition_params(context, speakers, c=features)
    prior = self.condition_params(context, speakers)
    if features is None:
      features = self.response_features(tokens)
    h = jnp.concatenate([features, prior.condition], axis=-1)
    mean, logvar = self.posterior_head(h)
    context = None
    if self.posterior_family.needs_flow and self.config.flow.amortized:
      context = jnp.tanh(self.flow_context(h))
    return prior.replace(mean=mean, logvar=logvar, context=context)

  # -- the decoder -------------------------------------------------------------------------------

  def log_likelihood(self, tokens: jax.Array, cond: jax.Array,
                     deterministic: bool = True) -> jax.Array:
    """log p(x|c,z) `[B]` for the conditioning vector `cond` = [c; z] (`decoder_input`)."""
    return -self.decoder.nll(tokens, token_mask(tokens), cond, deterministic=deterministic)

  def bow_log_likelihood(self, tokens: jax.Array, cond: jax.Array) -> jax.Array:
    """sum_t log p_bow(x_t|c,z) over the real tokens (EOS included, as Zhao et al.)."""
    logits = self.bow_output(jnp.tanh(self.bow_hidden(cond)))
    log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    return jnp.sum(jnp.take_along_axis(log_p, tokens, axis=-1) * token_mask(tokens), axis=-1)

  def auxiliary_nlls(self, tokens: jax.Array, cond: jax.Array) -> dict[str, jax.Array]:
    """The bag-of-words NLL at the conditioning vector `cond` (evaluation's key 'bow')."""
    if not self.config.bow_hidden_dim:
      return {}
    return {"bow_nll": -self.bow_log_likelihood(tokens, cond)}

  def __call__(self, tokens: jax.Array, context: jax.Array, speakers: jax.Array,
               deterministic: bool = False) -> CVAETerms:
    cfg = self.config
    features = self.encoder_features(tokens, context, speakers)
    params = self.encode(tokens, context, speakers, features=features)
    post = self.posterior(params)
    u, log_q = post.sample(self.make_rng("latent") if cfg.latent_dim else None, cfg.kl_samples)
    cond = post.to_decoder(u[0])
    rec_nll = -self.log_likelihood(tokens, cond, deterministic)
    kl, kl_dims = post.sample_kl(u, log_q)
    mean, logvar = post.whitened_base()
    bow = None if not cfg.bow_hidden_dim else -self.bow_log_likelihood(tokens, cond)
    return CVAETerms(rec_nll=rec_nll, kl=kl, kl_dims=kl_dims,
                     n_tokens=jnp.sum(token_mask(tokens), axis=-1),
                     z=post.prior.to_code(u[0]), mean=mean, logvar=logvar,
                     smoothness=jnp.zeros_like(kl), features=features, bow_nll=bow)

  # Decoding interface (vae_jax.nn.decoding), over the conditioning vector [c; z].
  def initial_state(self, cond: jax.Array) -> State:
    return self.decoder.initial_state(cond, cond.shape[0])

  def decode_step(self, state: State, token: jax.Array,
                  cond: jax.Array) -> tuple[State, jax.Array]:
    return self.decoder.step(state, token, cond)

