"""The public API of `vae_jax/__init__.py`: every exported name resolves to the object of the
module it is listed under, and a model built from the top-level names runs."""

import importlib

import jax
import jax.numpy as jnp
import pytest

import vae_jax


@pytest.mark.parametrize("name", vae_jax.__all__)
def test_every_exported_name_is_its_module_object(name):
  module = importlib.import_module(vae_jax._WHERE[name])
  assert getattr(vae_jax, name) is getattr(module, name)
  assert name in dir(vae_jax)


def test_unknown_names_raise_attribute_error():
  with pytest.raises(AttributeError, match="no attribute 'SeqVAEE'"):
    vae_jax.SeqVAEE  # noqa: B018


def test_a_script_composes_the_top_level_names():
  config = vae_jax.VAEConfig(vocab_size=12, embed_dim=4, hidden_dim=8, latent_dim=2,
                             posterior="flow", flow=vae_jax.FlowConfig(kind="planar"))
  model = vae_jax.SeqVAE(config)
  tokens = jnp.array([[5, 6, 2, 0], [7, 2, 0, 0]])
  variables = model.init({"params": jax.random.PRNGKey(0), "latent": jax.random.PRNGKey(1)},
                         tokens, deterministic=True)
  batch = {"tokens": tokens, "weights": jnp.ones(2)}
  out = vae_jax.evaluate(model, variables, [batch], jax.random.PRNGKey(2), k_samples=4,
                         chunk_size=4, hole_samples=16)
  assert out["n_sentences"] == 2 and out["k_samples"] == 4
  assert isinstance(model.posterior_family, vae_jax.Family)
  assert vae_jax.POSTERIORS["flow"] is model.posterior_family
