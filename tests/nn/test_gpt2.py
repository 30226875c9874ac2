"""GPT-2 checkpoints: a small random GPT-2 written by hand in the Hugging Face layout is loaded
and its logits checked against a float64 numpy GPT-2 (tests/numpy_gpt2.py) of the same tensors;
saving, the special rows, the errors and merging into a larger tree."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import traverse_util

import numpy_gpt2
from vae_jax.data.vocab import BOS, EOS, PAD, UNK
from vae_jax.nn import gpt2
from vae_jax.nn.transformer import Transformer, TransformerConfig

V, P, D, L, H = 30, 10, 16, 2, 2  # GPT-2's vocabulary, positions, width, layers, heads
TOKENS = np.array([[29, 3, 17, 0, 8, 29], [5, 11, 2, 29, 0, 0]], np.int32)  # GPT-2 ids


def hf_tensors(seed=0, inner=4 * D):
  """A random GPT-2 state dict with HF names and shapes (Conv1D weights are [in, out])."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape, scale=0.3: (scale * rng.normal(size=shape)).astype(np.float32)
  t = {"wte.weight": normal(V, D, scale=1.0), "wpe.weight": normal(P, D, scale=0.5),
       "ln_f.weight": 1 + normal(D, scale=0.1), "ln_f.bias": normal(D, scale=0.1)}
  for i in range(L):
    t.update({
        f"h.{i}.ln_1.weight": 1 + normal(D, scale=0.1), f"h.{i}.ln_1.bias": normal(D, scale=0.1),
        f"h.{i}.attn.c_attn.weight": normal(D, 3 * D), f"h.{i}.attn.c_attn.bias": normal(3 * D),
        f"h.{i}.attn.c_proj.weight": normal(D, D), f"h.{i}.attn.c_proj.bias": normal(D),
        f"h.{i}.ln_2.weight": 1 + normal(D, scale=0.1), f"h.{i}.ln_2.bias": normal(D, scale=0.1),
        f"h.{i}.mlp.c_fc.weight": normal(D, inner), f"h.{i}.mlp.c_fc.bias": normal(inner),
        f"h.{i}.mlp.c_proj.weight": normal(inner, D), f"h.{i}.mlp.c_proj.bias": normal(D),
    })
  return t


def hf_config(**extra):
  return {"model_type": "gpt2", "vocab_size": V, "n_positions": P, "n_ctx": P, "n_embd": D,
          "n_layer": L, "n_head": H, "n_inner": None, "activation_function": "gelu_new",
          "resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1, "layer_norm_epsilon": 1e-5,
          "initializer_range": 0.02, "bos_token_id": V - 1, "eos_token_id": V - 1, **extra}


