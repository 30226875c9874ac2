"""The one evaluation of a trained model (METHODS.md §6), for every model of the latent-model
protocol (`vae_jax.posteriors`): the LSTM VAE in all its posterior families, the dialogue CVAE
(against its conditional prior), DELLA, and the language models (the code-less case, where the
importance-weighted bound is the exact likelihood and KL = MI = AU = 0).

`evaluate` returns IW-NLL, PPL, ELBO, KL (each with its standard error), MI (per batch and
whole set), AU, the encoder-feature dispersion (Long et al. 2019), the hole metrics
(METHODS.md §2) and, for models with an unconditional prior, the generation metrics of prior
samples and interpolations (`vae_jax.generation`). It consumes batches in the project's
format (global `jax.Array`s sharded over the mesh when given one); per-example quantities are
computed under `jit` batch by batch, the set-level ones (MI, AU, holes) from the posteriors of
the whole split, rebuilt from their collected `PosteriorParams`. `posterior_summaries` and
`dimension_statistics` give the per-dimension KL and active-unit statistic behind those numbers
(drawn by experiments/report.py).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vae_jax import (generation, holes, metrics, mutual_information, objectives, posteriors,
                     probe)
from vae_jax.generation import to_host
from vae_jax.data.vocab import PAD


def make_batch_eval(model: nn.Module, k_samples: int, chunk_size: int,
                    mean_samples: int = 32) -> Callable:
  """Jitted per-batch evaluation `(variables, *inputs, rng) -> dict of [B, ...] arrays`
  (inputs: the batch entries `model.input_keys`).

  log_px: the importance-weighted bound L_K(x) with K = `k_samples` samples of the model's own
    posterior (`Posterior.log_weights`), `chunk_size` decoded at a time; elbo: the mean of the
    K log weights. kl: analytic for a closed form, else the Monte Carlo mean over K fresh
    samples. code_mean, code_mean_b: E_q[u|x] (exact and equal for a closed form, else two
    independent `mean_samples` averages, for an unbiased active-unit count). mean, logvar: the
    base Gaussian in latent coordinates. params: the posterior parameters (for the set-level
    metrics). aux: the model's auxiliary NLLs at the point code (the CVAE's bag of words).
  The rng is split (IW key, other key); the KL's samples use the other key folded with 1.
  """

  def evaluate_batch(m, inputs, rng):
    iw_rng, mean_rng = jax.random.split(rng)
    tokens = inputs[0]
    features = m.encoder_features(*inputs)
    params = m.encode(*inputs, features=features)
    post = m.posterior(params)

    def log_likelihood(cond):  # [n, B, ...] decoder inputs -> [n, B]
      n, b = cond.shape[:2]
      tiled = jnp.broadcast_to(tokens[None], (n, *tokens.shape)).reshape(n * b, -1)
      return m.log_likelihood(tiled, cond.reshape(n * b, *cond.shape[2:])).reshape(n, b)

    log_px, elbo = metrics.iw_log_likelihood(
        lambda r, n: post.log_weights(r, n, log_likelihood), iw_rng, k_samples, chunk_size,
        return_elbo=True)
    code_mean, code_mean_b = post.mean_estimates(mean_rng, mean_samples)
    mean, logvar = post.whitened_base()
    return {"log_px": log_px, "elbo": elbo,
            "kl": post.kl(jax.random.fold_in(mean_rng, 1), k_samples),
            "n_tokens": jnp.sum(tokens != PAD, axis=-1).astype(jnp.float32), "mean": mean,
            "logvar": logvar,
            "code_mean": code_mean, "code_mean_b": code_mean_b, "features": features,
            "params": params,
            "aux": m.auxiliary_nlls(tokens, m.decoder_input(post.point(), params))}

  @jax.jit
  def batch_eval(variables, *inputs_and_rng):
    *inputs, rng = inputs_and_rng
    return model.apply(variables, tuple(inputs), rng, method=evaluate_batch)

  return batch_eval


def collect(batch_eval: Callable, batches: Iterable[dict], rng: jax.Array, *args,
            keys: tuple[str, ...] = ("tokens",)) -> dict[str, Any]:
  """Runs `batch_eval(*args, *batch[keys], rng_i)` over all batches; the per-example outputs
  (pytrees) of real rows, concatenated."""
  parts: list[dict] = []
  for i, batch in enumerate(batches):
    out = batch_eval(*args, *(batch[k] for k in keys), jax.random.fold_in(rng, i))
    real = to_host(batch["weights"]) > 0
    parts.append(jax.tree.map(lambda v: to_host(v)[real], out))
  if not parts:
    raise ValueError("the evaluation split is empty: no batches to evaluate")
  return jax.tree.map(lambda *v: np.concatenate(v), *parts)


# He et al. 2019 evaluate in length-sorted batches of 32 (their PTB and Yahoo runs); their MI is
# the size-weighted average of per-batch estimates (`mutual_information.length_sorted_batches`).
MI_BATCH_SIZE = 32


def posterior_mi_terms(model: nn.Module, variables, params: posteriors.PosteriorParams,
                       rng: jax.Array, *, mask: jax.Array | None = None,
                       chunk_size: int = 16) -> jax.Array:
  """`mutual_information.mutual_information_terms` for any posterior family (METHODS.md §6):

    t_i = log q(u_i|x_i) - log (1/N) sum_j q(u_i|x_j),  u_i ~ q(u|x_i),

  with every log q(u|x_j) from `Posterior.log_prob` (for flows by inverting x_j's flow),
  `chunk_size` query codes against all N posteriors at a time: O(N^2) density evaluations.
  `mask` drops padding rows from the mixture (their terms are meaningless).
  """

  def terms(m, params, rng):
    post = m.posterior(params)
    u, log_q = post.sample(rng, 1)
    log_q_agg = mutual_information.aggregate_posterior_log_prob(
        u[0], lambda uc: post.log_prob(uc[:, None, :]), mask=mask, chunk_size=chunk_size)
    return mutual_information.mutual_information_terms(log_q[0], log_q_agg)

  return model.apply(variables, params, rng, method=terms)


def mi_terms_fn(model: nn.Module, variables) -> Callable:
  """The `terms_fn` of `mutual_information_metrics` over a set's `PosteriorParams`: the
  closed form for a Gaussian in latent coordinates (`mutual_information.gaussian_mi_terms`), the
  densities otherwise (`posterior_mi_terms`)."""
  if model.posterior_family.closed_form:
    def gaussian_terms(params, rng, mask):
      mean, logvar = posteriors.call(model, variables, params, lambda q: q.gaussian())
      return mutual_information.gaussian_mi_terms(rng, mean, logvar, mask=mask)
    return gaussian_terms
  return lambda params, rng, mask: posterior_mi_terms(model, variables, params, rng, mask=mask)


def mutual_information_report(set_terms: np.ndarray, batch_terms: np.ndarray) -> dict[str, Any]:
  """The MI keys of an evaluation from per-example terms
  (`mutual_information.mutual_information_terms`).

  mi_per_batch: He et al. 2019's estimator (each example's mixture q(z) is its length-sorted
    batch of at most 32, `mutual_information.length_sorted_batches`), the one METHODS.md §6
    names and He et al.'s Yahoo anchors of METHODS.md §7 report; `mi` is an alias of it.
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
                               params: Any, lengths: np.ndarray, rng: jax.Array, *,
                               set_rows: np.ndarray | None = None) -> dict[str, Any]:
  """`mutual_information_report` of a split's N posteriors.

  `terms_fn(params, rng, mask)` gives the MI terms of a set of posteriors (a pytree with the
  examples on the leading axis; `mask` None or `[n]` marking the real rows), e.g. a closed
  form (`mutual_information.gaussian_mi_terms`) or the densities (`posterior_mi_terms`); see
  `mi_terms_fn`. The whole-set estimate uses `set_rows` (all by default; a subset when the
  cost, quadratic, matters); the per-batch one He et al.'s length-sorted batches of `lengths` (e.g. tokens with EOS), one
  compiled program for every batch. Both use the paired (sampled) first term.
  """
  set_rng, batch_rng = jax.random.split(rng)
  rows = np.arange(len(lengths)) if set_rows is None else set_rows
  subset = jax.tree.map(lambda a: a[rows], params)
  set_terms = jax.jit(lambda p, r: terms_fn(p, r, None))(subset, set_rng)

  @jax.jit
  def batch_terms(indices, mask, b):
    return terms_fn(jax.tree.map(lambda a: a[indices], params),
                    jax.random.fold_in(batch_rng, b), mask)

  batches = mutual_information.length_sorted_batches(lengths, MI_BATCH_SIZE)
  per_batch = mutual_information.per_batch_terms(batch_terms, batches, len(lengths))
  return mutual_information_report(np.asarray(set_terms), per_batch)


