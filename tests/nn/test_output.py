"""The fused softmax output layer against the unfused logits -> log_softmax -> gather path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax import objectives
from vae_jax.nn.output import OutputLayer, linear_softmax_nll

B, T, H, V = 3, 5, 4, 11


def _inputs(seed=0):
  k = jax.random.split(jax.random.PRNGKey(seed), 6)
  hidden = jax.random.normal(k[0], (B, T, H))
  kernel = jax.random.normal(k[1], (H, V))
  bias = jax.random.normal(k[2], (V,))
  seq_bias = jax.random.normal(k[3], (B, V))
  targets = jax.random.randint(k[4], (B, T), 0, V)
  lengths = jnp.array([5, 3, 1])
  mask = (jnp.arange(T)[None, :] < lengths[:, None]).astype(jnp.float32)
  weights = jax.random.normal(k[5], (B,))  # a cotangent that differs per sequence
  return hidden, kernel, bias, seq_bias, targets, mask, weights


def _numpy_nll(hidden, kernel, bias, seq_bias, targets, mask):
  """Float64 numpy: logits, a stable log-softmax, the target entries, masked sums."""
  h, w = np.asarray(hidden, np.float64), np.asarray(kernel, np.float64)
  logits = h @ w + np.asarray(bias, np.float64)
  if seq_bias is not None:
    logits = logits + np.asarray(seq_bias, np.float64)[:, None, :]
  top = logits.max(-1, keepdims=True)
  log_p = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  picked = np.take_along_axis(log_p, np.asarray(targets)[..., None], -1)[..., 0]
  return -(picked * np.asarray(mask)).sum(-1)


@pytest.mark.parametrize("with_seq_bias", [False, True])
def test_value_matches_float64_numpy(with_seq_bias):
  hidden, kernel, bias, seq_bias, targets, mask, _ = _inputs()
  s = seq_bias if with_seq_bias else None
  got = jax.jit(linear_softmax_nll)(hidden, kernel, bias, targets, mask, s)
  np.testing.assert_allclose(got, _numpy_nll(hidden, kernel, bias, s, targets, mask),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_seq_bias", [False, True])
def test_gradients_match_autodiff_of_the_unfused_loss(with_seq_bias):
  hidden, kernel, bias, seq_bias, targets, mask, weights = _inputs(1)

  def fused(h, w, b, s):
    return jnp.sum(weights * linear_softmax_nll(h, w, b, targets, mask,
                                                s if with_seq_bias else None))

  def unfused(h, w, b, s):
    logits = h @ w + b + (s[:, None, :] if with_seq_bias else 0.0)
    return jnp.sum(weights * objectives.token_nll(logits, targets, mask))

  args = (hidden, kernel, bias, seq_bias)
  got = jax.jit(jax.grad(fused, argnums=(0, 1, 2, 3)))(*args)
  want = jax.grad(unfused, argnums=(0, 1, 2, 3))(*args)
  for g, w in zip(got, want):
    np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6)
  # Padded positions get no gradient, and the hidden state of a padded step none either.
  assert np.all(np.asarray(got[0])[2, 1:] == 0.0)


def test_no_bias_and_bfloat16_hidden():
  hidden, kernel, _, _, targets, mask, _ = _inputs(2)
  got = linear_softmax_nll(hidden.astype(jnp.bfloat16), kernel, None, targets, mask)
  want = _numpy_nll(hidden.astype(jnp.bfloat16).astype(jnp.float32), kernel, np.zeros(V), None,
                    targets, mask)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=1e-5)
  grad = jax.grad(lambda h: jnp.sum(linear_softmax_nll(h, kernel, None, targets, mask)))(
      hidden.astype(jnp.bfloat16))
  assert grad.dtype == jnp.bfloat16


def test_shape_errors():
  hidden, kernel, bias, seq_bias, targets, mask, _ = _inputs()
  with pytest.raises(ValueError, match="must agree"):
    linear_softmax_nll(hidden[:, :-1], kernel, bias, targets, mask)
  with pytest.raises(ValueError, match="seq_bias"):
    linear_softmax_nll(hidden, kernel, bias, targets, mask, seq_bias[:, :-1])


def test_output_layer_is_a_drop_in_for_dense():
  """Same parameter names, shapes and initial values as nn.Dense; same logits."""
  hidden, _, _, _, targets, mask, _ = _inputs()
  rng = jax.random.PRNGKey(3)
  dense = nn.Dense(V)
  layer = OutputLayer(H, V)
  p_dense = dense.init(rng, hidden)
  p_layer = layer.init(rng, hidden)
  assert jax.tree.map(jnp.shape, p_dense) == jax.tree.map(jnp.shape, p_layer)
  for a, b in zip(jax.tree.leaves(p_dense), jax.tree.leaves(p_layer)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(layer.apply(p_dense, hidden), dense.apply(p_dense, hidden),
                             rtol=1e-6)
  nll = layer.apply(p_dense, hidden, targets, mask, method="nll")
  np.testing.assert_allclose(
      nll, objectives.token_nll(dense.apply(p_dense, hidden), targets, mask), rtol=1e-5)


def test_bfloat16_matmuls_stay_close_to_float32():
  """matmul_dtype=bfloat16: the three matmuls on bf16 operands with f32 accumulation. The NLL
  and its gradients move by the bf16 rounding of the operands only (relative ~1e-2)."""
  hidden, kernel, bias, _, targets, mask, weights = _inputs(4)
  loss = lambda dt: (lambda h, w, b: jnp.sum(
      weights * linear_softmax_nll(h, w, b, targets, mask, matmul_dtype=dt)))
  exact = jax.value_and_grad(loss(None), argnums=(0, 1, 2))(hidden, kernel, bias)
  mixed = jax.value_and_grad(loss(jnp.bfloat16), argnums=(0, 1, 2))(hidden, kernel, bias)
  np.testing.assert_allclose(mixed[0], exact[0], rtol=2e-2)
  for m, e in zip(mixed[1], exact[1]):
    assert m.dtype == jnp.float32
    np.testing.assert_allclose(m, e, rtol=0.1, atol=0.05 * float(jnp.max(jnp.abs(e))))
  # And it is not the float32 computation: the rounding is visible.
  assert float(mixed[0]) != float(exact[0])
