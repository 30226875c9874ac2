"""The latent half of every model: posterior families and priors (METHODS.md §3, §6).

**Latent coordinates.** Every latent-variable model states its posterior over a code u in the
coordinates where its prior is N(0, I): z itself under the standard prior; the whitened code
u = (z - μ_p(c)) / σ_p(c) under the dialogue CVAE's conditional prior p(z|c) = N(μ_p, σ_p²);
the base code z_0 of the KL-preserving mode, whose decoder reads f(z_0); DELLA's chain in its
own prior coordinates. The KL, the importance weights log p(u) - log q(u|x), the mutual
information, the active units and the hole metrics are all functions of q(u|x) alone, so one
evaluation serves every model; `Prior.to_decoder` maps u to the code the decoder reads.

A **posterior object** (`Posterior`) is built inside `model.apply` from the encoder's
per-example `PosteriorParams` (a pytree, so evaluation can collect it over a split and rebuild
the posteriors of the whole set) and the model's flow. Its interface:

    sample(rng, n)      -> (u [n, B, d], log q(u|x) [n, B])
    log_prob(u)         -> log q(u|x), u's batch shape broadcast against the posteriors'
    point()             -> [B, d] a deterministic code (reconstructions, interpolations)
    mean_estimates(rng, n) -> two estimates of E_q[u|x] (equal and exact when closed form)
    kl(rng, n)          -> [B] KL(q(u|x) || N(0, I)): analytic, or Monte Carlo over n samples
    kl_dims()           -> [B, d] per-dimension KL, or None without a closed form
    gaussian()          -> (mean, logvar) [B, d] of a Gaussian q(u|x) (`closed_form` only)
    to_decoder(u)       -> what the decoder reads (`prior.to_decoder`)

The families are entries of `POSTERIORS` (name -> `Family`); a model's config names one, and
nothing outside this module compares family names.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, ClassVar

import distrax
import flax
import jax
import jax.numpy as jnp

from vae_jax import metrics, objectives


@flax.struct.dataclass
class PosteriorParams:
  """What the encoder outputs per example (every leaf `[B, ...]`).

  mean, logvar: the base Gaussian N(mean, exp(logvar)) over the model's own code z_0.
  context: an amortised flow's context h(x) (else None); DELLA keeps its pooled states here.
  prior_mean, prior_logvar: a conditional prior p(z|c) = N(prior_mean, exp(prior_logvar))
    (the dialogue CVAE); None for the standard prior N(0, I).
  condition: what the decoder reads besides the code (the CVAE's context vector c), or None.
  """
  mean: jax.Array
  logvar: jax.Array
  context: jax.Array | None = None
  prior_mean: jax.Array | None = None
  prior_logvar: jax.Array | None = None
  condition: jax.Array | None = None


# ---------------------------------------------------------------------------------------------
# Priors.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prior:
  """p(z) = N(mean, exp(logvar)) per example (`mean` None: N(0, I)), seen in latent
  coordinates u = (z - mean) / σ, where it is N(0, I).

  decoder_flow: a global bijection applied after un-whitening (the KL-preserving mode's f),
    else None. condition: `[B, C]` concatenated before the code for the decoder (the CVAE's c).
  """
  mean: jax.Array | None = None
  logvar: jax.Array | None = None
  decoder_flow: distrax.Bijector | None = None
  condition: jax.Array | None = None

  def whiten(self, z: jax.Array) -> jax.Array:
    return z if self.mean is None else (z - self.mean) * jnp.exp(-0.5 * self.logvar)

  def unwhiten(self, u: jax.Array) -> jax.Array:
    return u if self.mean is None else self.mean + jnp.exp(0.5 * self.logvar) * u

  def whiten_log_det(self) -> jax.Array | float:
    """log |det ∂u/∂z| = -½ Σ log σ_p² (0 for the standard prior)."""
    return 0.0 if self.logvar is None else -0.5 * jnp.sum(self.logvar, axis=-1)

  def log_prob(self, u: jax.Array) -> jax.Array:
    return objectives.standard_normal_log_prob(u)

  def to_code(self, u: jax.Array) -> jax.Array:
    """The model's code z for latent codes `u [..., d]`: f(μ_p + σ_p u) in general."""
    z = self.unwhiten(u)
    return z if self.decoder_flow is None else self.decoder_flow.forward(z)

  def to_decoder(self, u: jax.Array) -> jax.Array:
    """The decoder's input for latent codes `u [..., d]`: [c; f(μ_p + σ_p u)] in general."""
    z = self.to_code(u)
    if self.condition is None:
      return z
    c = jnp.broadcast_to(self.condition, (*z.shape[:-1], self.condition.shape[-1]))
    return jnp.concatenate([c, z], axis=-1)


def prior_of(params: PosteriorParams | None, decoder_flow=None) -> Prior:
  """The prior `params` carry (standard when there are none)."""
  if params is None:
    return Prior(decoder_flow=decoder_flow)
  return Prior(params.prior_mean, params.prior_logvar, decoder_flow, params.condition)


# ---------------------------------------------------------------------------------------------
# Posteriors.
# ---------------------------------------------------------------------------------------------


class Posterior:
  """q(u|x) in latent coordinates; see the module docstring for the interface."""
  closed_form: ClassVar[bool] = False

  def __init__(self, params: PosteriorParams, prior: Prior):
    self.params = params
    self.prior = prior

  def to_decoder(self, u: jax.Array) -> jax.Array:
    return self.prior.to_decoder(u)

  def sample(self, rng: jax.Array, num_samples: int) -> tuple[jax.Array, jax.Array]:
    raise NotImplementedError

  def log_prob(self, u: jax.Array) -> jax.Array:
    raise NotImplementedError

  def point(self) -> jax.Array:
    raise NotImplementedError

  def kl_dims(self) -> jax.Array | None:
    return None

  def gaussian(self) -> tuple[jax.Array, jax.Array]:
    raise TypeError(f"{type(self).__name__} is not Gaussian in latent coordinates")

  def mean_estimates(self, rng: jax.Array, num_samples: int = 32):
    """Two independent `num_samples` averages of E_q[u|x] (their covariance over a set counts
    active units without the Monte Carlo noise's bias, `metrics.active_units`)."""
    u = self.sample(rng, 2 * num_samples)[0]
    halves = jnp.mean(u.reshape(2, num_samples, *u.shape[1:]), axis=1)
    return halves[0], halves[1]

  def whitened_base(self) -> tuple[jax.Array, jax.Array]:
    """The base Gaussian N(mean, exp(logvar)) in latent coordinates, `[B, d]` each: q(u|x)
    itself for a Gaussian family, the flow's base distribution otherwise."""
    p = self.params
    logvar = p.logvar if self.prior.logvar is None else p.logvar - self.prior.logvar
    return self.prior.whiten(p.mean), logvar

  def sample_kl(self, u: jax.Array, log_q: jax.Array) -> tuple[jax.Array, jax.Array | None]:
    """(KL `[B]`, KL per dimension `[B, d]` or None) given samples `u [S, B, d]` of q with
    their log q: analytic for a closed form, else the Monte Carlo mean of log q - log p over
    the S samples (`metrics.monte_carlo_kl`; unbiased, negative for some x when S is small)."""
    return metrics.monte_carlo_kl(log_q, self.prior.log_prob(u)), None

  def kl(self, rng: jax.Array | None = None, num_samples: int = 1) -> jax.Array:
    """KL(q(u|x) || N(0, I)) `[B]`: the Monte Carlo mean over `num_samples` (analytic for a
    closed form, which overrides it)."""
    return self.sample_kl(*self.sample(rng, num_samples))[0]

  def code_mean(self, rng: jax.Array, num_samples: int = 32) -> jax.Array:
    """E_q[z|x] `[B, ...]` of the code the decoder reads (without a condition): exact for a
    Gaussian family without a decoder flow, else a `num_samples` average (probe features)."""
    u = self.sample(rng, num_samples)[0]
    return jnp.mean(self.prior.to_code(u), axis=0)

  def log_weights(self, rng: jax.Array, num_samples: int,
                  log_likelihood: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """`[n, B]` importance weights log p(x|u) + log p(u) - log q(u|x), u ~ q (Burda et al.
    2016); `log_likelihood` maps decoder inputs `[n, B, ...]` to `[n, B]`."""
    u, log_q = self.sample(rng, num_samples)
    return log_likelihood(self.to_decoder(u)) + self.prior.log_prob(u) - log_q


class GaussianPosterior(Posterior):
  """q(z|x) = N(μ, σ²): in latent coordinates N((μ - μ_p)/σ_p, σ²/σ_p²), closed form."""
  closed_form = True

  def gaussian(self) -> tuple[jax.Array, jax.Array]:
    return self.whitened_base()

  def code_mean(self, rng=None, num_samples=32):
    if self.prior.decoder_flow is None:
      return self.params.mean
    return super().code_mean(rng, num_samples)

  def sample(self, rng, num_samples):
    mean, logvar = self.gaussian()
    if mean.shape[-1] == 0:  # no code (seq2seq, language models): nothing to draw
      u = jnp.zeros((num_samples, *mean.shape), mean.dtype)
      return u, jnp.zeros(u.shape[:-1], mean.dtype)
    u = objectives.reparameterize(rng, mean, logvar, num_samples)
    return u, objectives.gaussian_log_prob(u, mean, logvar)

  def log_prob(self, u):
    return objectives.gaussian_log_prob(u, *self.gaussian())

  def point(self):
    return self.gaussian()[0]

  def mean_estimates(self, rng=None, num_samples=32):
    mean = self.gaussian()[0]
    return mean, mean

  def kl_dims(self):
    return objectives.gaussian_kl(*self.gaussian())

  def sample_kl(self, u=None, log_q=None):
    kl_dims = self.kl_dims()
    return jnp.sum(kl_dims, axis=-1), kl_dims

  def kl(self, rng=None, num_samples=1):
    return self.sample_kl()[0]


class FlowPosterior(Posterior):
  """z_K = f_x(z_0), z_0 ~ N(μ, σ²), u = whiten(z_K) (Rezende & Mohamed 2015):

    log q(u|x) = log N(z_0; μ, σ²) - log |det ∂f_x/∂z_0| - log |det ∂u/∂z_K|.
  """

  def __init__(self, params: PosteriorParams, prior: Prior, bijector: distrax.Bijector):
    super().__init__(params, prior)
    self.bijector = bijector

  def sample(self, rng, num_samples):
    p = self.params
    z0 = objectives.reparameterize(rng, p.mean, p.logvar, num_samples)
    z, log_det = self.bijector.forward_and_log_det(z0)
    log_q = objectives.gaussian_log_prob(z0, p.mean, p.logvar) - log_det
    return self.prior.whiten(z), log_q - self.prior.whiten_log_det()

  def log_prob(self, u):
    p = self.params
    z = self.prior.unwhiten(u)
    z = jnp.broadcast_to(z, jnp.broadcast_shapes(z.shape, p.mean.shape))
    z0, inverse_log_det = self.bijector.inverse_and_log_det(z)
    return (objectives.gaussian_log_prob(z0, p.mean, p.logvar) + inverse_log_det
            - self.prior.whiten_log_det())

  def point(self):
    return self.prior.whiten(self.bijector.forward(self.params.mean))


# ---------------------------------------------------------------------------------------------
# The registry of families.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Family:
  """A posterior family: how a model turns its encoder output and its flow into q and p.

  posterior: the `Posterior` class; `flow_in_posterior` hands it the (possibly amortised)
    flow. kl_label: what the per-dimension KL of the base Gaussian in latent coordinates is
    (figures; it sums to the posterior's KL exactly when `closed_form`). needs_flow: the
    model must build a flow (`model.flow`). global_flow: the flow is one bijection shared by
    prior and posterior (it may not depend on x) and the decoder reads f(z)
    (`Prior.decoder_flow`).
  """
  posterior: type[Posterior]
  needs_flow: bool = False
  flow_in_posterior: bool = False
  global_flow: bool = False
  kl_label: str = "KL(q(u_d|x) ‖ N(0,1))"

  @property
  def closed_form(self) -> bool:
    return self.posterior.closed_form

  def check(self, name: str, flow) -> None:
    """Raises ValueError when `flow` (a FlowConfig or None) does not fit the family."""
    if self.needs_flow and flow is None:
      raise ValueError(f"posterior {name!r} needs a flow (model.flow.kind)")
    if self.global_flow and flow.amortized:
      raise ValueError("the KL-preserving mode applies one bijection to prior and posterior, "
                       "so its flow cannot depend on x: set flow.amortized=False")

  def build(self, params: PosteriorParams, flow: Callable | None) -> Posterior:
    """The posterior object of `params`; `flow(context)` returns the model's bijector."""
    prior = self.prior(params, flow)
    if self.flow_in_posterior:
      return self.posterior(params, prior, flow(params.context))
    return self.posterior(params, prior)

  def prior(self, params: PosteriorParams | None, flow: Callable | None) -> Prior:
    return prior_of(params, flow(None) if self.global_flow else None)


POSTERIORS: dict[str, Family] = {
    # q(z|x) = N(μ(x), σ²(x)), analytic KL.
    "gaussian": Family(GaussianPosterior),
    # z_K = f_x(z_0): the (amortised) flow of METHODS.md §3, Monte Carlo KL.
    "flow": Family(FlowPosterior, needs_flow=True, flow_in_posterior=True,
                   kl_label="base Gaussian KL(q(u0_d|x) ‖ N(0,1))\n(not the flow posterior's KL)"),
    # One global f on prior and posterior: KL(f#q || f#p) = KL(q || p) stays analytic, the
    # decoder reads f(z_0).
    "kl_preserving": Family(GaussianPosterior, needs_flow=True, global_flow=True,
                            kl_label="KL(q(u_d|x) ‖ N(0,1)) (KL-preserving flow: exact)"),
}


def family(name: str) -> Family:
  """The registry entry `name`; ValueError naming the choices for an unknown one."""
  if name not in POSTERIORS:
    raise ValueError(f"unknown posterior {name!r}; use one of {', '.join(POSTERIORS)}")
  return POSTERIORS[name]


class LatentModel:
  """The protocol methods of a linen model whose `config.posterior` names a family of
  `POSTERIORS` and whose flow (when the family needs one) is the submodule `flow`:

    posterior(params) -> Posterior;  prior(params=None) -> Prior;
    decoder_input(u, params=None) -> what `log_likelihood` / `initial_state` read.

  The model itself implements `encode(*inputs) -> PosteriorParams` and the decoder."""
  input_keys = ("tokens",)  # the batch entries `__call__` and `encode` read, in order

  @property
  def code_dim(self) -> int:
    """The size of the latent code u."""
    return self.config.latent_dim

  @property
  def posterior_family(self) -> Family:
    return family(self.config.posterior)

  def _flow(self, context):
    return self.flow(context)

  def posterior(self, params: PosteriorParams) -> Posterior:
    """q(u|x) of the family `config.posterior`."""
    return self.posterior_family.build(params, self._flow)

  def prior(self, params: PosteriorParams | None = None) -> Prior:
    """p(u) = N(0, I) in latent coordinates, with the map of its codes to the decoder."""
    return self.posterior_family.prior(params, self._flow)

  def decoder_input(self, u: jax.Array, params: PosteriorParams | None = None) -> jax.Array:
    """The decoder's input for latent codes `u [..., d]` (and the condition in `params`)."""
    return self.prior(params).to_decoder(u)

  def auxiliary_nlls(self, tokens: jax.Array, cond: jax.Array) -> dict[str, jax.Array]:
    """Extra per-example NLLs `[B]` that evaluation reports at the point code, keyed
    '<name>_nll' (reported as '<name>'); none by default."""
    return {}


class NoLatent:
  """The protocol of a model without a code (the language models): the zero-width code u,
  with q = p, so KL = MI = AU = 0 and one importance sample gives the exact log p(x). The
  model implements `final_hidden(tokens)` (its sentence feature) and `__call__` returning
  `rec_nll`."""
  posterior_family = POSTERIORS["gaussian"]
  input_keys = ("tokens",)
  code_dim = 0

  def encoder_features(self, tokens: jax.Array) -> jax.Array:
    return self.final_hidden(tokens)

  def encode(self, tokens: jax.Array, deterministic: bool = True,
             features: jax.Array | None = None) -> PosteriorParams:
    zeros = jnp.zeros((tokens.shape[0], 0), jnp.float32)
    return PosteriorParams(zeros, zeros)

  def posterior(self, params: PosteriorParams) -> Posterior:
    return GaussianPosterior(params, Prior())

  def prior(self, params: PosteriorParams | None = None) -> Prior:
    return Prior()

  def decoder_input(self, u: jax.Array, params: PosteriorParams | None = None) -> jax.Array:
    return u

  auxiliary_nlls = LatentModel.auxiliary_nlls

  def log_likelihood(self, tokens: jax.Array, cond: jax.Array | None = None,
                     deterministic: bool = True) -> jax.Array:
    """log p(x) `[B]`, exact (`cond`, a zero-width code, is not read)."""
    return -self(tokens, deterministic=deterministic).rec_nll


def check_latent_config(config, rates: tuple[str, ...]) -> None:
  """The checks every latent model's config shares (ValueError naming the field)."""
  if config.vocab_size <= 4:
    raise ValueError(f"vocab_size must exceed the 4 special tokens, got {config.vocab_size}")
  if config.latent_dim < 0:
    raise ValueError(f"latent_dim must be >= 0 (0: no latent code, the language model or "
                     f"seq2seq), got {config.latent_dim}")
  for name in rates:
    if not 0.0 <= getattr(config, name) < 1.0:
      raise ValueError(f"{name} must be in [0, 1), got {getattr(config, name)}")
  family(config.posterior).check(config.posterior, config.flow)
  if config.kl_samples < 1:
    raise ValueError(f"kl_samples must be >= 1, got {config.kl_samples}")


def call(model, variables, params: PosteriorParams, fn: Callable, *args, **kwargs):
  """`fn(posterior, *args)` with the posterior of `params` under `model` (inside `apply`):
  e.g. `call(model, v, params, lambda q, r: q.sample(r, 8), rng)`."""
  return model.apply(variables, params, *args,
                     method=lambda m, p, *a: fn(m.posterior(p), *a), **kwargs)
