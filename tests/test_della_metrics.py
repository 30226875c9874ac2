"""The official DELLA code's KL schedule and active units (Hu et al. 2022; OpenVLG/DELLA),
checked against hand-computed values and against plain-Python transcriptions of the official
`train.py` (`train`) and `train_utils.py` (`calc_au`). The official IW-NLL, and AU on the
posterior means of a tiny DELLA, are checked against the numpy reference in
tests/models/test_della.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiment_configs import load_config
from vae_jax import configs, della_metrics, errors, run_config, schedules

BETA_0 = 1e-5  # the official beta_0


# -- the schedule --------------------------------------------------------------------------------


def official_betas(one_epoch_step, cycle_iters, epochs):
  """The beta each optimiser step of the official `train()` trains with
  (`--cycle_annealing --cycle_iters cycle_iters`, gradient_accumulation_steps = 1),
  transcribed from OpenVLG/DELLA train.py: beta is updated after the step, from its epoch."""
  beta = beta_0 = BETA_0
  beta_zero = beta_increase = cycle_iters // 2
  used = []
  for epoch in range(epochs):
    for _ in range(one_epoch_step):
      used.append(beta)  # loss = ce_loss + beta * kl_loss, then the optimiser step
      one_period = epoch % cycle_iters
      if one_period < beta_zero:
        beta = beta_0
      else:
        beta = min(1.0, beta + (1 - beta_0) / (beta_increase * one_epoch_step / 2))
  return np.array(used)


def values(schedule, n):
  return np.asarray(jax.jit(jax.vmap(schedule))(jnp.arange(n)), np.float64)


def test_della_cyclical_at_the_cycle_boundaries():
  # 10 steps per epoch, cycles of 2 epochs: beta_0 through epoch 0 (steps 0..10: step 0 is the
  # initial value, steps 1..10 follow epoch-0 steps), then + (1 - beta_0) / 5 per step from
  # step 11 (the first update in epoch 1), 1 from step 15 to step 20, which is the first step
  # of epoch 2 and still uses the value left by epoch 1's last step; beta_0 again from step 21.
  schedule = schedules.della_cyclical(10, 2)
  ramp = lambda j: BETA_0 + (1 - BETA_0) * j / 5
  for step, want in [(0, BETA_0), (1, BETA_0), (10, BETA_0), (11, ramp(1)), (12, ramp(2)),
                     (14, ramp(4)), (15, 1.0), (19, 1.0), (20, 1.0), (21, BETA_0),
                     (30, BETA_0), (31, ramp(1)), (35, 1.0), (40, 1.0), (41, BETA_0)]:
    np.testing.assert_allclose(schedule(step), want, rtol=1e-6, atol=0, err_msg=str(step))
  np.testing.assert_allclose(ramp(1), 0.200008)
  # Cycles of 3 epochs of 4 steps: h = 1 epoch at beta_0, a ramp of h * 4 / 2 = 2 steps, then 1
  # for the rest of the cycle (the last 1 at step 12, the first step of epoch 3).
  schedule = schedules.della_cyclical(4, 3)
  for step, want in [(4, BETA_0), (5, BETA_0 + (1 - BETA_0) / 2), (6, 1.0), (12, 1.0),
                     (13, BETA_0), (16, BETA_0), (17, BETA_0 + (1 - BETA_0) / 2)]:
    np.testing.assert_allclose(schedule(step), want, rtol=1e-6, atol=0, err_msg=str(step))
  # Other end points: the ramp is linear between them.
  schedule = schedules.della_cyclical(8, 4, start=0.0, end=0.5)  # ramp of 8 steps from step 17
  for step, want in [(16, 0.0), (17, 0.5 / 8), (20, 0.5 * 4 / 8), (24, 0.5), (33, 0.0)]:
    np.testing.assert_allclose(schedule(step), want, atol=1e-7, err_msg=str(step))


@pytest.mark.parametrize("one_epoch_step, cycle_iters", [(10, 2), (7, 2), (5, 4), (6, 3),
                                                          (9, 5)])
def test_della_cyclical_matches_the_official_training_loop(one_epoch_step, cycle_iters):
  epochs = 3 * cycle_iters + 1
  want = official_betas(one_epoch_step, cycle_iters, epochs)
  got = values(schedules.della_cyclical(one_epoch_step, cycle_iters), len(want))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  # The shape: half of each cycle (rounded down) at beta_0, a ramp, then 1.
  assert np.isclose(got, BETA_0).sum() >= (cycle_iters // 2) * one_epoch_step * 3
  assert np.isclose(got, 1.0).sum() > 0


def test_della_cyclical_from_the_config():
  """The `official_schedule` variant of experiments/configs/della.py selects the schedule by
  name, with the official constants, from the run's steps per epoch."""
  cfg = load_config("della", "smoke,official_schedule")
  assert (cfg.kl.schedule, cfg.kl.cycle_epochs, cfg.kl.start, cfg.kl.value) == (
      "della_cyclical", 2, BETA_0, 1.0)
  want = official_betas(6, 2, 6)
  schedule = configs.read(cfg).kl.schedule
  got = values(run_config.kl_schedule(schedule, total_steps=1000, steps_per_epoch=6), len(want))
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert load_config("della", "smoke").kl.schedule == "cyclical"  # the default is unchanged


