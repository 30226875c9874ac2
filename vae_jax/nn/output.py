"""The softmax output layer and its token NLL as one operation with a hand-written VJP.

A decoder's last layer and its loss are

  l_t = h_t W + b + s                    logits, W [H, V], b [V], s [V] per sequence (optional)
  NLL = sum_t m_t (logsumexp(l_t) - l_t[y_t])

and at the vocabulary sizes of text VAEs (V = 10k-20k, H = 256-1024) this layer is most of the
training step. Written naively (`logits -> log_softmax -> take_along_axis`) XLA:CPU
materialises the `[N, V]` logits several times: the target gather is a separate loop over the
logits that breaks the softmax fusions, the backward of `log_softmax` re-reads them twice more
and the one-hot scatter copies them. `linear_softmax_nll` computes the same numbers with the
fewest passes over `[N, V]`:

  forward:   logits = h W + b (+ s)                              one matmul
             lse    = max + log sum exp(logits - max)           one fused reduction
             l[y]   = <h, W[:, y]> + b[y] (+ s[y])              from W's target columns, O(N H)
  backward:  with c = g m (the cotangent of each token's NLL),
             P      = c (exp(logits - lse) - onehot(y))          one elementwise pass
             dW = h^T P,  dh = P W^T,  db = 1^T P,  ds = sum_t P  three matmuls

so the logits are written once and read twice. The only residuals are h, W, the logits and lse.
(He et al. 2019's PyTorch code, jxhe/vae-lagging-encoder, runs `nn.Linear` then
`nn.CrossEntropyLoss`: the same matmuls and three elementwise passes more.)

`OutputLayer` is a drop-in for `nn.Dense(V)` (same parameters, `kernel` [H, V] and `bias` [V],
same initialisers) whose `nll` method runs the fused operation; `__call__` still returns the
logits for step-by-step decoding.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from vae_jax.nn.lstm import MM, mixed_dot

Array = jax.Array

__all__ = ["OutputLayer", "linear_softmax_nll"]


def _matmul(a: Array, b: Array, matmul_dtype: Any) -> Array:
  """a @ b, with operands cast to `matmul_dtype` and float32 accumulation when given."""
  return mixed_dot(a, b, MM, matmul_dtype)


def _logits(h2: Array, kernel: Array, bias: Array | None, seq_bias: Array | None,
            steps: int, matmul_dtype: Any = None) -> Array:
  """`[N, V]` logits of the flattened `[N, H]` hidden states (N = sequences × steps)."""
  logits = _matmul(h2, kernel, matmul_dtype)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if seq_bias is not None:
    v = seq_bias.shape[-1]
    logits = (logits.reshape(-1, steps, v)
              + seq_bias.reshape(-1, 1, v).astype(jnp.float32)).reshape(-1, v)
  return logits


def _target_logits(h2: Array, kernel: Array, bias: Array | None, seq_bias: Array | None,
                   targets: Array, steps: int, matmul_dtype: Any = None) -> Array:
  """`[N]` logit of each target, from the target columns of W (never from the logits), with
  the operands rounded as the logits' matmul rounds them."""
  columns = jnp.take(kernel, targets, axis=1).T  # [N, H]
  if matmul_dtype is not None:
    h2, columns = h2.astype(matmul_dtype), columns.astype(matmul_dtype)
  out = jnp.sum(h2.astype(jnp.float32) * columns.astype(jnp.float32), axis=-1)
  if bias is not None:
    out = out + jnp.take(bias, targets).astype(jnp.float32)
  if seq_bias is not None:
    v = seq_bias.shape[-1]
    per_seq = jnp.take_along_axis(seq_bias.reshape(-1, v),
                                  targets.reshape(-1, steps), axis=-1)  # [S, T]
    out = out + per_seq.reshape(-1).astype(jnp.float32)
  return out


def _log_normaliser(logits: Array) -> Array:
  """`[N]` logsumexp over the last axis (max-shifted; logits are finite)."""
  top = jnp.max(logits, axis=-1, keepdims=True)
  return jnp.log(jnp.sum(jnp.exp(logits - top), axis=-1)) + top[:, 0]


