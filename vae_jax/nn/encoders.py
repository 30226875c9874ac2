"""Sequence encoders and posterior heads.

The LSTM encoder of the standard sequence VAE (METHODS.md §0) summarises a sentence by the
final hidden state h_T of a 1-layer LSTM. The pooling encoder (Long et al. 2019, METHODS.md §1)
instead pools all masked hidden states h_1..h_T (mean, max or both concatenated) — a one-line
switch here, so every model can use either.
"""

from __future__ import annotations

from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from vae_jax.nn.lstm import LSTM, uniform_init, uniform_lstm_init

Pooling = Literal["last", "mean", "max", "mean_max"]


def pool_states(outputs: jax.Array, mask: jax.Array, last: jax.Array,
                pooling: Pooling) -> jax.Array:
  """Summarises `[B, T, H]` encoder states into `[B, H]` (`[B, 2H]` for 'mean_max').

  'last' is the state at each sequence's last real token; 'mean' and 'max' pool only over real
  (mask = 1) positions (Long et al. 2019).
  """
  if pooling == "last":
    return last
  m = mask.astype(outputs.dtype)[..., None]
  mean = jnp.sum(outputs * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  neg = jnp.finfo(outputs.dtype).min
  maxed = jnp.max(jnp.where(m > 0, outputs, neg), axis=1)
  maxed = jnp.where(jnp.sum(m, axis=1) > 0, maxed, 0.0)
  if pooling == "mean":
    return mean
  if pooling == "max":
    return maxed
  if pooling == "mean_max":
    return jnp.concatenate([mean, maxed], axis=-1)
  raise ValueError(f"unknown pooling {pooling!r}; use 'last', 'mean', 'max' or 'mean_max'")


class LSTMEncoder(nn.Module):
  """Embedding -> 1-layer LSTM -> a fixed-size feature of the sentence.

  Attributes:
    embed: the token embedding (shared with nothing by default; pass a module to share).
    hidden_dim: LSTM size.
    pooling: 'last' (h_T, METHODS §0) or a pooling over all states (METHODS §1).
    init_scale: None, the LSTM's default initialisation; s, He et al. 2019's U(-s, s) for its
      kernels and bias (`uniform_lstm_init`).
    matmul_dtype: the LSTM's matmul operand dtype (None: float32; see `LSTM`).
  """
  embed: nn.Module
  hidden_dim: int
  pooling: Pooling = "last"
  init_scale: float | None = None
  matmul_dtype: Any = None

  @nn.compact
  def __call__(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    x = self.embed(tokens)
    lstm = LSTM(self.hidden_dim, name="lstm", matmul_dtype=self.matmul_dtype,
                **uniform_lstm_init(self.init_scale))
    outputs, (_, h_last) = lstm(x, mask)
    return pool_states(outputs, mask, h_last, self.pooling)


class GaussianHead(nn.Module):
  """Linear maps from an encoder feature to the diagonal-Gaussian posterior (mean, log σ²).

  With `batch_norm_gamma` = γ > 0 the means are batch-normalised with a fixed scale (BN-VAE,
  Zhu et al. 2020): μ = γ (μ̂ − E_B[μ̂]) / sqrt(Var_B[μ̂] + ε) + b, with b learned and γ not, so
  that every dimension's posterior means have variance γ² over the data and the expected KL
  is bounded below by d γ² / 2 > 0 — provided Var_B[μ̂] ≫ ε: an encoder whose features stop
  varying across the data (Var_B[μ̂] ≪ ε, 1e-5 by default as in PyTorch and the reference
  code) escapes the bound, since the normalised means then have variance γ² Var/(Var + ε).
  Batch statistics (running
  averages at evaluation, the 'batch_stats' collection) use only the rows where `row_mask` is
  true (padding rows excluded).

  `init_scale` = s draws both kernels U(-s, s) (He et al. 2019's bias-free
  `nn.Linear(nh, 2 nz)`; the biases here start at zero, as a missing bias would); None keeps
  flax's defaults.
  """
  latent_dim: int
  batch_norm_gamma: float = 0.0
  batch_norm_epsilon: float = 1e-5
  init_scale: float | None = None

  @nn.compact
  def __call__(self, features: jax.Array, deterministic: bool = True,
               row_mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    kernel = {} if self.init_scale is None else {"kernel_init": uniform_init(self.init_scale)}
    mean = nn.Dense(self.latent_dim, name="mean", **kernel)(features)
    logvar = nn.Dense(self.latent_dim, name="logvar", **kernel)(features)
    if self.batch_norm_gamma > 0:
      mask = None if row_mask is None else jnp.broadcast_to(row_mask[:, None], mean.shape)
      normed = nn.BatchNorm(use_running_average=deterministic, use_scale=False, use_bias=False,
                            momentum=0.9, epsilon=self.batch_norm_epsilon,
                            name="mean_bn")(mean, mask=mask)
      bias = self.param("mean_bn_bias", nn.initializers.zeros, (self.latent_dim,))
      mean = self.batch_norm_gamma * normed + bias
    return mean, logvar
