"""Loss functions: model terms -> (scalar loss, sums), in the form the training loop takes.

A loss function has the signature

    loss_fn(params, model_state, batch, rng, step) -> (loss, (sums, new_model_state))

`loss` is what the optimiser minimises (a mean over the batch's real rows); `sums` are sums over
real rows plus the denominators `n_sentences` and `n_tokens`, reduced across devices by `jit` and
divided on the host by `summarize`, so reported numbers are exact however data are batched.

The negative ELBO of a sentence is  rec + KL  with rec = -log p(x|z), z ~ q(z|x); training
minimises  mean_x [rec(x)] + beta(step) * KL_term  (+ loss weights times the amortised
regulariser and the bag-of-words NLL), where KL_term is an entry of `vae_jax.kl_terms.KL_TERMS`
chosen by name: the batch-mean KL, free bits on the batch mean or per sentence, DG-VAE's
density gap, DELLA's layer-wise hinge. The per-example pieces are `vae_jax.objectives`'.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vae_jax import kl_terms, mutual_information

Sums = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, tuple[Sums, Any]]]


def _gaussian_codes(model: nn.Module) -> bool:
  """Whether `model`'s posteriors are Gaussian in latent coordinates whose prior is N(0, I)
  (`mean`, `logvar`, `kl_dims` of its terms): a closed-form family of the latent-model
  protocol ('gaussian', 'kl_preserving'), not a flow, not DELLA's chain, not a model without
  a code."""
  return bool(model.code_dim) and model.posterior_family.closed_form


def _weighted_sum(x: jax.Array, weights: jax.Array) -> jax.Array:
  return jnp.sum(x * weights.reshape(weights.shape + (1,) * (x.ndim - 1)), axis=0)


def vae_sums(terms, weights: jax.Array) -> Sums:
  """Sums over real rows of a VAE pass, plus what `summarize` needs for KL, AU and PPL.

  `mean_sum` / `mean_sq_sum` (`[d]`) give the across-data variance of the (base) posterior
  means, from which active units are counted (Burda et al. 2016) without a second pass;
  `feature_sum` / `feature_sq_sum` (`[F]`) that of the encoder feature (the dispersion
  diagnostic of Long et al. 2019).
  """
  sums = {
      "rec": jnp.sum(terms.rec_nll * weights),
      "kl": jnp.sum(terms.kl * weights),
      "n_sentences": jnp.sum(weights),
      "n_tokens": jnp.sum(terms.n_tokens * weights),
      "mean_sum": _weighted_sum(terms.mean, weights),
      "mean_sq_sum": _weighted_sum(jnp.square(terms.mean), weights),
      "feature_sum": _weighted_sum(terms.features, weights),
      "feature_sq_sum": _weighted_sum(jnp.square(terms.features), weights),
  }
  return sums


def lm_sums(terms, weights: jax.Array) -> Sums:
  return {
      "rec": jnp.sum(terms.rec_nll * weights),
      "n_sentences": jnp.sum(weights),
      "n_tokens": jnp.sum(terms.n_tokens * weights),
  }


def _variables(params, model_state):
  return {"params": params, **(model_state or {})}


def model_inputs(model: nn.Module, batch) -> tuple:
  """The batch entries a model's `__call__` reads: `model.input_keys` (e.g. the dialogue
  CVAE's tokens, context and speakers), `batch["tokens"]` alone by default."""
  return tuple(batch[k] for k in model.input_keys)


def _apply_train(model, params, model_state, batch, rngs):
  """A training pass; mutable collections (BN-VAE's 'batch_stats') are updated and returned."""
  variables = _variables(params, model_state)
  inputs = model_inputs(model, batch)
  if model_state:
    return model.apply(variables, *inputs, deterministic=False, rngs=rngs,
                       mutable=list(model_state))
  return model.apply(variables, *inputs, deterministic=False, rngs=rngs), model_state


