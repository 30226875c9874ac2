"""Linear probes on fixed sentence representations: how much label information a code holds.

Protocol (Li et al. 2019, "A Surprisingly Effective Fix for Deep Latent Variable Modeling of
Text", EMNLP): a model is trained without labels; every labelled sentence is then
mapped to a fixed feature vector (the posterior mean E_q[z|x] of a VAE, the final hidden state
of a language model), a linear classifier is fitted on a small labelled training set (100, 500,
1k, 2k or 10k sentences) and its accuracy on the test split is reported. The classifier is
deliberately weak, so the accuracy measures how linearly accessible the label is in the code.

The classifier is multinomial logistic regression on standardised features,

  x~ = (x - mu) / sigma,              mu, sigma: the training set's per-feature mean and std,
  p(y = k | x) = softmax(x~ W + b)_k,  W [F, K], b [K],

fitted by minimising the penalised mean negative log-likelihood

  J(W, b) = (1 / N) sum_i [logsumexp_k (x~_i W + b)_k - (x~_i W + b)_{y_i}] + (l2 / 2) ||W||_F^2

(the bias is not penalised; scikit-learn's `C` corresponds to `1 / (l2 N)`). J is strictly convex
in W for l2 > 0 and is minimised to a gradient-norm tolerance with L-BFGS (Nocedal & Wright
2006, "Numerical Optimization", Algorithm 7.5; `optax.lbfgs` with a zoom line search). The
gradient with respect to b sums to zero over the classes, so the mean of b stays at its initial
value 0 and the solution is unique. Everything runs in float32 under `jit`.

The penalty is chosen by k-fold cross-validation on the labelled training set only (the test
split is never seen before the final score): every (fold, l2) problem is solved at once, as one
`vmap`ped L-BFGS run with per-example weights masking the held-out fold, and the l2 with the
highest pooled held-out accuracy wins (ties: lower held-out NLL, then the larger l2).

Short corpora repeat sentences across splits (short Yelp: 6.5% of `train_10000` also occurs in
`test`); `remove_overlap` drops such training sentences so the score is not a lookup.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Sequence
from typing import TypeVar

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vae_jax.data import encoding, pipeline, synthetic

DEFAULT_L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_MAX_ITER = 500
DEFAULT_TOL = 1e-5

# Features whose training std is at most this (relative to 1 + |mean|) are constant: they are
# centred but not scaled, so round-off noise is not blown up to unit variance.
_CONSTANT_STD = 1e-6

Params = tuple[jax.Array, jax.Array]  # (weights [F, K], bias [K])


@dataclasses.dataclass(frozen=True, eq=False)
class LinearProbe:
  """A fitted multinomial logistic regression on standardised features.

  Attributes:
    mean: float32 [F], the training features' mean mu.
    scale: float32 [F], their standard deviation sigma (1 for constant features).
    weights: float32 [F, K], W in the standardised coordinates.
    bias: float32 [K], b (mean 0).
  """
  mean: np.ndarray
  scale: np.ndarray
  weights: np.ndarray
  bias: np.ndarray

  @property
  def num_classes(self) -> int:
    return int(self.bias.shape[0])

  def logits(self, features: np.ndarray) -> np.ndarray:
    """float32 [N, K] class scores `((x - mu) / sigma) W + b`."""
    x = _as_features(features, self.mean.shape[0])
    return ((x - self.mean) / self.scale) @ self.weights + self.bias

  def predict(self, features: np.ndarray) -> np.ndarray:
    """int32 [N] most probable class of every row of `features` [N, F]."""
    return np.argmax(self.logits(features), axis=-1).astype(np.int32)

  def accuracy(self, features: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of rows whose predicted class equals `labels` [N]."""
    labels = np.asarray(labels)
    if labels.shape != (len(features),):
      raise ValueError(f"labels must have shape ({len(features)},), got {labels.shape}.")
    if len(labels) == 0:
      raise ValueError("Cannot compute the accuracy of an empty set.")
    return float(np.mean(self.predict(features) == labels))