def write_checkpoint(directory, tensors, config=None, prefix="", lm_head=False, buffers=True):
  directory.mkdir(parents=True, exist_ok=True)
  stored = {prefix + name: value for name, value in tensors.items()}
  if buffers:  # the causal-mask buffers of older transformers versions
    for i in range(L):
      stored[f"{prefix}h.{i}.attn.bias"] = np.tril(np.ones((1, 1, P, P), np.float32))
      stored[f"{prefix}h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
  if lm_head:
    stored["lm_head.weight"] = tensors["wte.weight"].copy()
  safetensors.numpy.save_file(stored, str(directory / "model.safetensors"))
  (directory / "config.json").write_text(json.dumps(config or hf_config()))
  return directory


def random_params(config, seed=0):
  """A Transformer parameter tree of `config` with random values (structure from eval_shape)."""
  shapes = jax.eval_shape(Transformer(config).init, jax.random.PRNGKey(0), jnp.asarray(TOKENS))
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(lambda s: rng.normal(size=s.shape).astype(np.float32),
                                shapes["params"])


def model_logits(config, params, gpt2_tokens):
  """The Transformer's logits for GPT-2 ids given as project ids (g + ID_OFFSET)."""

  @jax.jit
  def logits(params, tokens):
    model = Transformer(config)
    out = model.apply({"params": params}, tokens)
    return model.apply({"params": params}, out.hidden, method=Transformer.logits)

  return np.asarray(logits(params, jnp.asarray(gpt2_tokens + gpt2.ID_OFFSET)))


@pytest.mark.parametrize("prefix, lm_head", [("", False), ("transformer.", True)],
                         ids=["plain", "prefixed_with_head"])
def test_loaded_gpt2_matches_numpy_gpt2(tmp_path, prefix, lm_head):
  tensors = hf_tensors()
  config, params = gpt2.load_gpt2_params(write_checkpoint(tmp_path, tensors, prefix=prefix,
                                                          lm_head=lm_head))
  assert config.vocab_size == V + 4 and config.max_length == P and config.inner_dim == 4 * D
  logits = model_logits(config, params, TOKENS)
  assert logits.shape == (2, 6, V + 4)
  hidden, _ = numpy_gpt2.forward(tensors, TOKENS, H)
  np.testing.assert_allclose(logits[..., gpt2.ID_OFFSET:], numpy_gpt2.logits(tensors, hidden),
                             rtol=1e-4, atol=1e-4)


def test_config_from_hf():
  config = gpt2.config_from_hf(hf_config(n_inner=24, resid_pdrop=0.0, layer_norm_epsilon=1e-6))
  assert config == TransformerConfig(vocab_size=V + 4, num_layers=L, num_heads=H, model_dim=D,
                                     mlp_dim=24, max_length=P, embed_dropout=0.1,
                                     attention_dropout=0.1, residual_dropout=0.0,
                                     layer_norm_epsilon=1e-6)
  old = {k: v for k, v in hf_config().items() if k != "n_positions"}
  assert gpt2.config_from_hf(old).max_length == P  # n_ctx of old configs
  fused = gpt2.config_from_hf(hf_config(), latent_dim=8, value_fusion="low_rank")
  assert fused.latent_dim == 8 and fused.value_fusion == "low_rank"
  with pytest.raises(ValueError, match="activation_function 'relu'"):
    gpt2.config_from_hf(hf_config(activation_function="relu"))
  with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
    gpt2.config_from_hf(hf_config(scale_attn_by_inverse_layer_idx=True))
  with pytest.raises(ValueError, match="model_type 'bert'"):
    gpt2.config_from_hf(hf_config(model_type="bert"))


@pytest.mark.parametrize("endoftext", [None, 7])
def test_special_rows(tmp_path, endoftext):
  tensors = hf_tensors()
  config = hf_config(bos_token_id=endoftext, eos_token_id=endoftext)
  if endoftext is None:
    del config["bos_token_id"], config["eos_token_id"]
  _, params = gpt2.load_gpt2_params(write_checkpoint(tmp_path, tensors, config))
  wte, gpt2_wte = np.asarray(params["wte"]["embedding"]), tensors["wte.weight"]
  row = gpt2_wte[V - 1 if endoftext is None else endoftext]
  np.testing.assert_array_equal(wte[PAD], 0.0)
  np.testing.assert_array_equal(wte[BOS], row)
  np.testing.assert_array_equal(wte[EOS], row)
  np.testing.assert_allclose(wte[UNK], gpt2_wte.mean(0), rtol=1e-6)
  np.testing.assert_array_equal(wte[gpt2.ID_OFFSET:], gpt2_wte)


def test_save_and_load_round_trip(tmp_path):
  config, params = gpt2.load_gpt2_params(
      write_checkpoint(tmp_path / "hf", hf_tensors(inner=24), hf_config(n_inner=24)))
  gpt2.save_gpt2_checkpoint(params, config, tmp_path / "saved")
  stored = safetensors.numpy.load_file(str(tmp_path / "saved" / "model.safetensors"))
  np.testing.assert_array_equal(stored["wte.weight"], hf_tensors(inner=24)["wte.weight"])
  config2, params2 = gpt2.load_gpt2_params(tmp_path / "saved")
  assert config2 == config == gpt2.config_from_hf(tmp_path / "saved") and config.inner_dim == 24
  jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)

  # Any Transformer's parameters: everything but the special rows survives the trip.
  fresh = random_params(config)
  gpt2.save_gpt2_checkpoint(fresh, config, tmp_path / "fresh")
  _, loaded = gpt2.load_gpt2_params(tmp_path / "fresh")
  np.testing.assert_array_equal(loaded["wte"]["embedding"][4:], fresh["wte"]["embedding"][4:])
  loaded["wte"], fresh["wte"] = None, None
  jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, fresh)


