"""The LSTM sequence VAE (METHODS.md §0) with its flow-based variants (the variational
recurrent autoencoder with flow posteriors, KL-preserving flows, skip connections and amortised
regularisation, METHODS.md §3), and the LSTM language model (the same decoder, no z).

Models return per-example *terms* (`VAETerms`, `LMTerms`); `vae_jax.losses` weights and
reduces them. Randomness: the 'latent' rng stream samples z, 'dropout' drives dropout and word
dropout.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vae_jax import posteriors
from vae_jax.posteriors import PosteriorParams
from vae_jax.data.vocab import PAD, UNK
from vae_jax.nn.decoders import LSTMDecoder, State
from vae_jax.nn.encoders import GaussianHead, LSTMEncoder, Pooling
from vae_jax.nn.flows import Flow, FlowConfig
from vae_jax.nn.lstm import uniform_init


Init = Literal["default", "uniform"]


@dataclasses.dataclass(frozen=True)
class LatentSettings:
  """The fields the LSTM latent models' configs share: the vocabulary, the code, the
  decoder's input and output dropout and word dropout, and the posterior family (an entry of
  `posteriors.POSTERIORS`) with its flow and the Monte Carlo KL's samples."""
  vocab_size: int
  latent_dim: int = 32
  pooling: Pooling = "last"
  dropout_in: float = 0.0
  dropout_out: float = 0.0
  word_dropout: float = 0.0
  posterior: str = "gaussian"
  flow: FlowConfig | None = None
  kl_samples: int = 1


@dataclasses.dataclass(frozen=True)
class VAEConfig(LatentSettings):
  """Sizes and switches of the LSTM VAE. Defaults are the PTB reference (METHODS.md §0).

  posterior: the code's posterior family (METHODS.md §3):
    'gaussian': q(z|x) = N(μ(x), σ²(x)), analytic KL;
    'flow': z_K = f_x(z_0), z_0 ~ N(μ(x), σ²(x)), f_x the (amortised) `flow`; the KL is the
      Monte Carlo estimate log q(z_K|x) - log p(z_K) over `kl_samples` samples;
    'kl_preserving': one global bijection f applied to prior and posterior alike, so the
      KL(f#q || f#p) = KL(q || p) stays the analytic Gaussian KL while the decoder reads
      z_K = f(z_0) (and prior samples are f(ε), ε ~ N(0, I)).
  flow: the flow of the two flow modes (must not be amortised for 'kl_preserving').
  kl_samples: samples of the Monte Carlo KL ('flow'); the reconstruction uses the first.
  latent_to_output: skip connection, z also feeds the output layer (METHODS.md §3).
  smoothness_dropout: amortised regularisation; when > 0, the model also returns
    ‖μ(x) - μ(x̃)‖² with x̃ a copy of x whose tokens are replaced by UNK at this rate.
  mean_batch_norm: BN-VAE (Zhu et al. 2020): γ > 0 batch-normalises the posterior means with
    the fixed scale γ (see `GaussianHead`); 0 turns it off. Its running statistics live in the
    'batch_stats' collection. `mean_batch_norm_epsilon` is the ε of its normalisation.
  init: the parameters' initialisation.
    'default': each layer's own (LSTM kernels U(-0.1, 0.1) and zero bias, flax's LeCun-normal
      dense kernels and zero biases, embeddings of variance 1/E).
    'uniform': He et al. 2019's (jxhe/vae-lagging-encoder `text.py`, `uniform_initializer`;
      Li et al. 2019 and their LM too): embeddings U(-`embed_init_scale`, `embed_init_scale`),
      every LSTM kernel and every kernel of the posterior heads, z -> c_0, the output layer
      (and the skip connection) U(-`init_scale`, `init_scale`); the LSTM bias the sum of two
      such draws (PyTorch's b_ih + b_hh); dense biases zero (their linear layers have none).
      The flow, its context head and BN-VAE keep their own initialisation (not in the
      reference).
  matmul_dtype: 'float32' (default), or 'bfloat16': the LSTMs' and the output layer's matmuls
    take bfloat16 operands and accumulate in float32 (parameters, states, gates, the softmax
    and the optimiser stay float32); about 1.8x the float32 matmul rate on CPUs with
    AVX512-BF16 and the usual mixed precision on accelerators.
  """
  embed_dim: int = 256
  hidden_dim: int = 256
  encoder_hidden_dim: int | None = None  # None: same as hidden_dim
  share_embedding: bool = False
  latent_to_output: bool = False
  smoothness_dropout: float = 0.0
  mean_batch_norm: float = 0.0
  mean_batch_norm_epsilon: float = 1e-5
  init: Init = "default"
  init_scale: float = 0.01
  embed_init_scale: float = 0.1
  matmul_dtype: str = "float32"

  def __post_init__(self):
    posteriors.check_latent_config(self, ("dropout_in", "dropout_out", "word_dropout",
                                          "smoothness_dropout"))
    if self.mean_batch_norm < 0:
      raise ValueError(f"mean_batch_norm (BN-VAE gamma) must be >= 0, got {self.mean_batch_norm}")
    if self.init not in ("default", "uniform"):
      raise ValueError(f"unknown init {self.init!r}; use 'default' or 'uniform'")
    if self.matmul_dtype not in ("float32", "bfloat16"):
      raise ValueError(f"matmul_dtype must be 'float32' or 'bfloat16', got {self.matmul_dtype!r}")
    if self.init_scale <= 0 or self.embed_init_scale <= 0:
      raise ValueError("init_scale and embed_init_scale must be > 0, got "
                       f"{self.init_scale}, {self.embed_init_scale}")

  @property
  def lstm_matmul_dtype(self):
    """None (float32 matmuls) or jnp.bfloat16, for the LSTMs and the output layer."""
    return None if self.matmul_dtype == "float32" else jnp.dtype(self.matmul_dtype)

  @property
  def weight_init_scale(self) -> float | None:
    """The U(-s, s) scale of the LSTM and dense kernels; None for the layers' defaults."""
    return self.init_scale if self.init == "uniform" else None

  def embed(self, name: str) -> nn.Embed:
    """A token embedding `[vocab_size, embed_dim]` initialised as `init` says."""
    kwargs = {}
    if self.init == "uniform":
      kwargs["embedding_init"] = uniform_init(self.embed_init_scale)
    return nn.Embed(self.vocab_size, self.embed_dim, name=name, **kwargs)


