"""The training loop is ready for accelerators: the step loop never waits for the devices,
batches are placed ahead of their step, and every jitted step donates the state it replaces.

The step loop runs under `jax.transfer_guard('disallow')` with device -> host transfers
disallowed even when explicit; the loop allows transfers only where it means them (setup,
logging, evaluation, checkpoints, the aggressive controller's convergence check). On a GPU
JAX's guard checks every transfer. On CPU it never checks device -> host reads (a CPU array is
read in place, jax-ml/jax#16602), so `_cpu_device_to_host_guard` applies the same rule to the
reads Python makes of a `jax.Array` (float, int, bool, formatting, jax.device_get, ...); only
`np.asarray` of a single-device CPU array escapes it (NumPy reads the buffer directly), and the
real guard catches that on a GPU (benchmarks/accelerator.sh runs this file there).
"""

import contextlib
import warnings

import jax
from jax._src import array as jax_array
from jax._src import config as jax_config
from jax._src.lib import guard_lib
import numpy as np
import pytest

import toy_task
from vae_jax import training
from vae_jax.training import checkpoint as checkpoint_lib
from vae_jax.training import aggressive as aggressive_lib
from vae_jax.training import loop, optim, steps
from vae_jax.training import mesh as mesh_lib

TASK = toy_task.make_task()
OPT = training.OptimizerConfig(learning_rate=0.05)


def labels(params):
  """The toy model's embedding plays the encoder, the rest the decoder."""
  return {k: jax.tree.map(lambda _, g="encoder" if k == "Embed_0" else "decoder": g, v)
          for k, v in params.items()}


GROUP_OPT = optim.OptimizerConfig(learning_rate=0.05, grad_clip_norm=1.0, param_labels=labels)


class HostRead(RuntimeError):
  """A device value was read on the host where transfers are disallowed."""


@contextlib.contextmanager
def _cpu_device_to_host_guard():
  """JAX's device -> host transfer guard, applied to `jax.Array` reads on CPU too."""
  read = jax_array.ArrayImpl._value

  def guarded(self):
    level = jax_config.transfer_guard_device_to_host.value
    explicit = guard_lib.thread_local_state().explicit_device_get
    if level == "disallow_explicit" or (level == "disallow" and not explicit):
      raise HostRead(f"Disallowed device-to-host transfer of {self.dtype}{list(self.shape)} "
                     f"({'explicit' if explicit else 'implicit'})")
    return read.fget(self)

  jax_array.ArrayImpl._value = property(guarded)
  try:
    yield
  finally:
    jax_array.ArrayImpl._value = read


@contextlib.contextmanager
def _no_transfers():
  """No implicit transfer in any direction, no device -> host transfer at all."""
  with _cpu_device_to_host_guard(), jax.transfer_guard("disallow"), \
      jax.transfer_guard_device_to_host("disallow_explicit"):
    yield


def _config(**kwargs):
  # Steps 1, 2, 4 and 5 are neither logging, evaluation nor checkpoint steps.
  defaults = dict(num_steps=6, log_every=3, eval_every=3, checkpoint_every=6,
                  progress_bar=False, optimizer=OPT)
  defaults.update(kwargs)
  return training.TrainConfig(**defaults)


def _run(workdir, config, **kwargs):
  return training.train_and_evaluate(
      TASK, toy_task.ToyIterator(), {"valid": toy_task.make_eval_data()}, config,
      str(workdir), "v", **kwargs)


def test_the_guard_catches_a_host_read_on_cpu():
  x = jax.jit(lambda a: a + 1)(np.float32(1.0))
  with _no_transfers():
    with pytest.raises(HostRead):
      float(x)
    with pytest.raises(HostRead):
      jax.device_get(x)
    with jax.transfer_guard("allow"):
      assert float(x) == 2.0


def test_step_loop_makes_no_transfer_and_waits_for_nothing(tmp_path, monkeypatch):
  with warnings.catch_warnings(record=True) as caught, _no_transfers():
    warnings.simplefilter("always")
    result = _run(tmp_path / "plain", _config())
    # Aggressive training: encoder steps between convergence checks make no transfer either.
    aggressive = _config(optimizer=GROUP_OPT, aggressive=aggressive_lib.AggressiveConfig(
        max_inner_steps=4, check_every=2, stop_metric="rec"))
    _run(tmp_path / "aggressive", aggressive, encoder_iter=toy_task.ToyIterator(seed=7))
  assert result["step"] == 6 and np.isfinite(result["train"]["loss"])
  assert not [w for w in caught if "donated" in str(w.message)]

  # The check has teeth: a step loop that reads the loss after every step fails it.
  make_train_step = steps.make_train_step

  def reading_step(*args):
    step = make_train_step(*args)

    def run(state, batch):
      state, out = step(state, batch)
      float(out["loss"])
      return state, out

    return run

  monkeypatch.setattr(steps, "make_train_step", reading_step)
  with _no_transfers(), pytest.raises(HostRead, match="float32"):
    _run(tmp_path / "reads", _config())


