"""A tiny Task and resumable iterators for the training-loop tests.

The model embeds tokens, mean-pools them, normalises with BatchNorm (a
'batch_stats' collection, so the loop carries model state), applies dropout
(per-step randomness) and predicts every token of the sentence from the pooled
vector. The "KL" is a penalty on the pooled vector so there are two terms.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vae_jax.training import steps

VOCAB = 13
LENGTH = 6
PAD = 0


class ToyModel(nn.Module):
  vocab: int = VOCAB
  dim: int = 8

  @nn.compact
  def __call__(self, tokens, *, train: bool):
    mask = (tokens != PAD).astype(jnp.float32)
    emb = nn.Embed(self.vocab, self.dim)(tokens)
    n_tokens = mask.sum(-1)
    h = (emb * mask[..., None]).sum(1) / jnp.maximum(n_tokens, 1.0)[:, None]
    h = nn.BatchNorm(use_running_average=not train, momentum=0.9)(h)
    h = nn.Dropout(0.2, deterministic=not train)(h)
    logits = nn.Dense(self.vocab)(h)
    logp = jax.nn.log_softmax(logits)
    token_logp = jnp.take_along_axis(logp, tokens, axis=-1)
    rec = -(token_logp * mask).sum(-1)
    kl = 0.01 * (h ** 2).sum(-1)
    return {'rec': rec, 'kl': kl, 'n_tokens': n_tokens}


def _sums(terms, weights):
  return {
      'rec': (terms['rec'] * weights).sum(),
      'kl': (terms['kl'] * weights).sum(),
      'n_sentences': weights.sum(),
      'n_tokens': (terms['n_tokens'] * weights).sum(),
  }


def summarize(sums):
  n = max(sums['n_sentences'], 1.0)
  nll = (sums['rec'] + sums['kl']) / n
  return {'nll': nll, 'rec': sums['rec'] / n, 'kl': sums['kl'] / n,
          'ppl': float(np.exp((sums['rec'] + sums['kl']) / max(sums['n_tokens'], 1.0)))}


_MODEL = ToyModel()


def _init_fn(rng, batch):
  return _MODEL.init({'params': rng}, jnp.asarray(batch['tokens']), train=False)


def _loss_fn(params, model_state, batch, rng, step):
  del step
  terms, updates = _MODEL.apply(
      {'params': params, **model_state}, batch['tokens'], train=True,
      rngs={'dropout': rng}, mutable=['batch_stats'])
  sums = _sums(terms, batch['weights'])
  loss = (sums['rec'] + sums['kl']) / jnp.maximum(sums['n_sentences'], 1.0)
  return loss, (sums, dict(updates))


def _eval_fn(params, model_state, batch, rng):
  del rng
  terms = _MODEL.apply({'params': params, **model_state}, batch['tokens'], train=False)
  return _sums(terms, batch['weights'])


def _constant_eval_fn(params, model_state, batch, rng):
  """A validation loss that never improves (3 per sentence)."""
  del params, model_state, rng
  n = batch['weights'].sum()
  return {'rec': 3.0 * n, 'kl': 0.0 * n, 'n_sentences': n, 'n_tokens': 4.0 * n}


def _sample_fn(params, model_state, rng):
  del model_state
  best = jnp.argmax(params['Dense_0']['bias'])
  noise = jax.random.randint(rng, (), 0, VOCAB)
  return [f'token {int(best)} noise {int(noise)}']


def make_task(constant_eval=False, with_samples=False) -> steps.Task:
  """The toy task. Its functions are module-level, so tasks share compilations."""
  return steps.Task(init_fn=_init_fn, loss_fn=_loss_fn,
                   eval_fn=_constant_eval_fn if constant_eval else _eval_fn,
                   summarize=summarize,
                   sample_fn=_sample_fn if with_samples else None)


def global_batch(seed: int, index: int, batch_size: int, pad_rows: int = 0):
  """Deterministic random sentences (lengths 1..LENGTH-1 plus EOS=2, PAD after)."""
  rng = np.random.default_rng([seed, index])
  tokens = rng.integers(4, VOCAB, size=(batch_size, LENGTH)).astype(np.int32)
  lengths = rng.integers(1, LENGTH, size=batch_size)
  cols = np.arange(LENGTH)[None, :]
  tokens = np.where(cols < lengths[:, None], tokens, PAD)
  tokens[np.arange(batch_size), lengths] = 2
  weights = np.ones(batch_size, np.float32)
  if pad_rows:
    weights[-pad_rows:] = 0.0
    tokens[-pad_rows:] = PAD
  return {'tokens': tokens, 'weights': weights}


def process_rows(batch, process_index: int, process_count: int):
  """This process's rows [p*B/P, (p+1)*B/P) of a global batch."""
  n = batch['tokens'].shape[0] // process_count
  return {k: v[process_index * n:(process_index + 1) * n] for k, v in batch.items()}


class ToyIterator:
  """Infinite, resumable iterator of (this process's rows of) global batches.

  `fail_after` raises RuntimeError when that many batches have been read, to
  simulate a run killed between checkpoints. `nan_from` gives batches with a
  NaN weight from that batch index on, so the loss of that step is NaN. The
  last `pad_rows` rows of every global batch are padding (weight 0).
  """

  def __init__(self, seed=0, batch_size=8, process_index=0, process_count=1,
               fail_after=None, nan_from=None, pad_rows=0):
    self.seed, self.batch_size, self.pad_rows = seed, batch_size, pad_rows
    self.process_index, self.process_count = process_index, process_count
    self.fail_after, self.nan_from = fail_after, nan_from
    self.position = 0

  def __iter__(self):
    return self

  def __next__(self):
    if self.fail_after is not None and self.position >= self.fail_after:
      raise RuntimeError(f'killed after {self.position} batches')
    batch = global_batch(self.seed, self.position, self.batch_size, self.pad_rows)
    if self.nan_from is not None and self.position >= self.nan_from:
      batch['weights'][0] = np.nan
    self.position += 1
    return process_rows(batch, self.process_index, self.process_count)

  def state(self):
    return {'seed': self.seed, 'position': self.position}

  def restore(self, state):
    if state['seed'] != self.seed:
      raise ValueError('iterator seed mismatch')
    self.position = state['position']


def make_eval_data(seed=1000, num_batches=2, batch_size=8, process_index=0,
                   process_count=1):
  """A zero-argument callable returning a fresh finite iterator; last batch padded."""

  def make():
    for i in range(num_batches):
      pad = batch_size // 4 if i == num_batches - 1 else 0
      yield process_rows(global_batch(seed, i, batch_size, pad_rows=pad),
                         process_index, process_count)

  return make
