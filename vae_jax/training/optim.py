"""Optimisers from a typed config, and the halve-on-plateau learning-rate controller.

The reference optimiser of the LSTM VAE literature (He et al. 2019) is SGD with
gradient-norm clipping whose learning rate is halved when the validation loss
has not improved for a few evaluations, and which stops after a fixed number of
such decays. Adam is the default here. The learning rate is an injected
hyperparameter (`optax.inject_hyperparams`), so the controller changes it in the
optimiser state at run time and checkpoints carry it.
"""

from collections.abc import Callable
import dataclasses
import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

OPTIMIZERS = ('adam', 'sgd')


@dataclasses.dataclass(frozen=True)
class PlateauConfig:
  """Halve-on-plateau schedule.

  Attributes:
    patience: evaluations without improvement before the learning rate is
      decayed; None turns the controller off.
    factor: multiplier applied to the learning rate at each decay.
    max_decays: stop training after this many decays (He et al. 2019 use 5);
      None never stops.
    min_delta: an evaluation improves on the best one when it is lower by more
      than this.
    min_epochs: no decay at an evaluation before this many epochs of training
      (He et al. 2019's `epoch >= 15`, their epoch index counted from 0: 16);
      the counter of evaluations without improvement still runs before.
  """
  patience: int | None = None
  factor: float = 0.5
  max_decays: int | None = None
  min_delta: float = 0.0
  min_epochs: float = 0.0

  def __post_init__(self):
    if self.patience is not None and self.patience < 1:
      raise ValueError(
          f'plateau.patience={self.patience}: use a positive number of '
          'evaluations, or None to turn the plateau schedule off.')
    if not 0.0 < self.factor < 1.0:
      raise ValueError(f'plateau.factor={self.factor} must be in (0, 1), e.g. 0.5.')
    if self.max_decays is not None and self.max_decays < 1:
      raise ValueError(
          f'plateau.max_decays={self.max_decays}: use a positive number, or None '
          'to never stop on decays.')
    if self.min_delta < 0:
      raise ValueError(f'plateau.min_delta={self.min_delta} must be >= 0.')
    if self.min_epochs < 0:
      raise ValueError(f'plateau.min_epochs={self.min_epochs} must be >= 0.')

  @property
  def enabled(self) -> bool:
    return self.patience is not None


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  """Optimiser settings.

  Attributes:
    name: 'adam' (default) or 'sgd' (the reference: lr 1.0, clip 5.0, plateau).
    learning_rate: base learning rate; the plateau controller scales it.
    grad_clip_norm: clip gradients to this global norm; None or 0 turns it off.
    weight_decay: decoupled weight decay (AdamW for 'adam'); 0 turns it off.
    momentum: SGD momentum; None for plain SGD.
    b1, b2, eps: Adam moments.
    plateau: the halve-on-plateau controller.
    param_labels: None (one optimiser for all parameters), or a function
      params -> pytree of 'encoder' / 'decoder' labels: each group then has its
      own optimiser state (`optax.multi_transform`), so one group can be updated
      while the other's state stands still (aggressive training, He et al.
      2019, whose code keeps separate encoder and decoder optimisers).
  """
  name: str = 'adam'
  learning_rate: float = 1e-3
  grad_clip_norm: float | None = None
  weight_decay: float = 0.0
  momentum: float | None = None
  b1: float = 0.9
  b2: float = 0.999
  eps: float = 1e-8
  plateau: PlateauConfig = PlateauConfig()
  param_labels: Callable[[Any], Any] | None = None

  def __post_init__(self):
    if self.name not in OPTIMIZERS:
      raise ValueError(
          f'Unknown optimizer {self.name!r}; choose one of {", ".join(OPTIMIZERS)}.')
    if not self.learning_rate > 0:
      raise ValueError(f'learning_rate={self.learning_rate} must be > 0.')
    if self.grad_clip_norm is not None and self.grad_clip_norm < 0:
      raise ValueError(
          f'grad_clip_norm={self.grad_clip_norm} must be > 0, or None/0 for no clipping.')
    if self.weight_decay < 0:
      raise ValueError(f'weight_decay={self.weight_decay} must be >= 0.')


def _clip_value(grad_clip_norm: float | None) -> float:
  return float(grad_clip_norm) if grad_clip_norm else float('inf')


def make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:
  """Builds the optimiser from `cfg` (equal configs give the same object).

  The learning rate and the clipping norm are injected hyperparameters, stored
  in `opt_state.hyperparams` (`set_hyperparams` changes them). Clipping is always
  in the chain (an infinite norm when off, which is the identity), so a run can
  resume with clipping turned on or off. The plateau schedule acts on the
  state from outside (`plateau_update`, `apply_config`), not in the chain.
  """
  return _make_optimizer(dataclasses.replace(cfg, plateau=PlateauConfig()))


