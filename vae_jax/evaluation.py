"""The evaluation suite of a trained model (METHODS.md §6): IW-NLL, PPL, KL, MI, AU, the
encoder-feature dispersion (Long et al. 2019), the hole metrics (METHODS.md §2), and the
generation metrics of decoded prior samples and interpolations, and the BLEU of greedy
reconstructions against their inputs (`reconstruction_metrics`). `posterior_summaries` and
`dimension_statistics` give the per-dimension KL and active-unit statistic behind those numbers
(drawn by experiments/report.py).

`evaluate_vae` and `evaluate_lm` consume batches in the project's batch format (global
`jax.Array`s sharded over the mesh when given one) and return a flat dict of numbers, the
content of `eval_<split>.json`. Per-example quantities are computed under `jit` batch by batch;
the set-level metrics (MI, AU) use every posterior of the split at once.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from vae_jax import holes, metrics, objectives, probe, text_metrics
from vae_jax.data.vocab import EOS, PAD
from vae_jax.models.vae import PosteriorParams, token_mask
from vae_jax.nn import decoding


def to_host(x) -> np.ndarray:
  """A global (possibly multi-process) array as a numpy array on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def has_latent(model: nn.Module) -> bool:
  """Whether `model` is a latent-variable model with `SeqVAE`'s posterior interface
  (`encode`, `sample_codes`, `posterior_log_prob`, `point_code`, `prior_code`,
  `log_likelihood`): the LSTM VAE and DELLA; not the language models."""
  return hasattr(type(model), "sample_codes")


def code_dim(model: nn.Module) -> int:
  """The size of a model's code: d, or L·d for DELLA's layer-wise latents."""
  return getattr(model.config, "code_dim", model.config.latent_dim)


def vae_log_likelihood_fn(model: nn.Module, variables, tokens: jax.Array):
  """`z [n, B, d] -> [n, B]` log p(x|z) for every sample, decoding the n*B codes at once."""

  def log_likelihood(z):
    n, b, d = z.shape
    tiled = jnp.broadcast_to(tokens[None], (n, *tokens.shape)).reshape(n * b, -1)
    ll = model.apply(variables, tiled, z.reshape(n * b, d), method="log_likelihood")
    return ll.reshape(n, b)

  return log_likelihood


def make_vae_batch_eval(model: nn.Module, k_samples: int, chunk_size: int,
                        mean_samples: int = 32) -> Callable:
  """Jitted per-batch evaluation: `(variables, tokens, rng) -> dict of [B] / [B, d] arrays`.

  The importance weights come from the model's own posterior (`SeqVAE.sample_codes`), so a flow
  posterior is scored with its change-of-variables density. The KL is analytic for a Gaussian
  base (also in the KL-preserving mode); for a flow posterior it is the Monte Carlo average of
  log q - log p over K fresh samples (no decoding needed). `code_mean` and `code_mean_b` are
  E_q[z|x], exact for a Gaussian, otherwise two independent `mean_samples` averages (their
  covariance over the set gives the active units without the Monte Carlo noise's bias).
  """
  gaussian = model.config.posterior == "gaussian"

  @jax.jit
  def batch_eval(variables, tokens, rng):
    iw_rng, mean_rng = jax.random.split(rng)
    features = model.apply(variables, tokens, method="encoder_features")
    post = model.apply(variables, tokens, True, features, method="encode")
    sample = lambda r, n: model.apply(variables, post, r, n, method="sample_codes")
    log_weights = metrics.posterior_log_weights_fn(
        sample, vae_log_likelihood_fn(model, variables, tokens))
    log_px, mean_log_w = metrics.iw_log_likelihood(log_weights, iw_rng, k_samples, chunk_size,
                                                   return_elbo=True)
    if gaussian or model.config.posterior == "kl_preserving":
      kl = metrics.gaussian_kl_per_example(post.mean, post.logvar)
    else:
      _, log_q, log_p = sample(jax.random.fold_in(mean_rng, 1), k_samples)
      kl = metrics.monte_carlo_kl(log_q, log_p)
    if gaussian:
      code_mean = code_mean_b = post.mean
    else:  # two independent estimates, for an unbiased variance (metrics.active_units)
      halves = sample(mean_rng, 2 * mean_samples)[0].reshape(2, mean_samples, *post.mean.shape)
      code_mean, code_mean_b = jnp.mean(halves, axis=1)
    return {
        "log_px": log_px,
        "elbo": mean_log_w,
        "kl": kl,
        "n_tokens": jnp.sum(token_mask(tokens), axis=-1),
        "mean": post.mean,
        "logvar": post.logvar,
        "code_mean": code_mean,
        "code_mean_b": code_mean_b,
        "features": features,
        **({} if post.context is None else {"context": post.context}),
        **({"layer_means": model.apply(variables, tokens, method="layer_means")}
           if hasattr(type(model), "layer_means") else {}),
    }

  return batch_eval


