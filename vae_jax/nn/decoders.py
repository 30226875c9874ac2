"""The LSTM decoder of the sequence VAE (METHODS.md §0), and of the LSTM language model.

p(x|z) = prod_t softmax(W_o h_t + b_o)[x_t], with h_t = LSTM([e(x_{t-1}); z], h_{t-1}) and
the latent code entering twice (Bowman et al. 2016; He et al. 2019):
  (a) the initial state: c_0 = W_c z + b_c, h_0 = tanh(c_0);
  (b) concatenated to the input embedding at every step;
  (c) optionally (`latent_to_output`), added to the output layer as well,
      softmax(W_o h_t + W_z z + b_o): with (b) this is the skip connection of the skip-VAE
      (Dieng et al. 2019), z reaching every step and the prediction directly, so the decoder
      cannot route around it (METHODS.md §3).
With `latent_dim = 0` the same module is the LSTM language model (zero initial state, no z).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vae_jax.data.vocab import BOS, UNK
from vae_jax.nn.lstm import LSTM, uniform_init, uniform_lstm_init
from vae_jax.nn.output import OutputLayer

State = tuple[jax.Array, jax.Array]


def shift_right(tokens: jax.Array) -> jax.Array:
  """Decoder inputs: `BOS w_1 … w_n` from targets `w_1 … w_n EOS` (padding stays padding)."""
  bos = jnp.full_like(tokens[:, :1], BOS)
  return jnp.concatenate([bos, tokens[:, :-1]], axis=1)


def word_dropout(rng: jax.Array, inputs: jax.Array, rate: float) -> jax.Array:
  """Replaces decoder input words by UNK with probability `rate` (Bowman et al. 2016, §3.2).

  The first input (BOS) is never dropped, so the decoder always knows where a sentence starts.
  """
  drop = jax.random.bernoulli(rng, rate, inputs.shape)
  drop = drop.at[:, 0].set(False)
  return jnp.where(drop, UNK, inputs)


class LSTMDecoder(nn.Module):
  """Autoregressive LSTM decoder conditioned on z (or unconditional when `latent_dim == 0`).

  Attributes:
    embed: token embedding module (`[..] -> [.., E]`), may be shared with the encoder.
    vocab_size: output vocabulary size.
    hidden_dim: LSTM size.
    latent_dim: size of z; 0 gives the language model.
    dropout_in: dropout on input embeddings (He et al. 2019 use 0.5 at Yahoo size).
    dropout_out: dropout on LSTM outputs before the softmax.
    word_dropout: probability of replacing an input word by UNK.
    latent_to_output: also feed z to the output layer (skip connection).
    init_scale: None, each layer's default initialisation; s, He et al. 2019's: the LSTM as
      `uniform_lstm_init(s)`, and the kernels of z -> c_0, of the output layer and of the skip
      connection U(-s, s), their biases zero (He et al.'s `trans_linear` and `pred_linear`
      have none).
    matmul_dtype: None (float32), or the dtype of the LSTM's and the output layer's matmul
      operands (e.g. `jnp.bfloat16`), accumulating in float32.
  """
  embed: nn.Module
  vocab_size: int
  hidden_dim: int
  latent_dim: int
  dropout_in: float = 0.0
  dropout_out: float = 0.0
  word_dropout: float = 0.0
  latent_to_output: bool = False
  init_scale: float | None = None
  matmul_dtype: Any = None

  def setup(self):
    kernel = {} if self.init_scale is None else {"kernel_init": uniform_init(self.init_scale)}
    self.lstm = LSTM(self.hidden_dim, matmul_dtype=self.matmul_dtype,
                     **uniform_lstm_init(self.init_scale))
    if self.latent_dim:
      self.latent_to_cell = nn.Dense(self.hidden_dim, **kernel)
    self.output = OutputLayer(self.hidden_dim, self.vocab_size,
                              matmul_dtype=self.matmul_dtype, **kernel)
    if self.latent_dim and self.latent_to_output:
      self.latent_to_logits = nn.Dense(self.vocab_size, use_bias=False, **kernel)
    self.drop_in = nn.Dropout(self.dropout_in)
    self.drop_out = nn.Dropout(self.dropout_out)

  def initial_state(self, z: jax.Array | None, batch_size: int) -> State:
    """(c_0, h_0): from z when the decoder has a latent, zeros otherwise."""
    if z is None or not self.latent_dim:
      zeros = jnp.zeros((batch_size, self.hidden_dim), jnp.float32)
      return zeros, zeros
    c0 = self.latent_to_cell(z)
    return c0, jnp.tanh(c0)

  def __call__(self, tokens: jax.Array, mask: jax.Array, z: jax.Array | None,
               deterministic: bool = True) -> jax.Array:
    """Teacher-forced logits `[B, T, V]` for targets `tokens` (`w_1 … w_n EOS PAD …`)."""
    return self._logits(self._outputs(tokens, mask, z, deterministic), z, time_axis=True)

  def nll(self, tokens: jax.Array, mask: jax.Array, z: jax.Array | None,
          deterministic: bool = True) -> jax.Array:
    """-log p(tokens | z) `[B]`, summed over the real tokens: the teacher-forced logits'
    token NLL, computed without materialising them twice (`output.linear_softmax_nll`)."""
    outputs = self._outputs(tokens, mask, z, deterministic)
    skip = None
    if self.latent_dim and self.latent_to_output:
      skip = self.latent_to_logits(z)
    return self.output.nll(outputs, tokens, mask, seq_bias=skip)

  def _outputs(self, tokens: jax.Array, mask: jax.Array, z: jax.Array | None,
               deterministic: bool) -> jax.Array:
    """`[B, T, H]` the LSTM's outputs after output dropout (the softmax layer's input)."""
    inputs = shift_right(tokens)
    if not deterministic and self.word_dropout > 0:
      inputs = word_dropout(self.make_rng("dropout"), inputs, self.word_dropout)
    x = self.embed(inputs)
    x = self.drop_in(x, deterministic=deterministic)
    state = self.initial_state(z, tokens.shape[0])
    static = z if self.latent_dim else None
    outputs, _ = self.lstm(x, mask, initial_state=state, static_inputs=static)
    return self.drop_out(outputs, deterministic=deterministic)

  def final_hidden(self, tokens: jax.Array, mask: jax.Array) -> jax.Array:
    """`[B, H]` the state after reading `BOS w_1 … w_n` (the one that predicts EOS): a
    fixed-size feature of the whole sentence (the language-model baseline of METHODS.md §3)."""
    x = self.embed(shift_right(tokens))
    state = self.initial_state(None, tokens.shape[0])
    _, (_, h_last) = self.lstm(x, mask, initial_state=state)
    return h_last

  def _logits(self, outputs: jax.Array, z: jax.Array | None, time_axis: bool) -> jax.Array:
    logits = self.output(outputs)
    if self.latent_dim and self.latent_to_output:
      skip = self.latent_to_logits(z)
      logits = logits + (skip[:, None, :] if time_axis else skip)
    return logits

  def step(self, state: State, token: jax.Array,
           z: jax.Array | None) -> tuple[State, jax.Array]:
    """One decoding step: previous token `[B]` -> (new state, logits `[B, V]`)."""
    x = self.embed(token)
    static = z if self.latent_dim else None
    state, h = self.lstm.step(state, x, static_inputs=static)
    return state, self._logits(h, z, time_axis=False)