def _kl_term(model: nn.Module, name: str, options) -> tuple[kl_terms.KLTerm, Any]:
  """The registry entry `name` and its options (None: the defaults), checked against `model`."""
  term = kl_terms.entry(name)
  options = term.options() if options is None else options
  if not isinstance(options, term.options):
    raise TypeError(f"the options of KL term {name!r} are a {term.options.__name__}, not "
                    f"{type(options).__name__}")
  if term.needs_gaussian(options) and not _gaussian_codes(model):
    raise ValueError(f"KL term {name!r} with {options} needs Gaussian posteriors in latent "
                     "coordinates (a per-dimension KL, mean and logvar: posterior 'gaussian' or "
                     "'kl_preserving'), which this model does not have")
  return term, options


def make_vae_loss(model: nn.Module, kl_weight: optax.Schedule, kl_term: str = "kl",
                  kl_options: Any = None, *, smoothness_weight: float = 0.0,
                  bow_weight: float = 0.0) -> LossFn:
  """mean_x rec(x) + kl_weight(step) · KL_term for a model returning `VAETerms` (or kin).

  KL_term is `kl_terms.KL_TERMS[kl_term]` with `kl_options` (that entry's options dataclass;
  None: its defaults), e.g. the batch-mean KL ('kl', the β-weighted negative ELBO), free bits,
  or DG-VAE's density gap (logged as `density_gap`). The loss adds `smoothness_weight` times
  the amortised regulariser mean_x ‖μ(x) - μ(x̃)‖² (METHODS.md §3; the model computes it when
  its `smoothness_dropout` > 0) and `bow_weight` times the bag-of-words NLL of a model whose
  terms carry one (the dialogue CVAE's auxiliary loss, Zhao et al. 2017).

  Raises:
    ValueError: an unknown term, or one that needs Gaussian posteriors the model lacks.
    TypeError: `kl_options` of another entry's options class.
  """
  term, options = _kl_term(model, kl_term, kl_options)

  def loss_fn(params, model_state, batch, rng, step):
    latent_rng, dropout_rng, term_rng = jax.random.split(rng, 3)
    terms, model_state = _apply_train(model, params, model_state, batch,
                                      {"latent": latent_rng, "dropout": dropout_rng})
    w = batch["weights"]
    n = jnp.maximum(jnp.sum(w), 1.0)
    beta = kl_weight(step)
    kl = term.fn(terms, w, term_rng, options)
    loss = jnp.sum(terms.rec_nll * w) / n + beta * kl
    sums = vae_sums(terms, w)
    sums["beta"] = beta * sums["n_sentences"]
    if term.log_as:
      sums[term.log_as] = kl * sums["n_sentences"]
    if smoothness_weight > 0:
      sums["smoothness"] = jnp.sum(terms.smoothness * w)
      loss = loss + smoothness_weight * sums["smoothness"] / n
    if terms.bow_nll is not None:
      sums["bow"] = jnp.sum(terms.bow_nll * w)
      loss = loss + bow_weight * sums["bow"] / n
    return loss, (sums, model_state)

  return loss_fn


