"""Decoding from a model's codes and the scores of what it decodes (METHODS.md §2, §4, §6):
prior samples, greedy reconstructions, interpolations between point codes, and their
generation metrics (Self-BLEU, Distinct-n, the model's own fluency, reconstruction BLEU).

Codes are latent codes u (`vae_jax.posteriors`: the coordinates where the prior is N(0, I));
`model.decoder_input(u)` turns them into what the decoder reads, so the KL-preserving mode's
f, DELLA's chain and the language models (no code) need no case here.
"""

from __future__ import annotations

import functools
from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vae_jax import posteriors, text_metrics
from vae_jax.data.vocab import EOS, PAD
from vae_jax.nn import decoding


def to_host(x) -> np.ndarray:
  """A global (possibly multi-process) array as a numpy array on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


@functools.partial(jax.jit, static_argnames=("model", "max_length", "greedy", "batch_size"))
def generate(model: nn.Module, variables, z: jax.Array | None, rng: jax.Array, *,
             max_length: int, greedy: bool, batch_size: int | None = None) -> jax.Array:
  """Decodes from decoder inputs z (`[N, ...]`; None for a language model): greedy or
  sampled."""
  if z is None:
    state = model.apply(variables, batch_size, method=type(model).initial_state)
  else:
    state = model.apply(variables, z, method=type(model).initial_state)
  n = z.shape[0] if z is not None else batch_size
  step_fn = lambda s, t: model.apply(variables, s, t, z, method=type(model).decode_step)
  if greedy:
    return decoding.greedy_decode(step_fn, state, n, max_length)
  return decoding.sample_decode(step_fn, state, rng, n, max_length)


@functools.partial(jax.jit, static_argnames=("model",))
def decoder_inputs(model: nn.Module, variables, u: jax.Array) -> jax.Array:
  """`model.decoder_input(u)` of latent codes `u [N, d]` under the model's prior."""
  return model.apply(variables, u, method="decoder_input")


@functools.partial(jax.jit, static_argnames=("model",))
def point_codes(model: nn.Module, variables, params: posteriors.PosteriorParams) -> jax.Array:
  """`[N, d]` the latent point code of each posterior (`Posterior.point`)."""
  return posteriors.call(model, variables, params, lambda q: q.point())


@functools.partial(jax.jit, static_argnames=("num_pairs", "steps"))
def interpolate_pairs(rng: jax.Array, codes: jax.Array, num_pairs: int, steps: int) -> jax.Array:
  """`[num_pairs * steps, d]` codes on the segments between `num_pairs` random pairs of distinct
  rows of `codes`: (1 - t) z_a + t z_b, t = 0, 1/(steps-1), ..., 1."""
  n = codes.shape[0]
  a_rng, b_rng = jax.random.split(rng)
  a = jax.random.randint(a_rng, (num_pairs,), 0, n)
  b = (a + jax.random.randint(b_rng, (num_pairs,), 1, max(n, 2))) % n  # b != a when n > 1
  t = jnp.linspace(0.0, 1.0, steps)[None, :, None]
  z = (1.0 - t) * codes[a][:, None] + t * codes[b][:, None]
  return z.reshape(num_pairs * steps, codes.shape[1])


@functools.partial(jax.jit, static_argnames=("model",))
def _own_log_likelihood(model: nn.Module, variables, tokens: jax.Array, z: jax.Array):
  return model.apply(variables, tokens, z, method="log_likelihood")


def generation_metrics(model: nn.Module, variables, z: jax.Array, *, max_length: int = 40,
                       self_bleu_max: int = 1000, decode_batch: int = 500) -> dict[str, float]:
  """Decodes decoder inputs `z [N, ...]` greedily and scores the sentences (METHODS.md §2, §6):

  self_bleu: Self-BLEU-4 (Zhu et al. 2018; each sentence against all others, on a random
    subset of `self_bleu_max` scored sentences) — lower is more diverse;
  distinct_1, distinct_2: distinct n-grams / all n-grams (Li et al. 2016);
  nll_per_token: the model's own fluency, -sum log p(x̂|z) / sum (|x̂| + 1), of each generated
    x̂ under the code that generated it (EOS included; a sentence cut at `max_length` without
    EOS counts its tokens only);
  length: mean number of words.
  """
  ids, log_liks = [], []
  rng = jax.random.PRNGKey(0)  # unused by greedy decoding
  for start in range(0, z.shape[0], decode_batch):
    zc = z[start:start + decode_batch]
    out = generate(model, variables, zc, rng, max_length=max_length, greedy=True)
    log_liks.append(to_host(_own_log_likelihood(model, variables, out, zc)))
    ids.append(to_host(out))
  ids = np.concatenate(ids)
  n_tokens = float(np.sum(ids != PAD))
  sentences = [until_eos(row) for row in ids]
  return {
      "self_bleu": text_metrics.self_bleu(sentences, max_n=4, max_hypotheses=self_bleu_max),
      "distinct_1": text_metrics.distinct_n(sentences, 1),
      "distinct_2": text_metrics.distinct_n(sentences, 2),
      "nll_per_token": float(-np.sum(np.concatenate(log_liks), dtype=np.float64) / n_tokens),
      "length": text_metrics.average_length(sentences),
  }


