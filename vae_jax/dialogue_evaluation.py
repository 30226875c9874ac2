"""Evaluation and response generation of the dialogue CVAE (`vae_jax.models.cvae`), following
Zhao et al. 2017 (METHODS.md §3, §6).

Likelihood side, on the reference responses, with the learned conditional prior:
  nll, ppl: the importance-weighted bound L_K of log p(x|c) with K samples of q(z|x,c),
    log w = log p(x|c,z) + log p(z|c) - log q(z|x,c) (exact log p(x|c) for the seq2seq model);
  elbo, kl: the ELBO and KL(q(z|x,c) || p(z|c)) per response (analytic for a Gaussian base,
    Monte Carlo for a flow posterior);
  mi, au: the mutual information and the active units of the code in prior coordinates
    u = (z - μ_p(c)) / σ_p(c) (see `vae_jax.models.cvae`): what the code carries about the
    response beyond what the prior network reads in the context; both are 0 when the posterior
    collapses onto p(z|c);
  bow: the bag-of-words NLL when the model has the head.

Generation side (`generation_metrics`): for every context N codes z ~ p(z|c), each decoded
greedily (Zhao et al.'s protocol; the seq2seq baseline, having no z, samples its N responses
from the softmax instead), scored against the reference by BLEU-1..4 precision and recall
(`text_metrics.bleu_precision_recall`), plus Distinct-1/2 and the mean length of all samples,
and the single greedy and beam-search responses from the prior mean (BLEU-n of each against
the reference, averaged over contexts).

Probe (`probe_features`): E_q[z|x,c] as features of a linear classifier of the response's
dialogue act and emotion.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vae_jax import evaluation, holes, metrics, text_metrics
from vae_jax.data.vocab import EOS, PAD
from vae_jax.evaluation import collect, to_host
from vae_jax.models.cvae import CVAE, ConditionalPrior
from vae_jax.models.vae import PosteriorParams, token_mask
from vae_jax.nn import decoding

def _log_likelihood_fn(model: nn.Module, variables, tokens: jax.Array, c: jax.Array):
  """`z [n, B, d] -> [n, B]` log p(x|c,z), the n*B codes decoded at once."""

  def log_likelihood(z):
    n, b, d = z.shape
    tile = lambda a: jnp.broadcast_to(a[None], (n, *a.shape)).reshape(n * b, *a.shape[1:])
    cond = model.apply(variables, tile(c), z.reshape(n * b, d), method=CVAE.condition)
    return model.apply(variables, tile(tokens), cond, method=CVAE.log_likelihood).reshape(n, b)

  return log_likelihood


def make_cvae_batch_eval(model: nn.Module, k_samples: int, chunk_size: int,
                         mean_samples: int = 32) -> Callable:
  """Jitted per-batch evaluation `(variables, tokens, context, speakers, rng) -> dict of [B]
  and [B, d] arrays` (see the module docstring). `code_mean`/`code_mean_b` are E_q[u|x,c] in
  prior coordinates: exact for a Gaussian base, else two independent `mean_samples` averages
  (for an unbiased active-unit count, `metrics.active_units`)."""
  cfg = model.config

  @jax.jit
  def batch_eval(variables, tokens, context, speakers, rng):
    c = model.apply(variables, context, speakers, method=CVAE.encode_context)
    n_tokens = jnp.sum(token_mask(tokens), axis=-1)
    if not cfg.latent_dim:
      log_px = model.apply(variables, tokens, c, method=CVAE.log_likelihood)
      return {"log_px": log_px, "elbo": log_px, "kl": jnp.zeros_like(log_px),
              "n_tokens": n_tokens}
    iw_rng, mean_rng = jax.random.split(rng)
    features = model.apply(variables, tokens, method=CVAE.response_features)
    post = model.apply(variables, tokens, c, features, method=CVAE.encode)
    prior = model.apply(variables, c, method=CVAE.prior)
    sample = lambda r, n: model.apply(variables, post, prior, r, n, method=CVAE.sample_codes)
    log_weights = metrics.posterior_log_weights_fn(
        sample, _log_likelihood_fn(model, variables, tokens, c))
    log_px, mean_log_w = metrics.iw_log_likelihood(log_weights, iw_rng, k_samples, chunk_size,
                                                   return_elbo=True)
    mean, logvar = prior.whiten(post.mean), post.logvar - prior.logvar
    if cfg.posterior == "flow":
      _, log_q, log_p = sample(jax.random.fold_in(mean_rng, 1), k_samples)
      kl = metrics.monte_carlo_kl(log_q, log_p)
      z = sample(mean_rng, 2 * mean_samples)[0].reshape(2, mean_samples, *mean.shape)
      code_mean, code_mean_b = jnp.mean(prior.whiten(z), axis=1)
    else:
      kl = metrics.gaussian_kl_per_example(mean, logvar)
      code_mean = code_mean_b = mean
    out = {"log_px": log_px, "elbo": mean_log_w, "kl": kl, "n_tokens": n_tokens,
           "mean": mean, "logvar": logvar, "code_mean": code_mean, "code_mean_b": code_mean_b,
           "features": features, "post_mean": post.mean, "post_logvar": post.logvar,
           "prior_mean": prior.mean, "prior_logvar": prior.logvar}
    if post.context is not None:
      out["flow_context"] = post.context
    if cfg.bow_hidden_dim:
      cond = model.apply(variables, c, model.apply(variables, post, method=CVAE.point_code),
                         method=CVAE.condition)
      out["bow_nll"] = -model.apply(variables, tokens, cond, method=CVAE.bow_log_likelihood)
    return out

  return batch_eval


def flow_mi_terms(model: nn.Module, variables, post: PosteriorParams, prior: ConditionalPrior,
                  rng: jax.Array, *, mask: jax.Array | None = None,
                  chunk_size: int = 16) -> jax.Array:
  """MI terms (`metrics.mutual_information_terms`) of a flow posterior in prior coordinates
  over a set of N pairs:

    t_i = log q(u_i|i) - log (1/N) sum_j q(u_i|j),  u_i = whiten_i(z_i), z_i ~ q(z|i),

  with q(u|j) = q(μ_pj + σ_pj u | x_j, c_j) · prod σ_pj (change of variables; every density
  by inverting pair j's flow). Cost O(N^2) flow inversions. `mask` drops padding rows."""
  z, log_q, _ = model.apply(variables, post, prior, rng, 1, method=CVAE.sample_codes)
  log_q_u = log_q[0] + 0.5 * jnp.sum(prior.logvar, axis=-1)
  u = prior.whiten(z[0])

  def pairwise(u_chunk):  # [n, d] -> [n, N]
    zc = prior.sample(u_chunk[:, None, :])  # z = μ_pj + σ_pj u for every pair j
    return (model.apply(variables, zc, post, method=CVAE.posterior_log_prob)
            + 0.5 * jnp.sum(prior.logvar, axis=-1))

  log_q_agg = metrics.aggregate_posterior_log_prob(u, pairwise, mask=mask, chunk_size=chunk_size)
  return metrics.mutual_information_terms(log_q_u, log_q_agg)


def flow_mutual_information(model: nn.Module, variables, post: PosteriorParams,
                            prior: ConditionalPrior, rng: jax.Array, *,
                            chunk_size: int = 16) -> jax.Array:
  """I_q((x, c); u) of a flow posterior in prior coordinates: the mean of `flow_mi_terms`."""
  return jax.jit(lambda v, p, q, r: jnp.mean(flow_mi_terms(model, v, p, q, r,
                                                           chunk_size=chunk_size)))(
      variables, post, prior, rng)


def likelihood_metrics(model: nn.Module, variables, batches: Iterable[dict], rng: jax.Array, *,
                       k_samples: int = 500, chunk_size: int = 50, au_threshold: float = 0.01,
                       mi_max_examples: int = 0, hole_samples: int = 0) -> dict[str, Any]:
  """nll, ppl, elbo, kl, mi, au, dispersion (and bow, hole metrics) on reference responses."""
  eval_rng, mi_rng, hole_rng = jax.random.split(rng, 3)
  out = collect(make_cvae_batch_eval(model, k_samples, chunk_size), batches, eval_rng,
                variables, keys=CVAE.input_keys)
  log_px = out["log_px"].astype(np.float64)
  n_tokens = float(out["n_tokens"].sum())
  result = {
      "nll": float(-log_px.mean()),
      "ppl": float(np.exp(-log_px.sum() / n_tokens)),
      "elbo": float(out["elbo"].astype(np.float64).mean()),
      "ppl_elbo": float(np.exp(-out["elbo"].astype(np.float64).sum() / n_tokens)),
      "kl": float(out["kl"].astype(np.float64).mean()),
      "mi": 0.0, "au": 0,
      "k_samples": int(k_samples) if model.config.latent_dim else 0,
      "n_sentences": int(log_px.shape[0]),
      "n_tokens": int(n_tokens),
  }
  if not model.config.latent_dim:
    return result
  mean, logvar = jnp.asarray(out["mean"]), jnp.asarray(out["logvar"])
  if model.config.posterior == "flow":
    rows = np.arange(len(mean))
    if mi_max_examples and mi_max_examples < len(rows):
      rows = np.sort(np.random.default_rng(0).choice(rows, mi_max_examples, replace=False))
    post = PosteriorParams(jnp.asarray(out["post_mean"]), jnp.asarray(out["post_logvar"]),
                           jnp.asarray(out["flow_context"]) if "flow_context" in out else None)
    prior = ConditionalPrior(jnp.asarray(out["prior_mean"]), jnp.asarray(out["prior_logvar"]))
    terms_fn = lambda pq, rng, mask: flow_mi_terms(model, variables, *pq, rng, mask=mask)
    result.update(evaluation.mutual_information_metrics(terms_fn, (post, prior),
                                                        out["n_tokens"], mi_rng, set_rows=rows))
  else:
    terms_fn = lambda p, rng, mask: metrics.gaussian_mi_terms(rng, *p, mask=mask)
    result.update(evaluation.mutual_information_metrics(terms_fn, (mean, logvar),
                                                        out["n_tokens"], mi_rng))
    if hole_samples:
      result.update(holes.gaussian_hole_metrics(hole_rng, mean, logvar,
                                                num_samples=hole_samples))
  for name in ("nll", "elbo", "kl"):
    result[f"{name}_se"] = metrics.mean_and_stderr(
        -out["log_px"] if name == "nll" else out[name])[1]
  result.update(evaluation.active_unit_report(out["code_mean"], out["code_mean_b"],
                                              au_threshold))
  result["dispersion"] = float(out["features"].astype(np.float64).var(axis=0).mean())
  if "bow_nll" in out:
    result["bow"] = float(out["bow_nll"].astype(np.float64).mean())
  return result


# ---------------------------------------------------------------------------------------------
# Generation.
# ---------------------------------------------------------------------------------------------


def _decode_fn(model: nn.Module, variables, cond: jax.Array):
  state = model.apply(variables, cond, method=CVAE.initial_state)
  step = lambda s, t: model.apply(variables, s, t, cond, method=CVAE.decode_step)
  return state, step


@functools.partial(jax.jit, static_argnames=("model", "num_samples", "max_length"))
def sample_responses(model: nn.Module, variables, context: jax.Array, speakers: jax.Array,
                     rng: jax.Array, *, num_samples: int, max_length: int) -> jax.Array:
  """`[B, N, max_length]` responses per context: N codes z ~ p(z|c), each decoded greedily;
  the seq2seq model (no z) samples its N responses from the softmax."""
  c = model.apply(variables, context, speakers, method=CVAE.encode_context)
  b = c.shape[0]
  z_rng, dec_rng = jax.random.split(rng)
  c_n = jnp.broadcast_to(c[None], (num_samples, *c.shape)).reshape(num_samples * b, -1)
  if model.config.latent_dim:
    prior = model.apply(variables, c, method=CVAE.prior)
    eps = jax.random.normal(z_rng, (num_samples, *prior.mean.shape))
    z = model.apply(variables, prior, eps, method=CVAE.prior_code)
    cond = model.apply(variables, c_n, z.reshape(num_samples * b, -1), method=CVAE.condition)
    state, step = _decode_fn(model, variables, cond)
    ids = decoding.greedy_decode(step, state, num_samples * b, max_length)
  else:
    state, step = _decode_fn(model, variables, c_n)
    ids = decoding.sample_decode(step, state, dec_rng, num_samples * b, max_length)
  return jnp.swapaxes(ids.reshape(num_samples, b, max_length), 0, 1)


@functools.partial(jax.jit, static_argnames=("model", "max_length", "beam_size"))
def mode_responses(model: nn.Module, variables, context: jax.Array, speakers: jax.Array, *,
                   max_length: int, beam_size: int = 0) -> jax.Array:
  """`[B, max_length]` one response per context from the prior mean z = f(μ_p(c)) (c alone for
  seq2seq): greedy with `beam_size` 0, else beam search."""
  c = model.apply(variables, context, speakers, method=CVAE.encode_context)
  z = None
  if model.config.latent_dim:
    prior = model.apply(variables, c, method=CVAE.prior)
    z = model.apply(variables, prior, jnp.zeros_like(prior.mean), method=CVAE.prior_code)
  cond = model.apply(variables, c, z, method=CVAE.condition)
  state, step = _decode_fn(model, variables, cond)
  if beam_size:  # beam_search tiles the state; the step's conditioning is tiled alike
    _, step = _decode_fn(model, variables, jnp.repeat(cond, beam_size, axis=0))
    return decoding.beam_search(step, state, c.shape[0], max_length, beam_size=beam_size)[0]
  return decoding.greedy_decode(step, state, c.shape[0], max_length)


def strip(ids: np.ndarray) -> list[int]:
  """Word ids of one decoded or reference row: up to the first EOS, padding removed."""
  ids = np.asarray(ids)
  stop = np.flatnonzero((ids == EOS) | (ids == PAD))
  return [int(t) for t in ids[:stop[0] if stop.size else len(ids)]]


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
    refs += [strip(r) for r in to_host(batch["tokens"])[real]]
    samples += [[strip(h) for h in rows] for rows in out]
    greedy += [strip(h) for h in g]
    if beam_size:
      bm = to_host(mode_responses(model, *args, max_length=max_length,
                                   beam_size=beam_size))[real]
      beam += [strip(h) for h in bm]
  return {"references": refs, "samples": samples, "greedy": greedy,
          "beam": beam if beam_size else None}


def evaluate_cvae(model: nn.Module, variables, batches: Iterable[dict], rng: jax.Array, *,
                  k_samples: int = 500, chunk_size: int = 50, mi_max_examples: int = 0,
                  hole_samples: int = 0, num_response_samples: int = 10,
                  max_decode_length: int = 40, beam_size: int = 5) -> tuple[dict, dict]:
  """Likelihood and generation metrics of a dialogue CVAE on a split.

  Returns (metrics, responses) with `responses` as from `generate_responses` (word ids)."""
  like_rng, gen_rng = jax.random.split(rng)
  batches = list(batches)
  result = likelihood_metrics(model, variables, batches, like_rng, k_samples=k_samples,
                              chunk_size=chunk_size, mi_max_examples=mi_max_examples,
                              hole_samples=hole_samples)
  responses = generate_responses(model, variables, batches, gen_rng,
                                 num_samples=num_response_samples,
                                 max_length=max_decode_length, beam_size=beam_size)
  result.update(response_scores(responses["references"], responses["samples"],
                                responses["greedy"], responses["beam"]))
  result["num_response_samples"] = int(num_response_samples)
  return result, responses


# ---------------------------------------------------------------------------------------------
# Probe.
# ---------------------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("model", "num_samples"))
def probe_features(model: nn.Module, variables, tokens: jax.Array, context: jax.Array,
                   speakers: jax.Array, rng: jax.Array, num_samples: int = 32) -> jax.Array:
  """`[B, F]` features of each (context, response) pair for act/emotion probes: E_q[z|x,c]
  (a `num_samples` average for a flow posterior); the context vector c for seq2seq."""
  c = model.apply(variables, context, speakers, method=CVAE.encode_context)
  if not model.config.latent_dim:
    return c
  post = model.apply(variables, tokens, c, method=CVAE.encode)
  if model.config.posterior == "gaussian":
    return post.mean
  prior = model.apply(variables, c, method=CVAE.prior)
  z = model.apply(variables, post, prior, rng, num_samples, method=CVAE.sample_codes)[0]
  return jnp.mean(z, axis=0)
