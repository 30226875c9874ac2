"""The training loop every method uses: train, evaluate, checkpoint, resume.

A method hands the loop a `Task` (init, loss, eval and summary functions); the
loop owns the mesh, the optimiser, the jitted steps, checkpoints, metric
writers, the plateau controller and the NaN guard. `train_and_evaluate` is
resumable: rerunning the same command in the same workdir continues from the
latest checkpoint and ends with the same parameters, bit for bit, as a run
that never stopped.

Steps are counted in optimiser updates: metrics, evaluations and checkpoints
at step s describe the state after s updates; `loss_fn` receives the number of
updates applied before its own (0 for the first batch).

On accelerators the step loop keeps the devices busy: between logging, evaluation and
checkpoint steps it neither reads a device value on the host nor sends one (the step counter
is the host's, the state is donated to each step), and the next train batches are already on
the devices (`mesh_lib.Prefetcher`). The only exception is aggressive training's convergence
check, once per `check_every` inner steps. tests/training/test_accelerator_ready.py runs the
loop under `jax.transfer_guard` to keep it so.
"""

from collections.abc import Callable, Iterator, Mapping
import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from typing import Any, NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import optax

from vae_jax import errors
from vae_jax.training import checkpoint as checkpoint_lib
from vae_jax.training import mesh as mesh_lib
from vae_jax.training import optim
from vae_jax.training import state as state_lib
from vae_jax.training import writers

Batch = Mapping[str, Any]
Params = Any
ModelState = dict[str, Any]
Sums = dict[str, jax.Array]
TrainState = state_lib.TrainState