def collect(batch_eval: Callable, batches: Iterable[dict], rng: jax.Array, *args,
            keys: tuple[str, ...] = ("tokens",)) -> dict[str, np.ndarray]:
  """Runs `batch_eval(*args, *batch[keys], rng_i)` over all batches; the per-example outputs
  of real rows, concatenated."""
  parts: dict[str, list[np.ndarray]] = {}
  for i, batch in enumerate(batches):
    out = batch_eval(*args, *(batch[k] for k in keys), jax.random.fold_in(rng, i))
    real = to_host(batch["weights"]) > 0
    for key, value in out.items():
      parts.setdefault(key, []).append(to_host(value)[real])
  if not parts:
    raise ValueError("the evaluation split is empty: no batches to evaluate")
  return {k: np.concatenate(v) for k, v in parts.items()}


# He et al. 2019 evaluate in length-sorted batches of 32 (their PTB and Yahoo runs); their MI is
# the size-weighted average of per-batch estimates (`metrics.length_sorted_batches`).
MI_BATCH_SIZE = 32


def flow_mi_terms(model: nn.Module, variables, post: PosteriorParams, rng: jax.Array, *,
                  mask: jax.Array | None = None, chunk_size: int = 16) -> jax.Array:
  """`metrics.mutual_information_terms` for a posterior without a closed form (METHODS.md §6):

    t_i = log q(z_i|x_i) - log (1/N) sum_j q(z_i|x_j),  z_i ~ q(z|x_i),

  with every log q(z|x_j) evaluated by inverting x_j's flow (`SeqVAE.posterior_log_prob`),
  `chunk_size` query codes against all N posteriors at a time. Cost O(N^2) flow inversions.
  `mask` drops padding rows from the mixture (their terms are meaningless).
  """
  z, log_q, _ = model.apply(variables, post, rng, 1, method="sample_codes")
  pairwise = lambda zc: model.apply(variables, zc[:, None, :], post, method="posterior_log_prob")
  log_q_agg = metrics.aggregate_posterior_log_prob(z[0], pairwise, mask=mask,
                                                   chunk_size=chunk_size)
  return metrics.mutual_information_terms(log_q[0], log_q_agg)


def flow_mutual_information(model: nn.Module, variables, post: PosteriorParams, rng: jax.Array,
                            *, chunk_size: int = 16) -> jax.Array:
  """I_q(x; z) over a set of N sentences: the mean of `flow_mi_terms`."""
  return jax.jit(lambda v, p, r: jnp.mean(flow_mi_terms(model, v, p, r, chunk_size=chunk_size)))(
      variables, post, rng)


