"""Tests of vae_jax.probe against independent computations.

Accuracies are compared with the Bayes-optimal accuracy of Gaussian class-conditionals with
identity covariance (closed form Phi(delta / 2) for two classes, a 1-D integral for three) and with
the Bayes rule's accuracy on the same test sample; the fitted parameters with a float64 numpy
gradient of the penalised objective, a float64 scipy L-BFGS-B solution and the first-order
large-penalty expansion. The data sizes are shared between tests so each solver shape is
compiled once.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import integrate, optimize, special, stats

from vae_jax import probe
from vae_jax.data import encoding
from vae_jax.data.readers import Example
from vae_jax.data.vocab import PAD, Vocab

N_TRAIN, N_TEST, DIM = 400, 20000, 3
GRID = (1e-3, 1e-1, 10.0)


def gaussian_classes(means: np.ndarray, n: int, seed: int, dim: int = DIM):
  """Equal-prior classes x | y ~ N(means[y], I), means padded with zeros to `dim` features."""
  rng = np.random.default_rng(seed)
  mu = np.zeros((len(means), dim))
  mu[:, :means.shape[1]] = means
  y = np.arange(n) % len(means)
  rng.shuffle(y)
  x = mu[y] + rng.normal(size=(n, dim))
  return x.astype(np.float32), y.astype(np.int32), mu


def bayes_rule_accuracy(x: np.ndarray, y: np.ndarray, mu: np.ndarray) -> float:
  """Accuracy of the optimal rule (nearest class mean under equal priors and covariances)."""
  d = ((x[:, None, :] - mu[None]) ** 2).sum(-1)
  return float(np.mean(np.argmin(d, -1) == y))


DELTA = 2.0  # distance between the two class means
TWO = np.array([[-DELTA / 2], [DELTA / 2]])
# Three classes at the vertices of an equilateral triangle with side DELTA3.
DELTA3 = 2.5
THREE = DELTA3 / math.sqrt(3) * np.array(
    [[math.cos(a), math.sin(a)] for a in (0.0, 2 * math.pi / 3, 4 * math.pi / 3)])


def three_class_bayes_accuracy() -> float:
  """P(nearest mean = true class) for the triangle classes.

  The Bayes region of class 0 is the 120-degree wedge {u > 0, |v| < sqrt(3) u} around the
  direction of its mean, in coordinates (u, v) centred at the centroid; with u = r + e1, v = e2,
  r = DELTA3 / sqrt(3) and e ~ N(0, I), the accuracy is the 1-D integral
  int_{-r}^inf phi(e1) (2 Phi(sqrt(3) (r + e1)) - 1) de1.
  """
  r = DELTA3 / math.sqrt(3)
  value, _ = integrate.quad(
      lambda e: stats.norm.pdf(e) * (2 * stats.norm.cdf(math.sqrt(3) * (r + e)) - 1), -r,
      np.inf, epsabs=1e-12)
  return value


# ---------------------------------------------------------------------------------------------
# Independent float64 references.
# ---------------------------------------------------------------------------------------------


def np_standardize(x: np.ndarray) -> np.ndarray:
  x = x.astype(np.float64)
  return (x - x.mean(0)) / x.std(0)


def np_objective_and_grad(w: np.ndarray, b: np.ndarray, xs: np.ndarray, y: np.ndarray,
                          l2: float):
  """J(W, b) = mean_i [lse(z_i) - z_{i,y_i}] + l2/2 ||W||^2, z = xs W + b, and its gradient."""
  n, k = len(y), b.shape[0]
  z = xs @ w + b
  p = special.softmax(z, axis=-1)
  onehot = np.eye(k)[y]
  value = np.mean(special.logsumexp(z, axis=-1) - z[np.arange(n), y]) + 0.5 * l2 * np.sum(w**2)
  return value, xs.T @ (p - onehot) / n + l2 * w, (p - onehot).mean(0)


def scipy_fit(x: np.ndarray, y: np.ndarray, k: int, l2: float):
  """The same objective minimised in float64 by scipy's L-BFGS-B; bias centred to mean 0."""
  xs = np_standardize(x)
  f = xs.shape[1]

  def fun(theta):
    w, b = theta[:f * k].reshape(f, k), theta[f * k:]
    value, gw, gb = np_objective_and_grad(w, b, xs, y, l2)
    return value, np.concatenate([gw.ravel(), gb])

  res = optimize.minimize(fun, np.zeros(f * k + k), jac=True, method="L-BFGS-B",
                          options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000})
  w, b = res.x[:f * k].reshape(f, k), res.x[f * k:]
  return w, b - b.mean()


# ---------------------------------------------------------------------------------------------
# (a, f) Accuracy against the Bayes-optimal classifier, binary and 3-class.
# ---------------------------------------------------------------------------------------------