@dataclasses.dataclass(frozen=True)
class Task:
  """What a method hands the loop (built in experiments/ from a config).

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


@dataclasses.dataclass(frozen=True)
class AggressiveConfig:
  """Aggressive inference-network training (He et al. 2019, "Lagging inference networks").

  While the mode is on, every optimiser update of the model (an *outer* step) is preceded by
  encoder-only updates on fresh training batches (drawn from a second iterator), until the
  encoder has converged: the word-normalised loss of a window of `check_every` inner steps is
  no lower than that of the previous window, or `max_inner_steps` were taken. The outer step
  then updates the decoder only, on its own batch. At every evaluation the validation metric
  `stop_metric` (the mutual information by default) is compared with its previous value
  (initially 0, as in He et al.'s code); once it fails to rise, the mode ends for good and
  training continues as a plain VAE, both parts updated by every step. Encoder and decoder keep
  separate optimiser states (`OptimizerConfig.param_labels`), as the reference code's two
  optimisers do. Inner steps do not count as steps: `num_steps`, KL schedules, logging and
  evaluation all count outer steps.
  """
  max_inner_steps: int = 100
  check_every: int = 15
  stop_metric: str = 'mi'

  def __post_init__(self):
    if self.max_inner_steps < 1 or self.check_every < 1:
      raise ValueError(f'aggressive.max_inner_steps={self.max_inner_steps} and '
                       f'check_every={self.check_every} must be positive.')


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Settings of the loop.

  Attributes:
    num_steps: total optimiser updates of the run (a resumed run counts from 0).
    log_every: write averaged train metrics every this many steps.
    eval_every: evaluate every eval split every this many steps (and at the end).
    checkpoint_every: save the latest checkpoint every this many steps (and at
      the end).
    seed: seeds initialisation, the per-step randomness and evaluation.
    eval_split: the split whose `best_metric` selects the best checkpoint and
      drives the plateau controller.
    best_metric: name of a `summarize` output, lower is better.
    keep: latest checkpoints to keep.
    progress_bar: show a tqdm bar; None shows it on process 0 when stderr is a
      terminal.
    optimizer: optimiser and plateau settings.
    reload_best_on_decay: on a plateau decay, continue from the best
      checkpoint's parameters (as He et al. 2019 do).
    async_checkpoints: write checkpoints in a background thread.
    aggressive: aggressive inference-network training (needs an optimiser with
      `param_labels` and an `encoder_iter`); None: every step updates everything.
  """
  num_steps: int
  log_every: int = 100
  eval_every: int = 1000
  checkpoint_every: int = 1000
  seed: int = 0
  eval_split: str = 'valid'
  best_metric: str = 'nll'
  keep: int = 2
  progress_bar: bool | None = None
  optimizer: optim.OptimizerConfig = optim.OptimizerConfig()
  reload_best_on_decay: bool = False
  async_checkpoints: bool = True
  aggressive: AggressiveConfig | None = None

  def __post_init__(self):
    for name in ('log_every', 'eval_every', 'checkpoint_every'):
      if getattr(self, name) < 1:
        raise ValueError(f'{name}={getattr(self, name)} must be a positive number of steps.')
    if self.num_steps < 0:
      raise ValueError(f'num_steps={self.num_steps} must be >= 0.')
    if self.aggressive is not None and self.optimizer.param_labels is None:
      raise ValueError('Aggressive training updates the encoder and the decoder separately: '
                       'set optimizer.param_labels (e.g. vae_jax.models.vae.param_groups).')


# Training produced a NaN or Inf; the bad state was not saved.
NonFiniteLossError = errors.NonFiniteLossError


# Steps (pure functions; `make_*` jit them once for a mesh).


def _loss_step(state, batch, loss_fn, tx):
  rng = jax.random.fold_in(state.rng, state.step)
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  (loss, (sums, model_state)), grads = grad_fn(
      state.params, state.model_state, batch, rng, state.step)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  new_state = state.replace(step=state.step + 1, params=params,
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
  grad_fn = jax.value_and_grad(task.loss_fn, has_aux=True)
  (loss, (sums, model_state)), grads = grad_fn(
      state.params, state.model_state, batch, rng, state.step)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  labels = labels_fn(state.params)
  updates = jax.tree.map(lambda u, label: u if label == group else jnp.zeros_like(u),
                         updates, labels)
  other = next(g for g in optim.GROUPS if g != group)
  opt_state = optim.keep_group_state(opt_state, state.opt_state, other)
  new_state = state.replace(step=state.step + (0 if inner is not None else 1),
                            params=optax.apply_updates(state.params, updates),
                            model_state=model_state, opt_state=opt_state)
  return new_state, {'sums': sums, 'loss': loss, 'grad_norm': optax.tree.norm(grads)}


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


def _as_f32(tree):
  return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


def _all_finite(tree) -> jax.Array:
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
  finite = jnp.isfinite(out['loss']) & _all_finite(sums)
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


def _to_host(tree) -> Any:
  def host(x):
    x = np.asarray(jax.device_get(x))
    return x.item() if x.size == 1 else x  # vector sums (e.g. per-dimension) stay arrays
  return jax.tree.map(host, tree)


# Initialisation.


def _rngs(seed: int):
  init_rng, train_rng, eval_rng = jax.random.split(jax.random.PRNGKey(seed), 3)
  return init_rng, train_rng, eval_rng


class _Programs(NamedTuple):
  """The jitted functions of one (task, optimiser, mesh)."""
  tx: optax.GradientTransformation
  init: Callable[..., TrainState]
  init_fn: Callable[..., TrainState]
  train_step: Callable[..., tuple[TrainState, dict]]
  eval_step: Callable[..., Sums]
  accumulate: Callable[..., dict]
  apply_plateau: Callable[[TrainState, float], TrainState]
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

  def apply_plateau(state, val_loss):
    plateau = optim.plateau_update(state.plateau, val_loss, opt_cfg.plateau)
    return state.replace(
        plateau=plateau,
        opt_state=optim.apply_config(state.opt_state, opt_cfg, plateau.lr_scale))

  def apply_config(state):
    return state.replace(opt_state=optim.apply_config(
        state.opt_state, opt_cfg, state.plateau.lr_scale))

  return (jax.jit(_accumulate_train, out_shardings=rep, donate_argnums=0),
          jax.jit(apply_plateau, out_shardings=rep, donate_argnums=0),
          jax.jit(apply_config, out_shardings=rep, donate_argnums=0))


def _programs(task: Task, opt_cfg: optim.OptimizerConfig, mesh) -> _Programs:
  """The jitted programs of a run (each cached on what it depends on)."""
  base = _without_plateau(opt_cfg)
  tx = optim.make_optimizer(base)
  init_fn, init = _init_programs(task.init_fn, base, mesh)
  accumulate, apply_plateau, apply_config = _state_programs(opt_cfg, mesh)
  groups = {}
  if opt_cfg.param_labels is not None:
    groups = {f'{g}_step': make_group_step(task, tx, opt_cfg.param_labels, g, mesh)
              for g in optim.GROUPS}
  return _Programs(
      tx=tx, init=init, init_fn=init_fn,
      train_step=make_train_step(task, tx, mesh),
      eval_step=make_eval_step(task, mesh),
      accumulate=accumulate, apply_plateau=apply_plateau, apply_config=apply_config,
      **groups)


def init_train_state(task: Task, optimizer: optim.OptimizerConfig,
                     example_batch: Batch, seed: int, mesh) -> TrainState:
  """A fresh, replicated TrainState (every process gets process 0's example batch)."""
  example_batch = multihost_utils.broadcast_one_to_all(dict(example_batch))
  init_rng, train_rng, _ = _rngs(seed)
  return _programs(task, optimizer, mesh).init(init_rng, train_rng, example_batch)


def abstract_train_state(task: Task, optimizer: optim.OptimizerConfig,
                         example_batch: Batch, mesh) -> TrainState:
  """Shapes, dtypes and (replicated) shardings of the TrainState: a restore target."""
  init_rng, train_rng, _ = _rngs(0)
  shapes = jax.eval_shape(_programs(task, optimizer, mesh).init_fn, init_rng,
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
  sums = _to_host(acc)
  return dict(summarize(sums))


@functools.cache
def _jit_add_sums(mesh):
  return jax.jit(_add_sums, out_shardings=mesh_lib.replicated(mesh))


# The loop.

# Train batches placed on the devices ahead of the step that uses them (`mesh_lib.Prefetcher`).
PREFETCH_DEPTH = 2


def _intended_transfers():
  """Where the loop means to move data between host and devices (setup, logging, evaluation,
  checkpoints): transfers are allowed there even when the caller runs the loop under
  `jax.transfer_guard('disallow')`, which then catches any transfer in the step loop itself."""
  return jax.transfer_guard('allow')


def _check_iterator(train_iter) -> None:
  for name in ('state', 'restore'):
    if not callable(getattr(train_iter, name, None)):
      raise TypeError(
          f'The train iterator {type(train_iter).__name__} has no {name}() method; '
          'the loop needs a resumable iterator (state() -> dict, restore(dict)), '
          'e.g. the one from vae_jax.data.pipeline.')


def _next_batch(train_iter, step: int) -> Batch:
  try:
    return next(train_iter)
  except StopIteration:
    raise ValueError(
        f'The train iterator ended at step {step}; the loop needs an infinite '
        'iterator (one that repeats epochs) and stops at TrainConfig.num_steps.'
    ) from None


def _data_state(state: dict) -> dict:
  """An iterator position (`state()`) to checkpoint; checked to be the same on every process.

  Only process 0's copy is written, so the state must describe the position in
  the global batch stream, not this process's shard.
  """
  if jax.process_count() > 1:
    text = json.dumps(state, sort_keys=True, default=str).encode()
    digest = np.frombuffer(hashlib.sha256(text).digest(), np.uint8)
    digests = np.asarray(multihost_utils.process_allgather(digest))
    if not (digests == digests[:1]).all():
      raise ValueError(
          f'The train iterator state differs between processes (process '
          f'{jax.process_index()}: {state}); state() must describe the position '
          'in the global batch stream, the same on every process.')
  return state


def _peek(train_iter) -> Batch:
  position = train_iter.state()
  batch = next(train_iter)
  train_iter.restore(position)
  return batch


@functools.lru_cache(maxsize=32)
def _inner_indices(n: int, mesh) -> tuple[jax.Array, ...]:
  """The inner-step indices 0..n-1 as replicated int32 device scalars, placed once."""
  return tuple(jax.device_put(np.asarray(i, np.int32), mesh_lib.replicated(mesh))
               for i in range(n))


def aggressive_inner_steps(encoder_step, state: TrainState, first_batch: Batch,
                           encoder_iter, cfg: AggressiveConfig, mesh) -> tuple[TrainState, int]:
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
      with _intended_transfers():  # the convergence check
        current = float(_to_host(window_loss / jnp.maximum(window_words, 1.0)))
      if previous - current < 0:
        break
      previous, window_loss, window_words = current, None, None
    if i + 1 < cfg.max_inner_steps:
      batch = next(encoder_iter)
  return state, taken


class _Guard:
  """Raises NonFiniteLossError with what to do about it."""

  def __init__(self, ckpt: checkpoint_lib.Checkpointer, optimizer: optim.OptimizerConfig):
    self.ckpt = ckpt
    self.optimizer = optimizer

  def fail(self, step: int, what: str):
    last = self.ckpt.latest_step()
    where = os.path.join(self.ckpt.directory, 'latest')
    if last is None:
      saved = 'No checkpoint was saved before it, so nothing is left to resume from.'
    else:
      saved = (f'The last good checkpoint is step {last} in {where}; it is intact, '
               f'and rerunning the command resumes from it.')
    clip = self.optimizer.grad_clip_norm
    raise NonFiniteLossError(
        f'Training diverged: {what} at step {step}. Stopped without saving this '
        f'state. {saved} Lower the learning rate (optimizer.learning_rate, now '
        f'{self.optimizer.learning_rate:g}) or clip gradients '
        f'(optimizer.grad_clip_norm, now {clip}); both take effect on resume.')

  def check_acc(self, acc) -> None:
    if acc is None:
      return
    self.check_host_acc(_to_host({k: acc[k] for k in ('first_bad_step', 'bad_loss')}))

  def check_host_acc(self, host_acc) -> None:
    """`check_acc` of train sums already fetched by `_to_host`."""
    bad_step, bad_loss = host_acc['first_bad_step'], host_acc['bad_loss']
    if bad_step >= 0:
      loss = 'the loss' if not math.isfinite(bad_loss) else 'a train sum'
      self.fail(bad_step, f'{loss} was not finite (loss={bad_loss})')

  def check_state(self, state: TrainState, step: int) -> None:
    if not bool(_to_host(_jit_all_finite(state.params))):
      self.fail(step, 'the parameters were not finite after the update')


_jit_all_finite = jax.jit(_all_finite)


def train_and_evaluate(
    task: Task,
    train_iter: Iterator[Batch],
    eval_data: Mapping[str, Callable[[], Iterator[Batch]]],
    config: TrainConfig,
    workdir: str,
    vocab_fingerprint: str | None = None,
    *,
    mesh: jax.sharding.Mesh | None = None,
    encoder_iter: Iterator[Batch] | None = None,
) -> dict[str, Any]:
  """Trains `task` to `config.num_steps`, evaluating and checkpointing on the way.

  Resumes from `<workdir>/checkpoints/latest` when it exists (state and data
  position) from the newest checkpoint there that can be read: damaged newer
  ones are skipped with one warning line each, then deleted, and saved again
  when the run gets there. Otherwise initialises from `config.seed`.

  Args:
    task: the method's functions.
    train_iter: infinite iterator of this process's train batches with
      `state()` / `restore()`; `state()` must be the same on every process
      (the position in the global batch stream): process 0's is saved. The loop
      reads `PREFETCH_DEPTH` batches ahead (never past `num_steps`); checkpoints
      save the position after the batches trained on, and on return the iterator
      is put back there.
    eval_data: split name -> zero-argument callable returning a fresh finite
      iterator of this process's batches (every process the same number).
    config: loop settings.
    workdir: where checkpoints, metrics.jsonl and TensorBoard files go.
    vocab_fingerprint: identifies the vocabulary; checked on resume.
    mesh: device mesh (default: all devices on a `data` axis).
    encoder_iter: with `config.aggressive`, an infinite resumable iterator of
      train batches for the encoder's inner steps (a stream independent of
      `train_iter`, e.g. the same data with another seed).

  Returns:
    {'step': final step, 'stopped_early': bool, 'train': last train metrics,
     <split>: last metrics of each eval split}.
  """
  _check_iterator(train_iter)
  aggressive = config.aggressive
  if aggressive is not None:
    if encoder_iter is None:
      raise ValueError('Aggressive training needs encoder_iter, a second train iterator for '
                       'the inner encoder steps.')
    _check_iterator(encoder_iter)
    if not eval_data:
      raise ValueError('Aggressive training stops when the validation '
                       f'{aggressive.stop_metric!r} stops rising, so it needs eval_data.')
  if eval_data and config.eval_split not in eval_data:
    raise ValueError(
        f'eval_split={config.eval_split!r} is not among the eval splits '
        f'{sorted(eval_data)}; set TrainConfig.eval_split to one of them.')
  if config.optimizer.plateau.enabled and not eval_data:
    raise ValueError(
        'The plateau schedule (optimizer.plateau.patience) needs validation data, '
        'but eval_data is empty; pass an eval split or set patience=None.')
  with _intended_transfers():
    mesh = mesh if mesh is not None else mesh_lib.make_mesh()
    opt_cfg, plateau_cfg = config.optimizer, config.optimizer.plateau
    programs = _programs(task, opt_cfg, mesh)
    _, _, eval_rng = _rngs(config.seed)
    ckpt = checkpoint_lib.Checkpointer(
        workdir, vocab_fingerprint=vocab_fingerprint, keep=config.keep,
        best_metric=config.best_metric, async_save=config.async_checkpoints)
  guard = _Guard(ckpt, opt_cfg)
  writer = None
  bar = None
  # The batches on the devices ahead of the step that uses them; their positions are the
  # iterators' positions after the batches the model consumed (what checkpoints save).
  batches = encoder_batches = None
  # Aggressive training's controller (He et al. start from a previous MI of 0).
  aggressive_state = {'active': aggressive is not None, 'previous': 0.0}

  def saved_position():
    position = _data_state(batches.position())
    if aggressive is None:
      return position
    encoder = encoder_batches.position() if encoder_batches is not None else encoder_iter.state()
    return {'train': position, 'encoder': _data_state(encoder),
            'aggressive': dict(aggressive_state)}

  try:
    with _intended_transfers():
      example_batch = _peek(train_iter)
      resume_step = None
      if ckpt.latest_step() is None:
        state = init_train_state(task, opt_cfg, example_batch, config.seed, mesh)
        if task.warm_start is not None:
          state = state.replace(params=jax.device_put(task.warm_start(state.params),
                                                      mesh_lib.replicated(mesh)))
        logging.info('Initialised a new run in %s.', workdir)
      else:
        # The newest latest checkpoint that can be read (damaged newer ones are
        # skipped with a warning, and deleted by discard_after below).
        target = abstract_train_state(task, opt_cfg, example_batch, mesh)
        state, data_state, meta = ckpt.restore_latest(target)
        resume_step = meta['step']
        if aggressive is not None:
          encoder_iter.restore(data_state['encoder'])
          aggressive_state.update(data_state['aggressive'])
          data_state = data_state['train']
        train_iter.restore(data_state)
        ckpt.discard_after(resume_step)
        # The config's learning rate and clipping apply on resume (scaled by
        # the plateau controller), so a diverged run can resume with new ones.
        state = programs.apply_config(state)
        logging.info('Resumed from step %d of %s.', resume_step, workdir)
      writer = writers.MetricWriter(workdir, resume_step=resume_step)
      step = int(jax.device_get(state.step))
      if resume_step is not None and step != resume_step:
        raise ValueError(f'Checkpoint {resume_step} holds a state at step {step}; '
                         'the checkpoint directory is inconsistent.')

      results: dict[str, Any] = {}
      train_metrics: dict[str, float] = {}
      evaluated_at = None
      stopped_early = optim.should_stop(state.plateau, plateau_cfg)
      if stopped_early:
        logging.info('The run already stopped after %d learning-rate decays.',
                     plateau_cfg.max_decays)
      bar = writers.progress_bar(config.num_steps, step, config.progress_bar)
      acc = None
      inner_steps = 0
      tick, tick_step = time.time(), step
      first_step = step
      batches = mesh_lib.Prefetcher(
          train_iter, mesh, depth=PREFETCH_DEPTH,
          limit=0 if stopped_early else max(config.num_steps - step, 0),
          read=lambda i: _next_batch(train_iter, first_step + i))
      if aggressive_state['active']:
        encoder_batches = mesh_lib.Prefetcher(
            encoder_iter, mesh, depth=PREFETCH_DEPTH, read=lambda _: _next_batch(encoder_iter, -1))

    def run_eval(state, step, write=True):
      nonlocal evaluated_at
      out = {}
      for split, make_iter in eval_data.items():
        metrics = evaluate(programs.eval_step, state, make_iter, task.summarize,
                           jax.random.fold_in(eval_rng, step), mesh)
        writers.log_metrics(step, split, metrics)
        if write:
          writer.write_scalars(step, split, metrics)
        out[split] = metrics
      if task.sample_fn is not None and write:
        texts = task.sample_fn(state.params, state.model_state,
                               jax.random.fold_in(eval_rng, step))
        writer.write_texts(step, 'samples', texts)
      evaluated_at = step
      return out

    # The step loop: nothing in it waits for the devices or reads a device value on the host
    # (checked by tests/training/test_accelerator_ready.py); the step counter is the host's
    # `step`, and device values are fetched only at logging, evaluation and checkpoint steps,
    # in the `_intended_transfers` block.
    while step < config.num_steps and not stopped_early:
      batch = next(batches)
      if aggressive_state['active']:
        state, taken = aggressive_inner_steps(programs.encoder_step, state, batch,
                                              encoder_batches, aggressive, mesh)
        inner_steps += taken
        state, out = programs.decoder_step(state, batch)
      else:
        state, out = programs.train_step(state, batch)
      acc = programs.accumulate(acc, out, state.step)
      step += 1
      bar.update(1)
      is_last = step == config.num_steps
      is_log = step % config.log_every == 0 or is_last
      is_eval = bool(eval_data) and (step % config.eval_every == 0 or is_last)
      if not (is_log or is_eval or step % config.checkpoint_every == 0 or is_last):
        continue
      with _intended_transfers():
        if is_log:
          host = _to_host({'acc': acc, 'lr': optim.get_learning_rate(state.opt_state)})
          guard.check_host_acc(host['acc'])
          host, lr = host['acc'], host['lr']
          train_metrics = dict(task.summarize(host['sums']))
          train_metrics['loss'] = host['loss'] / host['steps']
          train_metrics['grad_norm'] = host['grad_norm'] / host['steps']
          train_metrics['learning_rate'] = float(lr)
          now = time.time()
          train_metrics['steps_per_sec'] = (step - tick_step) / max(now - tick, 1e-9)
          if aggressive is not None:
            train_metrics['aggressive'] = float(aggressive_state['active'])
            train_metrics['inner_steps'] = inner_steps / max(step - tick_step, 1)
            inner_steps = 0
          tick, tick_step = now, step
          writer.write_scalars(step, 'train', train_metrics)
          writers.log_metrics(step, 'train', train_metrics)
          bar.set_postfix(loss=f'{train_metrics["loss"]:.4g}')
          acc = None
        if is_eval:
          guard.check_acc(acc)
          results.update(run_eval(state, step))
          val = results[config.eval_split]
          if config.best_metric not in val:
            raise KeyError(
                f'best_metric={config.best_metric!r} is not among the '
                f'{config.eval_split!r} metrics {sorted(val)}; set '
                'TrainConfig.best_metric to one of them.')
          guard.check_state(state, step)
          if aggressive_state['active']:
            if aggressive.stop_metric not in val:
              raise KeyError(
                  f'aggressive.stop_metric={aggressive.stop_metric!r} is not among the '
                  f'{config.eval_split!r} metrics {sorted(val)}.')
            value = float(val[aggressive.stop_metric])
            if value - aggressive_state['previous'] < 0:
              aggressive_state['active'] = False
              logging.info('Validation %s fell from %.4f to %.4f: aggressive training ends at '
                           'step %d.', aggressive.stop_metric, aggressive_state['previous'],
                           value, step)
            aggressive_state['previous'] = value
          if ckpt.maybe_save_best(step, state, saved_position(), val):
            logging.info('New best %s=%.4f at step %d.', config.best_metric,
                         val[config.best_metric], step)
          if plateau_cfg.enabled:
            decays = int(jax.device_get(state.plateau.num_decays))
            state = programs.apply_plateau(state, val[config.best_metric])
            if int(jax.device_get(state.plateau.num_decays)) > decays:
              lr = float(jax.device_get(optim.get_learning_rate(state.opt_state)))
              logging.info('Validation %s has not improved for %d evaluations: '
                           'learning rate decayed to %g (decay %d).',
                           config.best_metric, plateau_cfg.patience, lr, decays + 1)
              if config.reload_best_on_decay and ckpt.best_step() is not None:
                ckpt.wait()
                try:
                  best, _, meta = ckpt.restore_best(abstract_train_state(
                      task, opt_cfg, example_batch, mesh))
                  state = state.replace(params=best.params, model_state=best.model_state)
                  logging.info('Continuing from the best parameters (step %d).', meta['step'])
                except errors.CheckpointError as e:
                  logging.warning('Continuing from the current parameters: %s', e)
            if optim.should_stop(state.plateau, plateau_cfg):
              stopped_early = True
              logging.info('Stopping early at step %d: the learning rate was decayed '
                           '%d times (max_decays).', step, plateau_cfg.max_decays)
        if step % config.checkpoint_every == 0 or is_last or stopped_early:
          guard.check_acc(acc)
          guard.check_state(state, step)
          ckpt.save_latest(step, state, saved_position(), train_metrics)

    with _intended_transfers():
      if eval_data and evaluated_at != step:
        # Nothing trained (already finished or stopped): report the final state;
        # its metrics are in the log already.
        results.update(run_eval(state, step, write=False))
    results.update(step=step, stopped_early=stopped_early, train=train_metrics)
    return results
  finally:
    with _intended_transfers():
      # The iterators stand after the batches the model consumed, as if nothing was read ahead.
      for prefetched in (batches, encoder_batches):
        if prefetched is not None:
          try:
            prefetched.rewind()
          except Exception as e:  # pylint: disable=broad-except  (never hide the real error)
            logging.warning('Could not put a data iterator back after the batches read '
                            'ahead: %s', e)
      if bar is not None:
        bar.close()
      ckpt.wait()
      ckpt.close()
      if writer is not None:
        writer.close()