def test_della_cyclical_argument_checks():
  for kwargs in (dict(steps_per_epoch=0), dict(steps_per_epoch=10, cycle_epochs=1)):
    with pytest.raises(ValueError):
      schedules.della_cyclical(**kwargs)
  with pytest.raises(ValueError, match="della_cyclical"):
    schedules.from_name("della_cycle", total_steps=10)
  cfg = load_config("della", "smoke,official_schedule")
  with cfg.unlocked():
    cfg.kl.cycle_epochs = 1
  with pytest.raises(errors.ConfigError, match=r"--config\.kl\.cycle_epochs=1"):
    configs.check_config(cfg)


# -- active units --------------------------------------------------------------------------------


def official_au(first_pass_batches, second_pass_batches, delta=0.2):
  """OpenVLG/DELLA train_utils.py `calc_au`, transcribed with numpy for torch: stage 1 sums the
  posterior means of every batch of one pass, stage 2 the squared deviations from their mean
  of the means of another pass."""
  cnt = 0
  for mean in first_pass_batches:
    if cnt == 0:
      means_sum = mean.sum(axis=0, keepdims=True)
    else:
      means_sum = means_sum + mean.sum(axis=0, keepdims=True)
    cnt += mean.shape[0]
  mean_mean = means_sum / cnt
  cnt = 0
  for mean in second_pass_batches:
    if cnt == 0:
      var_sum = ((mean - mean_mean) ** 2).sum(axis=0)
    else:
      var_sum = var_sum + ((mean - mean_mean) ** 2).sum(axis=0)
    cnt += mean.shape[0]
  au_var = var_sum / (cnt - 1)
  au = (au_var >= delta).sum().item()
  au_prop = au / mean.shape[-1]
  return au_prop


def test_paper_active_units_hand_example():
  """Three sentences, three dimensions, each deciding one detail of `calc_au` (threshold 0.2):
  dim 0: both passes (0, 0.5, 1): Σ dev² = 0.5, / (N − 1) = 0.25 >= 0.2 (the population
    variance 1/6 would not count);
  dim 1: pass 1 (0, 0, 0), pass 2 (0.3, 0.3, 0.3): deviations from pass 1's mean,
    3 · 0.09 / 2 = 0.135 < 0.2, and with threshold 0.135 exactly it counts (>=);
  dim 2: pass 1 (0, 0, 0), pass 2 (1, 1, 1): 3 / 2 = 1.5 (pass 2's own variance is 0).
  The proportion is over all dimensions: 2/3."""
  first = np.array([[0.0, 0.0, 0.0], [0.5, 0.0, 0.0], [1.0, 0.0, 0.0]])
  second = np.array([[0.0, 0.3, 1.0], [0.5, 0.3, 1.0], [1.0, 0.3, 1.0]])
  out = della_metrics.paper_active_units(first, second)
  assert (out["au_paper"], out["au_paper_count"], out["au_paper_threshold"]) == (2 / 3, 2, 0.2)
  assert della_metrics.PAPER_AU_THRESHOLD == 0.2
  exact = ((second[:, 1] - 0.0) ** 2).sum() / 2
  assert della_metrics.paper_active_units(first, second, exact)["au_paper_count"] == 3
  assert della_metrics.paper_active_units(first, second, 0.26)["au_paper_count"] == 1
  assert official_au([first], [second]) == 2 / 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_paper_active_units_against_the_official_code(seed):
  """Fixed sampled chains: two passes of posterior means over 4 layers of d = 8 (32 units)
  for 50 sentences in batches of 16, 16, 16, 2, spread so that the counts are neither 0 nor
  all."""
  rng = np.random.default_rng(seed)
  scale = np.exp(rng.uniform(-3, 1, size=32))         # per-unit spread of the means
  centre = rng.normal(size=32)
  first, second = (centre + scale * rng.normal(size=(50, 32)) for _ in range(2))
  split = lambda a: np.split(a, [16, 32, 48])
  out = della_metrics.paper_active_units(first, second)
  assert 0 < out["au_paper_count"] < 32
  assert out["au_paper"] == pytest.approx(official_au(split(first), split(second)), abs=1e-12)
  assert out["au_paper"] == out["au_paper_count"] / 32
  for threshold in (0.01, 1.0):
    assert della_metrics.paper_active_units(first, second, threshold)["au_paper"] == (
        pytest.approx(official_au(split(first), split(second), threshold), abs=1e-12))


def test_paper_active_units_argument_checks():
  with pytest.raises(ValueError, match="at least 2"):
    della_metrics.paper_active_units(np.zeros((1, 4)), np.zeros((1, 4)))
  with pytest.raises(ValueError, match="two"):
    della_metrics.paper_active_units(np.zeros((3, 4)), np.zeros((3, 5)))