def test_binary_gaussians_reach_bayes_accuracy():
  x, y, mu = gaussian_classes(TWO, N_TRAIN, seed=0)
  tx, ty, _ = gaussian_classes(TWO, N_TEST, seed=1)
  bayes = stats.norm.cdf(DELTA / 2)  # Phi(delta / 2) = 0.841
  rule = bayes_rule_accuracy(tx, ty, mu)
  assert abs(rule - bayes) < 4 * math.sqrt(bayes * (1 - bayes) / N_TEST)
  out = probe.probe_accuracy(x, y, tx, ty, 2, grid=GRID)
  assert out["l2"] in GRID
  assert out["n_train"] == N_TRAIN and out["n_test"] == N_TEST
  # The fitted rule can only be worse than the optimal one on average; with 400 examples in 3
  # dimensions the excess error is well under a point.
  assert rule - 0.01 <= out["accuracy"] <= rule + 0.003
  assert abs(out["accuracy"] - bayes) < 0.015


def test_three_gaussians_reach_bayes_accuracy():
  x, y, mu = gaussian_classes(THREE, N_TRAIN, seed=2)
  tx, ty, _ = gaussian_classes(THREE, N_TEST, seed=3)
  bayes = three_class_bayes_accuracy()
  # Check of the integral: 1 - accuracy is the mass beyond two 120-degree boundaries at
  # distance DELTA3 / 2 from the mean, between 1 and 2 times Phi(-DELTA3 / 2).
  tail = stats.norm.cdf(-DELTA3 / 2)
  assert 1 - 2 * tail < bayes < 1 - tail
  rule = bayes_rule_accuracy(tx, ty, mu)
  assert abs(rule - bayes) < 4 * math.sqrt(bayes * (1 - bayes) / N_TEST)
  out = probe.probe_accuracy(x, y, tx, ty, 3, grid=GRID)
  assert out["l2"] in GRID
  assert rule - 0.015 <= out["accuracy"] <= rule + 0.003
  assert abs(out["accuracy"] - bayes) < 0.02


def test_separable_data_is_classified_perfectly():
  x, y, _ = gaussian_classes(TWO * 8, N_TRAIN, seed=4)  # means 16 apart: separable in practice
  p = probe.fit_logistic_regression(x, y, 2, l2=1e-3)
  assert p.accuracy(x, y) == 1.0
  assert p.predict(x).dtype == np.int32


