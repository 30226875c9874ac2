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

1. Hoisting. x W_x for all steps is ONE `[4H, D] @ [D, T*B]` matmul before the loop;
   z W_z + b is computed once per sequence (`[B, Dz] @ [Dz, 4H]`) and added inside each
   step's elementwise gate fusion, never concatenated T times.
2. Feature-major layout inside. Per-step arrays are `[F, B]` and stacked ones `[F, T, B]`
   (only the D-wide input and H-wide output are transposed at the boundary, never the
   4H-wide projection). Each step's matmul is then W_hh^T `[4H, H]` @ h `[H, B]`: the weight
   is streamed and only the small `[H, B]` operand is packed, which on CPU is markedly faster
   than h `[B, H]` @ W_hh `[H, 4H]` once W_hh outgrows the L2 cache (H = 1024: about 25 % per
   step, forward and backward). Gate blocks are contiguous row blocks, and every matmul after
   the loops contracts the contiguous trailing (T, B) axes, so nothing large is transposed.
3. Custom VJP for the whole layer (input projection + recurrence). The forward loop saves
   the post-nonlinearity gates (i, f, g, o), c_{t-1} and h_{t-1}; the backward loop only
   propagates (dh, dc):

     dh~_t = m_t (dh_t + dy_t)
     dc~_t = m_t dc_t + dh~_t q_t                       q_t = o_t (1 - tanh^2 c~_t)
     da_t  = [dc~_t, dc~_t, dc~_t, dh~_t] * p_t         (blockwise)
     p_t   = [g i (1-i),  c_{t-1} f (1-f),  i (1-g^2),  tanh(c~_t) o (1-o)]
     dh_{t-1} = (1 - m_t) dh_t + W_hh da_t         dc_{t-1} = (1 - m_t) dc_t + dc~_t f_t

   p and q do not depend on the incoming gradients, so they are computed for all steps in
   one vectorised pass before the loop, leaving a few multiply-adds and one matmul per step.
   The weight gradients leave the loop as one matmul each over all T*B positions:
   dW_hh = H_prev dA^T, dW_x = X dA^T, dX = W_x dA, and d(z W_z + b) = sum_t da_t.
4. One elementwise pass for the four gate nonlinearities: sigmoid is written as
   0.5 tanh(a / 2) + 0.5, so all 4H pre-activations go through a single scaled tanh whose
   result is stored once. On XLA:CPU this is several times cheaper than `jax.nn.sigmoid` on
   three slices plus `tanh` on the fourth, which XLA splits into several fusions that
   recompute the activations.
5. The bias-only gradient sum over (T, B) is a matrix-vector product: XLA:CPU's default
   (YNNPACK) reductions are pathologically slow for some sums over leading or paired axes
   (e.g. sum over T of `[T, B, 4H]`: ~15x slower than `ones @ X` at the PTB size, ~50x at
   the Yahoo size), whatever `XLA_FLAGS` the user has set.
6. `unroll=1` by default: unrolling the loops (2, 4, 8) did not help the forward and made the
   backward slower on CPU.

Initialisation. Kernels default to uniform(-0.1, 0.1), the usual choice in text-VAE code
(Bowman et al. 2016 lineage). The bias is zero plus `forget_bias` on the f block (Jozefowicz
et al. 2015 recommend 1.0 for long dependencies; the default 0.0 matches PyTorch-trained
text VAEs). `uniform_lstm_init(0.01)` gives He et al. 2019's initialisation
(jxhe/vae-lagging-encoder, `uniform_initializer(0.01)` applied to every parameter of
`nn.LSTM`): every kernel U(-0.01, 0.01) and, since PyTorch's LSTM has two biases b_ih and b_hh
of which only the sum enters the gates, the one bias here is drawn as the sum of two
U(-0.01, 0.01) variables.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
State = tuple[Array, Array]  # (c, h), each [B, H]
Initializer = Callable[..., Array]

__all__ = ["LSTM", "lstm_recurrence", "mixed_dot", "summed_uniform_init", "uniform_init",
           "uniform_lstm_init"]