def mutual_information_report(set_terms: np.ndarray, batch_terms: np.ndarray) -> dict[str, Any]:
  """The MI keys of an evaluation from per-example terms (`metrics.mutual_information_terms`).

  mi_per_batch: He et al. 2019's estimator (each example's mixture q(z) is its length-sorted
    batch of at most 32, `metrics.length_sorted_batches`), the one METHODS.md §6 names and He
    et al.'s Yahoo anchors of METHODS.md §7 report; `mi` is an alias of it.
  mi_set: the mixture of the whole set (or of `mi_set_examples` of it, for flows), larger by
    about I(batch; z) and growing with N towards the population MI; Li et al. 2019's estimator,
    that of the PTB anchors quoted in Optimus.
  Each with its standard error over examples (`metrics.mean_and_stderr`): a value within two of
  them of zero is zero.
  """
  per_batch, per_batch_se = metrics.mean_and_stderr(batch_terms)
  whole, whole_se = metrics.mean_and_stderr(set_terms)
  return {"mi": per_batch, "mi_se": per_batch_se, "mi_per_batch": per_batch,
          "mi_per_batch_se": per_batch_se, "mi_set": whole, "mi_set_se": whole_se,
          "mi_set_examples": int(len(set_terms))}


def mutual_information_metrics(terms_fn: Callable[[Any, jax.Array, Any], jax.Array],
                               posteriors: Any, lengths: np.ndarray, rng: jax.Array, *,
                               set_rows: np.ndarray | None = None) -> dict[str, Any]:
  """`mutual_information_report` of a split's N posteriors.

  `terms_fn(posteriors, rng, mask)` gives the MI terms of a set of posteriors (a pytree with
  the examples on the leading axis; `mask` None or `[n]` marking the real rows), e.g.
  `metrics.gaussian_mi_terms` (closed form; the Gaussian base of the KL-preserving mode, whose
  MI equals that of z_K = f(z_0) as f is a bijection) or `flow_mi_terms` (densities). The whole-
  set estimate uses `set_rows` (all by default; a subset when the cost, quadratic, matters); the
  per-batch one He et al.'s length-sorted batches of `lengths` (e.g. tokens with EOS), one
  compiled program for every batch. Both use the paired (sampled) first term.
  """
  set_rng, batch_rng = jax.random.split(rng)
  rows = np.arange(len(lengths)) if set_rows is None else set_rows
  subset = jax.tree.map(lambda a: a[rows], posteriors)
  set_terms = jax.jit(lambda p, r: terms_fn(p, r, None))(subset, set_rng)

  @jax.jit
  def batch_terms(indices, mask, b):
    return terms_fn(jax.tree.map(lambda a: a[indices], posteriors),
                    jax.random.fold_in(batch_rng, b), mask)

  batches = metrics.length_sorted_batches(lengths, MI_BATCH_SIZE)
  return mutual_information_report(np.asarray(set_terms),
                                   metrics.per_batch_terms(batch_terms, batches, len(lengths)))


def vae_mi_terms_fn(model: nn.Module, variables) -> Callable:
  """The `terms_fn` of `mutual_information_metrics` for a model's `PosteriorParams`."""
  if model.config.posterior in ("gaussian", "kl_preserving"):
    return lambda post, rng, mask: metrics.gaussian_mi_terms(rng, post.mean, post.logvar,
                                                             mask=mask)
  return lambda post, rng, mask: flow_mi_terms(model, variables, post, rng, mask=mask)


