"""`generation.reconstruction_metrics`: greedy reconstructions scored by BLEU against their
inputs, on stub models whose reconstructions are known exactly (real models: the end-to-end
runs of tests/test_experiments.py)."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vae_jax import generation, posteriors
from vae_jax.data.vocab import EOS, PAD, UNK
from vae_jax.posteriors import PosteriorParams

V = 20


class CopyModel(nn.Module):
  """Its code is the sentence itself; decoding writes it back, with the word at position
  `corrupt` (if any) replaced by UNK."""
  corrupt: int = -1

  def encode(self, tokens):
    z = tokens.astype(jnp.float32)
    return PosteriorParams(z, jnp.zeros_like(z), None)

  def posterior(self, params):
    return posteriors.GaussianPosterior(params, posteriors.Prior())

  def decoder_input(self, u, params=None):
    return u

  def initial_state(self, z):
    return jnp.zeros((z.shape[0],), jnp.int32)

  def decode_step(self, position, prev, z):
    del prev
    token = jnp.take_along_axis(z.astype(jnp.int32), position[:, None], axis=1)[:, 0]
    token = jnp.where(position == self.corrupt, UNK, token)
    return position + 1, jax.nn.one_hot(token, V) * 10.0


def rows(*sentences, width):
  out = np.full((len(sentences), width), PAD, np.int32)
  for i, s in enumerate(sentences):
    out[i, :len(s) + 1] = s + [EOS]
  return out


SENTS = [[4, 5, 6, 7, 8, 9, 10, 11], [12, 13, 14, 15, 16, 17, 18, 19], [5, 7, 9, 11, 13]]


def test_perfect_copy_scores_one():
  batches = [rows(*SENTS[:2], width=10), rows(SENTS[2], width=10)]
  scores, hyps = generation.reconstruction_metrics(CopyModel(), {"params": {}}, batches,
                                                   jax.random.PRNGKey(0))
  assert hyps == SENTS
  assert scores["recon_bleu"] == 1.0 and scores["recon_exact"] == 1.0
  assert scores["recon_length"] == np.mean([len(s) for s in SENTS])


def test_one_substitution_per_sentence_matches_hand_computed_bleu():
  # Two 8-word sentences, each with its second word replaced: of the n-grams of order n
  # (9 - n per sentence), those covering position 1 miss (2 of them for n >= 2, 1 for n = 1).
  batches = [rows(*SENTS[:2], width=12)]
  scores, hyps = generation.reconstruction_metrics(CopyModel(corrupt=1), {"params": {}},
                                                   batches, jax.random.PRNGKey(0))
  assert hyps == [[s[0], UNK] + s[2:] for s in SENTS[:2]]
  precisions = [(8 - n - (0 if n == 1 else 1)) / (9 - n) for n in range(1, 5)]
  expected = math.exp(sum(math.log(p) for p in precisions) / 4)   # same lengths: BP = 1
  np.testing.assert_allclose(scores["recon_bleu"], expected, rtol=1e-12)
  assert scores["recon_exact"] == 0.0


def test_decoding_is_cut_at_max_length():
  batches = [rows(SENTS[0], width=10)]
  scores, hyps = generation.reconstruction_metrics(CopyModel(), {"params": {}}, batches,
                                                   jax.random.PRNGKey(0), max_length=4)
  assert hyps == [SENTS[0][:4]]
  # Perfect precisions, brevity penalty exp(1 - 8/4).
  np.testing.assert_allclose(scores["recon_bleu"], math.exp(1 - 8 / 4), rtol=1e-12)


def test_until_eos():
  assert generation.until_eos(np.array([4, 5, EOS, 6, PAD])) == [4, 5]
  assert generation.until_eos(np.array([4, 5, 6])) == [4, 5, 6]
  assert generation.until_eos(np.array([EOS, PAD])) == []


def test_no_batches():
  assert generation.reconstruction_metrics(CopyModel(), {"params": {}}, [],
                                           jax.random.PRNGKey(0)) == ({}, [])