@functools.lru_cache(maxsize=32)
def _make_optimizer(cfg: OptimizerConfig) -> optax.GradientTransformation:

  def base(learning_rate) -> list[optax.GradientTransformation]:
    if cfg.name == 'adam':
      if cfg.weight_decay:
        return [optax.adamw(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                            weight_decay=cfg.weight_decay)]
      return [optax.adam(learning_rate, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)]
    parts = [optax.add_decayed_weights(cfg.weight_decay)] if cfg.weight_decay else []
    return parts + [optax.sgd(learning_rate, momentum=cfg.momentum)]

  def build(learning_rate, grad_clip_norm):
    clip = optax.clip_by_global_norm(grad_clip_norm)
    if cfg.param_labels is None:
      return optax.chain(clip, *base(learning_rate))
    groups = {group: optax.chain(*base(learning_rate)) for group in GROUPS}
    return optax.chain(clip, optax.multi_transform(groups, cfg.param_labels))

  return optax.inject_hyperparams(build)(
      learning_rate=cfg.learning_rate,
      grad_clip_norm=_clip_value(cfg.grad_clip_norm))


GROUPS = ('encoder', 'decoder')


def keep_group_state(new_state: optax.OptState, old_state: optax.OptState,
                     group: str) -> optax.OptState:
  """`new_state` with the optimiser state of parameter group `group` taken from
  `old_state` (a state of `make_optimizer` with `param_labels`): after an update
  of the other group only, the frozen group's moments and counts stand still."""
  clip_state, groups = new_state.inner_state
  old_groups = old_state.inner_state[1]
  inner = dict(groups.inner_states)
  inner[group] = old_groups.inner_states[group]
  return new_state._replace(inner_state=(clip_state, groups._replace(inner_states=inner)))


def get_learning_rate(opt_state: optax.OptState) -> jax.Array:
  """The current learning rate stored in an optimiser state from `make_optimizer`."""
  return opt_state.hyperparams['learning_rate']


def set_hyperparams(opt_state: optax.OptState, **values) -> optax.OptState:
  """Returns `opt_state` with injected hyperparameters (e.g. learning_rate) replaced."""
  hyperparams = dict(opt_state.hyperparams)
  for name, value in values.items():
    if name not in hyperparams:
      raise KeyError(f'Unknown optimizer hyperparameter {name!r}; '
                     f'the optimizer has {sorted(hyperparams)}.')
    hyperparams[name] = jnp.asarray(value, dtype=hyperparams[name].dtype)
  return opt_state._replace(hyperparams=hyperparams)


def apply_config(opt_state: optax.OptState, cfg: OptimizerConfig,
                 lr_scale=1.0) -> optax.OptState:
  """Sets the learning rate (`cfg.learning_rate * lr_scale`) and clipping from `cfg`."""
  return set_hyperparams(opt_state,
                         learning_rate=cfg.learning_rate * lr_scale,
                         grad_clip_norm=_clip_value(cfg.grad_clip_norm))


@flax.struct.dataclass
class PlateauState:
  """State of the halve-on-plateau controller (float32/int32 scalars).

  Attributes:
    best: best validation loss so far (inf before the first evaluation).
    num_bad_evals: evaluations since the last improvement (or decay).
    num_decays: decays applied so far.
    lr_scale: current learning rate / base learning rate.
  """
  best: jax.Array
  num_bad_evals: jax.Array
  num_decays: jax.Array
  lr_scale: jax.Array


def init_plateau() -> PlateauState:
  return PlateauState(
      best=jnp.asarray(jnp.inf, jnp.float32),
      num_bad_evals=jnp.asarray(0, jnp.int32),
      num_decays=jnp.asarray(0, jnp.int32),
      lr_scale=jnp.asarray(1.0, jnp.float32))


def plateau_update(state: PlateauState, val_loss, cfg: PlateauConfig,
                   may_decay=True) -> PlateauState:
  """One step of the controller after a validation (pure; works under jit).

  He et al. (2019): the loss improves when it is below the best by more than
  `min_delta`; after `patience` evaluations without improvement the learning
  rate is multiplied by `factor`, the counter restarts and the reference loss
  becomes the current one. A non-finite loss never improves. `may_decay`
  (a bool, traced or not) is False at evaluations before `cfg.min_epochs` of
  training: no decay then, while the counter keeps running.
  """
  if not cfg.enabled:
    return state
  val_loss = jnp.asarray(val_loss, jnp.float32)
  improved = val_loss < state.best - cfg.min_delta
  num_bad = jnp.where(improved, 0, state.num_bad_evals + 1)
  decay = (num_bad >= cfg.patience) & jnp.asarray(may_decay)
  best = jnp.where(improved, val_loss, state.best)
  # On a decay the reference becomes the current loss (as in He et al.'s code),
  # unless it is not finite.
  best = jnp.where(decay & jnp.isfinite(val_loss), val_loss, best)
  return PlateauState(
      best=best.astype(jnp.float32),
      num_bad_evals=jnp.where(decay, 0, num_bad).astype(jnp.int32),
      num_decays=(state.num_decays + decay).astype(jnp.int32),
      lr_scale=jnp.where(decay, state.lr_scale * cfg.factor,
                         state.lr_scale).astype(jnp.float32))


def should_stop(plateau: PlateauState, cfg: PlateauConfig) -> bool:
  """Host-side: whether the controller has used up its `max_decays`."""
  return (cfg.enabled and cfg.max_decays is not None
          and int(plateau.num_decays) >= cfg.max_decays)
