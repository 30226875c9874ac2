"""Compiled decoding for autoregressive decoders: greedy, sampled and beam search.

Every function is written against a pure step function

    step_fn(state, prev_token [N]) -> (new_state, logits [N, V])

where `state` is any pytree whose leaves have the batch as leading axis (for the LSTM VAE:
`lambda s, t: model.apply(variables, s, t, z, method=SeqVAE.decode_step)`). Loops are
`lax.scan`s of fixed length `max_length`, so decoding compiles once per shape. Outputs are
`[N, max_length]` int32 ids in the batch format of the project (`w_1 … w_n EOS PAD …`); a
sequence that never emits EOS is cut at `max_length`.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from vae_jax.data.vocab import BOS, EOS, PAD

StepFn = Callable[[Any, jax.Array], tuple[Any, jax.Array]]


def _decode(step_fn: StepFn, state: Any, batch_size: int, max_length: int,
            choose: Callable[[jax.Array, jax.Array], jax.Array], rng: jax.Array) -> jax.Array:
  """Shared loop of greedy and sampled decoding; `choose(logits, rng) -> tokens`."""

  def body(carry, t):
    state, prev, done = carry
    state, logits = step_fn(state, prev)
    token = choose(logits.astype(jnp.float32), jax.random.fold_in(rng, t))
    token = jnp.where(done, PAD, token)
    done = done | (token == EOS)
    return (state, token, done), token

  init = (state, jnp.full((batch_size,), BOS, jnp.int32), jnp.zeros((batch_size,), bool))
  _, tokens = jax.lax.scan(body, init, jnp.arange(max_length))
  return tokens.T


def greedy_decode(step_fn: StepFn, state: Any, batch_size: int, max_length: int) -> jax.Array:
  """argmax decoding: x_t = argmax p(x_t | x_<t, z)."""
  return _decode(step_fn, state, batch_size, max_length,
                 lambda logits, _: jnp.argmax(logits, axis=-1).astype(jnp.int32),
                 jax.random.PRNGKey(0))


def sample_decode(step_fn: StepFn, state: Any, rng: jax.Array, batch_size: int,
                  max_length: int, temperature: float = 1.0,
                  top_k: int | None = None) -> jax.Array:
  """Ancestral sampling, x_t ~ softmax(logits / temperature), optionally from the top-k."""

  def choose(logits, key):
    logits = logits / temperature
    if top_k is not None:
      kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
      logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits).astype(jnp.int32)

  return _decode(step_fn, state, batch_size, max_length, choose, rng)


def beam_search(step_fn: StepFn, state: Any, batch_size: int, max_length: int,
                beam_size: int = 5, length_penalty: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """Beam search; returns the best sequence per example `[N, max_length]` and its log-prob.

  Hypotheses are ranked at the end by log p / length^length_penalty (0 = plain log-prob).
  A finished beam keeps its score and only extends with PAD.

  Args:
    state: decoder state for the N examples (it is tiled to N * beam_size internally).
  """
  n, k = batch_size, beam_size
  tile = lambda x: jnp.repeat(x, k, axis=0)
  state = jax.tree_util.tree_map(tile, state)
  scores = jnp.tile(jnp.array([0.0] + [-jnp.inf] * (k - 1), jnp.float32), (n, 1))  # [n, k]
  seqs = jnp.full((n, k, max_length), PAD, jnp.int32)
  prev = jnp.full((n * k,), BOS, jnp.int32)
  done = jnp.zeros((n, k), bool)
  lengths = jnp.zeros((n, k), jnp.int32)

  def body(carry, t):
    state, prev, scores, seqs, done, lengths = carry
    state, logits = step_fn(state, prev)
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    v = logp.shape[-1]
    logp = logp.reshape(n, k, v)
    # A finished hypothesis may only continue with PAD, at no cost.
    pad_only = jnp.full((v,), -jnp.inf).at[PAD].set(0.0)
    logp = jnp.where(done[..., None], pad_only, logp)
    cand = (scores[..., None] + logp).reshape(n, k * v)
    scores, idx = jax.lax.top_k(cand, k)
    beam, token = idx // v, (idx % v).astype(jnp.int32)
    gather = lambda x: jnp.take_along_axis(x, beam.reshape(n, k, *([1] * (x.ndim - 2))), axis=1)
    seqs = gather(seqs).at[:, :, t].set(token)
    was_done = gather(done)
    lengths = gather(lengths) + (~was_done).astype(jnp.int32)
    done = was_done | (token == EOS)
    flat_beam = (beam + jnp.arange(n)[:, None] * k).reshape(-1)
    state = jax.tree_util.tree_map(lambda x: x[flat_beam], state)
    return (state, token.reshape(-1), scores, seqs, done, lengths), None

  init = (state, prev, scores, seqs, done, lengths)
  (_, _, scores, seqs, _, lengths), _ = jax.lax.scan(body, init, jnp.arange(max_length))
  norm = scores / jnp.maximum(lengths, 1).astype(jnp.float32) ** length_penalty
  best = jnp.argmax(norm, axis=-1)
  take = lambda x: jnp.take_along_axis(x, best.reshape(n, 1, *([1] * (x.ndim - 2))), axis=1)[:, 0]
  return take(seqs), take(scores)
