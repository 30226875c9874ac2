"""KL terms by name: what stands for mean_x KL(q(z|x) || p(z)) in a VAE's loss.

The loss of `vae_jax.losses.make_vae_loss` is  mean_x rec(x) + β(step) · KL_term.  `KL_TERMS`
maps a name to a `KLTerm`, which holds

  options: a frozen dataclass of the term's settings, checked when built (a one-line
    ValueError naming the field);
  fn(terms, weights, rng, options) -> scalar: the batch's KL term, computed from the model's
    per-example terms (`VAETerms` and kin: `kl [B]`, `kl_dims [B, d]`, `mean`/`logvar [B, d]`,
    DELLA's `kl_layers [B, L]`), `weights [B]` (1 for a real row, 0 for padding) and `rng` (the
    key of a Monte Carlo term);
  needs_gaussian(options) -> bool: whether the term reads a Gaussian posterior in latent
    coordinates whose prior is N(0, I) (`kl_dims`, `mean`, `logvar`), which flow posteriors
    and DELLA's hierarchical one lack; `make_vae_loss` refuses such a model for it;
  log_as: the metric under which the loss logs the term's value beside the per-sentence `kl`
    (None: not logged).

The contract, checked for every entry by tests/test_kl_terms.py:
- The value is one scalar for the batch, not a mean of per-example values that a caller could
  take apart: batch-mean free bits clamp the batch's mean KL, the density gap compares the
  batch's aggregate posterior with the prior. The per-example pieces are the per-example
  functions of `vae_jax.objectives`.
- Rows of weight 0 (padding), whatever their values, change neither the value nor the
  gradients of the real rows.
- The function traces under `jax.jit` (options are static) and has finite gradients.
- At q = p (every posterior N(0, I), every KL 0) the value is the term's floor, 0 (the target
  for batch-mean free bits), and the gradient is 0.

Adding a term is one entry here and one row of examples in tests/test_kl_terms.py; the
experiment configs take the options from `option_defaults()` (`--config.kl.kind=NAME
--config.kl.options.FIELD=...`).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp

from vae_jax import objectives


def _check(ok: bool, message: str) -> None:
  if not ok:
    raise ValueError(message)


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------------------
# Options.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PlainKL:
  """The plain KL has no options."""


@dataclasses.dataclass(frozen=True)
class FreeBits:
  """Free bits (both forms).

  target: λ, the free nats (>= 0) of the quantity compared with it: the whole code's KL per
    sentence, or each dimension's KL with `per_dimension`.
  per_dimension: compare each dimension's KL with λ (a Gaussian posterior's `kl_dims`), else the
    whole code's KL.
  """
  target: float = 0.0
  per_dimension: bool = False

  def __post_init__(self):
    _check(_is_number(self.target) and self.target >= 0,
           f"target must be a number >= 0 (free nats), got {self.target!r}")
    _check(isinstance(self.per_dimension, bool),
           f"per_dimension must be True or False, got {self.per_dimension!r}")
    object.__setattr__(self, "target", float(self.target))


@dataclasses.dataclass(frozen=True)
class DensityGap:
  """DG-VAE's density gap: M = `samples` (>= 1) samples per posterior, mixtures over `chunk`
  consecutive rows (>= 0; 0: the whole batch; it must divide the batch)."""
  samples: int = 32
  chunk: int = 0

  def __post_init__(self):
    _check(_is_int(self.samples) and self.samples >= 1,
           f"samples must be an integer >= 1, got {self.samples!r}")
    _check(_is_int(self.chunk) and self.chunk >= 0,
           f"chunk must be an integer >= 0 (rows per mixture; 0: the batch), got {self.chunk!r}")


LAYER_REDUCTIONS = ("sum", "mean")


@dataclasses.dataclass(frozen=True)
class LayerHinge:
  """The layer-wise hinge: each layer's KL floored at `threshold` (>= 0 nats) per sentence, then
  reduced over layers by `reduction`, 'sum' or 'mean'."""
  threshold: float = 0.0
  reduction: str = "sum"

  def __post_init__(self):
    _check(_is_number(self.threshold) and self.threshold >= 0,
           f"threshold must be a number >= 0 (nats), got {self.threshold!r}")
    _check(self.reduction in LAYER_REDUCTIONS,
           f"reduction must be 'sum' or 'mean', got {self.reduction!r}")
    object.__setattr__(self, "threshold", float(self.threshold))


# ---------------------------------------------------------------------------------------------
# The terms: batch-level scalars from per-example arrays.
# ---------------------------------------------------------------------------------------------


def batch_mean(x: jax.Array, weights: jax.Array) -> jax.Array:
  """The mean of per-example `x [B]` over the real rows: Σ_i w_i x_i / max(Σ_i w_i, 1)."""
  return jnp.sum(x * weights) / jnp.maximum(jnp.sum(weights), 1.0)


def batch_mean_free_bits_kl(kl_dims: jax.Array, target: float, weights: jax.Array,
                            per_dimension: bool) -> jax.Array:
  """Free bits clamped on the batch mean KL (Kingma et al. 2016: Σ_j max(λ, E_{x∈M} KL_j(x))
  over groups j, the expectation over the minibatch M).

  The KL is first averaged over the batch (rows weighted by `weights`), then only the part
  above the target is penalised:

  - whole code (`per_dimension=False`): max(target, mean_x Σ_k KL_k(x)), `target` in nats per
    sentence;
  - per dimension (`per_dimension=True`): Σ_k max(target, mean_x KL_k(x)), `target` in nats
    per dimension (Kingma et al.'s groups, one per dimension).

  Either every sentence of the batch gets the gradient of its KL (the batch mean is above the
  target) or none does: a sentence far above the target is free as long as the others pull
  the mean below it. This is not Li et al. 2019's form, which compares each sentence's own KL
  (`objectives.sentence_free_bits_kl`, `sentence_dimension_free_bits_kl`); their `--fb 3`
  masks the whole batch on 1[mean_x KL(x) > target_kl], which has this function's gradient
  and a value lower by `target` when the mean is below it. At a tie the gradient is split
  (half of it flows), as `jnp.maximum` defines it.

  Args:
    kl_dims: `[B, d]` per-example, per-dimension KL (`[B, 1]` for the whole code's KL).
    target: free nats (per sentence, or per dimension).
    weights: `[B]` 1 for real rows, 0 for padding rows.
    per_dimension: which of the two forms.

  Returns:
    The batch's term, a scalar.
  """
  denom = jnp.maximum(jnp.sum(weights), 1.0)
  mean_dims = jnp.sum(kl_dims * weights[:, None], axis=0) / denom  # [d]
  if per_dimension:
    return jnp.sum(jnp.maximum(mean_dims, target))
  return jnp.maximum(jnp.sum(mean_dims), target)


def plain_kl(terms, weights, rng, options: PlainKL) -> jax.Array:
  """mean_x KL(q(z|x) || p(z)) (the ELBO's term; a flow's Monte Carlo KL included)."""
  del rng, options
  return batch_mean(terms.kl, weights)


def free_bits(terms, weights, rng, options: FreeBits) -> jax.Array:
  """Free bits on the batch mean (Kingma et al. 2016): max(λ, mean_x KL(x)), or per dimension
  Σ_k max(λ, mean_x KL_k(x)) (`batch_mean_free_bits_kl`). Floor: λ (Σ_k λ per dimension)."""
  del rng
  kl_dims = terms.kl_dims if options.per_dimension else terms.kl[:, None]
  return batch_mean_free_bits_kl(kl_dims, options.target, weights, options.per_dimension)


def free_bits_sentence(terms, weights, rng, options: FreeBits) -> jax.Array:
  """Free bits per sentence (Li et al. 2019, `--fb 1`): mean_x 1[KL(x) > λ] KL(x), or per
  sentence and dimension (their `--fb 2`, λ = target_kl / d): mean_x Σ_k 1[KL_k(x) > λ] KL_k(x);
  the masks are constants of the gradient (`objectives.sentence_free_bits_kl`,
  `objectives.sentence_dimension_free_bits_kl`). Floor: 0."""
  del rng
  if options.per_dimension:
    penalty = objectives.sentence_dimension_free_bits_kl(terms.kl_dims, options.target)
  else:
    penalty = objectives.sentence_free_bits_kl(terms.kl, options.target)
  return batch_mean(penalty, weights)


def density_gap(terms, weights, rng, options: DensityGap) -> jax.Array:
  """DG-VAE's density-gap estimate of KL(q_agg(z) || p(z)) (Zhang et al. 2022, METHODS.md §2):
  mean_x DG_x over the real rows, DG_x of `objectives.density_gap`. Floor: 0 (q_agg = p)."""
  per_example = objectives.density_gap(rng, terms.mean, terms.logvar, weights,
                                       num_samples=options.samples, chunk_size=options.chunk)
  return batch_mean(per_example, weights)


def layer_hinge(terms, weights, rng, options: LayerHinge) -> jax.Array:
  """Layer-wise latents (DELLA, Hu et al. 2022): mean_x reduce_l max(KL_l(x), threshold) over
  the per-layer KLs `kl_layers [B, L]`, reduce = Σ_l (the KL of the joint at threshold 0) or
  mean_l (the official code). Floor: the threshold (Σ_l or mean_l of it); 0 at threshold 0."""
  del rng
  kl_layers = getattr(terms, "kl_layers", None)
  if kl_layers is None:
    raise ValueError("the layer_hinge KL term needs per-layer KLs (`kl_layers [B, L]`, a DELLA "
                     "model); use 'kl' for other models")
  hinged = jnp.maximum(kl_layers, options.threshold)
  per_example = jnp.sum(hinged, -1) if options.reduction == "sum" else jnp.mean(hinged, -1)
  return batch_mean(per_example, weights)


# ---------------------------------------------------------------------------------------------
# The registry.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class KLTerm:
  """A registry entry: see the module docstring."""
  fn: Callable[[Any, jax.Array, jax.Array, Any], jax.Array]
  options: type
  needs_gaussian: Callable[[Any], bool] = lambda options: False
  log_as: str | None = None


KL_TERMS: dict[str, KLTerm] = {
    "kl": KLTerm(plain_kl, PlainKL),
    "free_bits": KLTerm(free_bits, FreeBits, lambda options: options.per_dimension),
    "free_bits_sentence": KLTerm(free_bits_sentence, FreeBits,
                                 lambda options: options.per_dimension),
    "density_gap": KLTerm(density_gap, DensityGap, lambda options: True, log_as="density_gap"),
    "layer_hinge": KLTerm(layer_hinge, LayerHinge),
}


def entry(name: str) -> KLTerm:
  """The registry entry `name`; ValueError naming the choices for an unknown one."""
  if name not in KL_TERMS:
    raise ValueError(f"unknown KL term {name!r}; choose one of {', '.join(KL_TERMS)}")
  return KL_TERMS[name]


def option_fields(name: str) -> tuple[str, ...]:
  """The option fields of entry `name`."""
  return tuple(f.name for f in dataclasses.fields(entry(name).options))


def option_defaults() -> dict[str, Any]:
  """Every entry's option fields at their defaults, one flat dict (the experiment configs'
  `kl.options`). Entries may share a field (free bits' `target`) only with one default."""
  out = {}
  for name, term in KL_TERMS.items():
    for field in dataclasses.fields(term.options):
      if field.name in out and out[field.name] != field.default:
        raise ValueError(f"KL term {name!r} redeclares option {field.name!r} with the default "
                         f"{field.default!r} instead of {out[field.name]!r}")
      out[field.name] = field.default
  return out


def logged() -> tuple[str, ...]:
  """The metrics under which the loss logs KL terms (`KLTerm.log_as`)."""
  return tuple(t.log_as for t in KL_TERMS.values() if t.log_as)


def owners(field: str) -> tuple[str, ...]:
  """The entries that have the option `field`."""
  return tuple(name for name in KL_TERMS if field in option_fields(name))