def evaluate_vae(model: nn.Module, variables, batches: Iterable[dict], rng: jax.Array, *,
                 k_samples: int = 500, chunk_size: int = 50, au_threshold: float = 0.01,
                 mi_max_examples: int = 0, hole_samples: int = 10_000,
                 num_prior_samples: int = 0, num_interpolations: int = 0,
                 interpolation_steps: int = 10, max_decode_length: int = 40,
                 self_bleu_max: int = 1000) -> dict[str, Any]:
  """IW-NLL (K = k_samples), PPL, ELBO, KL, MI (per batch and whole set), AU, dispersion, hole
  metrics and (optionally) generation metrics of a VAE.

  nll = -mean_x L_K(x); ppl = exp(-sum_x L_K(x) / sum_x (|x| + 1)); elbo is the K-sample Monte
  Carlo ELBO per sentence; kl is the KL per sentence (analytic for a Gaussian base, Monte Carlo
  for a flow posterior); each with its standard error over sentences (`nll_se`, `elbo_se`,
  `kl_se`). MI follows METHODS.md §6 (`mutual_information_metrics`: `mi` = `mi_per_batch`, He
  et al.'s estimator, and `mi_set`, each with its standard error); for a posterior without a
  closed form `mi_set` uses at most `mi_max_examples` sentences (a random subset; 0: all), its
  cost being quadratic. AU (`active_unit_report`) is from the variance of E_q[z|x] (for flows,
  the covariance of two independent sampled estimates of it), with the per-dimension variances.

  dispersion: the variance across the split of the encoder feature fed to the posterior heads,
  averaged over its dimensions (Long et al. 2019's diagnostic of collapse).

  Hole metrics (METHODS.md §2, `vae_jax.holes`) with q_agg the mixture of the split's
  posteriors: hole_kl = KL(p || q_agg) by Monte Carlo over `hole_samples` prior samples (with
  its standard error), beside hole_kl_null, the same estimator on null sets of the same N and
  widths whose population aggregate is the prior (its finite-mixture bias), and hole_kl_excess,
  their difference, each with a standard error (`holes.null_calibrated_hole_kl`); marginal_kl
  per dimension and prior_matched_dims (marginal KL < 0.03). In the KL-preserving mode they are
  computed on z_0 (KL is invariant under the shared bijection f); for a flow posterior (and
  DELLA's chain) the joint metrics only, with the flow's density, on the `mi_max_examples`
  subset and at most 1,000 prior samples, the null's widths from sampled codes
  (`flow_hole_metrics`; the marginals have no closed form).

  With `num_prior_samples` > 0, that many prior codes, and with `num_interpolations` > 0 that
  many random pairs of the split's sentences, each with `interpolation_steps` codes on the
  segment between their point codes (endpoints included), are decoded greedily and scored by
  `generation_metrics` (keys `prior_*` and `interp_*`).
  """
  eval_rng, mi_rng, hole_rng, gen_rng = jax.random.split(rng, 4)
  batch_eval = make_vae_batch_eval(model, k_samples, chunk_size)
  out = collect(batch_eval, batches, eval_rng, variables)
  log_px = out["log_px"].astype(np.float64)
  n_tokens = float(out["n_tokens"].sum())
  mean, logvar = jnp.asarray(out["mean"]), jnp.asarray(out["logvar"])
  post = PosteriorParams(mean, logvar, jnp.asarray(out["context"]) if "context" in out else None)
  rows = np.arange(len(mean))
  if mi_max_examples and mi_max_examples < len(rows):
    rows = np.sort(np.random.default_rng(0).choice(rows, mi_max_examples, replace=False))
  closed_form = model.config.posterior in ("gaussian", "kl_preserving")
  result = mutual_information_metrics(vae_mi_terms_fn(model, variables), post, out["n_tokens"],
                                      mi_rng, set_rows=None if closed_form else rows)
  if closed_form:
    result.update(holes.gaussian_hole_metrics(hole_rng, mean, logvar, num_samples=hole_samples))
  else:  # a flow or DELLA's chain
    result.update(flow_hole_metrics(model, variables, jax.tree.map(lambda a: a[rows], post),
                                    hole_rng, num_samples=min(hole_samples, 1000)))
  features = out["features"].astype(np.float64)
  nll, nll_se = metrics.mean_and_stderr(-log_px)
  elbo, elbo_se = metrics.mean_and_stderr(out["elbo"])
  kl, kl_se = metrics.mean_and_stderr(out["kl"])
  result = {
      "nll": nll, "nll_se": nll_se,
      "ppl": float(np.exp(-log_px.sum() / n_tokens)),
      "elbo": elbo, "elbo_se": elbo_se,
      "kl": kl, "kl_se": kl_se,
      **active_unit_report(out["code_mean"], out["code_mean_b"], au_threshold),
      "dispersion": float(features.var(axis=0).mean()),
      **result,
      **(layer_active_units(out["layer_means"]) if "layer_means" in out else {}),
      "k_samples": int(k_samples),
      "n_sentences": int(log_px.shape[0]),
      "n_tokens": int(n_tokens),
  }
  prior_rng, interp_rng = jax.random.split(gen_rng)
  if num_prior_samples:
    z = prior_codes(model, variables, prior_rng, num_prior_samples, mean.shape[1])
    scores = generation_metrics(model, variables, z, max_length=max_decode_length,
                                self_bleu_max=self_bleu_max)
    result.update({f"prior_{k}": v for k, v in scores.items()})
  if num_interpolations:
    post = PosteriorParams(mean, logvar, jnp.asarray(out["context"]) if "context" in out else None)
    z = interpolate_pairs(interp_rng, point_codes(model, variables, post), num_interpolations,
                          interpolation_steps)
    scores = generation_metrics(model, variables, z, max_length=max_decode_length,
                                self_bleu_max=self_bleu_max)
    result.update({f"interp_{k}": v for k, v in scores.items()})
  return result