# ---------------------------------------------------------------------------------------------
# (b) Optimality: the gradient vanishes and the solution matches a float64 solver.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("means,k", [(TWO, 2), (THREE, 3)], ids=["binary", "3-class"])
@pytest.mark.parametrize("l2", [1e-3, 0.1])
def test_solution_is_stationary_and_matches_scipy(means, k, l2):
  x, y, _ = gaussian_classes(means, N_TRAIN, seed=5)
  x = x * np.array([1.0, 3.0, 0.2], np.float32) + np.array([5.0, -2.0, 0.5], np.float32)
  p = probe.fit_logistic_regression(x, y, k, l2=l2)
  np.testing.assert_allclose(p.mean, x.astype(np.float64).mean(0), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(p.scale, x.astype(np.float64).std(0), rtol=1e-5)
  xs = np_standardize(x)
  _, gw, gb = np_objective_and_grad(p.weights.astype(np.float64), p.bias.astype(np.float64),
                                    xs, y, l2)
  assert math.hypot(np.linalg.norm(gw), np.linalg.norm(gb)) < 3e-5
  assert abs(p.bias.mean()) < 1e-5  # the bias gradient sums to 0 over classes
  w, b = scipy_fit(x, y, k, l2)
  # ||W - W*|| <= ||grad|| / l2 by strong convexity.
  tol = 3e-5 / l2 + 1e-4
  np.testing.assert_allclose(p.weights, w, atol=tol)
  np.testing.assert_allclose(p.bias, b, atol=tol)
  z = xs @ w + b
  np.testing.assert_array_equal(p.predict(x), np.argmax(z, -1))


# ---------------------------------------------------------------------------------------------
# (c) Shrinkage.
# ---------------------------------------------------------------------------------------------


def test_large_penalty_shrinks_weights_to_first_order_solution():
  x, y, _ = gaussian_classes(THREE, N_TRAIN, seed=6)
  y = np.where(np.arange(N_TRAIN) < 40, 0, y).astype(np.int32)  # unequal class frequencies
  norms = [np.linalg.norm(probe.fit_logistic_regression(x, y, 3, l2=l2).weights)
           for l2 in (1e-3, 1e-1, 10.0, 1e3)]
  assert all(a > b for a, b in zip(norms, norms[1:])), norms
  # For l2 -> inf: b -> log(pi) - mean(log(pi)) (pi: class frequencies) and
  # W -> xs^T (Y - pi) / (N l2), the stationarity condition at W = 0.
  l2 = 1e3
  p = probe.fit_logistic_regression(x, y, 3, l2=l2)
  pi = np.bincount(y, minlength=3) / len(y)
  w0 = np_standardize(x).T @ (np.eye(3)[y] - pi) / (len(y) * l2)
  assert np.linalg.norm(p.weights) < 1e-3
  np.testing.assert_allclose(p.weights, w0, rtol=0.02, atol=1e-6)
  np.testing.assert_allclose(p.bias, np.log(pi) - np.log(pi).mean(), atol=1e-3)


# ---------------------------------------------------------------------------------------------
# (d) Cross-validation.
# ---------------------------------------------------------------------------------------------


def test_select_l2_is_in_grid_and_deterministic():
  x, y, _ = gaussian_classes(TWO, N_TRAIN, seed=7)
  first = probe.select_l2(x, y, 2, grid=GRID, seed=3)
  assert first in GRID
  assert probe.select_l2(x, y, 2, grid=GRID, seed=3) == first
  assert probe.select_l2(x, y, 2, grid=(0.5,)) == 0.5


def test_cross_validation_scores_match_scipy_folds():
  x, y, _ = gaussian_classes(THREE, N_TRAIN, seed=8)
  acc, nll = probe.cross_validation_scores(x, y, 3, grid=GRID, folds=5, seed=1)
  fold = probe.fold_assignment(N_TRAIN, 5, 1)
  for g, l2 in enumerate(GRID):
    correct, loss = 0, 0.0
    for f in range(5):
      tr, va = fold != f, fold == f
      w, b = scipy_fit(x[tr], y[tr], 3, l2)
      m, s = x[tr].astype(np.float64).mean(0), x[tr].astype(np.float64).std(0)
      z = ((x[va] - m) / s) @ w + b
      correct += np.sum(np.argmax(z, -1) == y[va])
      loss -= np.sum(special.log_softmax(z, -1)[np.arange(va.sum()), y[va]])
    assert abs(acc[g] - correct / N_TRAIN) <= 2 / N_TRAIN, (l2, acc[g], correct / N_TRAIN)
    assert abs(nll[g] - loss / N_TRAIN) < 2e-3 + 1e-3 * loss / N_TRAIN


def test_fold_assignment():
  fold = probe.fold_assignment(23, 5, seed=0)
  counts = np.bincount(fold)
  assert len(counts) == 5 and counts.max() - counts.min() <= 1
  np.testing.assert_array_equal(fold, probe.fold_assignment(23, 5, seed=0))
  assert not np.array_equal(fold, probe.fold_assignment(23, 5, seed=1))
  np.testing.assert_array_equal(np.sort(probe.fold_assignment(3, 5, seed=0)), [0, 1, 2])


def test_select_l2_tiny_training_set():
  x = np.array([[-2.0, 0.1], [-1.0, 0.0], [1.0, 0.3], [2.0, -0.2]], np.float32)
  y = np.array([0, 0, 1, 1], np.int32)
  assert probe.select_l2(x, y, 2, grid=GRID, folds=5) in GRID  # leave-one-out over 4 folds
  with pytest.raises(ValueError, match="at least 2"):
    probe.select_l2(x[:1], y[:1], 2, grid=GRID)


def test_invalid_inputs():
  x = np.zeros((4, 2), np.float32)
  with pytest.raises(ValueError, match="labels"):
    probe.fit_logistic_regression(x, np.array([0, 1, 2, 0]), 2, l2=1.0)
  with pytest.raises(ValueError, match="shape"):
    probe.fit_logistic_regression(x, np.array([0, 1]), 2, l2=1.0)
  with pytest.raises(ValueError, match="l2"):
    probe.fit_logistic_regression(x, np.array([0, 1, 1, 0]), 2, l2=0.0)


# ---------------------------------------------------------------------------------------------
# (e) Overlap removal and feature alignment.
# ---------------------------------------------------------------------------------------------


def _ex(text: str, label: int = 0) -> Example:
  return Example(tokens=tuple(text.split()), label=label)


def test_remove_overlap_counts():
  train = [_ex("good food", 1), _ex("bad service"), _ex("good food", 1), _ex("ok"),
           _ex("bad  service", 1), _ex("good")]
  test = [_ex("good food", 0), _ex("bad service"), _ex("great")]
  kept, removed = probe.remove_overlap(train, test)
  assert removed == 4
  assert [ex.tokens for ex in kept] == [("ok",), ("good",)]
  kept, removed = probe.remove_overlap(train, [])
  assert removed == 0 and kept == train


def test_feature_matrix_rows_follow_the_examples():
  words = [f"w{i}" for i in range(30)]
  rng = np.random.default_rng(0)
  examples = [Example(tuple(rng.choice(words, size=rng.integers(1, 12))), label=i % 2)
              for i in range(23)]
  vocab = Vocab.build([ex.tokens for ex in examples])
  data = encoding.encode(examples, vocab)
  seen = []

  def feature_fn(tokens, index):
    seen.append(index)
    return np.stack([np.sum(tokens != PAD, -1), tokens[:, 0]], -1)

  feats = probe.feature_matrix(data, feature_fn, batch_size=8)
  assert seen == [0, 1, 2]
  np.testing.assert_array_equal(feats[:, 0], [len(ex.tokens) + 1 for ex in examples])
  np.testing.assert_array_equal(feats[:, 1], [vocab.encode(ex.tokens)[0] for ex in examples])
