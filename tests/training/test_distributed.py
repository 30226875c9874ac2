"""distributed.initialize: when it acts and the errors it gives (the real run: test_multihost)."""

import jax
import pytest

from vae_jax.training import distributed


def test_single_process_does_nothing():
  assert distributed.initialize() is False
  assert distributed.initialize('localhost:1234', 1, 0) is False


def test_partial_arguments_are_a_clear_error():
  with pytest.raises(ValueError, match='all of coordinator_address'):
    distributed.initialize('localhost:1234', num_processes=2)
  with pytest.raises(ValueError, match=r'process_id=2 must be in \[0, num_processes=2\)'):
    distributed.initialize('localhost:1234', 2, 2)


def test_initialize_after_jax_use_is_a_clear_error():
  jax.devices()  # Backends are now initialised.
  with pytest.raises(RuntimeError, match='before any other JAX'):
    distributed.initialize('localhost:1234', 2, 0)
