"""Mesh and batch sharding on the devices of this process (8-device cases: test_sharded)."""

import jax
import numpy as np
import pytest

from vae_jax.training import mesh as mesh_lib


def test_mesh_has_a_data_axis_over_all_devices():
  mesh = mesh_lib.make_mesh()
  assert mesh.axis_names == ('data',)
  assert mesh.devices.size == jax.device_count()
  assert mesh_lib.data_sharding(mesh).spec == jax.sharding.PartitionSpec('data')
  assert mesh_lib.replicated(mesh).spec == jax.sharding.PartitionSpec()


def test_to_global_keeps_values_and_shards_on_data():
  mesh = mesh_lib.make_mesh()
  local = {'tokens': np.arange(12, dtype=np.int32).reshape(4, 3),
           'weights': np.ones(4, np.float32)}
  out = mesh_lib.to_global(local, mesh)
  assert out['tokens'].shape == (4 * jax.process_count(), 3)
  assert out['tokens'].sharding == mesh_lib.data_sharding(mesh)
  np.testing.assert_array_equal(np.asarray(out['tokens']), local['tokens'])


def test_to_global_rejects_ragged_and_scalar_entries():
  mesh = mesh_lib.make_mesh()
  with pytest.raises(ValueError, match="'weights' has 3 rows"):
    mesh_lib.to_global({'tokens': np.zeros((4, 2), np.int32),
                        'weights': np.ones(3, np.float32)}, mesh)
  with pytest.raises(ValueError, match='scalar'):
    mesh_lib.to_global({'n': np.float32(1.0)}, mesh)


def test_make_mesh_needs_devices():
  with pytest.raises(ValueError, match='at least one device'):
    mesh_lib.make_mesh([])
