"""Aggressive inference-network training (He et al. 2019) in the loop: one-group updates
against an independent optimiser per group, the stopping rule, and exact resume."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import toy_task
from vae_jax import training
from vae_jax.training import aggressive, optim, steps, writers

TASK = toy_task.make_task()


def labels(params):
  """The toy model's embedding plays the encoder, the rest the decoder."""
  return {k: jax.tree.map(lambda _, g="encoder" if k == "Embed_0" else "decoder": g, v)
          for k, v in params.items()}


OPT = optim.OptimizerConfig(learning_rate=0.05, grad_clip_norm=1.0, param_labels=labels)


def test_group_steps_match_separate_optimisers():
  batch = toy_task.global_batch(0, 0, 8)
  state = steps.init_train_state(TASK, OPT, batch, 0, training.make_mesh())
  tx = optim.make_optimizer(OPT)
  enc_state, _ = jax.jit(lambda s, b: steps.group_step(
      s, b, jnp.asarray(0), task=TASK, tx=tx, labels_fn=labels, group="encoder"))(state, batch)
  # Independent computation: clip the full gradient, then Adam on the embedding alone.
  rng = jax.random.fold_in(jax.random.fold_in(state.rng, 0), 1)
  grads = jax.grad(lambda p: TASK.loss_fn(p, state.model_state, batch, rng, 0)[0])(state.params)
  norm = optax.tree.norm(grads)
  grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, 1.0 / norm), grads)
  adam = optax.adam(0.05)
  upd, _ = adam.update(grads["Embed_0"], adam.init(state.params["Embed_0"]))
  expected = optax.apply_updates(state.params["Embed_0"], upd)
  np.testing.assert_allclose(enc_state.params["Embed_0"]["embedding"],
                             expected["embedding"], rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(enc_state.params["Dense_0"]["kernel"],
                                state.params["Dense_0"]["kernel"])
  assert int(enc_state.step) == 0
  # The decoder step that follows starts its own Adam (count 1) and leaves the encoder.
  dec_state, _ = jax.jit(lambda s, b: steps.group_step(
      s, b, task=TASK, tx=tx, labels_fn=labels, group="decoder"))(enc_state, batch)
  assert int(dec_state.step) == 1
  np.testing.assert_array_equal(dec_state.params["Embed_0"]["embedding"],
                                enc_state.params["Embed_0"]["embedding"])
  groups = dec_state.opt_state.inner_state[1].inner_states
  counts = {g: int(jax.tree.leaves(groups[g].inner_state)[0]) for g in ("encoder", "decoder")}
  assert counts == {"encoder": 1, "decoder": 1}


def _config(**kwargs):
  defaults = dict(num_steps=12, log_every=2, eval_every=4, checkpoint_every=4,
                  progress_bar=False, optimizer=OPT,
                  aggressive=aggressive.AggressiveConfig(max_inner_steps=6, check_every=2,
                                                   stop_metric="rec"))
  defaults.update(kwargs)
  return training.TrainConfig(**defaults)


def _run(workdir, config, fail_after=None):
  return training.train_and_evaluate(
      TASK, toy_task.ToyIterator(fail_after=fail_after), {"valid": toy_task.make_eval_data()},
      config, str(workdir), "v", encoder_iter=toy_task.ToyIterator(seed=7))


def test_aggressive_phase_ends_when_the_metric_falls_and_resume_is_exact(tmp_path):
  _run(tmp_path / "straight", _config())
  train = [r["metrics"] for r in writers.read_metrics(tmp_path / "straight")
           if r["split"] == "train"]
  valid = [r["metrics"]["rec"] for r in writers.read_metrics(tmp_path / "straight")
           if r["split"] == "valid"]
  flags = [m["aggressive"] for m in train]
  # The phase ends at the first evaluation whose 'rec' is below the previous one.
  end = next(i for i in range(1, len(valid)) if valid[i] < valid[i - 1])
  ended_at = 4 * (end + 1)
  assert flags == [1.0 if 2 * (i + 1) <= ended_at else 0.0 for i in range(len(flags))]
  for m in train:
    assert (m["inner_steps"] >= 1) == bool(m["aggressive"])
    assert m["inner_steps"] <= 6
  with pytest.raises(RuntimeError, match="killed"):
    _run(tmp_path / "resumed", _config(), fail_after=6)
  _run(tmp_path / "resumed", _config())
  a, _ = training.restore_latest(str(tmp_path / "straight"))
  b, _ = training.restore_latest(str(tmp_path / "resumed"))
  for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_aggressive_needs_groups_and_an_encoder_iterator(tmp_path):
  with pytest.raises(ValueError, match="param_labels"):
    _config(optimizer=optim.OptimizerConfig())
  with pytest.raises(ValueError, match="encoder_iter"):
    training.train_and_evaluate(TASK, toy_task.ToyIterator(),
                                {"valid": toy_task.make_eval_data()}, _config(),
                                str(tmp_path), "v")


def test_controller_ends_the_mode_when_the_metric_first_fails_to_rise():
  cfg = aggressive.AggressiveConfig(stop_metric="mi")
  state = aggressive.init()
  seen = []
  for mi in (0.5, 0.7, 0.6, 0.9):
    state = aggressive.update(state, {"mi": mi, "nll": 3.0}, cfg)
    seen.append((state.active, state.previous))
  # He et al.: from a previous MI of 0, on while it rises; the first fall ends it for good
  # (the value that fell is the last one kept).
  assert seen == [(True, 0.5), (True, 0.7), (False, 0.6), (False, 0.6)]
  # A tie ends it too: an MI at its estimator's cap cannot climb.
  state = aggressive.init()
  for mi in (4.1, 4.15, 4.15):
    state = aggressive.update(state, {"mi": mi}, cfg)
  assert state == aggressive.AggressiveState(active=False, previous=4.15)
  with pytest.raises(KeyError, match="stop_metric='mi'"):
    aggressive.update(aggressive.init(), {"nll": 3.0}, cfg)


def test_controller_state_round_trips_through_the_checkpoint_layout():
  # The data state checkpoints hold (the layout written before the controller existed too).
  saved = {"train": {"seed": 0, "position": 6}, "encoder": {"seed": 7, "position": 19},
           "aggressive": {"active": False, "previous": 1.25}}
  train, encoder, state = aggressive.restore_position(saved)
  assert (train, encoder) == (saved["train"], saved["encoder"])
  assert (state.active, state.previous) == (False, 1.25)
  assert aggressive.position(train, encoder, state) == saved
