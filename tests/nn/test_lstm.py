"""Tests of vae_jax.nn.lstm against an independent plain-Python-loop LSTM."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax.nn import lstm as lstm_lib

B, T, D, DZ, H = 4, 6, 5, 3, 7


def reference_lstm(params, inputs, mask, initial_state=None, static_inputs=None):
  """Textbook LSTM, one Python iteration per step, gate equations written out.

  Input at step t is [x_t; z] against W_ih = [kernel_ih; kernel_static]; a padded step keeps
  the state and outputs zeros.
  """
  p = params["params"]
  w_ih, w_hh, b = p["kernel_ih"], p["kernel_hh"], p["bias"]
  batch, steps, _ = inputs.shape
  hidden = w_hh.shape[0]
  if static_inputs is not None:
    w_ih = jnp.concatenate([w_ih, p["kernel_static"]], axis=0)
  if initial_state is None:
    c = jnp.zeros((batch, hidden))
    h = jnp.zeros((batch, hidden))
  else:
    c, h = initial_state
  outputs = []
  for t in range(steps):
    x_t = inputs[:, t]
    if static_inputs is not None:
      x_t = jnp.concatenate([x_t, static_inputs], axis=-1)
    a = x_t @ w_ih + h @ w_hh + b
    i = jax.nn.sigmoid(a[:, 0 * hidden:1 * hidden])
    f = jax.nn.sigmoid(a[:, 1 * hidden:2 * hidden])
    g = jnp.tanh(a[:, 2 * hidden:3 * hidden])
    o = jax.nn.sigmoid(a[:, 3 * hidden:4 * hidden])
    c_new = f * c + i * g
    h_new = o * jnp.tanh(c_new)
    m = mask[:, t].astype(jnp.float32)[:, None]
    c = m * c_new + (1 - m) * c
    h = m * h_new + (1 - m) * h
    outputs.append(m * h_new)
  return jnp.stack(outputs, axis=1), (c, h)


def make_mask(lengths, steps=T):
  return jnp.arange(steps)[None, :] < jnp.asarray(lengths)[:, None]


# Lengths include a full row, a length-1 row and a fully padded row.
LENGTHS = [T, 1, 0, 3]


def make_inputs(seed=0, static=True, init_state=True):
  rng = np.random.default_rng(seed)
  x = jnp.asarray(rng.normal(size=(B, T, D)), jnp.float32)
  z = jnp.asarray(rng.normal(size=(B, DZ)), jnp.float32) if static else None
  state = None
  if init_state:
    state = (jnp.asarray(rng.normal(size=(B, H)), jnp.float32),
             jnp.asarray(rng.normal(size=(B, H)), jnp.float32) * 0.5)
  return x, z, state


@functools.cache
def _params():
  x, z, _ = make_inputs(0)
  params = lstm_lib.LSTM(H).init(jax.random.PRNGKey(0), x, make_mask(LENGTHS),
                                 static_inputs=z)
  # Larger weights than the default init so that the gates saturate differently per unit.
  return jax.tree.map(lambda p: p * 5.0, params)


def init_params(model, x, z):
  """Parameters of `LSTM(H)` (initialised once; unused `kernel_static` is harmless)."""
  del model, x, z
  return _params()


def assert_close(actual, expected, rtol):
  """|a - e| <= rtol * max|e| leaf by leaf (relative to each array's scale)."""
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    a, e = np.asarray(a), np.asarray(e)
    assert a.shape == e.shape
    scale = max(np.abs(e).max(), 1e-3)
    np.testing.assert_allclose(a, e, rtol=0, atol=rtol * scale)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("init_state", [False, True])
def test_forward_matches_reference(static, init_state):
  x, z, state = make_inputs(1, static, init_state)
  model = lstm_lib.LSTM(H)
  params = init_params(model, x, z)
  apply, reference = jax.jit(model.apply), jax.jit(reference_lstm)
  for seed in range(3):
    lengths = np.random.default_rng(seed).integers(0, T + 1, size=B)
    lengths[:3] = LENGTHS[:3] if seed == 0 else lengths[:3]
    mask = make_mask(lengths)
    y, (c, h) = apply(params, x, mask, initial_state=state, static_inputs=z)
    y_ref, (c_ref, h_ref) = reference(params, x, mask, state, z)
    assert y.shape == (B, T, H)
    np.testing.assert_allclose(y, y_ref, atol=1e-5)
    np.testing.assert_allclose(c, c_ref, atol=1e-5)
    np.testing.assert_allclose(h, h_ref, atol=1e-5)


def test_arbitrary_masks_match_reference():
  # The per-step rule is general: holes in the middle of a sequence are also skipped.
  x, z, state = make_inputs(2)
  model = lstm_lib.LSTM(H)
  params = init_params(model, x, z)
  mask = jnp.asarray(np.random.default_rng(0).integers(0, 2, size=(B, T)))
  y, final = model.apply(params, x, mask, initial_state=state, static_inputs=z)
  y_ref, final_ref = reference_lstm(params, x, mask, state, z)
  assert_close((y, final), (y_ref, final_ref), 1e-5)

  def loss(fn, params, x, z, state):
    y, (c, h) = fn(params, x, z, state)
    return jnp.sum(jnp.sin(y)) + jnp.sum(c * h)

  ours = lambda p, x, z, s: model.apply(p, x, mask, initial_state=s, static_inputs=z)
  ref = lambda p, x, z, s: reference_lstm(p, x, mask, s, z)
  grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), argnums=(0, 1, 2, 3)))
  assert_close(grad(ours)(params, x, z, state), grad(ref)(params, x, z, state), 1e-4)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("init_state", [False, True])
