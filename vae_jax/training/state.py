"""The training state: everything a resumed run needs, as one pytree."""

from collections.abc import Callable, Mapping
from typing import Any

import flax
import jax
import optax

from vae_jax.training import optim

Params = Any
ModelState = dict[str, Any]
Variables = Mapping[str, Any]


@flax.struct.dataclass
class TrainState:
  """Parameters, optimiser and controller state of a run.

  Attributes:
    step: number of optimiser updates applied (int32 scalar).
    params: the 'params' collection.
    model_state: the other variable collections (e.g. 'batch_stats'); may be {}.
    opt_state: optimiser state from `optim.make_optimizer` (holds the learning rate).
    rng: base PRNG key; the randomness of step s is `jax.random.fold_in(rng, s)`.
    plateau: the halve-on-plateau controller state.
  """
  step: jax.Array
  params: Params
  model_state: ModelState
  opt_state: optax.OptState
  rng: jax.Array
  plateau: optim.PlateauState


def split_variables(variables: Variables) -> tuple[Params, ModelState]:
  """Splits `module.init` output into ('params', the other collections)."""
  variables = dict(variables)
  if 'params' not in variables:
    raise ValueError(
        "init_fn must return variables with a 'params' collection, got "
        f'collections {sorted(variables)}.')
  params = variables.pop('params')
  return params, variables


def create_train_state(
    init_fn: Callable[[jax.Array, Any], Variables],
    tx: optax.GradientTransformation,
    init_rng: jax.Array,
    train_rng: jax.Array,
    example_batch: Any,
) -> TrainState:
  """Initialises the model and the optimiser (pure; jit it with output shardings)."""
  params, model_state = split_variables(init_fn(init_rng, example_batch))
  return TrainState(
      step=jax.numpy.asarray(0, jax.numpy.int32),
      params=params,
      model_state=model_state,
      opt_state=tx.init(params),
      rng=train_rng,
      plateau=optim.init_plateau())
