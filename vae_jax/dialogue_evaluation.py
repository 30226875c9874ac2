"""What evaluation of the dialogue CVAE (`vae_jax.models.cvae`) adds for responses, following
Zhao et al. 2017 (METHODS.md §3, §6). The likelihood side (IW-NLL of log p(x|c) under the
learned prior, KL, MI and AU of the code in prior coordinates, the bag-of-words NLL) is the one
evaluation of every model, `vae_jax.evaluation.evaluate`.

Generation (`generate_responses`, `response_scores`): for every context N codes z ~ p(z|c),
each decoded greedily (Zhao et al.'s protocol; the seq2seq baseline, having no z, samples its
N responses from the softmax instead), scored against the reference by BLEU-1..4 precision and
recall (`text_metrics.bleu_precision_recall`), plus Distinct-1/2 and the mean length of all
samples, and the single greedy and beam-search responses from the prior mean (BLEU-n of each
against the reference, averaged over contexts).

Probe features (`vae_jax.generation.features`): E_q[z|x,c] as features of a linear classifier
of the response's dialogue act and emotion (the context vector for seq2seq).
"""

from __future__ import annotations

import functools
from typing import Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vae_jax import evaluation, text_metrics
from vae_jax.generation import to_host, until_eos
from vae_jax.models.cvae import CVAE
from vae_jax.nn import decoding


# ---------------------------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------------------------


def _decode_fn(model: nn.Module, variables, cond: jax.Array):
  state = model.apply(variables, cond, method=CVAE.initial_state)
  step = lambda s, t: model.apply(variables, s, t, cond, method=CVAE.decode_step)
  return state, step


def _prior_inputs(model: nn.Module, variables, context, speakers, u: jax.Array) -> jax.Array:
  """Decoder inputs [c; z] of latent codes `u [..., B, d]` under p(z|c) of each context."""
  def inputs(m, context, speakers, u):
    return m.decoder_input(u, m.condition_params(context, speakers))
  return model.apply(variables, context, speakers, u, method=inputs)


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "max_length"))
def sample_responses(model: nn.Module, variables, context: jax.Array, speakers: jax.Array,
                     rng: jax.Array, *, num_samples: int, max_length: int) -> jax.Array:
  """`[B, N, max_length]` responses per context: N codes z ~ p(z|c), each decoded greedily;
  the seq2seq model (no z) samples its N responses from the softmax."""
  b, d = context.shape[0], model.config.latent_dim
  z_rng, dec_rng = jax.random.split(rng)
  cond = _prior_inputs(model, variables, context, speakers,
                       jax.random.normal(z_rng, (num_samples, b, d)))
  state, step = _decode_fn(model, variables, cond.reshape(num_samples * b, -1))
  if d:
    ids = decoding.greedy_decode(step, state, num_samples * b, max_length)
  else:
    ids = decoding.sample_decode(step, state, dec_rng, num_samples * b, max_length)
  return jnp.swapaxes(ids.reshape(num_samples, b, max_length), 0, 1)


@functools.partial(jax.jit, static_argnames=("model", "max_length", "beam_size"))
def mode_responses(model: nn.Module, variables, context: jax.Array, speakers: jax.Array, *,
                   max_length: int, beam_size: int = 0) -> jax.Array:
  """`[B, max_length]` one response per context from the prior mean z = f(μ_p(c)) (c alone for
  seq2seq): greedy with `beam_size` 0, else beam search."""
  b = context.shape[0]
  cond = _prior_inputs(model, variables, context, speakers,
                       jnp.zeros((b, model.config.latent_dim)))
  state, step = _decode_fn(model, variables, cond)
  if beam_size:  # beam_search tiles the state; the step's conditioning is tiled alike
    _, step = _decode_fn(model, variables, jnp.repeat(cond, beam_size, axis=0))
    return decoding.beam_search(step, state, b, max_length, beam_size=beam_size)[0]
  return decoding.greedy_decode(step, state, b, max_length)


