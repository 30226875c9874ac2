"""The LSTM layer: hoisted input projection + scanned recurrence with a custom VJP.

Gate equations (order i, f, g, o along the last axis of every `4H` array):

  a_t = x_t W_x + z W_z + h_{t-1} W_hh + b              a_t in R^{4H}
  i_t = sigmoid(a_t^i)   f_t = sigmoid(a_t^f)   g_t = tanh(a_t^g)   o_t = sigmoid(a_t^o)
  c~_t = f_t * c_{t-1} + i_t * g_t
  h~_t = o_t * tanh(c~_t)

`z` is an optional per-sequence "static" input (the VAE decoder's latent code): the layer is
exactly an LSTM whose step input is the concatenation [x_t; z], with the input kernel split in
two blocks, W_ih = [W_x; W_z]. Sequences are right-padded with a mask m_t in {0, 1}; a padded
step leaves the state untouched and outputs zeros:

  c_t = m_t c~_t + (1 - m_t) c_{t-1}      h_t = m_t h~_t + (1 - m_t) h_{t-1}      y_t = m_t h~_t

so the returned (c_T, h_T) is each sequence's state after its last real token. (The rule is
applied per step, so any mask is handled, not only right padding.)

Why the implementation is shaped as it is. Per token the LSTM costs two matmuls of the same
size, x_t W_x and h_{t-1} W_hh, but only the second is sequential. A plain `lax.scan` over an
LSTM cell does both inside the loop as small `[B, D] @ [D, 4H]` products, and reverse-mode
autodiff of that scan accumulates dW_hh and dW_x with `[H, B] @ [B, 4H]` outer products
(K = B = 32) at every step, plus the elementwise work of the autodiff'd cell. Here:

1. Hoisting. x W_x for all steps is ONE `[T*B, D] @ [D, 4H]` matmul before the recurrence;
   z W_z + b is computed once per sequence (`[B, Dz] @ [Dz, 4H]`) and added inside each
   step's elementwise gate fusion, never concatenated T times.
2. Time-major layout. The projection is produced time-major (`[T, B, 4H]`; the cheaper
   `[B, T, D]` input is transposed, not the 4x wider projection), so every step reads one
   contiguous `[B, 4H]` slab and writes contiguous `[B, H]` rows.
3. Custom VJP for the recurrence. The forward scan saves the post-nonlinearity gates
   (i, f, g, o), c_{t-1} and h_{t-1}; the backward scan only propagates (dh, dc):

     dh~_t = m_t (dh_t + dy_t)
     dc~_t = m_t dc_t + dh~_t q_t                       q_t = o_t (1 - tanh^2 c~_t)
     da_t  = [dc~_t, dc~_t, dc~_t, dh~_t] * p_t         (blockwise)
     p_t   = [g i (1-i),  c_{t-1} f (1-f),  i (1-g^2),  tanh(c~_t) o (1-o)]
     dh_{t-1} = (1 - m_t) dh_t + da_t W_hh^T       dc_{t-1} = (1 - m_t) dc_t + dc~_t f_t

   p and q do not depend on the incoming gradients, so they are computed for all steps in
   one vectorised pass before the loop, leaving a few multiply-adds and one matmul per step.
   The weight gradients leave the loop: dW_hh = sum_t h_{t-1}^T da_t is ONE
   `[H, T*B] @ [T*B, 4H]` matmul after the scan, the gradient of the hoisted projection is the
   stacked da (so autodiff of step 1 gives dW_x = X^T dA and dX = dA W_x^T as one matmul
   each), and d(z W_z + b) = sum_t da_t.
4. One elementwise pass for the four gate nonlinearities: sigmoid is written as
   0.5 tanh(a / 2) + 0.5, so all 4H pre-activations go through a single scaled tanh whose
   result is stored once. On XLA:CPU this is several times cheaper than `jax.nn.sigmoid` on
   three slices plus `tanh` on the fourth, which XLA splits into several fusions that
   recompute the activations.
5. Sums over steps are matrix-vector products (`ones @ X`): XLA:CPU's default (YNNPACK)
   reduction over a leading axis is pathologically slow (about 15x at the PTB size and 40x
   at the Yahoo size for sum_t da_t), whatever `XLA_FLAGS` the user has set.
6. `unroll=1` by default: unrolling the scans (2, 4, 8) did not help the forward and made the
   backward slower on CPU.

Initialisation. Kernels default to uniform(-0.1, 0.1), the usual choice in text-VAE code
(Bowman et al. 2016 lineage); He et al. (2019) use uniform(-0.01, 0.01) for their LSTMs, which
`uniform_init(0.01)` reproduces. The bias is zero plus `forget_bias` on the f block (Jozefowicz
et al. 2015 recommend 1.0 for long dependencies; the default 0.0 matches PyTorch-trained
text VAEs).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
State = tuple[Array, Array]  # (c, h), each [B, H]
Initializer = Callable[..., Array]

__all__ = ["LSTM", "lstm_recurrence", "uniform_init"]


def uniform_init(scale: float) -> Initializer:
  """U(-scale, scale) initialiser (flax's `initializers.uniform` is U(0, scale))."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-scale, maxval=scale)

  return init


# ---------------------------------------------------------------------------------------------
# The recurrence: a pure function of the hoisted projection, with a hand-written VJP.
# ---------------------------------------------------------------------------------------------


def _gate_activations(a: Array) -> Array:
  """[i, f, g, o] = [sigmoid, sigmoid, tanh, sigmoid](a) as one fused tanh over `[.., 4H]`.

  sigmoid(x) = 0.5 + 0.5 tanh(x / 2), so with per-column constants s = (1/2, 1/2, 1, 1/2):
  act = s' tanh(s a) + (1 - s') where s' = s (the g block has scale 1, offset 0).
  """
  four_h = a.shape[-1]
  h = four_h // 4
  col = jnp.arange(four_h)
  is_g = (col >= 2 * h) & (col < 3 * h)
  scale = jnp.where(is_g, 1.0, 0.5).astype(a.dtype)
  offset = jnp.where(is_g, 0.0, 0.5).astype(a.dtype)
  return scale * jnp.tanh(scale * a) + offset


def _split4(x: Array) -> tuple[Array, Array, Array, Array]:
  h = x.shape[-1] // 4
  return x[..., :h], x[..., h:2 * h], x[..., 2 * h:3 * h], x[..., 3 * h:]


def _sum_leading(x: Array, keep: int) -> Array:
  """Sums `x` over all but its last `keep` axes, as a matrix-vector product.

  Written as `ones @ x` because XLA:CPU's default library reduction is pathologically slow
  for sums over leading axes (over 100x slower than the matvec at the Yahoo size).
  """
  lead = x.shape[:x.ndim - keep]
  n = math.prod(lead)
  if n == 1:
    return x.reshape(x.shape[x.ndim - keep:])
  flat = x.reshape(n, -1)
  return jnp.dot(jnp.ones((n,), x.dtype), flat).reshape(x.shape[x.ndim - keep:])


def _forward_scan(x_proj, offset, mask, c0, h0, w_hh, unroll, save_residuals):
  """Runs the masked recurrence; optionally stacks what the backward pass needs."""

  def body(carry, xs):
    c, h = carry
    xp_t, m_t = xs
    a = xp_t + offset + jnp.dot(h, w_hh)
    act = _gate_activations(a)
    i, f, g, o = _split4(act)
    c_new = f * c + i * g
    h_new = o * jnp.tanh(c_new)
    keep = m_t[:, None] > 0
    c_next = jnp.where(keep, c_new, c)
    h_next = jnp.where(keep, h_new, h)
    y = jnp.where(keep, h_new, jnp.zeros_like(h_new))
    if save_residuals:
      return (c_next, h_next), (y, act, c, h)
    return (c_next, h_next), y

  (c_t, h_t), ys = jax.lax.scan(body, (c0, h0), (x_proj, mask), unroll=unroll)
  return ys, (c_t, h_t)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def lstm_recurrence(x_proj: Array, offset: Array, mask: Array, c0: Array, h0: Array,
                    w_hh: Array, unroll: int = 1) -> tuple[Array, State]:
  """The masked LSTM recurrence on a precomputed, time-major input projection.

  Args:
    x_proj: `[T, B, 4H]` x_t W_x for every step (bias and static terms may be in `offset`).
    offset: `[B, 4H]` (or broadcastable) per-sequence term added at every step: b + z W_z.
    mask: `[T, B]` float, 1 for real steps, 0 for padding.
    c0, h0: `[B, H]` initial state.
    w_hh: `[H, 4H]` recurrent kernel.
    unroll: `lax.scan` unroll factor (forward and backward).

  Returns:
    (`[T, B, H]` outputs y_t (0 at padded steps), (c_T, h_T)).
  """
  return _forward_scan(x_proj, offset, mask, c0, h0, w_hh, unroll, save_residuals=False)


def _recurrence_fwd(x_proj, offset, mask, c0, h0, w_hh, unroll):
  (ys, acts, c_prev, h_prev), final = _forward_scan(
      x_proj, offset, mask, c0, h0, w_hh, unroll, save_residuals=True)
  return (ys, final), (acts, c_prev, h_prev, mask, w_hh, offset)


def _recurrence_bwd(unroll, residuals, cotangents):
  acts, c_prev, h_prev, mask, w_hh, offset = residuals
  offset_shape = offset.shape
  dys, (dc_t, dh_t) = cotangents
  steps, batch, four_h = acts.shape
  hidden = four_h // 4
  w_hh_t = w_hh.T  # Transposed once, outside the loop.

  # Everything that does not depend on the incoming (dh, dc) is computed for all steps at
  # once, in one vectorised pass, so that the sequential loop only does a few FMAs per step
  # besides its matmul. With tc = tanh(c~_t):
  #   q_t = o (1 - tc^2)                     dc~ = m dc + dh~ q
  #   p_t = [g i (1-i), c_{t-1} f (1-f), i (1-g^2), tc o (1-o)]
  #   da_t = [dc~, dc~, dc~, dh~] * p_t       (blockwise)
  i, f, g, o = _split4(acts)
  tanh_c = jnp.tanh(f * c_prev + i * g)
  q = o * (1.0 - tanh_c * tanh_c)
  p = jnp.stack([g * i * (1.0 - i), c_prev * f * (1.0 - f), i * (1.0 - g * g),
                 tanh_c * o * (1.0 - o)], axis=2)  # [T, B, 4, H]
  m = mask[..., None]
  dys = m * dys
  block = jax.lax.broadcasted_iota(jnp.int32, (1, 4, 1), 1)

  def body(carry, xs):
    dc, dh = carry
    p_t, q_t, f_t, m_t, dy_t = xs
    dh_new = m_t * dh + dy_t
    dc_new = m_t * dc + dh_new * q_t
    da = jnp.where(block == 3, dh_new[:, None], dc_new[:, None]) * p_t
    da = da.reshape(batch, four_h)
    dh_prev = (1.0 - m_t) * dh + jnp.dot(da, w_hh_t)
    dc_prev = (1.0 - m_t) * dc + dc_new * f_t
    return (dc_prev, dh_prev), da

  (dc0, dh0), d_acts = jax.lax.scan(
      body, (dc_t, dh_t), (p, q, f, m, dys), reverse=True, unroll=unroll)
  # One [H, T*B] @ [T*B, 4H] matmul instead of T outer products inside the loop.
  dw_hh = jnp.dot(h_prev.reshape(steps * batch, hidden).T,
                  d_acts.reshape(steps * batch, four_h))
  d_offset = _sum_leading(d_acts, len(offset_shape))
  d_offset = jnp.sum(
      d_offset, axis=tuple(k for k, n in enumerate(offset_shape) if n == 1), keepdims=True)
  return d_acts, d_offset.reshape(offset_shape), jnp.zeros_like(mask), dc0, dh0, dw_hh


lstm_recurrence.defvjp(_recurrence_fwd, _recurrence_bwd)


# ---------------------------------------------------------------------------------------------
# The module.
# ---------------------------------------------------------------------------------------------


class LSTM(nn.Module):
  """Single-layer LSTM over right-padded, batch-major sequences (see the module docstring).

  Attributes:
    features: hidden size H.
    kernel_init: initialiser of the input kernels `kernel_ih [D, 4H]` and
      `kernel_static [Dz, 4H]`.
    recurrent_kernel_init: initialiser of `kernel_hh [H, 4H]`.
    bias_init: initialiser of `bias [4H]` (before `forget_bias` is added to the f block).
    forget_bias: constant added to the forget-gate block of the bias at initialisation.
    unroll: `lax.scan` unroll factor of the recurrence.
    param_dtype: parameter dtype (computation follows the inputs' dtype, promoted with it).
  """
  features: int
  kernel_init: Initializer = uniform_init(0.1)
  recurrent_kernel_init: Initializer = uniform_init(0.1)
  bias_init: Initializer = nn.initializers.zeros_init()
  forget_bias: float = 0.0
  unroll: int = 1
  param_dtype: Any = jnp.float32

  @nn.compact
  def _params(self, in_features: int, static_features: int | None):
    """Creates (at init) or fetches the parameters; shared by `__call__` and `step`."""
    h = self.features

    def bias_init(key, shape, dtype=self.param_dtype):
      b = self.bias_init(key, shape, dtype)
      return b.at[h:2 * h].add(jnp.asarray(self.forget_bias, dtype))

    kernel_ih = self.param("kernel_ih", self.kernel_init, (in_features, 4 * h),
                           self.param_dtype)
    kernel_hh = self.param("kernel_hh", self.recurrent_kernel_init, (h, 4 * h),
                           self.param_dtype)
    bias = self.param("bias", bias_init, (4 * h,), self.param_dtype)
    kernel_static = None
    if static_features is not None:
      kernel_static = self.param("kernel_static", self.kernel_init,
                                 (static_features, 4 * h), self.param_dtype)
    return kernel_ih, kernel_hh, bias, kernel_static

  def _offset(self, bias: Array, kernel_static: Array | None,
              static_inputs: Array | None) -> Array:
    """b + z W_z: `[B, 4H]` with static inputs, `[4H]` without."""
    if static_inputs is None:
      return bias
    return jnp.dot(static_inputs, kernel_static) + bias

  def initial_state(self, batch_size: int, dtype: Any = jnp.float32) -> State:
    zeros = jnp.zeros((batch_size, self.features), dtype)
    return zeros, zeros

  def __call__(self, inputs: Array, mask: Array | None = None,
               initial_state: State | None = None,
               static_inputs: Array | None = None) -> tuple[Array, State]:
    """Runs the LSTM over `inputs`.

    Args:
      inputs: `[B, T, D]`.
      mask: `[B, T]` bool or 0/1; None means every step is real.
      initial_state: (c_0, h_0), each `[B, H]`; zeros when None.
      static_inputs: optional `[B, Dz]` vector concatenated to every step's input.

    Returns:
      (`[B, T, H]` outputs, zero at padded steps; (c_T, h_T) the state after each sequence's
      last real step).
    """
    batch, steps, in_features = inputs.shape
    static_features = None if static_inputs is None else static_inputs.shape[-1]
    kernel_ih, kernel_hh, bias, kernel_static = self._params(in_features, static_features)
    if initial_state is None:
      initial_state = self.initial_state(batch, inputs.dtype)
    c0, h0 = initial_state
    if mask is None:
      mask = jnp.ones((batch, steps), inputs.dtype)
    mask_tm = (jnp.swapaxes(mask, 0, 1) != 0).astype(inputs.dtype)
    # Time-major input projection for all steps at once: [T*B, D] @ [D, 4H].
    x_proj = jnp.dot(jnp.swapaxes(inputs, 0, 1), kernel_ih)
    offset = self._offset(bias, kernel_static, static_inputs)
    ys, final = lstm_recurrence(x_proj, offset, mask_tm, c0, h0, kernel_hh, self.unroll)
    return jnp.swapaxes(ys, 0, 1), final

  def step(self, state: State, x: Array, static_inputs: Array | None = None,
           mask: Array | None = None) -> tuple[State, Array]:
    """One step with the layer's parameters, for decoding inside `lax` loops.

    Args:
      state: (c, h), each `[B, H]`.
      x: `[B, D]` this step's input.
      static_inputs: optional `[B, Dz]` (the same vector given to `__call__`). Its projection
        is loop-invariant; XLA hoists it out of a surrounding `while_loop`.
      mask: optional `[B]` bool or 0/1; where 0 the state is kept and the output is zero.

    Returns:
      ((c_t, h_t), y_t `[B, H]`).
    """
    static_features = None if static_inputs is None else static_inputs.shape[-1]
    kernel_ih, kernel_hh, bias, kernel_static = self._params(x.shape[-1], static_features)
    c, h = state
    a = jnp.dot(x, kernel_ih) + self._offset(bias, kernel_static, static_inputs)
    a = a + jnp.dot(h, kernel_hh)
    i, f, g, o = _split4(_gate_activations(a))
    c_new = f * c + i * g
    h_new = o * jnp.tanh(c_new)
    if mask is None:
      return (c_new, h_new), h_new
    keep = jnp.asarray(mask)[:, None] != 0
    y = jnp.where(keep, h_new, jnp.zeros_like(h_new))
    return (jnp.where(keep, c_new, c), jnp.where(keep, h_new, h)), y