def active_unit_report(code_mean: np.ndarray, code_mean_b: np.ndarray,
                       threshold: float = 0.01) -> dict[str, Any]:
  """AU (`metrics.active_units`: Var_x E_q[z_k|x] > threshold) with what decides the count:
  `au_variances`, the variance of every dimension (in dimension order), and `au_near`, the
  number of dimensions within a factor 2 of the threshold (where the count is fragile)."""
  au, variances = metrics.active_units(jnp.asarray(code_mean), threshold=threshold,
                                       independent_means=jnp.asarray(code_mean_b))
  variances = np.asarray(variances, np.float64)
  near = int(np.sum((variances > threshold / 2) & (variances < threshold * 2)))
  return {"au": int(au), "au_threshold": float(threshold), "au_near": near,
          "au_variances": [float(v) for v in variances]}


def layer_active_units(layer_means: np.ndarray,
                       thresholds: tuple[float, ...] = (0.01, 0.2)) -> dict[str, Any]:
  """Active units of layer-wise latents (DELLA, Hu et al. 2022) from the z-space posterior
  means `[N, L, d]`: per threshold, the count per layer (`au_layers_<t>`), their sum
  (`au_z_<t>`) and their mean over layers (`au_layer_mean_<t>`, the paper reports it at 0.2)."""
  variance = np.asarray(layer_means, np.float64).var(axis=0)  # [L, d]
  out = {}
  for t in thresholds:
    per_layer = (variance > t).sum(axis=-1)
    out[f"au_layers_{t:g}"] = [int(a) for a in per_layer]
    out[f"au_z_{t:g}"] = int(per_layer.sum())
    out[f"au_layer_mean_{t:g}"] = float(per_layer.mean())
  return out


def flow_hole_metrics(model: nn.Module, variables, post: PosteriorParams, rng: jax.Array, *,
                      num_samples: int = 1000, width_samples: int = 64,
                      num_null_sets: int = holes.DEFAULT_NULL_SETS,
                      chunk_size: int = 16) -> dict[str, Any]:
  """`holes.null_calibrated_hole_kl` for any posterior family, as host values.

  q_agg from `SeqVAE.posterior_log_prob` (flow inversions; cost O(num_samples * N)); prior
  codes are decoder-space codes. The null sets are diagonal Gaussians whose widths are each
  posterior's per-dimension variances, estimated from `width_samples` of its codes: a null of
  matched widths, not of matched shapes (exact for Gaussian posteriors).
  """

  @jax.jit
  def run(variables, post, rng):
    width_rng, hole_rng = jax.random.split(rng)
    codes, _, _ = model.apply(variables, post, width_rng, width_samples, method="sample_codes")
    logvar = jnp.log(jnp.var(codes, axis=0, ddof=1))
    pairwise = lambda zc: model.apply(variables, zc[:, None, :], post,
                                      method="posterior_log_prob")
    return holes.null_calibrated_hole_kl(hole_rng, pairwise, logvar,
                                         num_null_sets=num_null_sets, num_samples=num_samples,
                                         chunk_size=chunk_size)

  return holes.host_values(run(variables, post, rng))


