"""The loop's programs: the Task a method hands it, the pure step functions and their jits.

Steps are pure functions of the TrainState (`train_step`, `group_step`, `eval_step`); the
`make_*` functions jit them once per (function, optimiser, mesh) with the state replicated and
donated and the batch sharded on the `data` axis. `init_train_state` / `abstract_train_state`
give a fresh state or a restore target, and `evaluate` sums an eval split on the devices.
"""

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import functools
from typing import Any, NamedTuple

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from vae_jax.training import mesh as mesh_lib
from vae_jax.training import optim
from vae_jax.training import state as state_lib

Batch = Mapping[str, Any]
Params = Any
ModelState = dict[str, Any]
Sums = dict[str, jax.Array]
TrainState = state_lib.TrainState


@dataclasses.dataclass(frozen=True)
class Task:
  """What a method hands the loop (built by `vae_jax.build` from a run's config).

  Attributes:
    init_fn: (rng, example local numpy batch) -> variables {'params': ..., other
      collections}.
    loss_fn: (params, model_state, batch, rng, step) -> (scalar loss to minimise,
      (sums, new model_state)); `sums` are float32 sums over the batch's real
      rows plus the denominators 'n_sentences' and 'n_tokens'.
    eval_fn: (params, model_state, batch, rng) -> sums of the same kind.
    summarize: host-side sums -> scalars (e.g. nll = sum nll / n_sentences).
    sample_fn: optional (params, model_state, rng) -> text samples to log at
      every evaluation.
    warm_start: optional host-side params -> params applied once to the freshly initialised
      parameters of a new run (never on resume), e.g. to load pretrained weights. It runs
      outside `jit`, so a large checkpoint does not become constants of the init program.
  """
  init_fn: Callable[[jax.Array, Batch], Mapping[str, Any]]
  loss_fn: Callable[[Params, ModelState, Batch, jax.Array, jax.Array],
                    tuple[jax.Array, tuple[Sums, ModelState]]]
  eval_fn: Callable[[Params, ModelState, Batch, jax.Array], Sums]
  summarize: Callable[[Mapping[str, float]], dict[str, float]]
  sample_fn: Callable[[Params, ModelState, jax.Array], list[str]] | None = None
  warm_start: Callable[[Params], Params] | None = None


# Steps (pure functions; `make_*` jit them once for a mesh).


def _loss_step(state, batch, loss_fn, tx, rng=None, restrict=None, advance=True):
  """One gradient step of `loss_fn` (randomness `rng`, by default `fold_in(rng, step)`).

  `restrict(updates, opt_state) -> (updates, opt_state)` edits the optimiser's output before
  it is applied (e.g. to update one parameter group only); with `advance` False the step
  counter stands still.
  """
  if rng is None:
    rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (sums, model_state)), grads = grad_fn(
      state.params, state.model_state, batch, rng, state.step)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  if restrict is not None:
    updates, opt_state = restrict(updates, opt_state)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + (1 if advance else 0), params=params,
                            model_state=model_state, opt_state=opt_state)
  return new_state, {'sums': sums, 'loss': loss, 'grad_norm': optax.tree.norm(grads)}