def flow_hole_metrics(model: nn.Module, variables, params: posteriors.PosteriorParams,
                      rng: jax.Array, *, num_samples: int = 1000, width_samples: int = 64,
                      num_null_sets: int = holes.DEFAULT_NULL_SETS,
                      chunk_size: int = 16) -> dict[str, Any]:
  """`holes.null_calibrated_hole_kl` for a posterior without a closed form, as host values.

  q_agg from `Posterior.log_prob` (flow inversions, DELLA's chain; cost O(num_samples * N));
  prior codes are latent codes. The null sets are diagonal Gaussians whose widths are each
  posterior's per-dimension variances, estimated from `width_samples` of its codes: a null of
  matched widths, not of matched shapes (exact for Gaussian posteriors).
  """

  def hole_kl(m, params, rng):
    post = m.posterior(params)
    width_rng, hole_rng = jax.random.split(rng)
    logvar = jnp.log(jnp.var(post.sample(width_rng, width_samples)[0], axis=0, ddof=1))
    return holes.null_calibrated_hole_kl(hole_rng, lambda uc: post.log_prob(uc[:, None, :]),
                                         logvar, num_null_sets=num_null_sets,
                                         num_samples=num_samples, chunk_size=chunk_size)

  return holes.host_values(jax.jit(lambda v, p, r: model.apply(v, p, r, method=hole_kl))(
      variables, params, rng))


