"""Normalising flows for latent codes, as distrax bijectors (METHODS.md §3).

A flow is a bijection z_K = f_K ∘ … ∘ f_1(z_0) of R^d with a tractable log-determinant, so that
a simple base density q_0 becomes a richer one by the change of variables

    log q(z_K) = log q_0(z_0) - sum_k log |det ∂f_k/∂z_{k-1}|.

Three families, each a `distrax.Bijector` over events of shape `[d]` whose parameters may carry
any leading batch shape (so one bijector object holds a different flow per example):

- `Planar` (Rezende & Mohamed 2015): f(z) = z + û tanh(wᵀz + b);
- `InverseAutoregressive` (Kingma et al. 2016): f(z) = μ(z) + exp(s(z)) ⊙ z with (μ, s) from a
  MADE network (Germain et al. 2015), output i depending on z_{<i} only;
- affine coupling (Dinh et al. 2017, RealNVP): half of z, selected by a mask, is scaled and
  shifted by functions of the other half — `distrax.MaskedCoupling` with a `distrax.ScalarAffine`.

**Amortised** flows (METHODS.md §3): the parameters (planar) or an extra input of every
conditioner layer (MADE and coupling networks) come from a context vector h(x) computed by the
encoder, so the transformation itself depends on the sentence.

The families are the entries of the registry `FLOWS`: name -> layer builder, a function
`(module, k, d, config, context)` that creates layer k's parameters on the module and returns
its bijector(s); per-family constraints (coupling needs d >= 2) are checked there. `Flow` is
the linen module that owns the parameters and, given a context (or none), composes its layers
into one `distrax.Chain`. Adding a family is one registry entry (and one row of the contract
test's table, tests/nn/test_flows.py). The conditioners are pure functions of parameter
arrays, so the bijectors can be used under any JAX transformation. Every layer starts as the
identity: the planar û, and the last layer of every conditioner network, are zero-initialised.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import distrax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Conditioner = Callable[[jax.Array], tuple[jax.Array, jax.Array]]

# m(a) = -1 + softplus(a + log(e - 1)) keeps wᵀû > -1 (invertibility) and m(0) = 0, so û = 0
# when u = 0 whatever w: a zero-initialised u makes a fresh planar layer the identity.
_PLANAR_SHIFT = math.log(math.e - 1.0)


# ---------------------------------------------------------------------------------------------
# Bijectors.
# ---------------------------------------------------------------------------------------------


class Planar(distrax.Bijector):
  """Planar flow f(z) = z + û tanh(wᵀz + b) (Rezende & Mohamed 2015, Eq. 10 and App. A.1).

    log|det ∂f/∂z| = log|1 + ûᵀψ(z)|,  ψ(z) = (1 - tanh²(wᵀz + b)) w.

  û = u + (m(wᵀu) - wᵀu) w / ‖w‖² with m(a) = -1 + softplus(a + log(e - 1)) guarantees
  wᵀû = m(wᵀu) > -1, which makes f invertible (the paper's m(a) = -1 + softplus(a), shifted
  so that m(0) = 0). The inverse has no closed form but reduces to the scalar equation
  α + (wᵀû) tanh(α + b) = wᵀy in α = wᵀz, monotone in α, solved here by bisection on the bracket
  |α - wᵀy| <= |wᵀû|.

  Args:
    u, w: `[..., d]` parameters (any batch shape broadcastable against the events).
    b: `[...]` offsets.
    bisection_steps: iterations of the inverse's root finder (the bracket halves each time).
  """

  def __init__(self, u: jax.Array, w: jax.Array, b: jax.Array, bisection_steps: int = 60):
    super().__init__(event_ndims_in=1)
    wu = jnp.sum(w * u, axis=-1, keepdims=True)
    m = -1.0 + jax.nn.softplus(wu + _PLANAR_SHIFT)
    self._u = u + (m - wu) * w / (jnp.sum(jnp.square(w), axis=-1, keepdims=True) + 1e-8)
    self._w = w
    self._b = b
    self._bisection_steps = bisection_steps

  @property
  def u_hat(self) -> jax.Array:
    return self._u

  def forward_and_log_det(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    a = jnp.sum(self._w * z, axis=-1) + self._b
    h = jnp.tanh(a)
    y = z + self._u * h[..., None]
    psi_u = (1.0 - jnp.square(h)) * jnp.sum(self._w * self._u, axis=-1)
    return y, jnp.log(jnp.abs(1.0 + psi_u))

  def inverse_and_log_det(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    wu = jnp.sum(self._w * self._u, axis=-1)
    wy = jnp.sum(self._w * y, axis=-1)
    b = jnp.broadcast_to(self._b, wy.shape)
    wu = jnp.broadcast_to(wu, wy.shape)
    radius = jnp.abs(wu)

    def bisect(_, bracket):
      lo, hi = bracket
      mid = 0.5 * (lo + hi)
      above = mid + wu * jnp.tanh(mid + b) > wy
      return jnp.where(above, lo, mid), jnp.where(above, mid, hi)

    lo, hi = jax.lax.fori_loop(0, self._bisection_steps, bisect, (wy - radius, wy + radius))
    alpha = 0.5 * (lo + hi)
    z = y - self._u * jnp.tanh(alpha + b)[..., None]
    _, log_det = self.forward_and_log_det(z)
    return z, -log_det


class InverseAutoregressive(distrax.Bijector):
  """Affine autoregressive layer f(z) = μ(z) + exp(s(z)) ⊙ z, (μ_i, s_i) functions of z_{<i}
  (the inverse autoregressive flow of Kingma et al. 2016, Eq. 10, in its affine form).

    log|det ∂f/∂z| = sum_i s_i(z),

  since the Jacobian is triangular. Sampling direction (z -> f(z)) is one conditioner pass; the
  inverse needs d sequential passes (each fixes one more coordinate), used only to evaluate the
  density at given points (e.g. for the mutual information).

  Args:
    conditioner: autoregressive `z [..., d] -> (shift, log_scale)`, each `[..., d]`.
    dim: event size d (the number of passes of the inverse).
  """

  def __init__(self, conditioner: Conditioner, dim: int):
    super().__init__(event_ndims_in=1)
    self._conditioner = conditioner
    self._dim = dim

  def forward_and_log_det(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    shift, log_scale = self._conditioner(z)
    return shift + jnp.exp(log_scale) * z, jnp.sum(log_scale, axis=-1)

  def inverse_and_log_det(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:

    def fix_one_more(_, z):
      shift, log_scale = self._conditioner(z)
      return (y - shift) * jnp.exp(-log_scale)

    # The first pass outside the loop gives z the batch shape of y and the conditioner's
    # parameters together (e.g. codes [n, 1, d] against the flows of B examples).
    z = jax.lax.fori_loop(1, self._dim, fix_one_more, fix_one_more(0, jnp.zeros_like(y)))
    _, log_scale = self._conditioner(z)
    return z, -jnp.sum(log_scale, axis=-1)


class Permute(distrax.Bijector):
  """A fixed permutation of the event's coordinates (volume preserving: log-det 0)."""

  def __init__(self, permutation: np.ndarray):
    super().__init__(event_ndims_in=1, is_constant_jacobian=True)
    self._perm = np.asarray(permutation)
    self._inv = np.argsort(self._perm)

  def forward_and_log_det(self, z: jax.Array) -> tuple[jax.Array, jax.Array]:
    return z[..., self._perm], jnp.zeros(z.shape[:-1], z.dtype)

  def inverse_and_log_det(self, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    return y[..., self._inv], jnp.zeros(y.shape[:-1], y.dtype)


def chain(layers: list[distrax.Bijector]) -> distrax.Bijector:
  """Composes bijectors given in the order they are applied (f_1 first), unlike distrax.Chain."""
  return distrax.Chain(layers[::-1])


# ---------------------------------------------------------------------------------------------
# Conditioners (pure functions of parameter arrays).
# ---------------------------------------------------------------------------------------------


def made_masks(dim: int, hidden_dims: tuple[int, ...]) -> list[np.ndarray]:
  """Connectivity masks of MADE (Germain et al. 2015) for the natural input order 1..d.

  Hidden unit k gets a degree m(k) in [1, d-1]; a hidden unit sees inputs with index <= m(k),
  and output i (0-based, one of each of the two output groups) sees hidden units with degree
  <= i (so output i depends on inputs 0..i-1 only). Returns the masks of every layer, each
  `[fan_in, fan_out]`, the last one for one output group of size d.
  """
  degrees = [np.arange(1, dim + 1)]
  for h in hidden_dims:
    degrees.append(np.arange(h) % max(dim - 1, 1) + 1)
  masks = [(d_in[:, None] <= d_out[None, :]).astype(np.float32)
           for d_in, d_out in zip(degrees[:-1], degrees[1:])]
  output_degrees = np.arange(1, dim + 1)
  masks.append((degrees[-1][:, None] < output_degrees[None, :]).astype(np.float32))
  return masks


def soft_clamp(x: jax.Array, bound: float) -> jax.Array:
  """bound · tanh(x / bound): x near 0, smoothly limited to (-bound, bound) (log-scales)."""
  return bound * jnp.tanh(x / bound)


class _MLPConditioner(nn.Module):
  """Parameters of a (masked) MLP `z -> (shift, log_scale)` with an optional context input.

  Calling the module returns a *pure function* of z closed over the parameter arrays (and the
  context's contribution to the first layer), so that flows can be iterated under `lax` loops.
  Hidden layers use ReLU; the output layer is zero-initialised (the identity map at init).

  masks: per-layer `[fan_in, fan_out]` masks (MADE), or None for a dense network.
  """
  dim: int
  hidden_dims: tuple[int, ...]
  masks: tuple[np.ndarray, ...] | None
  max_log_scale: float

  @nn.compact
  def __call__(self, context: jax.Array | None) -> Conditioner:
    sizes = (self.dim, *self.hidden_dims)
    kernels, biases = [], []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
      kernels.append(self.param(f"kernel_{i}", nn.initializers.lecun_normal(),
                                (fan_in, fan_out)))
      biases.append(self.param(f"bias_{i}", nn.initializers.zeros, (fan_out,)))
    out_kernel = self.param("out_kernel", nn.initializers.zeros, (sizes[-1], 2 * self.dim))
    out_bias = self.param("out_bias", nn.initializers.zeros, (2 * self.dim,))
    context_term = 0.0
    if context is not None:
      context_term = nn.Dense(sizes[1], use_bias=False, name="context")(context)
    masks = self.masks
    if masks is not None:
      kernels = [k * m for k, m in zip(kernels, masks[:-1])]
      out_kernel = out_kernel * np.concatenate([masks[-1], masks[-1]], axis=1)
    bound = self.max_log_scale

    def conditioner(z: jax.Array) -> tuple[jax.Array, jax.Array]:
      h = z
      for i, (k, b) in enumerate(zip(kernels, biases)):
        h = h @ k + b
        if i == 0:
          h = h + context_term
        h = jax.nn.relu(h)
      out = h @ out_kernel + out_bias
      shift, log_scale = jnp.split(out, 2, axis=-1)
      return shift, soft_clamp(log_scale, bound)

    return conditioner


# ---------------------------------------------------------------------------------------------
# The registry of flow families: name -> builder of layer k.
# ---------------------------------------------------------------------------------------------

# (module, k, d, config, context) -> the bijectors of layer k, in the order they are applied.
# Called inside `Flow.__call__`, so `module.param` and submodules created here (with explicit
# names) belong to the `Flow`.
LayerBuilder = Callable[[nn.Module, int, int, "FlowConfig", "jax.Array | None"],
                        list[distrax.Bijector]]


def planar_layer(module: nn.Module, k: int, d: int, config: FlowConfig,
                 context: jax.Array | None) -> list[distrax.Bijector]:
  """Planar layer k (`Planar`). Global: parameters planar_{k}_w, planar_{k}_b, planar_{k}_u
  (u zero-initialised). Amortised: u(h), w(h), b(h) affine in the context h — Dense maps
  planar_{k}_u (zero kernel), planar_{k}_w_ctx and planar_{k}_b_ctx (zero kernels, no bias)
  added to the global w and b — so a fresh layer is the identity for every context."""
  del config
  w0 = module.param(f"planar_{k}_w", nn.initializers.normal(1.0 / math.sqrt(d)), (d,))
  b0 = module.param(f"planar_{k}_b", nn.initializers.zeros, ())
  if context is None:
    u = module.param(f"planar_{k}_u", nn.initializers.zeros, (d,))
    return [Planar(u, w0, b0)]
  u = nn.Dense(d, kernel_init=nn.initializers.zeros, name=f"planar_{k}_u")(context)
  w = w0 + nn.Dense(d, use_bias=False, kernel_init=nn.initializers.zeros,
                    name=f"planar_{k}_w_ctx")(context)
  b = b0 + nn.Dense(1, use_bias=False, kernel_init=nn.initializers.zeros,
                    name=f"planar_{k}_b_ctx")(context)[..., 0]
  return [Planar(u, w, b)]


def iaf_layer(module: nn.Module, k: int, d: int, config: FlowConfig,
              context: jax.Array | None) -> list[distrax.Bijector]:
  """IAF layer k (`InverseAutoregressive`) with the MADE conditioner made_{k} (two hidden
  layers of `hidden_dim`), preceded for k > 0 by the reversal of the coordinates, so that
  every coordinate eventually depends on every other."""
  del module
  hidden = (config.hidden_dim, config.hidden_dim)
  cond = _MLPConditioner(d, hidden, tuple(made_masks(d, hidden)), config.max_log_scale,
                         name=f"made_{k}")(context)
  iaf = InverseAutoregressive(cond, d)
  return [iaf] if k == 0 else [Permute(np.arange(d)[::-1]), iaf]


def coupling_layer(module: nn.Module, k: int, d: int, config: FlowConfig,
                   context: jax.Array | None) -> list[distrax.Bijector]:
  """Affine coupling layer k (RealNVP, Dinh et al. 2017): the coordinates i with i ≡ k (mod 2)
  pass through and set the shift and log-scale of the others (conditioner coupling_{k}, a
  dense MLP of two hidden layers of `hidden_dim`). Needs d >= 2."""
  del module
  if d < 2:
    raise ValueError("a coupling flow needs latent_dim >= 2")
  hidden = (config.hidden_dim, config.hidden_dim)
  cond = _MLPConditioner(d, hidden, None, config.max_log_scale, name=f"coupling_{k}")(context)
  return [distrax.MaskedCoupling(
      mask=np.arange(d) % 2 == k % 2, conditioner=cond,
      bijector=lambda params: distrax.ScalarAffine(shift=params[0], log_scale=params[1]))]


FLOWS: dict[str, LayerBuilder] = {
    "planar": planar_layer,
    "iaf": iaf_layer,
    "coupling": coupling_layer,
}


# ---------------------------------------------------------------------------------------------
# The flow module.
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FlowConfig:
  """A flow of `num_layers` layers of one family.

  kind: a key of `FLOWS`: 'planar', 'iaf' (MADE conditioner, the coordinates reversed between
    layers) or 'coupling' (RealNVP, alternating even/odd masks).
  num_layers: K.
  hidden_dim: width of the conditioner networks (iaf, coupling); two hidden layers.
  amortized: parameters (planar) or conditioner inputs (iaf, coupling) depend on the encoder's
    context h(x); otherwise the flow is one global bijection.
  context_dim: size of the context vector the encoder projects h(x) to (amortised flows).
  max_log_scale: log-scales are soft-clamped to ±this, for stability.
  """
  kind: str = "iaf"
  num_layers: int = 4
  hidden_dim: int = 64
  amortized: bool = True
  context_dim: int = 64
  max_log_scale: float = 3.0

  def __post_init__(self):
    if self.kind not in FLOWS:
      raise ValueError(f"unknown flow kind {self.kind!r}; use one of {', '.join(FLOWS)}")
    if self.num_layers < 1:
      raise ValueError(f"a flow needs num_layers >= 1, got {self.num_layers}")
    if self.amortized and self.context_dim < 1:
      raise ValueError("an amortised flow needs context_dim >= 1")


class Flow(nn.Module):
  """Builds the flow's `distrax` bijector for a context.

  `Flow(config, latent_dim)(context)` returns a bijector on `[..., d]` events: the layers
  `FLOWS[config.kind](self, k, d, config, context)`, k = 0..K-1, composed with `chain`. `context`
  is `[..., context_dim]` for an amortised flow (its leading shape broadcasts against the
  events' batch shape) and must be None otherwise. The same parameters give the same bijection
  for the same context, so a density can be evaluated at any point (`inverse_and_log_det`).
  """
  config: FlowConfig
  latent_dim: int

  @nn.compact
  def __call__(self, context: jax.Array | None) -> distrax.Bijector:
    c, d = self.config, self.latent_dim
    if c.amortized != (context is not None):
      raise ValueError("an amortised flow needs a context and a global flow takes none "
                       f"(amortized={c.amortized}, context given: {context is not None})")
    build = FLOWS[c.kind]
    return chain([bij for k in range(c.num_layers) for bij in build(self, k, d, c, context)])
