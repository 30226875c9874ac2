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


# ---------------------------------------------------------------------------------------------
# He et al. 2019's initialisation (`init='uniform'`).
# ---------------------------------------------------------------------------------------------

# jxhe/vae-lagging-encoder (`text.py`: model_init = uniform_initializer(0.01), emb_init =
# uniform_initializer(0.1); every module's `reset_parameters` runs model_init on each of its
# parameters, then emb_init on its embedding), written per parameter of their modules:
#   encoder.embed.weight                     U(-0.1, 0.1)
#   encoder.lstm.{weight_ih,weight_hh}_l0    U(-0.01, 0.01)
#   encoder.lstm.{bias_ih,bias_hh}_l0        U(-0.01, 0.01) each; the gates see their sum
#   encoder.linear.weight (no bias)          U(-0.01, 0.01)   -> our head's mean and logvar
#   decoder.embed.weight                     U(-0.1, 0.1)
#   decoder.trans_linear.weight (no bias)    U(-0.01, 0.01)   -> our latent_to_cell
#   decoder.lstm.weight_ih_l0 ([e(x); z])    U(-0.01, 0.01)   -> our kernel_ih and kernel_static
#   decoder.lstm.weight_hh_l0, biases        as the encoder's
#   decoder.pred_linear.weight (no bias)     U(-0.01, 0.01)   -> our output kernel
# Our dense layers have biases their linear layers lack: those start at zero (exempt).
HE_ET_AL = {
    "encoder_embed/embedding": "embed", "decoder_embed/embedding": "embed",
    "encoder/lstm/kernel_ih": "weight", "encoder/lstm/kernel_hh": "weight",
    "encoder/lstm/bias": "two_biases",
    "head/mean/kernel": "weight", "head/logvar/kernel": "weight",
    "head/mean/bias": "zero", "head/logvar/bias": "zero",
    "decoder/latent_to_cell/kernel": "weight", "decoder/latent_to_cell/bias": "zero",
    "decoder/lstm/kernel_ih": "weight", "decoder/lstm/kernel_static": "weight",
    "decoder/lstm/kernel_hh": "weight", "decoder/lstm/bias": "two_biases",
    "decoder/output/kernel": "weight", "decoder/output/bias": "zero",
}
HE_ET_AL_LM = {"embed/embedding": "embed", "decoder/lstm/kernel_ih": "weight",
               "decoder/lstm/kernel_hh": "weight", "decoder/lstm/bias": "two_biases",
               "decoder/output/kernel": "weight", "decoder/output/bias": "zero"}


def _flat_params(params) -> dict[str, np.ndarray]:
  return {"/".join(k.key for k in path): np.asarray(x)
          for path, x in jax.tree_util.tree_flatten_with_path(params)[0]}


def _check_he_et_al(flat, table):
  """Every parameter is in `table`, and each group has the support and the spread of its
  distribution: U(-s, s) has standard deviation s/sqrt(3); the sum of two has support
  (-2s, 2s), standard deviation s sqrt(2/3), and exceeds s in magnitude with probability
  1/4."""
  assert set(flat) == set(table)
  groups = {}
  for name, kind in table.items():
    groups.setdefault(kind, []).append(flat[name].ravel())
    scale = 0.1 if kind == "embed" else 0.01
    if kind == "zero":
      np.testing.assert_array_equal(flat[name], 0.0, err_msg=name)
    elif kind == "two_biases":
      assert np.abs(flat[name]).max() <= 2 * scale, name
    else:
      assert np.abs(flat[name]).max() <= scale, name
      if flat[name].size >= 5000:
        np.testing.assert_allclose(flat[name].std(), scale / np.sqrt(3), rtol=0.05,
                                   err_msg=name)
  for kind, scale, std in (("weight", 0.01, 0.01 / np.sqrt(3)),
                           ("embed", 0.1, 0.1 / np.sqrt(3)),
                           ("two_biases", 0.01, 0.01 * np.sqrt(2 / 3))):
    values = np.concatenate(groups[kind])
    np.testing.assert_allclose(values.std(), std, rtol=0.06, err_msg=kind)
    assert abs(values.mean()) < 4 * std / np.sqrt(values.size), kind
    if kind == "two_biases":
      np.testing.assert_allclose(np.mean(np.abs(values) > scale), 0.25, atol=0.05)
    else:
      assert np.abs(values).max() > 0.99 * scale, kind   # the whole support is used


def test_uniform_init_is_he_et_al():
  cfg = VAEConfig(vocab_size=300, embed_dim=64, hidden_dim=128, latent_dim=16, init="uniform")
  tokens = batch()
  _check_he_et_al(_flat_params(init(SeqVAE(cfg), tokens)["params"]), HE_ET_AL)
  lm = LSTMLanguageModel(cfg)
  lm_params = lm.init({"params": jax.random.PRNGKey(4)}, tokens, deterministic=True)["params"]
  _check_he_et_al(_flat_params(lm_params), HE_ET_AL_LM)
  # The default initialisation is another one: LSTM kernels U(-0.1, 0.1).
  default = _flat_params(init(SeqVAE(VAEConfig(vocab_size=300, embed_dim=64, hidden_dim=128,
                                               latent_dim=16)), tokens)["params"])
  np.testing.assert_allclose(default["encoder/lstm/kernel_hh"].std(), 0.1 / np.sqrt(3),
                             rtol=0.05)


def test_uniform_init_leaves_modules_outside_the_reference_alone():
  """The flow and its context head are not in He et al.'s model: they keep their own
  initialisation (the same values as under `init='default'` with the same key). The skip
  connection's kernel, a linear map of the decoder, is U(-0.01, 0.01) with the other dense
  kernels."""
  from vae_jax.nn.flows import FlowConfig  # noqa: PLC0415
  flow = FlowConfig(kind="iaf", num_layers=2, hidden_dim=8, amortized=True, context_dim=4)
  flat = {}
  for mode in ("default", "uniform"):
    cfg = VAEConfig(vocab_size=11, embed_dim=8, hidden_dim=12, latent_dim=3, init=mode,
                    posterior="flow", flow=flow, latent_to_output=True)
    flat[mode] = _flat_params(init(SeqVAE(cfg), batch())["params"])
  exempt = [k for k in flat["uniform"] if k.startswith(("flow/", "context/"))]
  assert exempt and set(flat["uniform"]) == set(HE_ET_AL) | set(exempt) | {
      "decoder/latent_to_logits/kernel"}
  for name in exempt:
    np.testing.assert_array_equal(flat["uniform"][name], flat["default"][name], err_msg=name)
  skip = flat["uniform"]["decoder/latent_to_logits/kernel"]
  assert np.abs(skip).max() <= 0.01 and not np.array_equal(
      skip, flat["default"]["decoder/latent_to_logits/kernel"])


def test_init_config_is_read_and_checked():
  from experiment_configs import load_config  # noqa: PLC0415
  from vae_jax import configs  # noqa: PLC0415
  for name, variants, want in (("vae", "ptb", "uniform"), ("vae", "yahoo", "uniform"),
                               ("lm", "ptb", "uniform"), ("lm", "yahoo", "uniform"),
                               ("vae", "", "default"), ("vae", "smoke", "default")):
    cfg = configs.model_config(load_config(name, variants), 100)
    assert (cfg.init, cfg.init_scale, cfg.embed_init_scale) == (want, 0.01, 0.1), (name, variants)
  with pytest.raises(ValueError, match="init"):
    VAEConfig(vocab_size=10, init="xavier")
  with pytest.raises(ValueError, match="init_scale"):
    VAEConfig(vocab_size=10, init="uniform", init_scale=0.0)