def test_gradients_match_reference(static, init_state):
  x, z, state = make_inputs(3, static, init_state)
  model = lstm_lib.LSTM(H)
  params = init_params(model, x, z)
  mask = make_mask(LENGTHS)
  rng = np.random.default_rng(7)
  wy = jnp.asarray(rng.normal(size=(B, T, H)), jnp.float32)
  wc = jnp.asarray(rng.normal(size=(B, H)), jnp.float32)
  wh = jnp.asarray(rng.normal(size=(B, H)), jnp.float32)

  def loss(fn, params, x, z, state):
    y, (c, h) = fn(params, x, z, state)
    return jnp.sum(wy * y) + jnp.sum(wc * c) + jnp.sum(wh * jnp.tanh(h))

  def ours(params, x, z, state):
    return model.apply(params, x, mask, initial_state=state, static_inputs=z)

  def ref(params, x, z, state):
    return reference_lstm(params, x, mask, state, z)

  argnums = (0, 1) + ((2,) if static else ()) + ((3,) if init_state else ())
  grad = lambda fn: jax.jit(jax.grad(functools.partial(loss, fn), argnums=argnums))
  grads = grad(ours)(params, x, z, state)
  grads_ref = grad(ref)(params, x, z, state)
  assert_close(grads, grads_ref, 1e-4)
  # Padded steps receive no input gradient; a fully padded row receives none at all.
  np.testing.assert_array_equal(grads[1][2], 0.0)
  np.testing.assert_array_equal(grads[1][1][1:], 0.0)


def test_step_reproduces_call():
  x, z, state = make_inputs(4)
  model = lstm_lib.LSTM(H)
  params = init_params(model, x, z)
  mask = make_mask(LENGTHS)
  y, (c_t, h_t) = model.apply(params, x, mask, initial_state=state, static_inputs=z)

  carry = state
  for t in range(T):
    carry, y_t = model.apply(params, carry, x[:, t], static_inputs=z, mask=mask[:, t],
                             method=lstm_lib.LSTM.step)
    np.testing.assert_allclose(y_t, y[:, t], atol=1e-5)
  np.testing.assert_allclose(carry[0], c_t, atol=1e-5)
  np.testing.assert_allclose(carry[1], h_t, atol=1e-5)

  # Without a mask, a step is a plain LSTM step: matches the full-length row.
  carry = state
  for t in range(T):
    carry, y_t = model.apply(params, carry, x[:, t], static_inputs=z,
                             method=lstm_lib.LSTM.step)
  np.testing.assert_allclose(carry[0][0], c_t[0], atol=1e-5)
  np.testing.assert_allclose(y_t[0], y[0, -1], atol=1e-5)


class _Decoder(nn.Module):
  """Uses `step` as a submodule method inside a compiled `lax.scan` (as decoding does)."""

  @nn.compact
  def __call__(self, x, z, state, teacher_forced):
    lstm = lstm_lib.LSTM(H, name="lstm")
    if teacher_forced:
      return lstm(x, None, initial_state=state, static_inputs=z)[0]

    def body(cell, carry, x_t):
      carry, y_t = cell.step(carry, x_t, static_inputs=z)
      return carry, y_t

    scan = nn.scan(body, variable_broadcast="params", split_rngs={"params": False})
    _, ys = scan(lstm, state, jnp.swapaxes(x, 0, 1))
    return jnp.swapaxes(ys, 0, 1)