@flax.struct.dataclass
class VAETerms:
  """Per-example terms of one VAE pass (all `[B]` unless noted).

  rec_nll: -log p(x|z) summed over tokens, for one sample z ~ q(z|x).
  kl: KL(q(z|x) || p(z)) (analytic, or the Monte Carlo estimate of a flow posterior).
  kl_dims: `[B, d]` per-dimension analytic KL of a Gaussian base, None for a flow posterior.
  n_tokens: number of real tokens (EOS included).
  z: `[B, d]` the code fed to the decoder.
  mean, logvar: `[B, d]` the base Gaussian's parameters. The training logs count active units
    from the variance of `mean` in every mode (for flows an exact E_q[z_K|x] needs sampling,
    whose noise would inflate that variance; evaluation estimates it without the bias).
  smoothness: ‖μ(x) - μ(x̃)‖² (amortised regularisation), zeros when off or deterministic.
  features: `[B, F]` the encoder feature fed to the posterior heads (h_T or a pooling of all
    states), whose variance across the data is the dispersion diagnostic of Long et al. 2019.
  bow_nll: an auxiliary bag-of-words NLL `[B]` (the dialogue CVAE's), None without one.
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


@flax.struct.dataclass
class LMTerms:
  """Per-example terms of the language model: exact -log p(x) and token counts."""
  rec_nll: jax.Array
  n_tokens: jax.Array


def token_mask(tokens: jax.Array) -> jax.Array:
  return (tokens != PAD).astype(jnp.float32)


def corrupt_tokens(rng: jax.Array, tokens: jax.Array, rate: float) -> jax.Array:
  """x̃: each real token replaced by UNK with probability `rate` (padding kept)."""
  drop = jax.random.bernoulli(rng, rate, tokens.shape) & (tokens != PAD)
  return jnp.where(drop, UNK, tokens)


class SeqVAE(posteriors.LatentModel, nn.Module):
  """LSTM encoder -> q(z|x) (Gaussian, flow, or KL-preserving flow) -> LSTM decoder p(x|z),
  prior N(0, I) (or its image under the global flow in the KL-preserving mode)."""
  config: VAEConfig

  def setup(self):
    c = self.config
    scale = c.weight_init_scale
    self.encoder_embed = c.embed("encoder_embed")
    self.decoder_embed = (self.encoder_embed if c.share_embedding else
                          c.embed("decoder_embed"))
    self.encoder = LSTMEncoder(self.encoder_embed, c.encoder_hidden_dim or c.hidden_dim,
                               pooling=c.pooling, init_scale=scale,
                               matmul_dtype=c.lstm_matmul_dtype)
    self.head = GaussianHead(c.latent_dim, batch_norm_gamma=c.mean_batch_norm,
                             batch_norm_epsilon=c.mean_batch_norm_epsilon, init_scale=scale)
    if c.flow is not None and self.posterior_family.needs_flow:
      self.flow = Flow(c.flow, c.latent_dim)
      if c.flow.amortized:
        self.context_head = nn.Dense(c.flow.context_dim, name="context")
    self.decoder = LSTMDecoder(self.decoder_embed, c.vocab_size, c.hidden_dim, c.latent_dim,
                               dropout_in=c.dropout_in, dropout_out=c.dropout_out,
                               word_dropout=c.word_dropout,
                               latent_to_output=c.latent_to_output, init_scale=scale,
                               matmul_dtype=c.lstm_matmul_dtype)

  # -- the latent-model protocol (vae_jax.posteriors) ------------------------------------------

  def encoder_features(self, tokens: jax.Array) -> jax.Array:
    """`[B, F]` the encoder's summary of each sentence, the input of the posterior heads."""
    return self.encoder(tokens, token_mask(tokens))

  def encode(self, tokens: jax.Array, deterministic: bool = True,
             features: jax.Array | None = None) -> PosteriorParams:
    """Posterior parameters of each sentence (`[B, d]` mean and logvar, and a flow context).

    `deterministic=False` only matters for BN-VAE, whose batch normalisation then uses (and
    updates) the statistics of this batch instead of the running averages.
    """
    if features is None:
      features = self.encoder_features(tokens)
    real_rows = jnp.any(tokens != PAD, axis=-1)
    mean, logvar = self.head(features, deterministic=deterministic, row_mask=real_rows)
    context = None
    if self.posterior_family.needs_flow and self.config.flow.amortized:
      context = jnp.tanh(self.context_head(features))
    return PosteriorParams(mean, logvar, context)

  # -- the decoder -----------------------------------------------------------------------------

  def log_likelihood(self, tokens: jax.Array, z: jax.Array,
                     deterministic: bool = True) -> jax.Array:
    """log p(x|z) `[B]` (summed over tokens, EOS included)."""
    return -self.decoder.nll(tokens, token_mask(tokens), z, deterministic=deterministic)

  def __call__(self, tokens: jax.Array, deterministic: bool = False) -> VAETerms:
    c = self.config
    features = self.encoder_features(tokens)
    params = self.encode(tokens, deterministic, features)
    post = self.posterior(params)
    u, log_q = post.sample(self.make_rng("latent"), c.kl_samples)
    z = post.to_decoder(u[0])
    rec_nll = -self.log_likelihood(tokens, z, deterministic=deterministic)
    kl, kl_dims = post.sample_kl(u, log_q)
    smoothness = jnp.zeros_like(kl)
    if not deterministic and c.smoothness_dropout > 0:
      noisy = corrupt_tokens(self.make_rng("dropout"), tokens, c.smoothness_dropout)
      smoothness = jnp.sum(jnp.square(params.mean - self.encode(noisy, deterministic).mean),
                           axis=-1)
    mean, logvar = post.whitened_base()
    return VAETerms(rec_nll=rec_nll, kl=kl, kl_dims=kl_dims,
                    n_tokens=jnp.sum(token_mask(tokens), axis=-1), z=z, mean=mean,
                    logvar=logvar, smoothness=smoothness, features=features)

  # Decoding interface (see vae_jax.nn.decoding): pure step functions over these methods.
  def initial_state(self, z: jax.Array) -> State:
    return self.decoder.initial_state(z, z.shape[0])

  def decode_step(self, state: State, token: jax.Array,
                  z: jax.Array) -> tuple[State, jax.Array]:
    return self.decoder.step(state, token, z)


