"""The Transformer language model: DELLA's decoder without a latent code (METHODS.md §4, §5).

p(x) = Π_t softmax(logits_t)[x_t] from the causal GPT-2 pass over `BOS w_1 … w_n`
(`vae_jax.nn.transformer`); the reference NLL a Transformer VAE must match or beat, at the same
size and budget.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from vae_jax import objectives, posteriors
from vae_jax.models.vae import LMTerms, token_mask
from vae_jax.nn.decoders import shift_right
from vae_jax.nn.transformer import Transformer, TransformerConfig


class TransformerLM(posteriors.NoLatent, nn.Module):
  config: TransformerConfig

  def setup(self):
    self.transformer = Transformer(self.config)

  def __call__(self, tokens: jax.Array, deterministic: bool = False) -> LMTerms:
    mask = token_mask(tokens)
    hidden = self.transformer(shift_right(tokens), deterministic=deterministic).hidden
    rec_nll = objectives.token_nll(self.transformer.logits(hidden), tokens, mask)
    return LMTerms(rec_nll=rec_nll, n_tokens=jnp.sum(mask, axis=-1))

  def final_hidden(self, tokens: jax.Array) -> jax.Array:
    """`[B, D]` the final state after reading the whole sentence (EOS included): the probe's
    feature, as the LSTM language model's last hidden state."""
    hidden = self.transformer(tokens, padding_mask=tokens != 0).hidden
    last = jnp.maximum(jnp.sum(tokens != 0, axis=-1) - 1, 0)
    return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]

  # Decoding interface (vae_jax.nn.decoding), as the LSTM language model's.
  def initial_state(self, batch_size: int) -> dict:
    return self.transformer.init_cache(batch_size, self.config.max_length)

  def decode_step(self, state: dict, token: jax.Array, z: None = None):
    del z
    state, hidden = self.transformer.decode_step(state, token)
    return state, self.transformer.logits(hidden)
