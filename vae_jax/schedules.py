"""KL-weight (beta) schedules as `optax.Schedule`s: step -> beta.

Use them exactly like learning-rate schedules: `beta = schedule(state.step)` inside a loss
function. All are pure, jit-compatible functions of the (integer) step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def constant(value: float = 1.0) -> optax.Schedule:
  """beta(t) = value: the plain VAE (value = 1) or a beta-VAE (Higgins et al. 2017)."""
  return optax.constant_schedule(value)


def linear(warmup_steps: int, start: float = 0.0, end: float = 1.0) -> optax.Schedule:
  """Linear KL annealing (Bowman et al. 2016): beta rises from `start` to `end` over
  `warmup_steps` steps and stays at `end`."""
  if warmup_steps <= 0:
    return optax.constant_schedule(end)
  return optax.linear_schedule(start, end, warmup_steps)


def sigmoid(midpoint: int, steepness: float = 0.0025, end: float = 1.0) -> optax.Schedule:
  """Logistic annealing (Bowman et al. 2016): beta(t) = end / (1 + exp(-k (t - t0)))."""

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    return end * jax.nn.sigmoid(steepness * (t - midpoint))

  return schedule


def cyclical(total_steps: int, num_cycles: int = 4, ratio: float = 0.5,
             start: float = 0.0, end: float = 1.0) -> optax.Schedule:
  """Cyclical annealing (Fu et al. 2019, "Cyclical Annealing Schedule").

  Training is split into `num_cycles` cycles of length P = total_steps / num_cycles; within a
  cycle, tau = (t mod P) / P, beta rises linearly from `start` to `end` while tau <= ratio, then
  stays at `end`:  beta(t) = start + (end - start) * min(1, tau / ratio).
  Steps past `total_steps` keep beta = end.
  """
  if total_steps <= 0 or num_cycles <= 0:
    raise ValueError(
        f"cyclical schedule needs total_steps > 0 and num_cycles > 0, got "
        f"total_steps={total_steps}, num_cycles={num_cycles}")
  if not 0.0 < ratio <= 1.0:
    raise ValueError(f"cyclical schedule ratio must be in (0, 1], got {ratio}")
  period = total_steps / num_cycles

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    tau = jnp.mod(t, period) / period
    beta = start + (end - start) * jnp.minimum(1.0, tau / ratio)
    return jnp.where(t >= total_steps, end, beta)

  return schedule


def della_cyclical(steps_per_epoch: int, cycle_epochs: int = 2, start: float = 1e-5,
                   end: float = 1.0) -> optax.Schedule:
  """The epoch-based cyclical schedule of the official DELLA code (Hu et al. 2022; OpenVLG/DELLA
  `train.py`, `train()` with `--cycle_annealing --cycle_iters C`).

  With E = `steps_per_epoch`, C = `cycle_epochs` and h = C // 2 (the code's `beta_zero =
  beta_increase`), beta starts at `start` (the code's beta_0 = 1e-5) and is updated after
  every optimiser step, from the epoch e of that step:

    beta <- start                                        if e mod C < h,
    beta <- min(end, beta + (end - start) / (h E / 2))   otherwise,

  so each cycle of C epochs holds beta at `start` for h epochs, then ramps it linearly to `end`
  over h E / 2 steps (a quarter of the cycle for even C) and holds `end`. Because the update
  follows the step, step t (0-based, `state.step`) uses the value left by step t - 1:

    beta(0) = start;  for t >= 1, with p = t - 1, e = p // E, i = p mod E, phase = e mod C:
    beta(t) = start                                            if phase < h,
            = min(end, start + (end - start) j / (h E / 2)),   j = (phase - h) E + i + 1,

  j being the number of ramp steps taken so far in the cycle; in particular the first step of
  each new cycle still uses the previous cycle's last value. The code adds the increment
  step by step in floating point; this closed form differs from that sum by rounding only.
  """
  if steps_per_epoch <= 0:
    raise ValueError(f"della_cyclical needs steps_per_epoch > 0, got {steps_per_epoch}")
  if cycle_epochs < 2 or int(cycle_epochs) != cycle_epochs:
    raise ValueError(f"della_cyclical needs an integer cycle_epochs >= 2 (the official code "
                     f"divides by cycle_epochs // 2), got {cycle_epochs}")
  epoch_steps, cycle, half = int(steps_per_epoch), int(cycle_epochs), int(cycle_epochs) // 2
  ramp_steps = half * epoch_steps / 2

  def schedule(step):
    t = jnp.asarray(step, jnp.int32)
    previous = jnp.maximum(t - 1, 0)
    phase = (previous // epoch_steps) % cycle
    j = (phase - half) * epoch_steps + previous % epoch_steps + 1
    ramp = jnp.minimum(end, start + (end - start) * j.astype(jnp.float32) / ramp_steps)
    beta = jnp.where(phase < half, start, ramp)
    return jnp.where(t <= 0, start, beta).astype(jnp.float32)

  return schedule


def from_name(name: str, *, total_steps: int, warmup_steps: int = 0, value: float = 1.0,
              num_cycles: int = 4, ratio: float = 0.5, start: float = 0.0,
              steepness: float = 0.0025, steps_per_epoch: int = 0,
              cycle_epochs: int = 2) -> optax.Schedule:
  """Builds a schedule by name ('constant', 'linear', 'sigmoid', 'cyclical',
  'della_cyclical'; the last needs `steps_per_epoch`)."""
  if name == "constant":
    return constant(value)
  if name == "linear":
    return linear(warmup_steps, start=start, end=value)
  if name == "sigmoid":
    return sigmoid(warmup_steps // 2 if warmup_steps else total_steps // 4, steepness, end=value)
  if name == "cyclical":
    return cyclical(total_steps, num_cycles, ratio, start=start, end=value)
  if name == "della_cyclical":
    return della_cyclical(steps_per_epoch, cycle_epochs, start=start, end=value)
  raise ValueError(
      f"unknown KL schedule {name!r}; choose one of 'constant', 'linear', 'sigmoid', "
      "'cyclical', 'della_cyclical'")
