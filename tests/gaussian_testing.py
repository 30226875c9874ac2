"""Helpers shared by the tests of the hole metrics (test_holes.py, test_marginal_holes.py)."""

import jax.numpy as jnp
import numpy as np


def analytic_kl_prior_to_gaussian(m, s):
  """KL(N(0, 1) || N(m, s^2)) per dimension, numpy float64."""
  m, s = np.asarray(m, np.float64), np.asarray(s, np.float64)
  return np.log(s) + (1.0 + m ** 2) / (2.0 * s ** 2) - 0.5


def f32(a):
  """`a` as a float32 JAX array."""
  return jnp.asarray(a, jnp.float32)
