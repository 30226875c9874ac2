"""The evaluation suite of a trained model (METHODS.md §6): IW-NLL, PPL, KL, MI, AU, plus
greedy reconstructions and prior samples.

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

from vae_jax import metrics
from vae_jax.models.vae import SeqVAE, token_mask
from vae_jax.nn import decoding


def _to_host(x) -> np.ndarray:
  """A global (possibly multi-process) array as a numpy array on every process."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def vae_log_likelihood_fn(model: nn.Module, variables, tokens: jax.Array):
  """`z [n, B, d] -> [n, B]` log p(x|z) for every sample, decoding the n*B codes at once."""

  def log_likelihood(z):
    n, b, d = z.shape
    tiled = jnp.broadcast_to(tokens[None], (n, *tokens.shape)).reshape(n * b, -1)
    ll = model.apply(variables, tiled, z.reshape(n * b, d), method=SeqVAE.log_likelihood)
    return ll.reshape(n, b)

  return log_likelihood


def make_vae_batch_eval(model: nn.Module, k_samples: int, chunk_size: int) -> Callable:
  """Jitted per-batch evaluation: `(variables, tokens, rng) -> dict of [B] / [B, d] arrays`."""

  @jax.jit
  def batch_eval(variables, tokens, rng):
    mean, logvar = model.apply(variables, tokens, method=SeqVAE.encode)
    log_weights = metrics.gaussian_log_weights_fn(
        mean, logvar, vae_log_likelihood_fn(model, variables, tokens))
    log_px, elbo = metrics.iw_log_likelihood(log_weights, rng, k_samples, chunk_size,
                                             return_elbo=True)
    return {
        "log_px": log_px,
        "elbo": elbo,
        "kl": metrics.gaussian_kl_per_example(mean, logvar),
        "n_tokens": jnp.sum(token_mask(tokens), axis=-1),
        "mean": mean,
        "logvar": logvar,
    }

  return batch_eval


def _collect(batch_eval: Callable, batches: Iterable[dict], rng: jax.Array,
             *args) -> dict[str, np.ndarray]:
  """Runs `batch_eval` over all batches; per-example outputs of real rows, concatenated."""
  parts: dict[str, list[np.ndarray]] = {}
  for i, batch in enumerate(batches):
    out = batch_eval(*args, batch["tokens"], jax.random.fold_in(rng, i))
    real = _to_host(batch["weights"]) > 0
    for key, value in out.items():
      parts.setdefault(key, []).append(_to_host(value)[real])
  if not parts:
    raise ValueError("the evaluation split is empty: no batches to evaluate")
  return {k: np.concatenate(v) for k, v in parts.items()}


def evaluate_vae(model: nn.Module, variables, batches: Iterable[dict], rng: jax.Array, *,
                 k_samples: int = 500, chunk_size: int = 50,
                 au_threshold: float = 0.01) -> dict[str, Any]:
  """IW-NLL (K = k_samples), PPL, ELBO, KL, MI (whole-set estimator) and AU of a Gaussian VAE.

  nll = -mean_x L_K(x); ppl = exp(-sum_x L_K(x) / sum_x (|x| + 1)); elbo is the K-sample Monte
  Carlo ELBO per sentence; kl is the analytic KL per sentence; mi and au follow METHODS.md §6.
  """
  eval_rng, mi_rng = jax.random.split(rng)
  batch_eval = make_vae_batch_eval(model, k_samples, chunk_size)
  out = _collect(batch_eval, batches, eval_rng, variables)
  log_px = out["log_px"].astype(np.float64)
  n_tokens = float(out["n_tokens"].sum())
  mean, logvar = jnp.asarray(out["mean"]), jnp.asarray(out["logvar"])
  return {
      "nll": float(-log_px.mean()),
      "ppl": float(np.exp(-log_px.sum() / n_tokens)),
      "elbo": float(out["elbo"].astype(np.float64).mean()),
      "kl": float(out["kl"].astype(np.float64).mean()),
      "mi": float(metrics.gaussian_mutual_information(mi_rng, mean, logvar)),
      "au": int(metrics.active_units(mean, threshold=au_threshold)[0]),
      "k_samples": int(k_samples),
      "n_sentences": int(log_px.shape[0]),
      "n_tokens": int(n_tokens),
  }


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
  out = _collect(make_lm_batch_eval(model), batches, rng, variables)
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
  """Greedy decoding from the posterior mean of each sentence."""
  mean, _ = model.apply(variables, tokens, method=SeqVAE.encode)
  return generate(model, variables, mean, rng, max_length=max_length, greedy=True)


def sample_prior(model: nn.Module, variables, rng: jax.Array, num: int, latent_dim: int,
                 max_length: int, greedy: bool = True) -> jax.Array:
  """Decodes z ~ N(0, I) (greedily by default, as in Bowman et al. 2016)."""
  z_rng, dec_rng = jax.random.split(rng)
  z = jax.random.normal(z_rng, (num, latent_dim))
  return generate(model, variables, z, dec_rng, max_length=max_length, greedy=greedy)

