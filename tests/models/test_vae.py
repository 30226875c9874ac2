"""The LSTM VAE and LM against independent recomputations of their terms."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vae_jax import objectives
from vae_jax.data.vocab import EOS, PAD, UNK
from vae_jax.models.vae import LSTMLanguageModel, SeqVAE, VAEConfig
from vae_jax.nn import decoders

CFG = VAEConfig(vocab_size=11, embed_dim=8, hidden_dim=12, latent_dim=3)


def batch():
  return jnp.array([[5, 6, 7, EOS, PAD, PAD],
                    [8, EOS, PAD, PAD, PAD, PAD],
                    [4, 5, 6, 7, 8, EOS]], jnp.int32)


def init(model, tokens):
  return model.init({"params": jax.random.PRNGKey(0), "latent": jax.random.PRNGKey(1)},
                    tokens, deterministic=True)


def test_vae_terms_against_step_by_step_decoding():
  model, tokens = SeqVAE(CFG), batch()
  variables = init(model, tokens)
  terms = model.apply(variables, tokens, deterministic=True,
                      rngs={"latent": jax.random.PRNGKey(2)})
  # KL is the analytic Gaussian KL of the returned posterior.
  np.testing.assert_allclose(terms.kl, objectives.gaussian_kl(terms.mean, terms.logvar).sum(-1),
                             rtol=1e-6)
  np.testing.assert_array_equal(terms.n_tokens, [4, 2, 6])
  # rec_nll recomputed with the decoder's single-step interface, token by token.
  state = model.apply(variables, terms.z, method=SeqVAE.initial_state)
  prev = decoders.shift_right(tokens)
  nll = np.zeros(3)
  for t in range(tokens.shape[1]):
    state, logits = model.apply(variables, state, prev[:, t], terms.z, method=SeqVAE.decode_step)
    logp = np.asarray(jax.nn.log_softmax(logits))
    for b in range(3):
      if tokens[b, t] != PAD:
        nll[b] -= logp[b, tokens[b, t]]
  np.testing.assert_allclose(terms.rec_nll, nll, rtol=1e-5)


def test_extra_padding_changes_nothing():
  model, tokens = SeqVAE(CFG), batch()
  variables = init(model, tokens)
  padded = jnp.pad(tokens, ((0, 0), (0, 5)))
  rngs = {"latent": jax.random.PRNGKey(3)}
  a = model.apply(variables, tokens, deterministic=True, rngs=rngs)
  b = model.apply(variables, padded, deterministic=True, rngs=rngs)
  for name in ("rec_nll", "kl", "z", "mean", "logvar", "n_tokens"):
    np.testing.assert_allclose(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-6)


def test_decoder_uses_z():
  model, tokens = SeqVAE(CFG), batch()
  variables = init(model, tokens)
  z0 = jnp.zeros((3, CFG.latent_dim))
  ll0 = model.apply(variables, tokens, z0, method=SeqVAE.log_likelihood)
  ll1 = model.apply(variables, tokens, z0 + 1.0, method=SeqVAE.log_likelihood)
  assert np.all(np.abs(np.asarray(ll0 - ll1)) > 1e-4)


def test_language_model_against_step_by_step_decoding():
  cfg = VAEConfig(vocab_size=11, embed_dim=8, hidden_dim=12, latent_dim=0)
  lm, tokens = LSTMLanguageModel(cfg), batch()
  variables = lm.init(jax.random.PRNGKey(0), tokens, deterministic=True)
  terms = lm.apply(variables, tokens, deterministic=True)
  state = lm.apply(variables, 3, method=LSTMLanguageModel.initial_state)
  prev = decoders.shift_right(tokens)
  nll = np.zeros(3)
  for t in range(tokens.shape[1]):
    state, logits = lm.apply(variables, state, prev[:, t], method=LSTMLanguageModel.decode_step)
    logp = np.asarray(jax.nn.log_softmax(logits))
    for b in range(3):
      if tokens[b, t] != PAD:
        nll[b] -= logp[b, tokens[b, t]]
  np.testing.assert_allclose(terms.rec_nll, nll, rtol=1e-5)
  np.testing.assert_array_equal(terms.n_tokens, [4, 2, 6])


def test_word_dropout_keeps_bos_and_rate():
  inputs = jnp.full((200, 50), 7, jnp.int32)
  out = np.asarray(decoders.word_dropout(jax.random.PRNGKey(0), inputs, 0.3))
  assert np.all(out[:, 0] == 7)
  frac = np.mean(out[:, 1:] == UNK)
  assert abs(frac - 0.3) < 0.02


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "mean_max"])
def test_pooling_variants_shapes(pooling):
  cfg = VAEConfig(vocab_size=11, embed_dim=8, hidden_dim=12, latent_dim=3, pooling=pooling)
  model, tokens = SeqVAE(cfg), batch()
  variables = init(model, tokens)
  post = model.apply(variables, tokens, method=SeqVAE.encode)
  assert post.mean.shape == post.logvar.shape == (3, 3) and post.context is None


def test_config_errors_are_clear():
  with pytest.raises(ValueError, match="word_dropout"):
    VAEConfig(vocab_size=10, word_dropout=1.5)


def test_bn_vae_means_have_fixed_batch_statistics():
  """BN-VAE: in training the means of the real rows have mean b (= 0 at init) and variance
  gamma^2 in every dimension; running statistics are updated and used at evaluation."""
  from vae_jax.models.vae import encoder_param_mask, param_groups  # noqa: PLC0415
  gamma = 0.7
  model = SeqVAE(VAEConfig(vocab_size=11, embed_dim=8, hidden_dim=12, latent_dim=3,
                           mean_batch_norm=gamma))
  tokens = jnp.concatenate([batch(), jnp.array([[9, 10, 4, EOS, PAD, PAD],
                                                [PAD] * 6])], axis=0)  # last row: padding
  variables = init(model, tokens)
  assert "batch_stats" in variables
  terms, updates = model.apply(variables, tokens, deterministic=False,
                               rngs={"latent": jax.random.PRNGKey(2),
                                     "dropout": jax.random.PRNGKey(3)},
                               mutable=["batch_stats"])
  real = np.asarray(terms.mean)[:-1]
  # Independently: the head's raw means of the real rows, normalised by their batch moments.
  features = np.asarray(model.apply(variables, tokens, method=SeqVAE.encoder_features))[:-1]
  dense = variables["params"]["head"]["mean"]
  raw = features @ np.asarray(dense["kernel"]) + np.asarray(dense["bias"])
  expected = gamma * (raw - raw.mean(0)) / np.sqrt(raw.var(0) + 1e-5)
  np.testing.assert_allclose(real, expected, rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(real.mean(0), 0.0, atol=1e-5)
  stats = updates["batch_stats"]["head"]["mean_bn"]
  raw_mean = jax.tree.leaves(stats["mean"])
  assert not np.allclose(np.asarray(raw_mean[0]), 0.0)   # the running mean moved
  # Evaluation uses the running statistics: deterministic passes need no mutable collection.
  post = model.apply({**variables, **updates}, tokens, method=SeqVAE.encode)
  assert post.mean.shape == (5, 3)
  mask = encoder_param_mask(variables["params"])
  assert all(jax.tree.leaves(mask["head"])) and not any(jax.tree.leaves(mask["decoder"]))
  assert set(jax.tree.leaves(param_groups(variables["params"]))) == {"encoder", "decoder"}