@functools.partial(jax.jit, static_argnames=("model",))
def point_codes(model: nn.Module, variables, post: PosteriorParams) -> jax.Array:
  """`[N, d]` the point code of each posterior (`point_code`), one compiled program."""
  return model.apply(variables, post, method="point_code")


@functools.partial(jax.jit, static_argnames=("model", "num", "latent_dim"))
def prior_codes(model: nn.Module, variables, rng: jax.Array, num: int,
                latent_dim: int) -> jax.Array:
  """`[num, d]` decoder-space prior codes: z ~ N(0, I), or f(z) in the KL-preserving mode."""
  z = jax.random.normal(rng, (num, latent_dim))
  if has_latent(model):
    z = model.apply(variables, z, method="prior_code")
  return z


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
  """Decodes codes `z [N, d]` greedily and scores the sentences (METHODS.md §2, §6):

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
  """Greedy reconstructions x̂ = greedy_decode(point_code(q(z|x))) of the sentences in
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


def make_lm_batch_eval(model: nn.Module) -> Callable:

  @jax.jit
  def batch_eval(variables, tokens, rng):
    del rng
    terms = model.apply(variables, tokens, deterministic=True)
    return {"nll": terms.rec_nll, "n_tokens": terms.n_tokens}

  return batch_eval


def evaluate_lm(model: nn.Module, variables, batches: Iterable[dict],
                rng: jax.Array) -> dict[str, Any]:
  """Exact NLL and PPL of a language model (no latent: KL = MI = AU = 0)."""
  out = collect(make_lm_batch_eval(model), batches, rng, variables)
  nll = out["nll"].astype(np.float64)
  n_tokens = float(out["n_tokens"].sum())
  return {
      "nll": float(nll.mean()),
      "ppl": float(np.exp(nll.sum() / n_tokens)),
      "elbo": float(-nll.mean()),
      "kl": 0.0, "mi": 0.0, "au": 0,
      "k_samples": 0,
      "n_sentences": int(nll.shape[0]),
      "n_tokens": int(n_tokens),
  }


@functools.partial(jax.jit, static_argnames=("model", "max_length", "greedy", "batch_size"))
def generate(model: nn.Module, variables, z: jax.Array | None, rng: jax.Array, *,
             max_length: int, greedy: bool, batch_size: int | None = None) -> jax.Array:
  """Decodes from codes z (`[N, d]`; None for a language model): greedy or sampled."""
  if z is None:
    state = model.apply(variables, batch_size, method=type(model).initial_state)
  else:
    state = model.apply(variables, z, method=type(model).initial_state)
  n = z.shape[0] if z is not None else batch_size
  step_fn = lambda s, t: model.apply(variables, s, t, z, method=type(model).decode_step)
  if greedy:
    return decoding.greedy_decode(step_fn, state, n, max_length)
  return decoding.sample_decode(step_fn, state, rng, n, max_length)


def reconstruct(model: nn.Module, variables, tokens: jax.Array, rng: jax.Array,
                max_length: int) -> jax.Array:
  """Greedy decoding from each sentence's point code (the posterior mean, or its image under the
  flow)."""
  return generate(model, variables, _encoded_point_codes(model, variables, tokens), rng,
                  max_length=max_length, greedy=True)


@functools.partial(jax.jit, static_argnames=("model",))
def _encoded_point_codes(model: nn.Module, variables, tokens: jax.Array) -> jax.Array:
  return model.apply(variables, model.apply(variables, tokens, method="encode"),
                     method="point_code")


def sample_prior(model: nn.Module, variables, rng: jax.Array, num: int, latent_dim: int,
                 max_length: int, greedy: bool = True) -> jax.Array:
  """Decodes prior samples (greedily by default, as in Bowman et al. 2016): z ~ N(0, I), or
  f(z) in the KL-preserving mode."""
  z_rng, dec_rng = jax.random.split(rng)
  z = prior_codes(model, variables, z_rng, num, latent_dim)
  return generate(model, variables, z, dec_rng, max_length=max_length, greedy=greedy)