def _subset(n: int, max_examples: int) -> np.ndarray:
  """A sorted random subset of `max_examples` of n rows (all when 0 or n is smaller)."""
  rows = np.arange(n)
  if max_examples and max_examples < n:
    rows = np.sort(np.random.default_rng(0).choice(rows, max_examples, replace=False))
  return rows


def evaluate(model: nn.Module, variables, batches: Iterable[dict], rng: jax.Array, *,
             k_samples: int = 500, chunk_size: int = 50, au_threshold: float = 0.01,
             mi_max_examples: int = 0, hole_samples: int = 10_000,
             num_prior_samples: int = 0, num_interpolations: int = 0,
             interpolation_steps: int = 10, max_decode_length: int = 40,
             self_bleu_max: int = 1000, per_sentence: bool = False):
  """IW-NLL (K = k_samples), PPL, ELBO, KL, MI (per batch and whole set), AU, dispersion, hole
  metrics and (optionally) generation metrics of any model of the protocol.

  nll = -mean_x L_K(x); ppl = exp(-sum_x L_K(x) / sum_x (|x| + 1)); elbo is the K-sample Monte
  Carlo ELBO per sentence (ppl_elbo its perplexity); kl is the KL per sentence (analytic for a
  closed form, Monte Carlo otherwise); each with its standard error over sentences (`nll_se`,
  `elbo_se`, `kl_se`). A model without a code is evaluated exactly (one sample, `k_samples`
  reported 0; kl = mi = au = 0). MI follows METHODS.md §6 (`mutual_information_metrics`: `mi`
  = `mi_per_batch`, He et al.'s estimator, and `mi_set`, each with its standard error); without
  a closed form `mi_set` uses at most `mi_max_examples` sentences (a random subset; 0: all),
  its cost being quadratic. AU (`active_unit_report`) is from the variance of E_q[u|x] (for
  sampled estimates, the covariance of two independent ones), with the per-dimension variances.

  dispersion: the variance across the split of the encoder feature fed to the posterior heads,
  averaged over its dimensions (Long et al. 2019's diagnostic of collapse).

  Hole metrics (METHODS.md §2, `vae_jax.holes`) with q_agg the mixture of the split's
  posteriors in latent coordinates: hole_kl = KL(p || q_agg) by Monte Carlo over
  `hole_samples` prior samples (with its standard error), beside hole_kl_null, the same
  estimator on null sets of the same N and widths whose population aggregate is the prior
  (its finite-mixture bias), and hole_kl_excess, their difference, each with a standard error
  (`holes.null_calibrated_hole_kl`); marginal_kl per dimension and prior_matched_dims
  (marginal KL < 0.03) for a closed form; without one, the joint metrics only, with the
  posterior's density, on the `mi_max_examples` subset and at most 1,000 prior samples
  (`flow_hole_metrics`; the marginals have no closed form).

  With `num_prior_samples` > 0, that many prior codes, and with `num_interpolations` > 0 that
  many random pairs of the split's sentences, each with `interpolation_steps` codes on the
  segment between their point codes (endpoints included), are decoded greedily and scored by
  `generation.generation_metrics` (keys `prior_*` and `interp_*`); models with an
  unconditional prior only (the dialogue CVAE's generation is `vae_jax.dialogue_evaluation`).

  With `per_sentence`, returns `(metrics, sentences)`, `sentences` holding `[N]` arrays in
  the order the batches gave their real rows: 'nll' = -L_K(x) (float64) and 'n_tokens'
  (|x| + 1, int64). Paired per-sentence differences between two models (or a model and the exact
  likelihood) have far smaller standard errors than the difference of their means.
  """
  eval_rng, mi_rng, hole_rng, gen_rng = jax.random.split(rng, 4)
  dim = model.code_dim
  k = k_samples if dim else 1
  out = collect(make_batch_eval(model, k, chunk_size), batches, eval_rng, variables,
                keys=model.input_keys)
  log_px = out["log_px"].astype(np.float64)
  n_tokens = float(out["n_tokens"].sum())
  result = {}
  if dim:
    params = jax.tree.map(jnp.asarray, out["params"])
    closed_form = model.posterior_family.closed_form
    rows = None if closed_form else _subset(len(log_px), mi_max_examples)
    result.update(mutual_information_metrics(mi_terms_fn(model, variables), params,
                                             out["n_tokens"], mi_rng, set_rows=rows))
    if closed_form and hole_samples:
      result.update(holes.gaussian_hole_metrics(hole_rng, jnp.asarray(out["mean"]),
                                                jnp.asarray(out["logvar"]),
                                                num_samples=hole_samples))
    elif hole_samples:
      result.update(flow_hole_metrics(model, variables, jax.tree.map(lambda a: a[rows], params),
                                      hole_rng, num_samples=min(hole_samples, 1000)))
    result.update(active_unit_report(out["code_mean"], out["code_mean_b"], au_threshold))
  else:
    result.update(mi=0.0, au=0)
  nll, nll_se = metrics.mean_and_stderr(-log_px)
  elbo, elbo_se = metrics.mean_and_stderr(out["elbo"])
  kl, kl_se = metrics.mean_and_stderr(out["kl"])
  result = {
      "nll": nll, "nll_se": nll_se,
      "ppl": float(np.exp(-log_px.sum() / n_tokens)),
      "elbo": elbo, "elbo_se": elbo_se,
      "ppl_elbo": float(np.exp(-out["elbo"].astype(np.float64).sum() / n_tokens)),
      "kl": kl, "kl_se": kl_se,
      "dispersion": float(out["features"].astype(np.float64).var(axis=0).mean()),
      **result,
      **{key.removesuffix("_nll"): float(v.astype(np.float64).mean())
         for key, v in out["aux"].items()},
      "k_samples": int(k_samples) if dim else 0,
      "n_sentences": int(log_px.shape[0]),
      "n_tokens": int(n_tokens),
  }
  prior_rng, interp_rng = jax.random.split(gen_rng)
  if dim and num_prior_samples:
    z = generation.decoder_inputs(model, variables,
                                  jax.random.normal(prior_rng, (num_prior_samples, dim)))
    result.update(_prefixed("prior", generation.generation_metrics(
        model, variables, z, max_length=max_decode_length, self_bleu_max=self_bleu_max)))
  if dim and num_interpolations:
    u = generation.interpolate_pairs(interp_rng,
                                     generation.point_codes(model, variables, params),
                                     num_interpolations, interpolation_steps)
    result.update(_prefixed("interp", generation.generation_metrics(
        model, variables, generation.decoder_inputs(model, variables, u),
        max_length=max_decode_length, self_bleu_max=self_bleu_max)))
  if per_sentence:
    return result, {"nll": -log_px, "n_tokens": out["n_tokens"].astype(np.int64)}
  return result


def _prefixed(prefix: str, scores: dict[str, float]) -> dict[str, float]:
  return {f"{prefix}_{k}": v for k, v in scores.items()}


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


# The per-example posterior summaries of `posterior_summaries`, in their packed order.
POSTERIOR_SUMMARY_KEYS = ("mean", "logvar", "code_mean", "code_mean_b")


def posterior_summaries(batch_eval: Callable, variables, data, rng: jax.Array, *,
                        batch_size: int, pad_multiple: int = 8,
                        keys: tuple[str, ...] = ("tokens",)) -> dict[str, np.ndarray]:
  """Per-example posterior summaries of every example of `data`, row i = example i.

  `batch_eval(variables, *batch[keys], rng)` is the evaluation's own per-batch function
  (`make_batch_eval`, with `keys = model.input_keys`; k_samples = 1 makes its likelihood part
  one decoder pass), so the numbers are those the evaluation computes its KL, MI and AU from:

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