def response_scores(references: list[list[int]], samples: list[list[list[int]]],
                    greedy: list[list[int]] | None = None,
                    beam: list[list[int]] | None = None, max_n: int = 4) -> dict[str, float]:
  """Zhao et al.'s BLEU-1..max_n precision/recall of N samples per context (one reference
  each), Distinct-1/2 and mean length over all samples, and BLEU-n of the greedy and beam
  responses.

  Two Distinct-n are reported: `distinct_n` pools every sample of every context (Li et al.
  2016), and `intra_distinct_n` is the mean over contexts of Distinct-n among that context's own
  N samples (Gu et al. 2019's intra-dist), which measures how much z varies the response to a
  fixed context: 1/N when all N samples of every context coincide.
  """
  prec, rec = [], []
  for ref, hyps in zip(references, samples):
    p, r = text_metrics.bleu_precision_recall([ref], hyps, max_n=max_n)
    prec.append(p)
    rec.append(r)
  prec, rec = np.mean(prec, axis=0), np.mean(rec, axis=0)
  flat = [h for hyps in samples for h in hyps]
  out = {}
  for n in range(1, max_n + 1):
    out[f"bleu{n}_precision"] = float(prec[n - 1])
    out[f"bleu{n}_recall"] = float(rec[n - 1])
    out[f"bleu{n}_f1"] = float(2 * prec[n - 1] * rec[n - 1] /
                               max(prec[n - 1] + rec[n - 1], 1e-12))
  for n in (1, 2):
    out[f"distinct_{n}"] = text_metrics.distinct_n(flat, n)
    out[f"intra_distinct_{n}"] = float(np.mean(
        [text_metrics.distinct_n(hyps, n) for hyps in samples]))
  out.update(
             length=text_metrics.average_length(flat))
  for name, single in (("greedy", greedy), ("beam", beam)):
    if single is None:
      continue
    scores = np.mean([text_metrics.bleu_precision_recall([ref], [h], max_n=max_n)[0]
                      for ref, h in zip(references, single)], axis=0)
    for n in range(1, max_n + 1):
      out[f"{name}_bleu{n}"] = float(scores[n - 1])
    out[f"{name}_distinct_2"] = text_metrics.distinct_n(single, 2)
    out[f"{name}_length"] = text_metrics.average_length(single)
  return out


def generate_responses(model: nn.Module, variables, batches: Iterable[dict], rng: jax.Array, *,
                       num_samples: int = 10, max_length: int = 40,
                       beam_size: int = 5) -> dict[str, list]:
  """Decodes every real row of `batches`: the reference, N sampled responses, the greedy and
  (with `beam_size` > 0) the beam response, as word-id lists in the batches' row order."""
  refs, samples, greedy, beam = [], [], [], []
  for i, batch in enumerate(batches):
    real = to_host(batch["weights"]) > 0
    args = (variables, batch["context"], batch["context_speakers"])
    out = to_host(sample_responses(model, *args, jax.random.fold_in(rng, i),
                                    num_samples=num_samples, max_length=max_length))[real]
    g = to_host(mode_responses(model, *args, max_length=max_length))[real]
    refs += [until_eos(r) for r in to_host(batch["tokens"])[real]]
    samples += [[until_eos(h) for h in rows] for rows in out]
    greedy += [until_eos(h) for h in g]
    if beam_size:
      bm = to_host(mode_responses(model, *args, max_length=max_length,
                                   beam_size=beam_size))[real]
      beam += [until_eos(h) for h in bm]
  return {"references": refs, "samples": samples, "greedy": greedy,
          "beam": beam if beam_size else None}


def evaluate_cvae(model: nn.Module, variables, batches: Iterable[dict], rng: jax.Array, *,
                  k_samples: int = 500, chunk_size: int = 50, mi_max_examples: int = 0,
                  hole_samples: int = 0, num_response_samples: int = 10,
                  max_decode_length: int = 40, beam_size: int = 5) -> tuple[dict, dict]:
  """The likelihood metrics of `evaluation.evaluate` and the generation metrics of a dialogue
  CVAE on a split. Returns (metrics, responses) with `responses` as from
  `generate_responses` (word ids)."""
  like_rng, gen_rng = jax.random.split(rng)
  batches = list(batches)
  result = evaluation.evaluate(model, variables, batches, like_rng, k_samples=k_samples,
                               chunk_size=chunk_size, mi_max_examples=mi_max_examples,
                               hole_samples=hole_samples)
  responses = generate_responses(model, variables, batches, gen_rng,
                                 num_samples=num_response_samples,
                                 max_length=max_decode_length, beam_size=beam_size)
  result.update(response_scores(responses["references"], responses["samples"],
                                responses["greedy"], responses["beam"]))
  result["num_response_samples"] = int(num_response_samples)
  return result, responses