def train_step(state: TrainState, batch: Batch, *, task: Task,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
  """One optimiser update with randomness `fold_in(state.rng, state.step)`.

  Returns the new state and {'sums': the loss_fn's sums, 'loss': the scalar
  loss, 'grad_norm': the global gradient norm before clipping}.
  """
  return _loss_step(state, batch, task.loss_fn, tx)


def group_step(state: TrainState, batch: Batch, inner: jax.Array | None = None, *,
               task: Task, tx: optax.GradientTransformation, labels_fn: Callable,
               group: str) -> tuple[TrainState, dict]:
  """An update of one parameter group only ('encoder' or 'decoder', by the optimiser's
  `param_labels`); the other group's parameters and optimiser state stand still.

  A decoder update is an outer step (the step counter advances, randomness
  `fold_in(rng, step)`); an encoder update with `inner` = i is the i-th inner step of
  aggressive training before the next outer step (randomness
  `fold_in(fold_in(rng, step), i + 1)`, the step counter unchanged).
  """
  rng = jax.random.fold_in(state.rng, state.step)
  if inner is not None:
    rng = jax.random.fold_in(rng, inner + 1)
  other = next(g for g in optim.GROUPS if g != group)

  def only_group(updates, opt_state):
    labels = labels_fn(state.params)
    updates = jax.tree.map(lambda u, label: u if label == group else jnp.zeros_like(u),
                           updates, labels)
    return updates, optim.keep_group_state(opt_state, state.opt_state, other)

  return _loss_step(state, batch, task.loss_fn, tx, rng=rng, restrict=only_group,
                    advance=inner is None)


def eval_step(state: TrainState, batch: Batch, rng: jax.Array, *, task: Task) -> Sums:
  """Sums of one evaluation batch."""
  return task.eval_fn(state.params, state.model_state, batch, rng)


# Jitted programs are cached on the functions they run (not the Task), so
# tasks that share a loss_fn, or configs that differ only in the plateau
# schedule, compile once per process.


@functools.lru_cache(maxsize=32)
def _jit_train_step(loss_fn, tx, mesh):
  rep = mesh_lib.replicated(mesh)
  return jax.jit(functools.partial(_loss_step, loss_fn=loss_fn, tx=tx),
                 in_shardings=(rep, mesh_lib.data_sharding(mesh)),
                 out_shardings=(rep, rep), donate_argnums=0)


@functools.lru_cache(maxsize=32)
def _jit_group_step(loss_fn, tx, labels_fn, group, mesh):
  rep = mesh_lib.replicated(mesh)
  task = Task(init_fn=None, loss_fn=loss_fn, eval_fn=None, summarize=None)
  step = functools.partial(group_step, task=task, tx=tx, labels_fn=labels_fn, group=group)
  if group == 'encoder':
    return jax.jit(step, in_shardings=(rep, mesh_lib.data_sharding(mesh), rep),
                   out_shardings=(rep, rep), donate_argnums=0)
  return jax.jit(lambda state, batch: step(state, batch),
                 in_shardings=(rep, mesh_lib.data_sharding(mesh)),
                 out_shardings=(rep, rep), donate_argnums=0)


@functools.lru_cache(maxsize=32)
def _jit_eval_step(eval_fn, mesh):
  rep = mesh_lib.replicated(mesh)

  def step(state, batch, rng):
    return eval_fn(state.params, state.model_state, batch, rng)

  return jax.jit(step, in_shardings=(rep, mesh_lib.data_sharding(mesh), rep),
                 out_shardings=rep)


def make_train_step(task: Task, tx: optax.GradientTransformation, mesh):
  """`train_step` jitted for `mesh`: state replicated (and donated), batch sharded.

  Cached: the same (loss_fn, tx, mesh) gives the same compiled function.
  """
  return _jit_train_step(task.loss_fn, tx, mesh)


def make_group_step(task: Task, tx: optax.GradientTransformation, labels_fn, group: str, mesh):
  """`group_step` jitted for `mesh` (cached): an encoder step takes (state, batch, inner
  index), a decoder step (state, batch)."""
  return _jit_group_step(task.loss_fn, tx, labels_fn, group, mesh)


def make_eval_step(task: Task, mesh):
  """`eval_step` jitted for `mesh`: (state, sharded batch, rng) -> replicated sums (cached)."""
  return _jit_eval_step(task.eval_fn, mesh)


# Train sums, accumulated on the devices, and host transfers.


def _as_f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def all_finite(tree) -> jax.Array:
  """Whether every floating-point leaf of `tree` is finite (a device scalar)."""
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _accumulate_train(acc, out, steps_done):
  """Adds one step's output to the running train sums; remembers the first bad step.

  `steps_done` is the device step counter of the state the step returned (the updates applied
  after it), so the step's own index `steps_done - 1` never has to be sent from the host.
  """
  step = steps_done - 1
  sums = _as_f32(out['sums'])
  finite = jnp.isfinite(out['loss']) & all_finite(sums)
  if acc is None:
    acc = {'sums': jax.tree.map(jnp.zeros_like, sums),
           'loss': jnp.zeros((), jnp.float32), 'grad_norm': jnp.zeros((), jnp.float32),
           'steps': jnp.zeros((), jnp.int32), 'first_bad_step': jnp.asarray(-1, jnp.int32),
           'bad_loss': jnp.zeros((), jnp.float32)}
  first_bad = acc['first_bad_step'] < 0
  newly_bad = first_bad & ~finite
  return {
      'sums': jax.tree.map(jnp.add, acc['sums'], sums),
      'loss': acc['loss'] + out['loss'].astype(jnp.float32),
      'grad_norm': acc['grad_norm'] + out['grad_norm'].astype(jnp.float32),
      'steps': acc['steps'] + 1,
      'first_bad_step': jnp.where(newly_bad, step, acc['first_bad_step']).astype(jnp.int32),
      'bad_loss': jnp.where(newly_bad, out['loss'], acc['bad_loss']).astype(jnp.float32),
  }


def _add_sums(acc, sums):
  sums = _as_f32(sums)
  if acc is None:
    return sums
  return jax.tree.map(jnp.add, acc, sums)


def to_host(tree) -> Any:
  """`tree` fetched to the host: scalars as Python numbers, vectors as numpy arrays."""
  def host(x):
    x = np.asarray(jax.device_get(x))
    return x.item() if x.size == 1 else x  # vector sums (e.g. per-dimension) stay arrays
  return jax.tree.map(host, tree)


def intended_transfers():
  """Where the loop means to move data between host and devices (setup, logging, evaluation,
  checkpoints, aggressive training's convergence checks): transfers are allowed there even
  when the caller runs the loop under `jax.transfer_guard('disallow')`, which then catches any
  transfer in the step loop itself."""
  return jax.transfer_guard('allow')


# Initialisation.


def rngs(seed: int):
  """(init, train, eval) keys of a run's seed."""
  init_rng, train_rng, eval_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
  return init_rng, train_rng, eval_rng


class Programs(NamedTuple):
  """The jitted functions of one (task, optimiser, mesh)."""
  tx: optax.GradientTransformation
  init: Callable[..., TrainState]
  init_fn: Callable[..., TrainState]
  train_step: Callable[..., tuple[TrainState, dict]]
  eval_step: Callable[..., Sums]
  accumulate: Callable[..., dict]
  apply_plateau: Callable[[TrainState, float, bool], TrainState]
  apply_config: Callable[[TrainState], TrainState]
  encoder_step: Callable[..., tuple[TrainState, dict]] | None = None
  decoder_step: Callable[..., tuple[TrainState, dict]] | None = None


def _without_plateau(opt_cfg: optim.OptimizerConfig) -> optim.OptimizerConfig:
  return dataclasses.replace(opt_cfg, plateau=optim.PlateauConfig())


@functools.lru_cache(maxsize=32)
def _init_programs(init_fn, opt_cfg: optim.OptimizerConfig, mesh):
  """(python init function, its jitted version) for an optimiser without plateau."""
  tx = optim.make_optimizer(opt_cfg)

  def init(init_rng, train_rng, example_batch):
    state = state_lib.create_train_state(init_fn, tx, init_rng, train_rng, example_batch)
    return state.replace(opt_state=optim.apply_config(state.opt_state, opt_cfg))

  return init, jax.jit(init, out_shardings=mesh_lib.replicated(mesh))


@functools.lru_cache(maxsize=32)
def _state_programs(opt_cfg: optim.OptimizerConfig, mesh):
  """Jitted accumulate / plateau / config updates of the state."""
  rep = mesh_lib.replicated(mesh)

  def apply_plateau(state, val_loss, may_decay):
    plateau = optim.plateau_update(state.plateau, val_loss, opt_cfg.plateau, may_decay)
    return state.replace(
        plateau=plateau,
        opt_state=optim.apply_config(state.opt_state, opt_cfg, plateau.lr_scale))

  def apply_config(state):
    return state.replace(opt_state=optim.apply_config(
        state.opt_state, opt_cfg, state.plateau.lr_scale))

  return (jax.jit(_accumulate_train, out_shardings=rep, donate_argnums=0),
          jax.jit(apply_plateau, out_shardings=rep, donate_argnums=0),
          jax.jit(apply_config, out_shardings=rep, donate_argnums=0))


def programs(task: Task, opt_cfg: optim.OptimizerConfig, mesh) -> Programs:
  """The jitted programs of a run (each cached on what it depends on)."""
  base = _without_plateau(opt_cfg)
  tx = optim.make_optimizer(base)
  init_fn, init = _init_programs(task.init_fn, base, mesh)
  accumulate, apply_plateau, apply_config = _state_programs(opt_cfg, mesh)
  groups = {}
  if opt_cfg.param_labels is not None:
    groups = {f'{g}_step': make_group_step(task, tx, opt_cfg.param_labels, g, mesh)
              for g in optim.GROUPS}
  return Programs(
      tx=tx, init=init, init_fn=init_fn,
      train_step=make_train_step(task, tx, mesh),
      eval_step=make_eval_step(task, mesh),
      accumulate=accumulate, apply_plateau=apply_plateau, apply_config=apply_config,
      **groups)


def init_train_state(task: Task, optimizer: optim.OptimizerConfig,
                     example_batch: Batch, seed: int, mesh) -> TrainState:
  """A fresh, replicated TrainState (every process gets process 0's example batch)."""
  example_batch = multihost_utils.broadcast_one_to_all(dict(example_batch))
  init_rng, train_rng, _ = rngs(seed)
  return programs(task, optimizer, mesh).init(init_rng, train_rng, example_batch)


def abstract_train_state(task: Task, optimizer: optim.OptimizerConfig,
                         example_batch: Batch, mesh) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the TrainState: a restore target."""
  init_rng, train_rng, _ = rngs(0)
  shapes = jax.eval_shape(programs(task, optimizer, mesh).init_fn, init_rng,
                          train_rng, dict(example_batch))
  rep = mesh_lib.replicated(mesh)
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=rep), shapes)


# Evaluation.


def evaluate(p_eval_step, state: TrainState, make_iter: Callable[[], Iterator[Batch]],
             summarize, rng: jax.Array, mesh) -> dict[str, float]:
  """Sums `eval_fn` over every batch of a fresh iterator, then `summarize`s on the host."""
  acc = None
  add = _jit_add_sums(mesh)
  for i, batch in enumerate(make_iter()):
    acc = add(acc, p_eval_step(state, mesh_lib.to_global(batch, mesh),
                               jax.random.fold_in(rng, i)))
  if acc is None:
    raise ValueError('An evaluation iterator yielded no batches; check the eval split.')
  sums = to_host(acc)
  return dict(summarize(sums))


@functools.cache
def _jit_add_sums(mesh):
  return jax.jit(_add_sums, out_shardings=mesh_lib.replicated(mesh))
