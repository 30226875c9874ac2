"""Aggressive inference-network training (He et al. 2019) as a controller of the loop.

While the mode is on, every outer step of the loop is preceded by encoder-only inner steps
(`aggressive_inner_steps`) and updates the decoder only; at every evaluation the controller
(`init` / `update`, pure functions of a small state) decides whether the mode stays on. Its
state is saved with the data positions of every checkpoint (`position` / `restore_position`,
the layout `{'train', 'encoder', 'aggressive'}`), so a resumed run continues in the phase it
was in.
"""

import dataclasses
import functools
import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vae_jax.training import mesh as mesh_lib
from vae_jax.training import steps


@dataclasses.dataclass(frozen=True)
class AggressiveConfig:
  """Aggressive inference-network training (He et al. 2019, "Lagging inference networks").

  While the mode is on, every optimiser update of the model (an *outer* step) is preceded by
  encoder-only updates on fresh training batches (drawn from a second iterator), until the
  encoder has converged: the word-normalised loss of a window of `check_every` inner steps is
  no lower than that of the previous window, or `max_inner_steps` were taken. The outer step
  then updates the decoder only, on its own batch. At every evaluation the validation metric
  `stop_metric` (the mutual information by default) is compared with its previous value
  (initially 0, as in He et al.'s code); once it fails to rise (equal or lower: the paper's
  "stops climbing"), the mode ends for good and training continues as a plain VAE, both parts
  updated by every step. Encoder and decoder keep separate optimiser states
  (`OptimizerConfig.param_labels`), as the reference code's two optimisers do. Inner steps do
  not count as steps: `num_steps`, KL schedules, logging and evaluation all count outer
  steps.
  """
  max_inner_steps: int = 100
  check_every: int = 15
  stop_metric: str = 'mi'

  def __post_init__(self):
    if self.max_inner_steps < 1 or self.check_every < 1:
      raise ValueError(f'aggressive.max_inner_steps={self.max_inner_steps} and '
                       f'check_every={self.check_every} must be positive.')


@flax.struct.dataclass
class AggressiveState:
  """The controller's state (host values: it chooses which program the next step runs).

  Attributes:
    active: whether the aggressive mode is on.
    previous: the validation `stop_metric` at the last evaluation while it was on.
  """
  active: bool
  previous: float


def init() -> AggressiveState:
  """The mode starts on, with a previous metric of 0 (He et al.'s code)."""
  return AggressiveState(active=True, previous=0.0)


def update(state: AggressiveState, metrics: dict[str, float],
           cfg: AggressiveConfig) -> AggressiveState:
  """The controller after an evaluation with validation `metrics` (pure): the mode ends for
  good when `stop_metric` did not rise above its previous value; once off, nothing changes.

  He et al.'s code ends it on a strict fall (`cur_mi - pre_mi < 0`). The two rules differ on a
  tie, which happens when the per-batch MI sits at its cap, log of the batch size: then it
  cannot climb, and the strict rule would keep the mode on to the end of training (on the
  embedded corpus the validation MI read 4.14779 at epochs 2 and 3, log 64 being 4.159, at 40
  minutes per aggressive epoch on one CPU core)."""
  if not state.active:
    return state
  if cfg.stop_metric not in metrics:
    raise KeyError(f'aggressive.stop_metric={cfg.stop_metric!r} is not among the validation '
                   f'metrics {sorted(metrics)}.')
  value = float(metrics[cfg.stop_metric])
  return AggressiveState(active=value > state.previous, previous=value)


def position(train: dict, encoder: dict, state: AggressiveState) -> dict:
  """The data state of a checkpoint of an aggressive run: both iterators' positions and the
  controller."""
  return {'train': train, 'encoder': encoder,
          'aggressive': {'active': bool(state.active), 'previous': float(state.previous)}}


def restore_position(data_state: dict) -> tuple[dict, dict, AggressiveState]:
  """(train position, encoder position, controller state) of a checkpoint's data state."""
  saved = data_state['aggressive']
  return (data_state['train'], data_state['encoder'],
          AggressiveState(active=bool(saved['active']), previous=float(saved['previous'])))


def train_metrics(state: AggressiveState, inner_steps: int, outer_steps: int) -> dict:
  """What the train log records of the controller: whether the mode is on, and the mean
  number of inner steps per outer step since the last log."""
  return {'aggressive': float(state.active), 'inner_steps': inner_steps / max(outer_steps, 1)}


@functools.lru_cache(maxsize=32)
def _inner_indices(n: int, mesh) -> tuple[jax.Array, ...]:
  """The inner-step indices 0..n-1 as replicated int32 device scalars, placed once."""
  return tuple(jax.device_put(np.asarray(i, np.int32), mesh_lib.replicated(mesh))
               for i in range(n))


def aggressive_inner_steps(encoder_step, state: steps.TrainState, first_batch: steps.Batch,
                           encoder_iter, cfg: AggressiveConfig,
                           mesh) -> tuple[steps.TrainState, int]:
  """Encoder-only updates until the encoder converges (He et al. 2019, Algorithm 1).

  The first inner step uses the outer batch, the next ones fresh batches of `encoder_iter`,
  an iterator of batches already placed on the mesh (e.g. a `mesh_lib.Prefetcher`).
  Every `check_every` steps the loss per word of the window is compared with the previous
  window's; the inner loop ends when it stopped decreasing, or after `max_inner_steps`.

  The comparison decides on the host whether to take another step, so it is the one device ->
  host transfer of the inner loop (once per `check_every` inner steps, as He et al.'s code reads
  the loss); everything between checks is dispatched without waiting for the device.
  """
  previous = math.inf
  window_loss = window_words = None  # the window's sums, on the device
  batch = first_batch
  indices = _inner_indices(cfg.max_inner_steps, mesh)
  taken = 0
  for i in range(cfg.max_inner_steps):
    state, out = encoder_step(state, batch, indices[i])
    taken += 1
    loss = out['loss'] * out['sums']['n_sentences']
    words = out['sums']['n_tokens']
    window_loss = loss if window_loss is None else window_loss + loss
    window_words = words if window_words is None else window_words + words
    if (i + 1) % cfg.check_every == 0:
      with steps.intended_transfers():  # the convergence check
        current = float(steps.to_host(window_loss / jnp.maximum(window_words, 1.0)))
      if previous - current < 0:
        break
      previous, window_loss, window_words = current, None, None
    if i + 1 < cfg.max_inner_steps:
      batch = next(encoder_iter)
  return state, taken


def outer_step(programs: steps.Programs, state: steps.TrainState, batch: steps.Batch,
               encoder_batches, cfg: AggressiveConfig, mesh) -> tuple[steps.TrainState, Any, int]:
  """One outer step of the aggressive mode: the encoder's inner steps, then the decoder's
  update on `batch`. Returns (state, the decoder step's output, inner steps taken)."""
  state, taken = aggressive_inner_steps(programs.encoder_step, state, batch, encoder_batches,
                                        cfg, mesh)
  state, out = programs.decoder_step(state, batch)
  return state, out, taken
