"""The official DELLA code's estimators (Hu et al. 2022, OpenVLG/DELLA `train_utils.py`), as
extra keys beside the correct ones of `vae_jax.evaluation` (METHODS.md §4, §6).

The paper's PPL and AU come from `calc_iwnll` and `calc_au`, which differ from the definitions
of METHODS.md §6 that `evaluation.evaluate` implements. The headline keys (`nll`, `ppl`,
`au`, `au_layers_*`) stay the correct estimators; these functions add, clearly labelled:

- `nll_paper`, `ppl_paper` (`calc_iwnll`): importance weighting with the layers' log-densities
  *averaged* over the n latents (`Della.iw_sample` reads the encoder's `log_prior` and
  `log_post`, each `torch.stack(...).mean(0)` of the per-layer `Normal.log_p`):

    log w_k = log p(x|z_k) + (1/n) Σ_l log p(z_kl|z_k,<l) − (1/n) Σ_l log q(z_kl|z_k,<l, x),

  z_k drawn ancestrally from the posterior chain, L_K(x) = logsumexp_k log w_k − log K. The
  joint's weight sums the layers; the difference, (1 − 1/n)(log q(z|x) − log p(z)), has
  expectation (1 − 1/n)·KL under q. So for n > 1 the one-sample (K = 1) estimate exceeds the
  ELBO by (1 − 1/n)·KL in expectation, and as K grows the estimate converges to
  log ∫ p(x|z) p(z)^(1/n) q(z|x)^(1 − 1/n) dz, not to log p(x). For n = 1 it is the correct
  estimator. The official code draws K = 30 (`--sample_times`); here K is the caller's, the
  K of `nll`. nll_paper = −mean_x L_K(x) and

    ppl_paper = exp(−Σ_x L_K(x) / Σ_x (|x| + 2)),

  the official denominator, the attention mask's count of `<s> w_1 … w_n </s>` (the BOS is
  counted although it is never predicted), where `ppl` divides by Σ_x (|x| + 1).
- `au_paper` (`calc_au`, `delta=0.2`): the *proportion* of active units over the n·d
  posterior means. The means are those of a *sampled* chain, μ_q(z_l|z_<l, x) with z_<l
  drawn from q (`Della.get_encode_states` runs the encoder, which samples, and returns the
  concatenated per-layer means; the head's raw μ, before the clamp that `Normal` applies
  inside), not the chain of means of `au_layers_*`. The set's mean is taken over one pass
  (stage 1) and the squared deviations from it over a second pass with fresh samples
  (stage 2):

    A_k = Σ_x (μ_k^(2)(x) − mean_x μ_k^(1)(x))² / (N − 1),   au_paper = #{k : A_k >= 0.2} / (n·d).

References: X. Hu, et al. Fuse It More Deeply! A Variational Transformer with Layer-Wise
Latent Variable Inference for Text Generation. NAACL 2022; https://github.com/OpenVLG/DELLA.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vae_jax import evaluation, metrics
from vae_jax.models.vae import token_mask

# `calc_au`'s delta.
PAPER_AU_THRESHOLD = 0.2


def paper_log_weights_fn(model: nn.Module, variables, tokens: jax.Array,
                         features: jax.Array) -> metrics.LogWeightsFn:
  """`(rng, k) -> [k, B]` the official log weights (module docstring) of k posterior chains,

    log p(x|z) + mean_l log p(z_l|z_<l) − mean_l log q(z_l|z_<l, x),

  drawn with ε = `jax.random.normal(rng, (k, B, n, d))` (`Della.layer_log_probs`), the noise
  `Della.sample_chain` draws from the same key: given the same keys (`metrics.iw_log_likelihood`
  folds the chunk index into its key), `nll_paper` weights the same samples as `nll`.
  `features` are the pooled states of `Della.encoder_features` for `tokens` `[B, T]`."""
  c = model.config

  def log_weights(rng: jax.Array, num_samples: int) -> jax.Array:
    batch = features.shape[:-1]
    eps = jax.random.normal(rng, (num_samples, *batch, c.num_latents, c.latent_dim))
    z, log_p, log_q = model.apply(variables, features, eps, method="layer_log_probs")
    tiled = jnp.broadcast_to(tokens[None], (num_samples, *tokens.shape))
    log_px_z = model.apply(variables, tiled.reshape(-1, tokens.shape[-1]),
                           z.reshape(-1, *z.shape[-2:]), method="decode_latents")
    return (log_px_z.reshape(num_samples, *batch) + jnp.mean(log_p, axis=-1)
            - jnp.mean(log_q, axis=-1))

  return log_weights


def _is_posterior_head(module: nn.Module, method_name: str) -> bool:
  return method_name == "__call__" and (module.name or "").startswith("posterior_")


def sampled_posterior_means(model: nn.Module, variables, features: jax.Array,
                            eps: jax.Array) -> jax.Array:
  """`[..., n·d]` (layer-major) the posterior means μ_q(z_l|z_<l, x) along the chain drawn with
  `eps [..., n, d]` (`Della.posterior_chain`), as the official `get_encode_states` returns
  them: the raw output of each layer's posterior head `posterior_<l>`, read with
  `capture_intermediates`, before the clamp to ±`clamp` (the chain itself is drawn from the
  clamped Gaussians, as in the official code)."""
  _, state = model.apply(variables, features, eps, method="posterior_chain",
                         capture_intermediates=_is_posterior_head, mutable=["intermediates"])
  heads = state["intermediates"]
  d = model.config.latent_dim
  return jnp.concatenate([heads[f"posterior_{l}"]["__call__"][0][..., :d]
                          for l in range(model.config.num_latents)], axis=-1)


def make_paper_batch_eval(model: nn.Module, k_samples: int, chunk_size: int) -> Callable:
  """Jitted per-batch computation: `(variables, tokens, rng) -> dict of [B] / [B, n·d]`:

    log_px_paper: the official L_K(x) (`paper_log_weights_fn`, K = `k_samples`, `chunk_size`
      samples decoded at a time);
    au_means, au_means_b: the sampled-chain posterior means of AU stage 1 and stage 2
      (`sampled_posterior_means`, two independent chains);
    n_tokens: |x| + 1 (words and EOS).

  `rng` is split as `evaluation.make_batch_eval` splits it, (IW key, other key), so that
  with the key the evaluation's batch gets, both IW estimates weight the same K samples."""
  c = model.config

  @jax.jit
  def batch_eval(variables, tokens, rng):
    iw_rng, au_rng = jax.random.split(rng)
    features = model.apply(variables, tokens, method="encoder_features")
    log_weights = paper_log_weights_fn(model, variables, tokens, features)
    log_px = metrics.iw_log_likelihood(log_weights, iw_rng, k_samples, chunk_size)
    eps = jax.random.normal(au_rng, (2, *features.shape[:-1], c.num_latents, c.latent_dim))
    means = sampled_posterior_means(model, variables, features, eps)
    return {"log_px_paper": log_px, "au_means": means[0], "au_means_b": means[1],
            "layer_means": model.apply(variables, tokens, method="layer_means"),
            "n_tokens": jnp.sum(token_mask(tokens), axis=-1)}

  return batch_eval