def uniform_init(scale: float) -> Initializer:
  """U(-scale, scale) initialiser (flax's `initializers.uniform` is U(0, scale))."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, minval=-scale, maxval=scale)

  return init


def summed_uniform_init(scale: float, terms: int = 2) -> Initializer:
  """The sum of `terms` independent U(-scale, scale) draws: the distribution of PyTorch's
  b_ih + b_hh when each LSTM bias is initialised U(-scale, scale) (triangular on
  (-2 scale, 2 scale) for two terms, standard deviation scale sqrt(terms / 3))."""

  def init(key, shape, dtype=jnp.float32):
    draws = jax.random.uniform(key, (terms, *shape), dtype, minval=-scale, maxval=scale)
    return jnp.sum(draws, axis=0)

  return init


def uniform_lstm_init(scale: float | None) -> dict[str, Initializer]:
  """The `LSTM` initialisers of He et al. 2019 (see the module docstring) as keyword
  arguments: kernels U(-scale, scale), the bias a sum of two such draws. None: {} (the
  layer's defaults)."""
  if scale is None:
    return {}
  return dict(kernel_init=uniform_init(scale), recurrent_kernel_init=uniform_init(scale),
              bias_init=summed_uniform_init(scale, 2))


# ---------------------------------------------------------------------------------------------
# The layer as a pure function of feature-major arrays ([F, B] per step, [F, T, B] stacked),
# with a hand-written VJP.
# ---------------------------------------------------------------------------------------------


def _gate_activations(a: Array, axis: int = 0) -> Array:
  """[i, f, g, o] = [sigmoid, sigmoid, tanh, sigmoid](a) as one fused tanh.

  The 4H gate pre-activations lie along `axis`. sigmoid(x) = 0.5 + 0.5 tanh(x / 2), so with
  per-gate constants s = (1/2, 1/2, 1, 1/2) and offsets (1/2, 1/2, 0, 1/2):
  act = s tanh(s a) + offset.
  """
  axis = axis % a.ndim
  four_h = a.shape[axis]
  h = four_h // 4
  shape = [1] * a.ndim
  shape[axis] = four_h
  gate = jnp.arange(four_h).reshape(shape)
  is_g = (gate >= 2 * h) & (gate < 3 * h)
  scale = jnp.where(is_g, 1.0, 0.5).astype(a.dtype)
  offset = jnp.where(is_g, 0.0, 0.5).astype(a.dtype)
  return scale * jnp.tanh(scale * a) + offset


def _split4(x: Array, axis: int = 0) -> tuple[Array, Array, Array, Array]:
  """The (i, f, g, o) blocks of an array with 4H gate entries along `axis`."""
  return tuple(jnp.split(x, 4, axis=axis))


def _at(x: Array, t: Array) -> Array:
  """x[:, t] of a stacked `[F, T, B]` array."""
  return jax.lax.dynamic_index_in_dim(x, t, axis=1, keepdims=False)


def _put(x: Array, value: Array, t: Array) -> Array:
  """x[:, t] = value, in place inside a loop."""
  return jax.lax.dynamic_update_index_in_dim(x, value, t, axis=1)


def _forward_loop(x_proj, offset, mask, c0, h0, w_hh, unroll, save_residuals,
                  matmul_dtype=None):
  """Runs the masked recurrence; optionally stacks what the backward pass needs."""
  four_h, steps, batch = x_proj.shape
  hidden = four_h // 4
  dtype = x_proj.dtype
  w_hh_t = w_hh.T  # [4H, H], transposed (and cast) once, outside the loop.
  if matmul_dtype is not None:
    w_hh_t = w_hh_t.astype(matmul_dtype)
  stacked = lambda f: jnp.zeros((f, steps, batch), dtype)
  buffers = {"y": stacked(hidden)}
  if save_residuals:
    buffers.update(act=stacked(four_h), c_prev=stacked(hidden), h_prev=stacked(hidden))

  def body(t, carry):
    c, h, bufs = carry
    a = _at(x_proj, t) + offset + mixed_dot(w_hh_t, h, MM, matmul_dtype)
    act = _gate_activations(a)
    i, f, g, o = _split4(act)
    c_new = f * c + i * g
    h_new = o * jnp.tanh(c_new)
    keep = mask[t][None, :] != 0
    bufs = dict(bufs, y=_put(bufs["y"], jnp.where(keep, h_new, 0.0), t))
    if save_residuals:
      bufs.update(act=_put(bufs["act"], act, t), c_prev=_put(bufs["c_prev"], c, t),
                  h_prev=_put(bufs["h_prev"], h, t))
    return jnp.where(keep, c_new, c), jnp.where(keep, h_new, h), bufs

  c_t, h_t, buffers = jax.lax.fori_loop(0, steps, body, (c0, h0, buffers), unroll=unroll)
  return buffers, (c_t, h_t)


def _sum_steps(x: Array, keep_batch: bool) -> Array:
  """sum_t x[:, t] of `[F, T, B]` -> `[F, B]`, or sum over (t, b) -> `[F, 1]`.

  The (t, b) sum is written as a matrix-vector product: XLA:CPU's default (YNNPACK)
  reductions are pathologically slow for some sums over leading or paired axes.
  """
  if keep_batch:
    return jnp.sum(x, axis=1)
  f = x.shape[0]
  return jnp.dot(x.reshape(f, -1), jnp.ones((x.shape[1] * x.shape[2],), x.dtype))[:, None]


def mixed_dot(a: Array, b: Array, dims, matmul_dtype: Any = None) -> Array:
  """`dot_general(a, b, dims)`; with a `matmul_dtype` (e.g. bfloat16) the operands are cast
  to it and the products accumulated in float32 (the result is float32)."""
  if matmul_dtype is None:
    return jax.lax.dot_general(a, b, dims)
  return jax.lax.dot_general(a.astype(matmul_dtype), b.astype(matmul_dtype), dims,
                             preferred_element_type=jnp.float32)


MM = (((1,), (0,)), ((), ()))  # a @ b
_NT = (((1,), (1,)), ((), ()))  # a @ b^T


def _project(x: Array, w_ih: Array, matmul_dtype: Any = None) -> Array:
  """(x_t W_x)^T for all steps: `[D, T, B]`, `[D, 4H]` -> `[4H, T, B]`, one matmul."""
  if matmul_dtype is None:
    return jax.lax.dot_general(w_ih, x, (((0,), (0,)), ((), ())))
  # [4H, D] @ [D, T*B]: XLA:CPU runs mixed-precision dots only in this plain layout.
  d, steps, batch = x.shape
  return mixed_dot(w_ih.T, x.reshape(d, steps * batch), MM, matmul_dtype).reshape(-1, steps, batch)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def lstm_recurrence(x: Array, w_ih: Array, offset: Array, mask: Array, c0: Array, h0: Array,
                    w_hh: Array, unroll: int = 1, matmul_dtype: Any = None
                    ) -> tuple[Array, State]:
  """The masked LSTM over a whole sequence, feature-major, with a hand-written VJP.

  Args:
    x: `[D, T, B]` inputs (feature, step, batch).
    w_ih: `[D, 4H]` input kernel; x_t W_x is computed for all steps in one matmul.
    offset: `[4H, B]` or `[4H, 1]` term added at every step: (b + z W_z)^T.
    mask: `[T, B]` float, 1 for real steps, 0 for padding.
    c0, h0: `[H, B]` initial state (transposed).
    w_hh: `[H, 4H]` recurrent kernel.
    unroll: loop unroll factor (forward and backward).
    matmul_dtype: None (matmuls in the inputs' dtype), or e.g. `jnp.bfloat16`: every matmul of
      the forward and backward passes takes operands cast to it and accumulates in float32;
      the state, gates and gradients stay float32.

  Returns:
    (`[H, T, B]` outputs y_t (0 at padded steps), (c_T, h_T) each `[H, B]`).
  """
  buffers, final = _forward_loop(_project(x, w_ih, matmul_dtype), offset, mask, c0, h0, w_hh,
                                 unroll, False, matmul_dtype)
  return buffers["y"], final


def _recurrence_fwd(x, w_ih, offset, mask, c0, h0, w_hh, unroll, matmul_dtype):
  buffers, final = _forward_loop(_project(x, w_ih, matmul_dtype), offset, mask, c0, h0, w_hh,
                                 unroll, True, matmul_dtype)
  residuals = (x, w_ih, buffers["act"], buffers["c_prev"], buffers["h_prev"], mask, w_hh,
               offset)
  return (buffers["y"], final), residuals


def _recurrence_bwd(unroll, matmul_dtype, residuals, cotangents):
  x, w_ih, acts, c_prev, h_prev, mask, w_hh, offset = residuals
  dys, (dc_t, dh_t) = cotangents
  four_h, steps, batch = acts.shape
  hidden = four_h // 4

  # Everything that does not depend on the incoming (dh, dc) is computed for all steps at
  # once, in one vectorised pass, so that the sequential loop only does a few multiply-adds
  # per step besides its matmul. With tc = tanh(c~_t):
  #   q_t = o (1 - tc^2)                     dc~ = m dc + dh~ q
  #   p_t = [g i (1-i), c_{t-1} f (1-f), i (1-g^2), tc o (1-o)]
  #   da_t = [dc~, dc~, dc~, dh~] * p_t       (blockwise)
  i, f, g, o = _split4(acts)
  tanh_c = jnp.tanh(f * c_prev + i * g)
  q = o * (1.0 - tanh_c * tanh_c)
  p = jnp.concatenate([g * i * (1.0 - i), c_prev * f * (1.0 - f), i * (1.0 - g * g),
                       tanh_c * o * (1.0 - o)], axis=0)
  dys = mask[None] * dys
  block = jax.lax.broadcasted_iota(jnp.int32, (4, 1, 1), 0)
  w_hh_loop = w_hh if matmul_dtype is None else w_hh.astype(matmul_dtype)

  def body(k, carry):
    dc, dh, d_acts = carry
    t = steps - 1 - k
    m = mask[t][None, :]
    dh_new = m * dh + _at(dys, t)
    dc_new = m * dc + dh_new * _at(q, t)
    da = jnp.where(block == 3, dh_new[None], dc_new[None]) * _at(p, t).reshape(4, hidden, batch)
    da = da.reshape(four_h, batch)
    dh_prev = (1.0 - m) * dh + mixed_dot(w_hh_loop, da, MM, matmul_dtype)
    dc_prev = (1.0 - m) * dc + dc_new * _at(f, t)
    return dc_prev, dh_prev, _put(d_acts, da, t)

  d_acts = jnp.zeros_like(acts)
  dc0, dh0, d_acts = jax.lax.fori_loop(0, steps, body, (dc_t, dh_t, d_acts), unroll=unroll)
  # The weight gradients are single matmuls over all T*B positions (contracting the
  # trailing (T, B) axes), instead of T outer products inside the loop.
  d_flat = d_acts.reshape(four_h, steps * batch)
  dw_hh = mixed_dot(h_prev.reshape(hidden, steps * batch), d_flat, _NT, matmul_dtype)
  dw_ih = mixed_dot(x.reshape(x.shape[0], steps * batch), d_flat, _NT, matmul_dtype)
  dx = mixed_dot(w_ih, d_flat, MM, matmul_dtype).reshape(x.shape)
  d_offset = _sum_steps(d_acts, keep_batch=offset.shape[1] != 1)
  return (dx.astype(x.dtype), dw_ih.astype(w_ih.dtype), d_offset, jnp.zeros_like(mask), dc0,
          dh0, dw_hh.astype(w_hh.dtype))


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
    unroll: unroll factor of the forward and backward loops (1 is fastest on CPU).
    param_dtype: parameter dtype (computation follows the inputs' dtype, promoted with it).
    matmul_dtype: None, or the dtype the matmuls' operands are cast to (e.g. `jnp.bfloat16`),
      accumulating in float32; the state, gates and parameters keep their dtype.
  """
  features: int
  kernel_init: Initializer = uniform_init(0.1)
  recurrent_kernel_init: Initializer = uniform_init(0.1)
  bias_init: Initializer = nn.initializers.zeros_init()
  forget_bias: float = 0.0
  unroll: int = 1
  param_dtype: Any = jnp.float32
  matmul_dtype: Any = None

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
    # Feature-major inside: transposing the D-wide input (and the H-wide output) is cheaper
    # than transposing the 4H-wide projection.
    offset = self._offset(bias, kernel_static, static_inputs)
    offset = offset.T if offset.ndim == 2 else offset[:, None]
    ys, (c_t, h_t) = lstm_recurrence(jnp.transpose(inputs, (2, 1, 0)), kernel_ih, offset,
                                     mask_tm, c0.T, h0.T, kernel_hh, self.unroll,
                                     self.matmul_dtype)
    return jnp.transpose(ys, (2, 1, 0)), (c_t.T, h_t.T)

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
    a = (mixed_dot(x, kernel_ih, MM, self.matmul_dtype)
         + self._offset(bias, kernel_static, static_inputs))
    a = a + mixed_dot(h, kernel_hh, MM, self.matmul_dtype)
    i, f, g, o = _split4(_gate_activations(a, axis=-1), axis=-1)
    c_new = f * c + i * g
    h_new = o * jnp.tanh(c_new)
    if mask is None:
      return (c_new, h_new), h_new
    keep = jnp.asarray(mask)[:, None] != 0
    y = jnp.where(keep, h_new, jnp.zeros_like(h_new))
    return (jnp.where(keep, c_new, c), jnp.where(keep, h_new, h)), y