def test_prefetcher_reads_ahead_defers_errors_and_rewinds():
  mesh = training.make_mesh()
  it = toy_task.ToyIterator(fail_after=3)
  batches = mesh_lib.Prefetcher(it, mesh, depth=2)
  assert it.position == 2 and batches.position()["position"] == 0
  first = next(batches)
  assert isinstance(first["tokens"], jax.Array)
  np.testing.assert_array_equal(np.asarray(first["tokens"]),
                                toy_task.global_batch(0, 0, 8)["tokens"])
  assert it.position == 2 and batches.position()["position"] == 1
  next(batches)  # reads batch 2 ahead
  assert it.position == 3 and batches.position()["position"] == 2
  next(batches)  # reading batch 3 ahead failed: the error waits for its turn
  assert batches.position()["position"] == 3
  with pytest.raises(RuntimeError, match="killed after 3"):
    next(batches)
  batches.rewind()
  assert it.position == 3
  # `limit`: never read past the batches the caller needs.
  it = toy_task.ToyIterator()
  batches = mesh_lib.Prefetcher(it, mesh, depth=2, limit=3)
  assert len(list(batches)) == 3 and it.position == 3


def test_prefetched_batches_are_not_checkpointed_as_consumed(tmp_path):
  """Batches read ahead are not in the saved positions: the checkpoints of steps 2 and 4 hold
  the iterator after 2 and 4 batches, and the caller's iterator is put back after 4."""
  it = toy_task.ToyIterator()
  training.train_and_evaluate(TASK, it, {"valid": toy_task.make_eval_data()},
                              _config(num_steps=4, checkpoint_every=2), str(tmp_path), "v")
  assert loop.PREFETCH_DEPTH >= 2
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), read_only=True)
  try:
    for step in (2, 4):
      _, data_state, _ = ckpt.restore_latest(step=step)
      assert data_state == {"seed": 0, "position": step}
  finally:
    ckpt.close()
  assert it.position == 4


def test_every_jitted_step_donates_the_state():
  mesh = training.make_mesh()
  batch = toy_task.global_batch(0, 0, 8)
  placed = training.to_global(batch, mesh)

  def alive(tree):
    """Paths of the leaves whose buffers were not donated."""
    return [jax.tree_util.keystr(path) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
            if not leaf.is_deleted()]

  programs = steps.programs(TASK, OPT, mesh)
  state = steps.init_train_state(TASK, OPT, batch, 0, mesh)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    new, out = programs.train_step(state, placed)
    assert not alive(state)
    acc = programs.accumulate(None, out, new.step)
    acc2 = programs.accumulate(acc, out, new.step)
    assert not alive(acc) and alive(acc2)
    configured = programs.apply_config(new)
    # The config and plateau updates overwrite the learning rate and the clipping norm without
    # reading them: jit drops unread arguments from the program, so there is nothing to donate.
    overwritten = {".opt_state.hyperparams['learning_rate']",
                   ".opt_state.hyperparams['grad_clip_norm']"}
    assert set(alive(new)) <= overwritten
    decayed = programs.apply_plateau(configured, 3.0, True)
    assert set(alive(configured)) <= overwritten and alive(decayed)

    groups = steps.programs(TASK, GROUP_OPT, mesh)
    state = steps.init_train_state(TASK, GROUP_OPT, batch, 0, mesh)
    encoded, _ = aggressive_lib.aggressive_inner_steps(
        groups.encoder_step, state, placed,
        mesh_lib.Prefetcher(toy_task.ToyIterator(seed=7), mesh),
        aggressive_lib.AggressiveConfig(max_inner_steps=2, check_every=2), mesh)
    assert not alive(state)
    decoded, _ = groups.decoder_step(encoded, placed)
    assert not alive(encoded) and alive(decoded)
  assert not [w for w in caught if "donated" in str(w.message)], [str(w.message) for w in caught]