def test_checkpoint_errors_name_the_tensors(tmp_path):
  tensors = hf_tensors()
  del tensors["h.1.ln_2.bias"]
  tensors["h.0.attn.c_attn.weight"] = tensors["h.0.attn.c_attn.weight"][:, :D]
  tensors["h.0.attn.rotary.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as error:
    gpt2.load_gpt2_params(write_checkpoint(tmp_path / "bad", tensors))
  message = str(error.value)
  assert "missing: h.1.ln_2.bias" in message
  assert "unexpected: h.0.attn.rotary.weight" in message
  assert f"h.0.attn.c_attn.weight: ({D}, {D}), expected ({D}, {3 * D})" in message

  untied = hf_tensors()
  directory = write_checkpoint(tmp_path / "untied", untied)
  stored = safetensors.numpy.load_file(str(directory / "model.safetensors"))
  stored["lm_head.weight"] = untied["wte.weight"] + 1
  safetensors.numpy.save_file(stored, str(directory / "model.safetensors"))
  with pytest.raises(ValueError, match="lm_head.weight differs"):
    gpt2.load_gpt2_params(directory)

  wrong = dataclasses.replace(gpt2.config_from_hf(hf_config()), vocab_size=V)
  with pytest.raises(ValueError, match="wte.weight"):
    gpt2.load_gpt2_params(write_checkpoint(tmp_path / "good", hf_tensors()), wrong)


def test_merge_pretrained_into_a_larger_tree(tmp_path):
  config, pretrained = gpt2.load_gpt2_params(write_checkpoint(tmp_path, hf_tensors()))
  fused = dataclasses.replace(config, latent_dim=3, value_fusion="low_rank")
  decoder = random_params(fused, seed=1)
  tree = {"encoder": {"dense": {"kernel": np.ones((2, 3), np.float32)}},
          "decoder": {"transformer": decoder}}
  merged, left = gpt2.merge_pretrained(tree, pretrained, at="decoder/transformer")
  flat = traverse_util.flatten_dict(merged)
  for path, value in traverse_util.flatten_dict(pretrained).items():
    np.testing.assert_array_equal(flat[("decoder", "transformer", *path)], value)
  assert left == sorted(["encoder/dense/kernel"] + [
      f"decoder/transformer/h_{i}/attn/fusion/{name}" for i in range(L)
      for name in ("latent_factors", "value_factors")])
  fusion = merged["decoder"]["transformer"]["h_0"]["attn"]["fusion"]
  np.testing.assert_array_equal(fusion["value_factors"],
                                decoder["h_0"]["attn"]["fusion"]["value_factors"])
  assert tree["decoder"]["transformer"] is decoder  # the input is not modified
  assert not np.array_equal(decoder["ln_f"]["scale"], pretrained["ln_f"]["scale"])

  with pytest.raises(ValueError, match="no such parameter: .*decoder/wte/embedding"):
    gpt2.merge_pretrained(tree, pretrained, at="decoder")
  small = jax.eval_shape(Transformer(dataclasses.replace(config, mlp_dim=8)).init,
                         jax.random.PRNGKey(1), jnp.asarray(TOKENS))["params"]
  with pytest.raises(ValueError, match=r"wrong shape: .*h_0/mlp/c_fc/bias: \(8,\) vs pretrained"):
    gpt2.merge_pretrained(small, pretrained)