def paper_active_units(first_pass: np.ndarray, second_pass: np.ndarray,
                       threshold: float = PAPER_AU_THRESHOLD) -> dict[str, Any]:
  """`calc_au` on the posterior means `[N, n·d]` of its two passes over a set:

    A_k = Σ_x (second_pass_k(x) − mean_x first_pass_k(x))² / (N − 1),
    au_paper = #{k : A_k >= threshold} / (n·d),

  with `au_paper_count` the number and `au_paper_threshold` the threshold."""
  first = np.asarray(first_pass, np.float64)
  second = np.asarray(second_pass, np.float64)
  if first.shape != second.shape or first.ndim != 2:
    raise ValueError(f"two [N, n·d] passes are needed, got {first.shape} and {second.shape}")
  if first.shape[0] < 2:
    raise ValueError(f"calc_au needs at least 2 sentences, got {first.shape[0]}")
  variance = np.sum((second - first.mean(axis=0)) ** 2, axis=0) / (first.shape[0] - 1)
  count = int(np.sum(variance >= threshold))
  return {"au_paper": count / first.shape[1], "au_paper_count": count,
          "au_paper_threshold": float(threshold)}


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


def paper_metrics(model: nn.Module, variables, batches: Iterable[dict], rng: jax.Array, *,
                  k_samples: int = 500, chunk_size: int = 50,
                  au_threshold: float = PAPER_AU_THRESHOLD) -> dict[str, Any]:
  """The official DELLA estimators over a split (module docstring), from batches in the
  project's format (`tokens`, `weights`; padding rows, weight 0, are dropped):

    nll_paper, nll_paper_se: −mean_x of the official L_K(x) and its standard error;
    ppl_paper: exp(−Σ_x L_K(x) / Σ_x (|x| + 2));
    au_paper, au_paper_count, au_paper_threshold: `paper_active_units` at `au_threshold`;
    au_layers_<t>, au_z_<t>, au_layer_mean_<t>: `layer_active_units`, the correct per-layer
      count on the chain of posterior means that the paper's table reports.

  Batch i is evaluated with `jax.random.fold_in(rng, i)` (`make_paper_batch_eval`), as
  `evaluation.collect` does: passed the key `evaluation.evaluate` gives `collect`, `nll_paper`
  weights the samples `nll` weights, and for one latent (n = 1) equals it. The batch function reads
  `tokens` only (unconditional models, as `evaluation.make_batch_eval`).
  """
  out = evaluation.collect(make_paper_batch_eval(model, k_samples, chunk_size), batches, rng,
                           variables)
  log_px = out["log_px_paper"].astype(np.float64)
  nll, nll_se = metrics.mean_and_stderr(-log_px)
  n_tokens = float(np.sum(out["n_tokens"] + 1, dtype=np.float64))
  return {"nll_paper": nll, "nll_paper_se": nll_se,
          "ppl_paper": float(np.exp(-log_px.sum() / n_tokens)),
          **paper_active_units(out["au_means"], out["au_means_b"], au_threshold),
          **layer_active_units(out["layer_means"])}