def test_step_as_submodule_method_in_scan():
  x, z, state = make_inputs(5)
  dec = _Decoder()
  params = dec.init(jax.random.PRNGKey(0), x, z, state, True)
  teacher = dec.apply(params, x, z, state, True)
  stepped = jax.jit(lambda p: dec.apply(p, x, z, state, False))(params)
  np.testing.assert_allclose(stepped, teacher, atol=1e-5)


def test_step_only_init_creates_same_params():
  # A module that only ever calls `step` gets the same parameter tree.
  model = lstm_lib.LSTM(H)
  x, z, state = make_inputs(6)
  p_call = model.init(jax.random.PRNGKey(0), x, None, static_inputs=z)
  p_step = model.init(jax.random.PRNGKey(0), state, x[:, 0], static_inputs=z,
                      method=lstm_lib.LSTM.step)
  assert jax.tree.map(jnp.shape, p_call) == jax.tree.map(jnp.shape, p_step)


def test_jit_matches_eager_and_unroll_is_equivalent():
  x, z, state = make_inputs(7)
  model = lstm_lib.LSTM(H)
  params = init_params(model, x, z)
  mask = make_mask(LENGTHS)

  def run(model, params):
    return model.apply(params, x, mask, initial_state=state, static_inputs=z)

  eager = run(model, params)
  with jax.disable_jit():
    no_jit = run(model, params)
  jitted = jax.jit(run, static_argnums=0)(model, params)
  unrolled = jax.jit(run, static_argnums=0)(lstm_lib.LSTM(H, unroll=4), params)
  assert_close(no_jit, eager, 1e-6)
  assert_close(jitted, eager, 1e-6)
  assert_close(unrolled, eager, 1e-6)

  g = jax.jit(lambda m, p: jax.grad(lambda p: jnp.sum(run(m, p)[0] ** 2))(p),
              static_argnums=0)
  assert_close(g(lstm_lib.LSTM(H, unroll=3), params), g(model, params), 1e-5)


def test_final_state_is_state_at_last_real_token():
  x, z, state = make_inputs(8)
  model = lstm_lib.LSTM(H)
  params = init_params(model, x, z)
  lengths = [T, 1, 0, 3]
  _, (c, h) = model.apply(params, x, make_mask(lengths), initial_state=state, static_inputs=z)
  for b, n in enumerate(lengths):
    row = lambda a: None if a is None else a[b:b + 1]
    st = (state[0][b:b + 1], state[1][b:b + 1])
    if n == 0:
      c_b, h_b = st
    else:
      _, (c_b, h_b) = model.apply(params, x[b:b + 1, :n], None, initial_state=st,
                                  static_inputs=row(z))
    np.testing.assert_allclose(c[b], c_b[0], atol=1e-5)
    np.testing.assert_allclose(h[b], h_b[0], atol=1e-5)


def test_mask_types_and_default():
  x, z, _ = make_inputs(9)
  model = lstm_lib.LSTM(H)
  params = init_params(model, x, z)
  mask = make_mask(LENGTHS)
  y_bool = model.apply(params, x, mask, static_inputs=z)
  y_int = model.apply(params, x, mask.astype(jnp.int32), static_inputs=z)
  y_float = model.apply(params, x, mask.astype(jnp.float32), static_inputs=z)
  assert_close(y_int, y_bool, 0)
  assert_close(y_float, y_bool, 0)
  y_none = model.apply(params, x, None, static_inputs=z)
  y_ones = model.apply(params, x, jnp.ones((B, T), bool), static_inputs=z)
  assert_close(y_none, y_ones, 0)


@pytest.mark.parametrize("batch,steps", [(1, 1), (3, 9)])
def test_shapes_under_batching(batch, steps):
  model = lstm_lib.LSTM(H)
  x = jnp.ones((batch, steps, D))
  z = jnp.ones((batch, DZ))
  params = model.init(jax.random.PRNGKey(0), x, None, static_inputs=z)
  y, (c, h) = model.apply(params, x, jnp.ones((batch, steps)), static_inputs=z)
  assert y.shape == (batch, steps, H) and c.shape == h.shape == (batch, H)
  # vmap over an extra leading axis agrees with the flattened batch.
  xs = jnp.stack([x, 2 * x])
  zs = jnp.stack([z, -z])
  y_v, (c_v, _) = jax.vmap(lambda a, b: model.apply(params, a, None, static_inputs=b))(xs, zs)
  assert y_v.shape == (2, batch, steps, H) and c_v.shape == (2, batch, H)
  y_flat, _ = model.apply(params, xs.reshape(2 * batch, steps, D), None,
                          static_inputs=zs.reshape(2 * batch, DZ))
  np.testing.assert_allclose(y_v.reshape(2 * batch, steps, H), y_flat, atol=1e-6)


