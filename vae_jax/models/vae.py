"""The LSTM sequence VAE (METHODS.md §0) and the LSTM language model (the same decoder, no z).

Models return per-example *terms* (`VAETerms`, `LMTerms`); `vae_jax.losses` weights and
reduces them. Randomness: the 'latent' rng stream samples z, 'dropout' drives dropout and word
dropout.
"""

from __future__ import annotations

import dataclasses

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vae_jax import objectives
from vae_jax.data.vocab import PAD
from vae_jax.nn.decoders import LSTMDecoder, State
from vae_jax.nn.encoders import GaussianHead, LSTMEncoder, Pooling


@dataclasses.dataclass(frozen=True)
class VAEConfig:
  """Sizes and switches of the LSTM VAE. Defaults are the PTB reference (METHODS.md §0)."""
  vocab_size: int
  embed_dim: int = 256
  hidden_dim: int = 256
  encoder_hidden_dim: int | None = None  # None: same as hidden_dim
  latent_dim: int = 32
  pooling: Pooling = "last"
  dropout_in: float = 0.0
  dropout_out: float = 0.0
  word_dropout: float = 0.0
  share_embedding: bool = False

  def __post_init__(self):
    if self.vocab_size <= 4:
      raise ValueError(f"vocab_size must exceed the 4 special tokens, got {self.vocab_size}")
    if self.latent_dim < 0:
      raise ValueError(f"latent_dim must be >= 0 (0 = language model), got {self.latent_dim}")
    for name in ("dropout_in", "dropout_out", "word_dropout"):
      rate = getattr(self, name)
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {rate}")


@flax.struct.dataclass
class VAETerms:
  """Per-example terms of one VAE pass (all `[B]` unless noted).

  rec_nll: -log p(x|z) summed over tokens, for one sample z ~ q(z|x).
  kl: KL(q(z|x) || p(z)).
  kl_dims: `[B, d]` per-dimension KL (analytic).
  n_tokens: number of real tokens (EOS included).
  z, mean, logvar: `[B, d]` the sample and the posterior parameters.
  """
  rec_nll: jax.Array
  kl: jax.Array
  kl_dims: jax.Array
  n_tokens: jax.Array
  z: jax.Array
  mean: jax.Array
  logvar: jax.Array


@flax.struct.dataclass
class LMTerms:
  """Per-example terms of the language model: exact -log p(x) and token counts."""
  rec_nll: jax.Array
  n_tokens: jax.Array


def token_mask(tokens: jax.Array) -> jax.Array:
  return (tokens != PAD).astype(jnp.float32)


class SeqVAE(nn.Module):
  """LSTM encoder -> Gaussian q(z|x) -> LSTM decoder p(x|z), prior N(0, I)."""
  config: VAEConfig

  def setup(self):
    c = self.config
    self.encoder_embed = nn.Embed(c.vocab_size, c.embed_dim, name="encoder_embed")
    self.decoder_embed = (self.encoder_embed if c.share_embedding else
                          nn.Embed(c.vocab_size, c.embed_dim, name="decoder_embed"))
    self.encoder = LSTMEncoder(self.encoder_embed, c.encoder_hidden_dim or c.hidden_dim,
                               pooling=c.pooling)
    self.head = GaussianHead(c.latent_dim)
    self.decoder = LSTMDecoder(self.decoder_embed, c.vocab_size, c.hidden_dim, c.latent_dim,
                               dropout_in=c.dropout_in, dropout_out=c.dropout_out,
                               word_dropout=c.word_dropout)

  def encode(self, tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Posterior parameters (mean, logvar), each `[B, d]`."""
    return self.head(self.encoder(tokens, token_mask(tokens)))

  def log_likelihood(self, tokens: jax.Array, z: jax.Array,
                     deterministic: bool = True) -> jax.Array:
    """log p(x|z) `[B]` (summed over tokens, EOS included)."""
    mask = token_mask(tokens)
    logits = self.decoder(tokens, mask, z, deterministic=deterministic)
    return -objectives.token_nll(logits, tokens, mask)

  def __call__(self, tokens: jax.Array, deterministic: bool = False) -> VAETerms:
    mean, logvar = self.encode(tokens)
    z = objectives.reparameterize(self.make_rng("latent"), mean, logvar)
    rec_nll = -self.log_likelihood(tokens, z, deterministic=deterministic)
    kl_dims = objectives.gaussian_kl(mean, logvar)
    return VAETerms(rec_nll=rec_nll, kl=jnp.sum(kl_dims, axis=-1), kl_dims=kl_dims,
                    n_tokens=jnp.sum(token_mask(tokens), axis=-1), z=z, mean=mean,
                    logvar=logvar)

  # Decoding interface (see vae_jax.nn.decoding): pure step functions over these methods.
  def initial_state(self, z: jax.Array) -> State:
    return self.decoder.initial_state(z, z.shape[0])

  def decode_step(self, state: State, token: jax.Array,
                  z: jax.Array) -> tuple[State, jax.Array]:
    return self.decoder.step(state, token, z)


class LSTMLanguageModel(nn.Module):
  """The VAE's decoder without z: the reference NLL every VAE must match or beat."""
  config: VAEConfig  # latent_dim and encoder fields are ignored

  def setup(self):
    c = self.config
    self.decoder = LSTMDecoder(nn.Embed(c.vocab_size, c.embed_dim, name="embed"),
                               c.vocab_size, c.hidden_dim, latent_dim=0,
                               dropout_in=c.dropout_in, dropout_out=c.dropout_out,
                               word_dropout=c.word_dropout)

  def __call__(self, tokens: jax.Array, deterministic: bool = False) -> LMTerms:
    mask = token_mask(tokens)
    logits = self.decoder(tokens, mask, None, deterministic=deterministic)
    return LMTerms(rec_nll=objectives.token_nll(logits, tokens, mask),
                   n_tokens=jnp.sum(mask, axis=-1))

  def initial_state(self, batch_size: int) -> State:
    return self.decoder.initial_state(None, batch_size)

  def decode_step(self, state: State, token: jax.Array,
                  z: jax.Array | None = None) -> tuple[State, jax.Array]:
    return self.decoder.step(state, token, None)