@functools.partial(jax.jit, static_argnames=("model", "num_samples"))
def features(model: nn.Module, variables, tokens: jax.Array, rng: jax.Array,
             num_samples: int = 32) -> jax.Array:
  """A fixed-size feature per sentence `[B, F]` for probing classifiers (METHODS.md §3): the
  posterior mean E_q[z|x] of a VAE (a `num_samples` average for flow posteriors), the final
  hidden state of a language model."""
  if has_latent(model):
    return model.apply(variables, tokens, rng, num_samples, method="code_mean")
  return model.apply(variables, tokens, method=type(model).final_hidden)


# The per-example posterior summaries of `posterior_summaries`, in their packed order.
POSTERIOR_SUMMARY_KEYS = ("mean", "logvar", "code_mean", "code_mean_b")


def posterior_summaries(batch_eval: Callable, variables, data, rng: jax.Array, *,
                        batch_size: int, pad_multiple: int = 8,
                        keys: tuple[str, ...] = ("tokens",)) -> dict[str, np.ndarray]:
  """Per-example posterior summaries of every example of `data`, row i = example i.

  `batch_eval(variables, *batch[keys], rng)` is the evaluation's own per-batch function
  (`make_vae_batch_eval`, or `dialogue_evaluation.make_cvae_batch_eval` with `keys =
  CVAE.input_keys`; k_samples = 1 makes its likelihood part one decoder pass), so the numbers
  are those the evaluation computes its KL, MI and AU from:

    mean, logvar: `[N, d]` the base Gaussian N(mean, exp(logvar)) of q (DELLA's whitened
      Gaussian along the chain of posterior means; the dialogue CVAE's in prior coordinates);
    code_mean, code_mean_b: `[N, d]` two estimates of E_q[z|x] (exact and equal for a Gaussian
      posterior; independent sample averages otherwise, for `metrics.active_units`).

  Batches come from `probe.feature_matrix` (the data's own order, padding rows dropped).
  """

  def packed(*inputs):
    *arrays, index = inputs
    out = batch_eval(variables, *arrays, jax.random.fold_in(rng, index))
    return np.concatenate([to_host(out[k]) for k in POSTERIOR_SUMMARY_KEYS], axis=1)

  matrix = probe.feature_matrix(data, packed, batch_size, pad_multiple, keys)
  return dict(zip(POSTERIOR_SUMMARY_KEYS, np.split(matrix, len(POSTERIOR_SUMMARY_KEYS), 1)))


def dimension_statistics(summary: dict[str, np.ndarray], au_threshold: float = 0.01
                         ) -> dict[str, Any]:
  """Per-dimension statistics of a set's `posterior_summaries`.

    kl_dims[d] = mean_x KL(N(mean_d(x), exp(logvar_d(x))) || N(0, 1))
               = mean_x 0.5 (mean_d² + exp(logvar_d) - logvar_d - 1),

  the analytic KL per dimension of the base Gaussian (the posterior's own KL for a Gaussian or
  KL-preserving posterior, where the KL is the sum over d; not so for a flow or DELLA's chain),
  and au_variance[d] = Var_x E_q[z_d|x] (`metrics.active_units`, the unbiased covariance of the
  two independent estimates where E_q[z|x] is sampled), with `au` the number of dimensions
  whose variance exceeds `au_threshold`.
  """
  kl = objectives.gaussian_kl(jnp.asarray(summary["mean"]), jnp.asarray(summary["logvar"]))
  au, variance = metrics.active_units(jnp.asarray(summary["code_mean"]),
                                      threshold=au_threshold,
                                      independent_means=jnp.asarray(summary["code_mean_b"]))
  return {"kl_dims": np.asarray(kl, np.float64).mean(axis=0), "au_variance": np.asarray(variance),
          "au": int(au), "au_threshold": float(au_threshold)}