def test_initialisers():
  model = lstm_lib.LSTM(H, forget_bias=1.0, kernel_init=lstm_lib.uniform_init(0.01))
  params = model.init(jax.random.PRNGKey(0), jnp.ones((2, 3, D)), None,
                      static_inputs=jnp.ones((2, DZ)))["params"]
  assert params["kernel_ih"].shape == (D, 4 * H)
  assert params["kernel_static"].shape == (DZ, 4 * H)
  assert params["kernel_hh"].shape == (H, 4 * H)
  assert np.abs(params["kernel_ih"]).max() <= 0.01
  assert np.abs(params["kernel_hh"]).max() <= 0.1
  assert np.abs(params["kernel_hh"]).max() > 0.05  # symmetric U(-0.1, 0.1) by default
  assert params["kernel_hh"].min() < 0
  bias = np.asarray(params["bias"])
  np.testing.assert_array_equal(bias[H:2 * H], 1.0)
  np.testing.assert_array_equal(np.delete(bias, np.s_[H:2 * H]), 0.0)


def test_recurrence_offset_broadcast_gradient():
  # A `[4H, 1]` offset (bias only) gets the gradient summed over the batch.
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(D, T, B)), jnp.float32)
  w_ih = jnp.asarray(rng.normal(size=(D, 4 * H)) * 0.3, jnp.float32)
  w = jnp.asarray(rng.normal(size=(H, 4 * H)) * 0.3, jnp.float32)
  bias = jnp.asarray(rng.normal(size=(4 * H, 1)), jnp.float32)
  mask = jnp.swapaxes(make_mask(LENGTHS), 0, 1).astype(jnp.float32)
  zeros = jnp.zeros((H, B))

  def f(bias, full):
    off = jnp.broadcast_to(bias, (4 * H, B)) if full else bias
    ys, (c, _) = lstm_lib.lstm_recurrence(x, w_ih, off, mask, zeros, zeros, w)
    return jnp.sum(ys ** 2) + jnp.sum(c)

  assert_close(jax.grad(f)(bias, False), jax.grad(f)(bias, True), 1e-6)


def test_bfloat16_matmuls_follow_the_float32_layer():
  """matmul_dtype=bfloat16 rounds the matmul operands only: outputs and gradients stay within
  bf16 rounding (~1e-2 relative) of the float32 reference, are float32, and differ from it."""
  x, z, state = make_inputs(3, True, True)
  exact = lstm_lib.LSTM(H)
  mixed = lstm_lib.LSTM(H, matmul_dtype=jnp.bfloat16)
  params = init_params(exact, x, z)
  mask = make_mask(LENGTHS)
  wy = jnp.asarray(np.random.default_rng(8).normal(size=(B, T, H)), jnp.float32)

  def loss(model, params, x):
    y, (c, h) = model.apply(params, x, mask, initial_state=state, static_inputs=z)
    return jnp.sum(wy * y) + jnp.sum(c) + jnp.sum(h)

  want = jax.value_and_grad(functools.partial(loss, exact), argnums=(0, 1))(params, x)
  got = jax.jit(jax.value_and_grad(functools.partial(loss, mixed), argnums=(0, 1)))(params, x)
  np.testing.assert_allclose(got[0], want[0], rtol=2e-2)
  for g, w in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1])):
    assert g.dtype == jnp.float32
    np.testing.assert_allclose(g, w, rtol=0.1, atol=0.03 * float(jnp.max(jnp.abs(w))))
  assert float(got[0]) != float(want[0])
  # Decoding step by step uses the same matmul dtype.
  (c1, h1), y1 = mixed.apply(params, state, x[:, 0], static_inputs=z, method="step")
  y_all, _ = mixed.apply(params, x[:, :1], initial_state=state, static_inputs=z)
  np.testing.assert_allclose(y1, y_all[:, 0], rtol=1e-5, atol=1e-6)
