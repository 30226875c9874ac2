"""Loss functions: model terms -> (scalar loss, sums), in the form the training loop takes.

A loss function has the signature

    loss_fn(params, model_state, batch, rng, step) -> (loss, (sums, new_model_state))

`loss` is what the optimiser minimises (a mean over the batch's real rows); `sums` are sums over
real rows plus the denominators `n_sentences` and `n_tokens`, reduced across devices by `jit` and
divided on the host by `summarize`, so reported numbers are exact however data are batched.

The negative ELBO of a sentence is  rec + KL  with rec = -log p(x|z), z ~ q(z|x); training
minimises  mean_x [rec(x)] + beta(step) * KL_term,  where KL_term is the batch-mean KL, its
free-bits form (clamped on the batch mean, vae_jax.objectives.batch_mean_free_bits_kl, or
masked per sentence as Li et al. 2019, sentence_free_bits_kl and
sentence_dimension_free_bits_kl), or DG-VAE's density-gap estimate of KL(q_agg || p)
(vae_jax.objectives.density_gap_kl).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vae_jax import mutual_information, objectives

Sums = dict[str, jax.Array]
LossFn = Callable[..., tuple[jax.Array, tuple[Sums, Any]]]


KL_KINDS = ("kl", "density_gap")


@dataclasses.dataclass(frozen=True)
class KLTermConfig:
  """How the KL (and the encoder's regulariser) enter the loss.

  kind: 'kl', the per-sentence KL(q(z|x) || p(z)) averaged over the batch (optionally in a
    free-bits form, below); 'density_gap', DG-VAE's
    dimension-wise estimate of KL(q_agg(z) || p(z)) from `density_gap_samples` samples per
    posterior over mixtures of `density_gap_chunk` rows (0: the whole batch) (Zhang et al. 2022,
    METHODS.md §2; Gaussian posteriors, or the Gaussian base of a KL-preserving flow).
  free_bits: 0 turns free bits off; > 0 is the free KL, in nats of the quantity compared with
    it: per sentence for the whole code, per dimension with `free_bits_per_dimension`.
  free_bits_per_dimension: compare each dimension's KL with `free_bits` (else the whole
    code's KL, Σ_k KL_k).
  free_bits_per_sentence: where the comparison happens.
    False: on the batch mean, max(λ, mean_x KL(x)) or Σ_k max(λ, mean_x KL_k(x))
      (`objectives.batch_mean_free_bits_kl`; Kingma et al. 2016);
    True: in each sentence (and dimension), mean_x 1[KL(x) > λ] KL(x) or
      mean_x Σ_k 1[KL_k(x) > λ] KL_k(x), the mask a constant of the gradient
      (`objectives.sentence_free_bits_kl`, `sentence_dimension_free_bits_kl`; Li et al. 2019,
      `--fb 1` and `--fb 2` of their code, whose `--fb 2` with λ = target_kl / d gave their
      published numbers).
  smoothness_weight: λ of the amortised regularisation λ · mean_x ‖μ(x) - μ(x̃)‖²
    (METHODS.md §3; the model computes the term when its `smoothness_dropout` > 0).
  layer_reduction, layer_threshold: for models with layer-wise latents (terms with
    `kl_layers [B, L]`, DELLA), the KL term is mean_x reduce_l max(KL_l(x), layer_threshold)
    with reduce 'sum' (the KL of the joint when the threshold is 0) or 'mean' (the official
    DELLA code: the average over layers, each hinged per sentence at its threshold).
  """
  free_bits: float = 0.0
  free_bits_per_dimension: bool = False
  smoothness_weight: float = 0.0
  kind: str = "kl"
  density_gap_samples: int = 32
  density_gap_chunk: int = 0
  layer_reduction: str = "sum"
  layer_threshold: float = 0.0
  free_bits_per_sentence: bool = False

  def __post_init__(self):
    if self.layer_reduction not in ("sum", "mean"):
      raise ValueError(f"layer_reduction must be 'sum' or 'mean', got {self.layer_reduction!r}")
    if self.layer_threshold < 0:
      raise ValueError(f"layer_threshold must be >= 0, got {self.layer_threshold}")
    if self.kind not in KL_KINDS:
      raise ValueError(f"unknown KL term {self.kind!r}; use one of {KL_KINDS}")
    if self.kind == "density_gap" and self.free_bits > 0:
      raise ValueError("free bits apply to the per-sentence KL, not to the density gap; set "
                       "free_bits=0 or kind='kl'")
    if self.density_gap_samples < 1 or self.density_gap_chunk < 0:
      raise ValueError("density_gap_samples must be >= 1 and density_gap_chunk >= 0, got "
                       f"{self.density_gap_samples}, {self.density_gap_chunk}")


def _gaussian_codes(model: nn.Module) -> bool:
  """Whether the model's posterior is a Gaussian in latent coordinates (a closed form)."""
  return bool(model.config.latent_dim) and model.posterior_family.closed_form


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
  return tuple(batch[k] for k in getattr(model, "input_keys", ("tokens",)))


def _apply_train(model, params, model_state, batch, rngs):
  """A training pass; mutable collections (BN-VAE's 'batch_stats') are updated and returned."""
  variables = _variables(params, model_state)
  inputs = model_inputs(model, batch)
  if model_state:
    return model.apply(variables, *inputs, deterministic=False, rngs=rngs,
                       mutable=list(model_state))
  return model.apply(variables, *inputs, deterministic=False, rngs=rngs), model_state


def free_bits_term(terms, kl_term: KLTermConfig, weights: jax.Array) -> jax.Array:
  """The free-bits KL term of a batch (a scalar that replaces mean_x KL(x) in the loss), in
  the form `kl_term` names (see `KLTermConfig`). A flow posterior has no per-dimension KL
  (`terms.kl_dims` is None): only the whole-code forms apply to its Monte Carlo KL."""
  if kl_term.free_bits_per_dimension and terms.kl_dims is None:
    raise ValueError("per-dimension free bits need a per-dimension KL, which a flow "
                     "posterior does not have; use free bits on the whole code")
  target = kl_term.free_bits
  if not kl_term.free_bits_per_sentence:
    kl_dims = terms.kl[:, None] if terms.kl_dims is None else terms.kl_dims
    return objectives.batch_mean_free_bits_kl(kl_dims, target, weights,
                                              kl_term.free_bits_per_dimension)
  if kl_term.free_bits_per_dimension:
    penalty = objectives.sentence_dimension_free_bits_kl(terms.kl_dims, target)
  else:
    penalty = objectives.sentence_free_bits_kl(terms.kl, target)
  return jnp.sum(penalty * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def make_vae_loss(model: nn.Module, kl_weight: optax.Schedule,
                  kl_term: KLTermConfig = KLTermConfig(), bow_weight: float = 0.0) -> LossFn:
  """The (beta-weighted, optionally free-bits) negative ELBO of a VAE returning `VAETerms`, or
  reconstruction + beta * density gap (DG-VAE), plus the amortised regulariser when
  `kl_term.smoothness_weight` > 0, plus `bow_weight` times the bag-of-words NLL of a model
  whose terms carry one (the dialogue CVAE's auxiliary loss, Zhao et al. 2017).

  A flow posterior has no per-dimension KL (`terms.kl_dims` is None): only whole-code free
  bits apply to it, on its Monte Carlo KL.
  """
  if kl_term.kind == "density_gap" and not _gaussian_codes(model):
    raise ValueError("the density gap needs Gaussian posteriors (posterior='gaussian' or "
                     f"'kl_preserving'), not posterior={model.config.posterior!r}")

  def loss_fn(params, model_state, batch, rng, step):
    latent_rng, dropout_rng, gap_rng = jax.random.split(rng, 3)
    terms, model_state = _apply_train(model, params, model_state, batch,
                                      {"latent": latent_rng, "dropout": dropout_rng})
    w = batch["weights"]
    n = jnp.maximum(jnp.sum(w), 1.0)
    beta = kl_weight(step)
    rec = jnp.sum(terms.rec_nll * w) / n
    gap = None
    if kl_term.kind == "density_gap":
      gap = objectives.density_gap_kl(gap_rng, terms.mean, terms.logvar, w,
                                      num_samples=kl_term.density_gap_samples,
                                      chunk_size=kl_term.density_gap_chunk)
      kl = gap
    elif kl_term.free_bits > 0:
      kl = free_bits_term(terms, kl_term, w)
    elif getattr(terms, "kl_layers", None) is not None:
      hinged = jnp.maximum(terms.kl_layers, kl_term.layer_threshold)
      per_example = (jnp.sum(hinged, axis=-1) if kl_term.layer_reduction == "sum"
                     else jnp.mean(hinged, axis=-1))
      kl = jnp.sum(per_example * w) / n
    else:
      kl = jnp.sum(terms.kl * w) / n
    loss = rec + beta * kl
    sums = vae_sums(terms, w)
    sums["beta"] = beta * sums["n_sentences"]
    if gap is not None:
      sums["density_gap"] = gap * sums["n_sentences"]
    if kl_term.smoothness_weight > 0:
      sums["smoothness"] = jnp.sum(terms.smoothness * w)
      loss = loss + kl_term.smoothness_weight * sums["smoothness"] / n
    if getattr(terms, "bow_nll", None) is not None:
      sums["bow"] = jnp.sum(terms.bow_nll * w)
      loss = loss + bow_weight * sums["bow"] / n
    return loss, (sums, model_state)

  return loss_fn


def make_vae_eval(model: nn.Module) -> Callable[..., Sums]:
  """Eval sums of a VAE: one-sample ELBO terms with dropout off and, for Gaussian posteriors
  (or the Gaussian base of a KL-preserving flow, whose MI is the same), He et al. 2019's
  per-batch MI (`mi` in `summarize`; the quick validation signal aggressive training watches;
  evaluation reports the whole-set MI)."""

  def eval_fn(params, model_state, batch, rng):
    latent_rng, mi_rng = jax.random.split(rng)
    terms = model.apply(_variables(params, model_state), *model_inputs(model, batch),
                        deterministic=True, rngs={"latent": latent_rng})
    sums = vae_sums(terms, batch["weights"])
    if getattr(terms, "bow_nll", None) is not None:
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
  `vae_jax.evaluation`), `ppl_elbo` = exp((rec + kl) / n_tokens), `rec`, `kl`, `beta`, and `au`,
  the number of latent dimensions whose posterior mean varies across the data by more than
  `au_threshold` (population variance from the running sums of m and m^2).
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
  for key in ("beta", "smoothness", "density_gap", "mi", "bow"):
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