DECODER_PARAMS = ("decoder", "decoder_embed")


def encoder_param_mask(params) -> dict:
  """A pytree of bools over a `SeqVAE`'s params: True for the inference network (encoder,
  its embedding, the posterior heads and flows), False for the generative part (the decoder and
  its own embedding). A shared embedding belongs to the encoder. Used by aggressive training
  (He et al. 2019) and by the decoder reset after autoencoder pretraining (Li et al. 2019)."""
  return {k: jax.tree.map(lambda _, enc=k not in DECODER_PARAMS: enc, v)
          for k, v in params.items()}


class LSTMLanguageModel(posteriors.NoLatent, nn.Module):
  """The VAE's decoder without z: the reference NLL every VAE must match or beat."""
  config: VAEConfig  # latent_dim and encoder fields are ignored

  def setup(self):
    c = self.config
    self.decoder = LSTMDecoder(c.embed("embed"), c.vocab_size, c.hidden_dim, latent_dim=0,
                               dropout_in=c.dropout_in, dropout_out=c.dropout_out,
                               word_dropout=c.word_dropout, init_scale=c.weight_init_scale,
                               matmul_dtype=c.lstm_matmul_dtype)

  def __call__(self, tokens: jax.Array, deterministic: bool = False) -> LMTerms:
    mask = token_mask(tokens)
    return LMTerms(rec_nll=self.decoder.nll(tokens, mask, None, deterministic=deterministic),
                   n_tokens=jnp.sum(mask, axis=-1))

  def final_hidden(self, tokens: jax.Array) -> jax.Array:
    """`[B, H]` the LSTM state after reading the sentence: the LM's sentence feature."""
    return self.decoder.final_hidden(tokens, token_mask(tokens))

  def initial_state(self, batch_size: int) -> State:
    return self.decoder.initial_state(None, batch_size)

  def decode_step(self, state: State, token: jax.Array,
                  z: jax.Array | None = None) -> tuple[State, jax.Array]:
    return self.decoder.step(state, token, None)


def param_groups(params) -> dict:
  """`encoder_param_mask` as optimiser labels ('encoder' / 'decoder'), for
  `OptimizerConfig.param_labels`."""
  return jax.tree.map(lambda enc: "encoder" if enc else "decoder", encoder_param_mask(params))
