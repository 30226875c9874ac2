"""The GPT-2 Transformer against a float64 numpy GPT-2 (tests/numpy_gpt2.py): forward pass,
masks, the latent hooks (value fusion, memory, embedding offset) and the KV cache."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import numpy_gpt2
from vae_jax.data.vocab import BOS, EOS, PAD
from vae_jax.nn import decoding
from vae_jax.nn.transformer import (LatentValueFusion, Transformer, TransformerConfig,
                                    initial_decode_state, make_step_fn)

V, D, L, H, M, Z = 20, 16, 2, 2, 3, 5
BASE = TransformerConfig(vocab_size=V, num_layers=L, num_heads=H, model_dim=D, max_length=8)
LOW_RANK = dataclasses.replace(BASE, latent_dim=Z, value_fusion="low_rank", fusion_rank=3)
ADD = dataclasses.replace(BASE, latent_dim=Z, value_fusion="add")
TOKENS = np.array([[1, 5, 9, 7, 12, 2], [1, 8, 6, 2, PAD, PAD], [1, 4, PAD, PAD, PAD, PAD]],
                  np.int32)
MASK = TOKENS != PAD
TOL = dict(rtol=2e-4, atol=2e-5)


@functools.cache
def jitted(config):
  """(init, apply) of the Transformer of `config`, compiled (much faster than op by op)."""
  model = Transformer(config)
  return jax.jit(model.init), jax.jit(model.apply, static_argnames=("causal", "deterministic",
                                                                    "method"))


def init(config, seed=0):
  """Parameters (the Transformer's tree) with spread-out random values (LayerNorm scales near 1),
  so every path of the computation matters numerically."""
  shapes = jax.eval_shape(Transformer(config).init, jax.random.PRNGKey(0), jnp.asarray(TOKENS))
  leaves, tree = jax.tree_util.tree_flatten_with_path(shapes["params"])
  rng = np.random.default_rng(seed)
  new = []
  for path, leaf in leaves:
    noise = rng.normal(size=leaf.shape)
    new.append(jnp.asarray(1.0 + 0.1 * noise if path[-1].key == "scale" else 0.4 * noise,
                           jnp.float32))
  return {"params": jax.tree_util.tree_unflatten(tree, new)}


def conditioning(seed=1):
  rng = np.random.default_rng(seed)
  b = len(TOKENS)
  return {"latents": rng.normal(size=(b, L, Z)).astype(np.float32),
          "memory": rng.normal(size=(b, L, M, D)).astype(np.float32),
          "embedding_offset": rng.normal(size=(b, D)).astype(np.float32)}


def run(config, variables, tokens=TOKENS, **kwargs):
  return jitted(config)[1](variables, jnp.asarray(tokens), **kwargs)


def reference(variables, tokens=TOKENS, **kwargs):
  return numpy_gpt2.forward(numpy_gpt2.tensors_from_params(variables["params"]), tokens, H,
                            **kwargs)


def low_rank_reference(v, z, value_factors, latent_factors):
  """The official DELLA LMF layer: (Σ_j A_j [v; 1]) ⊙ (Σ_j B_j [z; 1]), one factor at a time."""
  v1 = np.concatenate([v, np.ones((*v.shape[:-1], 1))], axis=-1)
  z1 = np.concatenate([z, np.ones((len(z), 1))], axis=-1)
  text = sum(v1 @ np.asarray(a, np.float64) for a in value_factors)
  latent = sum(z1 @ np.asarray(b, np.float64) for b in latent_factors)
  return text * latent[:, None, :]


def fusion_params(variables, l):
  return variables["params"][f"h_{l}"]["attn"]["fusion"]


def test_parameter_names_shapes_and_gpt2_initialisation():
  config = dataclasses.replace(BASE, model_dim=64, num_heads=4, value_fusion="low_rank",
                               latent_dim=Z)
  # rbg keys: same distributions, a much faster compile than threefry for this many draws
  params = jitted(config)[0](jax.random.key(0, impl="rbg"), jnp.asarray(TOKENS))["params"]
  assert set(params) == {"wte", "wpe", "h_0", "h_1", "ln_f"}
  assert set(params["h_0"]) == {"ln_1", "attn", "ln_2", "mlp"}
  assert set(params["h_0"]["attn"]) == {"c_attn", "c_proj", "fusion"}
  assert params["wte"]["embedding"].shape == (V, 64)
  assert params["wpe"]["embedding"].shape == (8, 64)
  assert params["h_0"]["attn"]["c_attn"]["kernel"].shape == (64, 192)
  assert params["h_0"]["mlp"]["c_fc"]["kernel"].shape == (64, 256)
  assert fusion_params({"params": params}, 0)["value_factors"].shape == (4, 65, 64)
  assert fusion_params({"params": params}, 0)["latent_factors"].shape == (4, Z + 1, 64)
  block = params["h_1"]
  np.testing.assert_allclose(np.std(block["attn"]["c_attn"]["kernel"]), 0.02, rtol=0.05)
  np.testing.assert_allclose(np.std(block["mlp"]["c_fc"]["kernel"]), 0.02, rtol=0.05)
  for proj in (block["attn"]["c_proj"]["kernel"], block["mlp"]["c_proj"]["kernel"]):
    np.testing.assert_allclose(np.std(proj), 0.02 / np.sqrt(2 * 2), rtol=0.05)
  np.testing.assert_allclose(np.std(params["wte"]["embedding"]), 0.02, rtol=0.1)
  np.testing.assert_array_equal(block["ln_1"]["scale"], 1.0)
  np.testing.assert_array_equal(block["attn"]["c_attn"]["bias"], 0.0)
  factors = np.asarray(fusion_params({"params": params}, 0)["value_factors"])
  assert np.abs(factors).max() <= 1 / np.sqrt(65)  # nn.Linear's U(±1/sqrt(fan_in))
  np.testing.assert_allclose(factors.std(), 1 / np.sqrt(65) / np.sqrt(3), rtol=0.05)
  normal = jax.jit(LatentValueFusion(dataclasses.replace(config, fusion_init="normal")).init)(
      jax.random.key(0, impl="rbg"), jnp.zeros((1, 1, 64)), jnp.zeros((1, Z)))["params"]
  np.testing.assert_allclose(np.std(normal["value_factors"]), 0.02, rtol=0.05)


def test_forward_matches_numpy_gpt2():
  variables = init(BASE)
  out = run(BASE, variables, padding_mask=MASK)
  hidden, layers = reference(variables, padding_mask=MASK)
  assert out.hidden.shape == (3, 6, D) and out.layers.shape == (L, 3, 6, D)
  np.testing.assert_allclose(np.asarray(out.hidden)[MASK], hidden[MASK], **TOL)
  np.testing.assert_allclose(np.asarray(out.layers)[:, MASK], layers[:, MASK], **TOL)
  logits = jitted(BASE)[1](variables, out.hidden, method=Transformer.logits)
  expected = numpy_gpt2.logits(numpy_gpt2.tensors_from_params(variables["params"]), hidden)
  np.testing.assert_allclose(np.asarray(logits)[MASK], expected[MASK], **TOL)


def test_causal_mask_and_padding_mask():
  variables = init(BASE)
  base = np.asarray(run(BASE, variables, padding_mask=MASK).hidden)
  later = TOKENS.copy()
  later[0, 4] = 3  # a later token of a full row
  changed = np.asarray(run(BASE, variables, later, padding_mask=MASK).hidden)
  np.testing.assert_allclose(changed[0, :4], base[0, :4], rtol=1e-6, atol=1e-6)
  assert not np.allclose(changed[0, 4], base[0, 4])
  padded = TOKENS.copy()
  padded[~MASK] = 11  # a different token behind the padding mask
  for causal in (True, False):
    a = np.asarray(run(BASE, variables, padding_mask=MASK, causal=causal).hidden)
    b = np.asarray(run(BASE, variables, padded, padding_mask=MASK, causal=causal).hidden)
    np.testing.assert_allclose(b[MASK], a[MASK], rtol=1e-6, atol=1e-6)


def test_non_causal_attends_to_the_future():
  variables = init(BASE)
  out = run(BASE, variables, padding_mask=MASK, causal=False)
  hidden, _ = reference(variables, padding_mask=MASK, causal=False)
  np.testing.assert_allclose(np.asarray(out.hidden)[MASK], hidden[MASK], **TOL)
  later = TOKENS.copy()
  later[0, 4] = 3
  changed = run(BASE, variables, later, padding_mask=MASK, causal=False)
  assert not np.allclose(np.asarray(changed.hidden)[0, 0], np.asarray(out.hidden)[0, 0])


def test_low_rank_fusion_is_the_official_lmf_layer():
  variables = init(LOW_RANK)
  z = conditioning()["latents"]
  v = np.random.default_rng(3).normal(size=(3, 6, D)).astype(np.float32)
  fusion = fusion_params(variables, 0)
  out = LatentValueFusion(LOW_RANK).apply({"params": fusion}, jnp.asarray(v), jnp.asarray(z[:, 0]))
  expected = low_rank_reference(v, z[:, 0], fusion["value_factors"], fusion["latent_factors"])
  np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-4, atol=1e-4)

  value_fn = lambda l, v: low_rank_reference(v, z[:, l], fusion_params(variables, l)[
      "value_factors"], fusion_params(variables, l)["latent_factors"])
  out = run(LOW_RANK, variables, padding_mask=MASK, latents=z)
  hidden, layers = reference(variables, padding_mask=MASK, value_fn=value_fn)
  np.testing.assert_allclose(np.asarray(out.hidden)[MASK], hidden[MASK], **TOL)
  np.testing.assert_allclose(np.asarray(out.layers)[:, MASK], layers[:, MASK], **TOL)


def test_add_fusion():
  variables = init(ADD)
  z = conditioning()["latents"]

  def value_fn(l, v):
    p = fusion_params(variables, l)
    return v + (z[:, l] @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"]))[:, None]

  out = run(ADD, variables, padding_mask=MASK, latents=z)
  hidden, _ = reference(variables, padding_mask=MASK, value_fn=value_fn)
  np.testing.assert_allclose(np.asarray(out.hidden)[MASK], hidden[MASK], **TOL)


@pytest.mark.parametrize("config", [LOW_RANK, ADD], ids=["low_rank", "add"])
def test_without_latents_the_values_are_untouched(config):
  variables = init(config)
  out = run(config, variables, padding_mask=MASK, causal=False)
  hidden, _ = reference(variables, padding_mask=MASK, causal=False)
  np.testing.assert_allclose(np.asarray(out.hidden)[MASK], hidden[MASK], **TOL)


def test_memory_and_embedding_offset_match_explicit_computation():
  variables = init(BASE)
  cond = conditioning()
  for kwargs in ({"memory": cond["memory"]}, {"embedding_offset": cond["embedding_offset"]},
                 {"memory": cond["memory"], "embedding_offset": cond["embedding_offset"]}):
    out = run(BASE, variables, padding_mask=MASK, **kwargs)
    hidden, _ = reference(variables, padding_mask=MASK, **kwargs)
    np.testing.assert_allclose(np.asarray(out.hidden)[MASK], hidden[MASK], **TOL)
  # Memory is never masked: even an all-padding row attends to it.
  mask = MASK.copy()
  mask[2] = False
  out = run(BASE, variables, padding_mask=mask, memory=cond["memory"])
  hidden, _ = reference(variables, padding_mask=mask, memory=cond["memory"])
  np.testing.assert_allclose(np.asarray(out.hidden)[2], hidden[2], **TOL)


def test_all_padding_row_has_no_nan():
  variables = init(LOW_RANK)
  tokens = TOKENS.copy()
  tokens[2] = PAD
  mask = tokens != PAD
  z = conditioning()["latents"]
  for causal in (True, False):
    out = run(LOW_RANK, variables, tokens, padding_mask=mask, causal=causal, latents=z)
    assert np.all(np.isfinite(np.asarray(out.hidden)))

  def loss(params):
    out = run(LOW_RANK, {"params": params}, tokens, padding_mask=mask, latents=z)
    return jnp.sum(out.hidden * mask[..., None])

  grads = jax.jit(jax.grad(loss))(variables["params"])
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree_util.tree_leaves(grads))


CASES = {  # every way of conditioning, each in at least one case
    "plain": (BASE, ()),
    "add": (ADD, ("latents",)),
    "everything": (LOW_RANK, ("latents", "memory", "embedding_offset")),
}


@pytest.mark.parametrize("case", list(CASES))
def test_decode_step_with_cache_reproduces_the_forward_pass(case):
  config, keys = CASES[case]
  model, apply = Transformer(config), jitted(config)[1]
  variables = init(config)
  cond = {key: jnp.asarray(value) for key, value in conditioning().items() if key in keys}
  full = apply(variables, jnp.asarray(TOKENS), **cond)
  expected = apply(variables, full.hidden, method=Transformer.logits)
  step = jax.jit(make_step_fn(model, variables))
  state = initial_decode_state(model, len(TOKENS), 8, **cond)
  for t in range(TOKENS.shape[1]):
    state, logits = step(state, jnp.asarray(TOKENS[:, t]))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected[:, t]), rtol=1e-4,
                               atol=1e-4)
  np.testing.assert_array_equal(np.asarray(state["cache"]["index"]), TOKENS.shape[1])
  if case == "everything":  # decode_step itself returns the final state
    _, hidden = apply(variables, model.init_cache(3, 8), jnp.asarray(TOKENS[:, 0]),
                      method=Transformer.decode_step, **cond)
    np.testing.assert_allclose(np.asarray(hidden), np.asarray(full.hidden[:, 0]), rtol=1e-4,
                               atol=1e-5)


def test_greedy_and_beam_decoding_with_the_cache():
  model = Transformer(LOW_RANK)
  variables = init(LOW_RANK)
  z = jnp.asarray(conditioning()["latents"])
  steps = 5
  state = initial_decode_state(model, 3, steps, latents=z)
  greedy = np.asarray(decoding.greedy_decode(make_step_fn(model, variables), state, 3, steps))
  # The same search re-running the whole sequence at every step, without a cache (positions
  # after t do not affect position t under the causal mask).
  apply = jitted(LOW_RANK)[1]
  inputs = np.full((3, steps + 1), PAD, np.int32)
  inputs[:, 0] = BOS
  for t in range(steps):
    out = apply(variables, jnp.asarray(inputs[:, :steps]), latents=z)
    logits = apply(variables, out.hidden[:, t], method=Transformer.logits)
    inputs[:, t + 1] = np.argmax(np.asarray(logits), -1)
  expected = inputs[:, 1:]
  for row in expected:  # decoding pads after EOS
    eos = np.flatnonzero(row == EOS)
    row[eos[0] + 1 if eos.size else len(row):] = PAD
  np.testing.assert_array_equal(greedy, expected)
  assert np.mean(expected[:, :3] != PAD) > 0.5  # not an immediate stop
  beam, _ = decoding.beam_search(make_step_fn(model, variables), state, 3, steps, beam_size=1,
                                 length_penalty=0.0)
  np.testing.assert_array_equal(np.asarray(beam), greedy)


def test_dropout_and_bfloat16():
  variables = init(BASE)
  kwargs = dict(padding_mask=MASK, deterministic=False)
  a = run(BASE, variables, rngs={"dropout": jax.random.PRNGKey(0)}, **kwargs).hidden
  b = run(BASE, variables, rngs={"dropout": jax.random.PRNGKey(1)}, **kwargs).hidden
  assert not np.allclose(np.asarray(a), np.asarray(b))
  bf16 = dataclasses.replace(BASE, dtype="bfloat16")
  params = jax.eval_shape(Transformer(bf16).init, jax.random.PRNGKey(0), jnp.asarray(TOKENS))
  assert all(p.dtype == jnp.float32 for p in jax.tree_util.tree_leaves(params))
  out = run(bf16, variables, padding_mask=MASK).hidden
  assert out.dtype == jnp.bfloat16
  ref = np.asarray(run(BASE, variables, padding_mask=MASK).hidden)
  np.testing.assert_allclose(np.asarray(out, np.float32)[MASK], ref[MASK], atol=0.15)


@pytest.mark.parametrize("kwargs, message", [
    (dict(model_dim=15), "divisible"),
    (dict(value_fusion="concat", latent_dim=2), "unknown value_fusion"),
    (dict(value_fusion="low_rank"), "latent_dim"),
    (dict(latent_dim=4), "latent_dim"),
    (dict(value_fusion="low_rank", latent_dim=4, fusion_rank=0), "fusion_rank"),
    (dict(attention_dropout=1.0), "attention_dropout"),
    (dict(dtype="int8"), "dtype"),
])
def test_config_validation(kwargs, message):
  with pytest.raises(ValueError, match=message):
    dataclasses.replace(BASE, **kwargs)


def test_call_validation():
  variables = init(BASE)
  with pytest.raises(ValueError, match="value_fusion='none'"):
    run(BASE, variables, latents=conditioning()["latents"])
  with pytest.raises(ValueError, match="max_length"):
    run(BASE, variables, np.ones((1, 9), np.int32))
  with pytest.raises(ValueError, match="memory"):
    run(BASE, variables, memory=np.zeros((3, L, D)))