def until_eos(row: np.ndarray) -> list[int]:
  """The word ids of a decoded or encoded row: everything before its first EOS (the whole row
  when it has none), padding dropped."""
  row = np.asarray(row)
  stop = np.flatnonzero(row == EOS)
  return [int(t) for t in row[:stop[0] if stop.size else len(row)] if t != PAD]


def reconstruction_metrics(model: nn.Module, variables, token_batches: Iterable[np.ndarray],
                           rng: jax.Array, *, max_length: int | None = None
                           ) -> tuple[dict[str, float], list[list[int]]]:
  """Greedy reconstructions x̂ = greedy_decode(point code of q(z|x)) of the sentences in
  `token_batches` (arrays `[B, T]` of real rows, EOS-terminated, PAD-padded), scored against
  their inputs (METHODS.md §4, §6):

  recon_bleu: corpus BLEU-4 (Papineni et al. 2002; `text_metrics.corpus_bleu`, no smoothing,
    brevity penalty included) of the reconstructions, each with its own input as the single
    reference, EOS excluded from both;
  recon_exact: the fraction of sentences reproduced exactly;
  recon_length: the mean length of the reconstructions, in words.

  Each batch is decoded for `max_length` steps (default: its width T, so a reconstruction can
  be as long as the longest input of its batch plus its EOS). A collapsed posterior reproduces
  the same sentence for every input and scores near 0; an autoencoder near 1.

  Returns the metrics and the reconstructions (word-id lists, in input order).
  """
  references, hypotheses = [], []
  for tokens in token_batches:
    tokens = np.asarray(tokens)
    out = to_host(reconstruct(model, variables, jnp.asarray(tokens), rng,
                              max_length or tokens.shape[1]))
    references += [until_eos(row) for row in tokens]
    hypotheses += [until_eos(row) for row in out]
  if not hypotheses:
    return {}, []
  scores = {
      "recon_bleu": text_metrics.corpus_bleu([[r] for r in references], hypotheses, max_n=4),
      "recon_exact": float(np.mean([h == r for h, r in zip(hypotheses, references)])),
      "recon_length": text_metrics.average_length(hypotheses),
  }
  return scores, hypotheses


def reconstruct(model: nn.Module, variables, tokens: jax.Array, rng: jax.Array,
                max_length: int) -> jax.Array:
  """Greedy decoding from each sentence's point code (the posterior mean, or its image under the
  flow)."""
  return generate(model, variables, _encoded_point_codes(model, variables, tokens), rng,
                  max_length=max_length, greedy=True)


@functools.partial(jax.jit, static_argnames=("model",))
def _encoded_point_codes(model: nn.Module, variables, tokens: jax.Array) -> jax.Array:
  def point(m, tokens):
    params = m.encode(tokens)
    return m.decoder_input(m.posterior(params).point(), params)
  return model.apply(variables, tokens, method=point)


def sample_prior(model: nn.Module, variables, rng: jax.Array, num: int, latent_dim: int,
                 max_length: int, greedy: bool = True) -> jax.Array:
  """Decodes prior samples (greedily by default, as in Bowman et al. 2016): u ~ N(0, I) read
  through `model.decoder_input` (f(u) in the KL-preserving mode)."""
  z_rng, dec_rng = jax.random.split(rng)
  z = decoder_inputs(model, variables, jax.random.normal(z_rng, (num, latent_dim)))
  return generate(model, variables, z, dec_rng, max_length=max_length, greedy=greedy)


@functools.partial(jax.jit, static_argnames=("model", "num_samples"))
def features(model: nn.Module, variables, inputs: tuple, rng: jax.Array,
             num_samples: int = 32) -> jax.Array:
  """A fixed-size feature per example `[B, F]` for probing classifiers (METHODS.md §3): the
  posterior mean E_q[z|x] of the code the decoder reads (`Posterior.code_mean`, a
  `num_samples` average for flows), or the model's sentence feature when it has no code (the
  language models' final hidden state, the seq2seq model's context vector)."""
  if not model.code_dim:
    return model.apply(variables, *inputs, method="encoder_features")
  params = model.apply(variables, *inputs, method="encode")
  return posteriors.call(model, variables, params, lambda q, r: q.code_mean(r, num_samples), rng)
