"""Decoding against brute force on a decoder whose sequence probabilities are enumerable."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from vae_jax.data.vocab import BOS, EOS, PAD
from vae_jax.nn import decoding

V = 6  # PAD, BOS, EOS, UNK, a, b
MAX_LEN = 4


def markov_step_fn(table):
  """A first-order Markov 'decoder': logits depend on the previous token only; the state
  counts steps (a pytree leaf with a batch axis, to exercise state gathering in beams)."""

  def step_fn(state, prev):
    return state + 1, table[prev]

  return step_fn


def random_table(seed):
  rng = np.random.default_rng(seed)
  table = rng.normal(size=(V, V)) * 2.0
  table[:, PAD] = -1e9  # never emit PAD or BOS
  table[:, BOS] = -1e9
  return jnp.asarray(table, jnp.float32)


def seq_logprob(table, seq):
  logp = np.asarray(jax.nn.log_softmax(table, axis=-1))
  prev, total = BOS, 0.0
  for tok in seq:
    total += logp[prev, tok]
    prev = tok
  return total


def brute_force_best(table):
  """Best sequence ending in EOS within MAX_LEN steps, or best EOS-free one of length MAX_LEN."""
  words = [t for t in range(V) if t not in (PAD, BOS)]
  best, best_lp = None, -np.inf
  for n in range(1, MAX_LEN + 1):
    for prefix in itertools.product([w for w in words if w != EOS], repeat=n - 1):
      for last in words:
        seq = list(prefix) + [last]
        if last != EOS and n < MAX_LEN:
          continue
        lp = seq_logprob(table, seq)
        if lp > best_lp:
          best, best_lp = seq, lp
  return best, best_lp


def as_list(row):
  out = []
  for t in np.asarray(row):
    if t == PAD:
      break
    out.append(int(t))
  return out


def test_greedy_matches_python_loop():
  table = random_table(0)
  state = jnp.zeros((3,), jnp.int32)
  out = decoding.greedy_decode(markov_step_fn(table), state, 3, MAX_LEN)
  prev, expected = BOS, []
  for _ in range(MAX_LEN):
    tok = int(np.argmax(np.asarray(table[prev])))
    expected.append(tok)
    if tok == EOS:
      break
    prev = tok
  for row in np.asarray(out):
    assert as_list(row) == expected
  assert out.shape == (3, MAX_LEN)


def test_beam_search_finds_brute_force_optimum():
  for seed in range(5):
    table = random_table(seed)
    best, best_lp = brute_force_best(table)
    seqs, scores = decoding.beam_search(markov_step_fn(table), jnp.zeros((2,), jnp.int32), 2,
                                        MAX_LEN, beam_size=V * V * V, length_penalty=0.0)
    assert as_list(seqs[0]) == best
    np.testing.assert_allclose(float(scores[0]), best_lp, rtol=1e-5)


def test_beam_one_equals_greedy():
  table = random_table(7)
  state = jnp.zeros((2,), jnp.int32)
  greedy = decoding.greedy_decode(markov_step_fn(table), state, 2, MAX_LEN)
  beam, _ = decoding.beam_search(markov_step_fn(table), state, 2, MAX_LEN, beam_size=1,
                                 length_penalty=0.0)
  np.testing.assert_array_equal(np.asarray(greedy), np.asarray(beam))


def test_sampling_frequencies_match_model():
  table = random_table(3)
  n = 4000
  out = decoding.sample_decode(markov_step_fn(table), jnp.zeros((n,), jnp.int32),
                               jax.random.PRNGKey(0), n, 1)
  freq = np.bincount(np.asarray(out[:, 0]), minlength=V) / n
  expected = np.asarray(jax.nn.softmax(table[BOS]))
  np.testing.assert_allclose(freq, expected, atol=0.03)


def test_outputs_are_padded_after_eos():
  table = random_table(1)
  out = np.asarray(decoding.sample_decode(markov_step_fn(table), jnp.zeros((64,), jnp.int32),
                                          jax.random.PRNGKey(1), 64, 8))
  for row in out:
    eos = np.where(row == EOS)[0]
    if eos.size:
      assert np.all(row[eos[0] + 1:] == PAD)
