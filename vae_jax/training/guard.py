"""The loop's NaN/Inf guard: a non-finite train loss, sum or parameter stops the run with
what to do about it, before the bad state is saved."""

import math
import os

import jax

from vae_jax import errors
from vae_jax.training import checkpoint as checkpoint_lib
from vae_jax.training import optim
from vae_jax.training import steps

# Training produced a NaN or Inf; the bad state was not saved.
NonFiniteLossError = errors.NonFiniteLossError


class Guard:
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
    self.check_host_acc(steps.to_host({k: acc[k] for k in ('first_bad_step', 'bad_loss')}))

  def check_host_acc(self, host_acc) -> None:
    """`check_acc` of train sums already fetched by `steps.to_host`."""
    bad_step, bad_loss = host_acc['first_bad_step'], host_acc['bad_loss']
    if bad_step >= 0:
      loss = 'the loss' if not math.isfinite(bad_loss) else 'a train sum'
      self.fail(bad_step, f'{loss} was not finite (loss={bad_loss})')

  def check_state(self, state: steps.TrainState, step: int) -> None:
    if not bool(steps.to_host(_jit_all_finite(state.params))):
      self.fail(step, 'the parameters were not finite after the update')


_jit_all_finite = jax.jit(steps.all_finite)