def make_vae_eval(model: nn.Module, kl_term: str = "kl",
                  kl_options: Any = None) -> Callable[..., Sums]:
  """Eval sums of a VAE: one-sample ELBO terms with dropout off; the KL term of the loss
  (`kl_terms.KL_TERMS[kl_term]` with `kl_options`) at full weight, so that `summarize` gives
  `objective` = rec + KL_term, the method's own objective (for 'kl' the negative ELBO; for the
  density gap DG-VAE's, the validation loss its authors select and decay on); and, for
  Gaussian posteriors (or the Gaussian base of a KL-preserving flow, whose MI is the same),
  He et al. 2019's per-batch MI (`mi` in `summarize`; the quick validation signal aggressive
  training watches; evaluation reports the whole-set MI)."""
  term, options = _kl_term(model, kl_term, kl_options)

  def eval_fn(params, model_state, batch, rng):
    latent_rng, mi_rng = jax.random.split(rng)
    terms = model.apply(_variables(params, model_state), *model_inputs(model, batch),
                        deterministic=True, rngs={"latent": latent_rng})
    sums = vae_sums(terms, batch["weights"])
    sums["kl_term"] = term.fn(terms, batch["weights"], jax.random.fold_in(rng, 2),
                              options) * sums["n_sentences"]
    if terms.bow_nll is not None:
      sums["bow"] = jnp.sum(terms.bow_nll * batch["weights"])
    if _gaussian_codes(model):
      mi = mutual_information.gaussian_mutual_information(mi_rng, terms.mean, terms.logvar,
                                                          mask=batch["weights"])
      sums["mi"] = mi * sums["n_sentences"]
    return sums

  return eval_fn


def make_lm_loss(model: nn.Module) -> LossFn:
  """Token NLL of a language model returning `LMTerms` (mean over sentences)."""

  def loss_fn(params, model_state, batch, rng, step):
    del step
    terms = model.apply(_variables(params, model_state), batch["tokens"], deterministic=False,
                        rngs={"dropout": rng})
    w = batch["weights"]
    sums = lm_sums(terms, w)
    return sums["rec"] / jnp.maximum(sums["n_sentences"], 1.0), (sums, model_state)

  return loss_fn


def make_lm_eval(model: nn.Module) -> Callable[..., Sums]:
  def eval_fn(params, model_state, batch, rng):
    del rng
    terms = model.apply(_variables(params, model_state), batch["tokens"], deterministic=True)
    return lm_sums(terms, batch["weights"])

  return eval_fn


def summarize(sums: dict[str, Any], au_threshold: float = 0.01) -> dict[str, float]:
  """Host-side: sums -> metrics.

  For a language model (no 'kl' in the sums): `nll` = rec / n_sentences (exact) and
  `ppl` = exp(rec / n_tokens). For a VAE: `neg_elbo` = (rec + kl) / n_sentences, the one-sample
  negative ELBO (an upper bound of the NLL; the importance-weighted NLL comes from
  `vae_jax.evaluation`), `ppl_elbo` = exp((rec + kl) / n_tokens), `rec`, `kl`, `beta`,
  `objective` = (rec + KL term) / n_sentences where the sums carry the loss's KL term at full
  weight (`make_vae_eval`), and `au`, the number of latent dimensions whose posterior mean
  varies across the data by more than `au_threshold` (population variance from the running
  sums of m and m^2).
  """
  s = {k: np.asarray(v, np.float64) for k, v in sums.items()}
  n = max(float(s["n_sentences"]), 1.0)
  n_tokens = max(float(s["n_tokens"]), 1.0)
  if "kl" not in s:
    return {"nll": float(s["rec"] / n), "ppl": float(np.exp(s["rec"] / n_tokens))}
  total = s["rec"] + s["kl"]
  out = {
      "neg_elbo": float(total / n),
      "ppl_elbo": float(np.exp(total / n_tokens)),
      "rec": float(s["rec"] / n),
      "kl": float(s["kl"] / n),
  }
  if "kl_term" in s:
    out["objective"] = float((s["rec"] + s["kl_term"]) / n)
  for key in ("beta", "smoothness", *kl_terms.logged(), "mi", "bow"):
    if key in s:
      out[key] = float(s[key] / n)
  if "mean_sum" in s:
    mean = s["mean_sum"] / n
    var = np.maximum(s["mean_sq_sum"] / n - mean ** 2, 0.0)
    out["au"] = int(np.sum(var > au_threshold))
  if "feature_sum" in s:
    mean = s["feature_sum"] / n
    out["dispersion"] = float(np.mean(np.maximum(s["feature_sq_sum"] / n - mean ** 2, 0.0)))
  return out
