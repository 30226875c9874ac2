"""Response generation and the dialogue metrics of `vae_jax.dialogue_evaluation`, and the one
evaluation (`vae_jax.evaluation`) on the dialogue CVAE."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vae_jax import dialogue_evaluation as de
from vae_jax import evaluation, mutual_information, objectives
from vae_jax.models.cvae import CVAE

from cvae_testing import BASE, IAF, init, make_batch, perturb


def batch_dict(tokens, context, speakers):
  return {"tokens": tokens, "context": context, "context_speakers": speakers,
          "weights": jnp.ones(tokens.shape[0])}


def test_response_scores_by_hand():
  refs = [[1, 2, 3, 4], [7, 8]]
  samples = [[[1, 2, 3, 4], [5, 6]], [[7, 8], [7, 8]]]
  out = de.response_scores(refs, samples, greedy=[[1, 2, 3, 4], [9]], max_n=2)
  # One exact sample per context: every reference is covered (recall 1) ...
  assert out["bleu1_recall"] == out["bleu2_recall"] == 1.0
  # ... but only three of the four samples match (precision below 1).
  assert 0.75 <= out["bleu1_precision"] < 1.0
  # Distinct-n over all 4 samples: unigrams {1..8} of 10, bigrams 5 distinct of 6.
  assert out["distinct_1"] == 8 / 10 and out["distinct_2"] == 5 / 6
  # Within each context: all distinct (1, 1) and two copies of one response (2/4, 1/2).
  assert out["intra_distinct_1"] == (1 + 2 / 4) / 2 and out["intra_distinct_2"] == (1 + 1 / 2) / 2
  assert out["length"] == 10 / 4
  assert 0.5 <= out["greedy_bleu1"] < 1.0 and out["greedy_length"] == 2.5


def test_beam_of_one_is_greedy_and_a_certain_prior_gives_one_response():
  tokens, context, speakers = make_batch()
  model = CVAE(BASE)
  v = perturb(init(model, tokens, context, speakers), scale=0.5)
  greedy = de.mode_responses(model, v, context, speakers, max_length=7)
  np.testing.assert_array_equal(
      de.mode_responses(model, v, context, speakers, max_length=7, beam_size=1), greedy)
  beam = de.mode_responses(model, v, context, speakers, max_length=7, beam_size=3)
  assert beam.shape == greedy.shape
  samples = de.sample_responses(model, v, context, speakers, jax.random.PRNGKey(0),
                                num_samples=4, max_length=7)
  assert samples.shape == (3, 4, 7)
  # With σ_p -> 0 every code is the prior mean: the N responses are the greedy one.
  params = jax.tree.map(lambda x: x, v["params"])
  head = dict(params["prior_head"])
  head["logvar"] = {"kernel": jnp.zeros_like(head["logvar"]["kernel"]),
                    "bias": jnp.full_like(head["logvar"]["bias"], -40.0)}
  certain = {**v, "params": {**params, "prior_head": head}}
  samples = de.sample_responses(model, certain, context, speakers, jax.random.PRNGKey(0),
                                num_samples=4, max_length=7)
  np.testing.assert_array_equal(
      samples, np.repeat(np.asarray(de.mode_responses(model, certain, context, speakers,
                                                      max_length=7))[:, None], 4, axis=1))


def test_seq2seq_likelihood_metrics_are_exact():
  tokens, context, speakers = make_batch()
  model = CVAE(dataclasses.replace(BASE, latent_dim=0))
  v = perturb(init(model, tokens, context, speakers))
  terms = model.apply(v, tokens, context, speakers, deterministic=True)
  out = evaluation.evaluate(model, v, [batch_dict(tokens, context, speakers)],
                            jax.random.PRNGKey(0))
  np.testing.assert_allclose(out["nll"], float(np.mean(terms.rec_nll)), rtol=1e-6)
  assert out["kl"] == 0.0 and out["mi"] == 0.0 and out["au"] == 0 and out["k_samples"] == 0
  np.testing.assert_allclose(out["ppl"], np.exp(np.sum(terms.rec_nll) / np.sum(terms.n_tokens)),
                             rtol=1e-6)


def test_flow_mutual_information_in_prior_coordinates():
  """A fresh one-layer IAF is the identity (zero-initialised output layer; deeper IAFs also
  permute), so the flow estimator (inverting the flows and changing variables to
  u = (z - μ_p)/σ_p) must equal the Gaussian estimator on the whitened posteriors with the
  same samples."""
  tokens, context, speakers = make_batch()
  flow = dataclasses.replace(IAF, num_layers=1)
  model = CVAE(dataclasses.replace(BASE, posterior="flow", flow=flow))
  v0 = init(model, tokens, context, speakers)
  v = perturb(v0, scale=0.4)
  v = {**v, "params": {**v["params"], "flow": v0["params"]["flow"]}}
  post = model.apply(v, tokens, context, speakers, method=CVAE.encode)
  rng = jax.random.PRNGKey(3)
  got = jnp.mean(evaluation.posterior_mi_terms(model, v, post, rng, chunk_size=2))
  whiten = lambda z: (z - post.prior_mean) * jnp.exp(-0.5 * post.prior_logvar)
  mean, logvar = whiten(post.mean), post.logvar - post.prior_logvar
  u = whiten(objectives.reparameterize(rng, post.mean, post.logvar, 1)[0])
  log_q = objectives.gaussian_log_prob(u, mean, logvar)
  log_agg = mutual_information.aggregate_posterior_log_prob(
      u, mutual_information.gaussian_pairwise_log_prob(mean, logvar), chunk_size=2)
  want = mutual_information.mutual_information(log_q, log_agg)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_evaluate_cvae_reports_every_metric():
  tokens, context, speakers = make_batch()
  model = CVAE(dataclasses.replace(BASE, bow_hidden_dim=6))
  v = perturb(init(model, tokens, context, speakers))
  out, responses = de.evaluate_cvae(model, v, [batch_dict(tokens, context, speakers)],
                                    jax.random.PRNGKey(0), k_samples=6, chunk_size=3,
                                    num_response_samples=2, max_decode_length=5, beam_size=2)
  for key in ("nll", "ppl", "kl", "mi", "au", "bow", "bleu4_precision", "bleu4_recall",
              "distinct_2", "length", "greedy_bleu1", "beam_bleu1"):
    assert key in out, key
  assert -out["nll"] >= out["elbo"] - 1e-4
  assert len(responses["samples"]) == 3 and len(responses["samples"][0]) == 2
  assert responses["references"][1] == [8]
