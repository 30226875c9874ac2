"""Tiny dialogue CVAE configurations and batches shared by the CVAE and dialogue-evaluation tests."""

import jax
import jax.numpy as jnp

from vae_jax.data.vocab import PAD
from vae_jax.models.cvae import CVAEConfig
from vae_jax.nn import flows

V = 13
BASE = CVAEConfig(vocab_size=V, embed_dim=8, utterance_dim=8, context_dim=6, response_dim=8,
                  hidden_dim=10, latent_dim=3, prior_hidden_dim=8)
IAF = flows.FlowConfig(kind="iaf", num_layers=2, hidden_dim=8, amortized=True, context_dim=4)


def make_batch():
  tokens = jnp.array([[5, 6, 7, 2, PAD], [8, 2, PAD, PAD, PAD], [4, 5, 6, 7, 2]], jnp.int32)
  context = jnp.array([
      [[4, 5, 2, PAD], [6, 2, PAD, PAD], [PAD] * 4],       # two turns, one empty slot
      [[7, 8, 9, 2], [PAD] * 4, [PAD] * 4],                # one turn
      [[4, 2, PAD, PAD], [5, 6, 2, PAD], [7, 7, 7, 2]],    # a full window
  ], jnp.int32)
  speakers = jnp.array([[0, 1, 0], [1, 0, 0], [1, 0, 1]], jnp.int32)
  return tokens, context, speakers


def init(model, *inputs):
  return model.init({"params": jax.random.PRNGKey(0), "latent": jax.random.PRNGKey(1)},
                    *inputs, deterministic=True)


def perturb(variables, scale=0.3, seed=3):
  leaves, tree = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(
      tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
