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