def _forward(hidden, kernel, bias, seq_bias, targets, mask, matmul_dtype):
  steps = targets.shape[-1]
  h2 = hidden.reshape(-1, hidden.shape[-1])
  logits = _logits(h2, kernel, bias, seq_bias, steps, matmul_dtype)
  lse = _log_normaliser(logits)
  token_nll = lse - _target_logits(h2, kernel, bias, seq_bias, targets.reshape(-1), steps,
                                   matmul_dtype)
  token_nll = token_nll.reshape(targets.shape) * mask.astype(jnp.float32)
  return jnp.sum(token_nll, axis=-1), (logits, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _fused_nll(hidden, kernel, bias, seq_bias, targets, mask, matmul_dtype):
  return _forward(hidden, kernel, bias, seq_bias, targets, mask, matmul_dtype)[0]


def _fused_nll_fwd(hidden, kernel, bias, seq_bias, targets, mask, matmul_dtype):
  nll, (logits, lse) = _forward(hidden, kernel, bias, seq_bias, targets, mask, matmul_dtype)
  return nll, (hidden, kernel, bias, seq_bias, targets, mask, logits, lse)


def _fused_nll_bwd(matmul_dtype, residuals, g):
  hidden, kernel, bias, seq_bias, targets, mask, logits, lse = residuals
  n, v = logits.shape
  h2 = hidden.reshape(n, hidden.shape[-1])
  coef = (g[..., None] * mask.astype(jnp.float32)).reshape(-1)  # [N]
  # dNLL/dlogits = c (softmax - onehot(y)), in one elementwise pass (no scatter, no copy).
  is_target = jax.lax.broadcasted_iota(jnp.int32, (n, v), 1) == targets.reshape(-1, 1)
  p = (jnp.exp(logits - lse[:, None]) - is_target.astype(jnp.float32)) * coef[:, None]
  d_kernel = _matmul(h2.T.astype(jnp.float32), p, matmul_dtype).astype(kernel.dtype)
  d_hidden = _matmul(p, kernel.T.astype(jnp.float32), matmul_dtype).reshape(
      hidden.shape).astype(hidden.dtype)
  d_bias = None
  if bias is not None:
    # A matrix-vector product: XLA:CPU's reductions over a leading axis are slow.
    d_bias = jnp.dot(jnp.ones((n,), jnp.float32), p).astype(bias.dtype)
  d_seq_bias = None
  if seq_bias is not None:
    steps = targets.shape[-1]
    d_seq = jnp.einsum("t,stv->sv", jnp.ones((steps,), jnp.float32), p.reshape(-1, steps, v))
    d_seq_bias = d_seq.reshape(seq_bias.shape).astype(seq_bias.dtype)
  return d_hidden, d_kernel, d_bias, d_seq_bias, None, None


_fused_nll.defvjp(_fused_nll_fwd, _fused_nll_bwd)


def linear_softmax_nll(hidden: Array, kernel: Array, bias: Array | None, targets: Array,
                       mask: Array, seq_bias: Array | None = None,
                       matmul_dtype: Any = None) -> Array:
  """Per-sequence NLL of `targets` under softmax(hidden W + b + seq_bias), fused.

  Equal to `objectives.token_nll(hidden @ kernel + bias + seq_bias[..., None, :], targets,
  mask)`, computed as the module docstring describes (differentiable in hidden, kernel, bias
  and seq_bias).

  Args:
    hidden: `[..., T, H]` the decoder's outputs (any float dtype; logits are f32).
    kernel: `[H, V]` output weights.
    bias: `[V]` output bias, or None.
    targets: `[..., T]` integer token ids.
    mask: `[..., T]` 1 for real tokens (EOS included), 0 for padding.
    seq_bias: `[..., V]` a per-sequence addition to the logits (e.g. a skip connection from
      z), or None.
    matmul_dtype: None (float32 matmuls), or e.g. `jnp.bfloat16`: the three matmuls take
      operands cast to it and accumulate in float32; the softmax stays float32.

  Returns:
    `[...]` the NLL summed over each sequence's real tokens (f32).
  """
  if hidden.shape[:-1] != targets.shape or targets.shape != mask.shape:
    raise ValueError(f"hidden {hidden.shape}, targets {targets.shape} and mask {mask.shape} "
                     "must agree on [..., T]")
  if seq_bias is not None and seq_bias.shape != targets.shape[:-1] + kernel.shape[-1:]:
    raise ValueError(f"seq_bias {seq_bias.shape} must be {targets.shape[:-1]} + [V]")
  return _fused_nll(hidden, kernel, bias, seq_bias, targets, mask, matmul_dtype)


class OutputLayer(nn.Module):
  """`nn.Dense(vocab_size)` on `in_features` inputs with a fused NLL: the same parameters
  (`kernel` [in_features, V], `bias` [V]) and initialisers.

  `__call__(h)` returns logits (decoding); `nll(h, targets, mask, seq_bias)` the per-sequence
  NLL through `linear_softmax_nll`. `matmul_dtype` (e.g. bfloat16): the matmuls' operand dtype,
  accumulating in float32.
  """
  in_features: int
  vocab_size: int
  use_bias: bool = True
  matmul_dtype: Any = None
  kernel_init: Callable[..., Any] = nn.initializers.lecun_normal()
  bias_init: Callable[..., Any] = nn.initializers.zeros_init()

  def setup(self):
    self.kernel = self.param("kernel", self.kernel_init, (self.in_features, self.vocab_size),
                             jnp.float32)
    self.bias = (self.param("bias", self.bias_init, (self.vocab_size,), jnp.float32)
                 if self.use_bias else None)

  def __call__(self, hidden: Array) -> Array:
    logits = mixed_dot(hidden, self.kernel, (((hidden.ndim - 1,), (0,)), ((), ())),
                       self.matmul_dtype)
    return logits if self.bias is None else logits + self.bias

  def nll(self, hidden: Array, targets: Array, mask: Array,
          seq_bias: Array | None = None) -> Array:
    return linear_softmax_nll(hidden, self.kernel, self.bias, targets, mask, seq_bias,
                              self.matmul_dtype)