# ---------------------------------------------------------------------------------------------
# The objective and its minimiser.
# ---------------------------------------------------------------------------------------------


def standardization(x: jax.Array, w: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Weighted per-feature mean and std of `x` [N, F] over rows with weights `w` [N] >= 0.

  Returns (mu, sigma), sigma = sqrt(sum_i w_i (x_i - mu)^2 / sum_i w_i), replaced by 1 where
  the feature is constant on the weighted rows.
  """
  total = jnp.sum(w)
  mean = w @ x / total
  std = jnp.sqrt(w @ jnp.square(x - mean) / total)
  return mean, jnp.where(std > _CONSTANT_STD * (1.0 + jnp.abs(mean)), std, 1.0)


def penalized_nll(params: Params, x: jax.Array, y: jax.Array, w: jax.Array, l2: jax.Array,
                  mean: jax.Array, scale: jax.Array) -> jax.Array:
  """J(W, b): weighted mean NLL of `y` under softmax(x~ W + b) plus (l2 / 2) ||W||^2.

  The standardisation is folded into the weights, `x~ W = x (W / sigma) - (mu / sigma) W`, so
  the [N, F] matrix x~ is never formed (the probes of a cross-validation share one `x`).
  """
  weights, bias = params
  scaled = weights / scale[:, None]
  logits = x @ scaled + (bias - mean @ scaled)
  nll = jax.nn.logsumexp(logits, axis=-1) - jnp.take_along_axis(logits, y[:, None], -1)[:, 0]
  return w @ nll / jnp.sum(w) + 0.5 * l2 * jnp.sum(jnp.square(weights))


def _minimize(x: jax.Array, y: jax.Array, w: jax.Array, l2: jax.Array, *, num_classes: int,
              max_iter: int, tol: float):
  """L-BFGS on J from W = 0, b = 0 until ||grad J|| <= tol or `max_iter` iterations.

  Returns (mean, scale, weights, bias, grad_norm, num_iter).
  """
  mean, scale = standardization(x, w)
  objective = functools.partial(penalized_nll, x=x, y=y, w=w, l2=l2, mean=mean, scale=scale)
  solver = optax.lbfgs()
  value_and_grad = optax.value_and_grad_from_state(objective)

  def step(carry):
    params, state = carry
    value, grad = value_and_grad(params, state=state)
    updates, state = solver.update(grad, state, params, value=value, grad=grad,
                                   value_fn=objective)
    return optax.apply_updates(params, updates), state

  def not_done(carry):
    _, state = carry
    count = optax.tree.get(state, "count")
    grad_norm = optax.tree.norm(optax.tree.get(state, "grad"))
    return (count == 0) | ((count < max_iter) & (grad_norm > tol))

  params = (jnp.zeros((x.shape[1], num_classes), x.dtype), jnp.zeros((num_classes,), x.dtype))
  params, state = jax.lax.while_loop(not_done, step, (params, solver.init(params)))
  grad_norm = optax.tree.norm(jax.grad(objective)(params))
  return mean, scale, params[0], params[1], grad_norm, optax.tree.get(state, "count")


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iter"))
def _minimize_many(x, y, w, l2, tol, *, num_classes: int, max_iter: int):
  """`_minimize` for P problems at once: w [P, N], l2 [P] (x and y shared)."""
  solve = functools.partial(_minimize, num_classes=num_classes, max_iter=max_iter, tol=tol)
  return jax.vmap(solve, in_axes=(None, None, 0, 0))(x, y, w, l2)


def _solve(features: np.ndarray, labels: np.ndarray, row_weights: np.ndarray,
           l2s: np.ndarray, num_classes: int, max_iter: int, tol: float):
  """Runs `_minimize_many` on host arrays; warns about problems that did not converge."""
  out = _minimize_many(jnp.asarray(features), jnp.asarray(labels), jnp.asarray(row_weights),
                       jnp.asarray(l2s, jnp.float32), jnp.float32(tol),
                       num_classes=num_classes, max_iter=max_iter)
  mean, scale, weights, bias, grad_norm, _ = (np.asarray(a) for a in out)
  if np.any(~(grad_norm <= tol)):
    bad = np.flatnonzero(~(grad_norm <= tol))
    logging.warning("Logistic regression: %d of %d fits stopped after %d iterations with "
                    "gradient norm up to %.3g > tol %.3g (l2 = %s); increase max_iter.",
                    len(bad), len(l2s), max_iter, float(np.nanmax(grad_norm[bad])), tol,
                    sorted(set(np.asarray(l2s)[bad].tolist())))
  return mean, scale, weights, bias


def _check_inputs(features, labels, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  x = _as_features(features)
  y = np.asarray(labels)
  if y.shape != (x.shape[0],):
    raise ValueError(f"labels must have shape ({x.shape[0]},) to match features {x.shape}, "
                     f"got {y.shape}.")
  if x.shape[0] == 0:
    raise ValueError("No training examples.")
  if num_classes < 2:
    raise ValueError(f"num_classes must be >= 2, got {num_classes}.")
  if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= num_classes:
    raise ValueError(f"labels must be integers in [0, {num_classes}), got values in "
                     f"[{y.min()}, {y.max()}] of dtype {y.dtype}.")
  if not np.all(np.isfinite(x)):
    raise ValueError("features contain NaN or inf.")
  return x, y.astype(np.int32)


def _as_features(features, dim: int | None = None) -> np.ndarray:
  x = np.asarray(features, dtype=np.float32)
  if x.ndim != 2 or (dim is not None and x.shape[1] != dim):
    want = f"[N, {dim}]" if dim is not None else "[N, F]"
    raise ValueError(f"features must have shape {want}, got {x.shape}.")
  return x


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray, num_classes: int,
                            l2: float, max_iter: int = DEFAULT_MAX_ITER,
                            tol: float = DEFAULT_TOL) -> LinearProbe:
  """Fits the L2-penalised multinomial logistic regression of the module docstring.

  Args:
    features: float [N, F] training features (standardised here with their own mean/std).
    labels: int [N] classes in [0, num_classes).
    num_classes: K >= 2 (binary problems use K = 2 softmax outputs).
    l2: the penalty l2 > 0 on ||W||^2 / 2 (per example: the NLL term is a mean).
    max_iter: L-BFGS iteration limit (a warning is logged when it is reached).
    tol: stop when the Euclidean norm of grad J over (W, b) is at most this.

  Returns:
    The fitted probe.
  """
  x, y = _check_inputs(features, labels, num_classes)
  if not l2 > 0:
    raise ValueError(f"l2 must be > 0, got {l2}.")
  mean, scale, weights, bias = _solve(x, y, np.ones((1, len(y)), np.float32),
                                      np.array([l2], np.float32), num_classes, max_iter, tol)
  return LinearProbe(mean=mean[0], scale=scale[0], weights=weights[0], bias=bias[0])


# ---------------------------------------------------------------------------------------------
# Choosing the penalty.
# ---------------------------------------------------------------------------------------------


def fold_assignment(n: int, folds: int, seed: int) -> np.ndarray:
  """int64 [n] fold id of every example: a seeded permutation dealt round-robin into
  `min(folds, n)` folds, so fold sizes differ by at most one and none is empty."""
  k = min(folds, n)
  fold = np.empty(n, dtype=np.int64)
  fold[np.random.default_rng(seed).permutation(n)] = np.arange(n) % k
  return fold


def cross_validation_scores(features: np.ndarray, labels: np.ndarray, num_classes: int,
                            grid: Sequence[float] = DEFAULT_L2_GRID, folds: int = 5,
                            seed: int = 0, max_iter: int = DEFAULT_MAX_ITER,
                            tol: float = DEFAULT_TOL) -> tuple[np.ndarray, np.ndarray]:
  """Pooled k-fold held-out accuracy and mean NLL of every penalty in `grid`.

  Every example is held out exactly once; for each l2 the held-out predictions of the k fits
  are pooled: accuracy = (1/N) sum_i [argmax_k p_{-f(i)}(k|x_i) = y_i] and NLL = -(1/N) sum_i
  log p_{-f(i)}(y_i|x_i), where p_{-f} is fitted without fold f (its own standardisation).

  Returns:
    (accuracy [G], nll [G]) in the order of `grid`.
  """
  x, y = _check_inputs(features, labels, num_classes)
  grid = np.asarray(grid, dtype=np.float32)
  n = len(y)
  if n < 2:
    raise ValueError(f"Cross-validation needs at least 2 examples, got {n}.")
  if folds < 2:
    raise ValueError(f"folds must be >= 2, got {folds}.")
  if grid.ndim != 1 or grid.size == 0 or not np.all(grid > 0):
    raise ValueError(f"grid must be a non-empty sequence of penalties > 0, got {grid}.")
  fold = fold_assignment(n, folds, seed)
  k = int(fold.max()) + 1
  held_out = fold[None, :] == np.arange(k)[:, None]  # [k, N]
  train = np.repeat((~held_out).astype(np.float32), len(grid), axis=0)  # [k*G, N]
  l2s = np.tile(grid, k)  # [k*G]
  mean, scale, weights, bias = _solve(x, y, train, l2s, num_classes, max_iter, tol)
  scaled = weights / scale[:, :, None]  # [k*G, F, K]; x~ W = x (W / sigma) - (mu / sigma) W
  logits = np.einsum("nf,pfk->pnk", x, scaled)
  logits += (bias - np.einsum("pf,pfk->pk", mean, scaled))[:, None]
  log_p = logits - _logsumexp(logits)
  correct = (np.argmax(logits, -1) == y).astype(np.float64)  # [k*G, N]
  nll = -np.take_along_axis(log_p, np.broadcast_to(y[None, :, None], (len(l2s), n, 1)),
                            -1)[..., 0].astype(np.float64)
  mask = np.repeat(held_out, len(grid), axis=0)
  pooled = lambda v: (v * mask).reshape(k, len(grid), n).sum(axis=(0, 2)) / n
  return pooled(correct), pooled(nll)


def _logsumexp(a: np.ndarray) -> np.ndarray:
  m = np.max(a, axis=-1, keepdims=True)
  return m + np.log(np.sum(np.exp(a - m), axis=-1, keepdims=True))


def select_l2(features: np.ndarray, labels: np.ndarray, num_classes: int,
              grid: Sequence[float] = DEFAULT_L2_GRID, folds: int = 5, seed: int = 0,
              max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL) -> float:
  """The penalty of `grid` with the best k-fold cross-validated accuracy on the given set.

  Folds: `fold_assignment(N, folds, seed)` (deterministic; `min(folds, N)` folds, so leave-one-
  out for N <= folds). Criterion: highest pooled held-out accuracy; ties are broken by the lower
  pooled held-out NLL, then by the larger penalty (the simpler model).

  Args:
    features: float [N, F], the labelled training set only.
    labels: int [N].
    num_classes: K >= 2.
    grid: candidate penalties (> 0).
    folds: number of folds k >= 2 (reduced to N for N < k).
    seed: seed of the shuffle that deals the examples into folds.
    max_iter, tol: as for `fit_logistic_regression`.

  Returns:
    An element of `grid`.
  """
  if len(grid) == 1:
    return float(grid[0])
  accuracy, nll = cross_validation_scores(features, labels, num_classes, grid, folds, seed,
                                          max_iter, tol)
  l2s = np.asarray(grid, dtype=np.float64)
  # np.lexsort sorts by the last key first: accuracy (descending), then NLL, then -l2.
  best = np.lexsort((-l2s, np.round(nll, 6), -np.round(accuracy, 9)))[0]
  return float(grid[best])


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray,
                   test_y: np.ndarray, num_classes: int, l2: float | None = None, *,
                   grid: Sequence[float] = DEFAULT_L2_GRID, folds: int = 5, seed: int = 0,
                   max_iter: int = DEFAULT_MAX_ITER, tol: float = DEFAULT_TOL) -> dict:
  """Test accuracy of a linear probe fitted on (train_x, train_y).

  Args:
    train_x, train_y: float [N, F] features and int [N] labels of the labelled training set.
    test_x, test_y: float [M, F] and int [M], used only for the final score.
    num_classes: K >= 2.
    l2: the penalty; None chooses it with `select_l2` on the training set.
    grid, folds, seed, max_iter, tol: as for `select_l2`.

  Returns:
    {'accuracy': float, 'l2': float, 'n_train': N, 'n_test': M}.
  """
  if l2 is None:
    l2 = select_l2(train_x, train_y, num_classes, grid, folds, seed, max_iter, tol)
  probe = fit_logistic_regression(train_x, train_y, num_classes, l2, max_iter, tol)
  return {"accuracy": probe.accuracy(test_x, test_y), "l2": float(l2),
          "n_train": int(len(train_y)), "n_test": int(len(test_y))}


# ---------------------------------------------------------------------------------------------
# Data helpers.
# ---------------------------------------------------------------------------------------------

E = TypeVar("E")


def remove_overlap(examples: Iterable[E], held_out: Iterable) -> tuple[list[E], int]:
  """Drops every example whose token tuple occurs among the held-out examples.

  Args:
    examples: objects with a `.tokens` tuple (e.g. `readers.Example`), in order.
    held_out: examples (with `.tokens`) that must not be trained on, e.g. the test split.

  Returns:
    (the kept examples in their order, the number removed). Duplicates within `examples` are
    kept or removed together.
  """
  seen = {tuple(ex.tokens) for ex in held_out}
  kept, removed = [], 0
  for ex in examples:
    if tuple(ex.tokens) in seen:
      removed += 1
    else:
      kept.append(ex)
  return kept, removed


def label_sets(corpus: str, examples: Sequence) -> dict[str, np.ndarray]:
  """int32 [N] targets of `examples` (`readers.Example`s) by name: each of the embedded
  corpus's four factors (`synthetic.FACTOR_NAMES`, from `Example.factors`) for 'synthetic',
  else {'label': `Example.label`} (every example must have one)."""
  if corpus == "synthetic":
    factors = np.array([ex.factors for ex in examples], dtype=np.int32).reshape(
        len(examples), len(synthetic.FACTOR_NAMES))
    return {name: factors[:, i] for i, name in enumerate(synthetic.FACTOR_NAMES)}
  return {"label": np.array([ex.label for ex in examples], dtype=np.int32)}


def feature_matrix(data: encoding.EncodedCorpus | pipeline.BatchSource,
                   feature_fn: Callable[..., np.ndarray], batch_size: int,
                   pad_multiple: int = 8, keys: tuple[str, ...] = ("tokens",)) -> np.ndarray:
  """float32 [N, F] features of every example of `data`, row i = example i.

  Runs `feature_fn(*batch[keys], batch_index) -> [B, F]` (by default `feature_fn(tokens
  [B, T] int32, batch_index)`) on the `pipeline.EvalIterator` batches (single process) and
  places each real row (weight > 0) at its example index, read from the iterator's `order`,
  so the rows align with the data's labels whatever the batch order.
  """
  batches = pipeline.EvalIterator(data, batch_size, sort_by_length=False,
                                  pad_multiple=pad_multiple)
  order = batches.order.reshape(len(batches), batch_size)
  out = None
  for i, (batch, rows) in enumerate(zip(batches, order)):
    real = batch["weights"] > 0
    if not np.array_equal(real, rows >= 0):
      raise AssertionError("EvalIterator padding rows do not match its order.")
    feats = np.asarray(feature_fn(*(batch[k] for k in keys), i), dtype=np.float32)
    if feats.ndim != 2 or feats.shape[0] != batch_size:
      raise ValueError(f"feature_fn must return [{batch_size}, F], got {feats.shape}.")
    if out is None:
      out = np.full((len(data), feats.shape[1]), np.nan, dtype=np.float32)
    out[rows[real]] = feats[real]
  return out
