"""Damaged checkpoints: the one-line cause of a failed read, with orbax's own reports kept quiet.

`vae_jax.training.checkpoint` restores the checkpoints of a kind newest first and skips one that
cannot be read with one warning line. This module supplies that line and the silence around
it: `Damaged` carries the cause of one unreadable checkpoint, `describe_error` turns an
exception into that short cause, and `quiet_restore` keeps off the console the reports orbax,
asyncio and tensorstore's threads make of the same failure.
"""

from collections.abc import Iterator
import contextlib
import gc
import logging as pylogging
import os
import re
import sys
import types
import warnings

import orbax.checkpoint as ocp

from vae_jax import errors

# Longest cause quoted in a warning or error line (longer ones lose their middle).
MAX_CAUSE = 400


class Damaged(Exception):
  """One checkpoint could not be read; `cause` is one short line (the part and the error)."""

  def __init__(self, cause: str):
    super().__init__(cause)
    self.cause = cause


def describe_error(exc: BaseException, folder: str | None = None,
                  limit: int = MAX_CAUSE) -> str:
  """`exc` as one short line: `Type: message`.

  Line breaks are folded, tensorstore's long spec dumps and driver chains are
  dropped, paths inside `folder` are written relative to it, and a line longer
  than `limit` loses its middle (the end usually says what went wrong).
  """
  text = errors.one_line(str(exc))
  text = re.split(r' ?\[tensorstore_spec', text, maxsplit=1)[0]
  text = re.sub(r'Error opening "\w+" driver: ', '', text)
  if folder:
    text = text.replace(folder.rstrip(os.sep) + os.sep, '')
  text = f'{type(exc).__name__}: {text}' if text else type(exc).__name__
  if len(text) > limit:
    head = limit * 2 // 5
    text = f'{text[:head]} ... {text[-(limit - head - 5):]}'
  return text


class _DropLibraryReports(pylogging.Filter):
  """Drops orbax's warnings and errors, and asyncio's reports of tensorstore reads whose
  failure nobody awaited (their own accounts of a failed restore)."""

  _ORBAX = os.path.dirname(os.path.dirname(os.path.abspath(ocp.__file__))) + os.sep
  _UNAWAITED = ('Future exception was never retrieved', 'Task exception was never retrieved')

  def filter(self, record: pylogging.LogRecord) -> bool:
    if record.name == 'asyncio':
      return not str(record.msg).startswith(self._UNAWAITED)
    return record.levelno < pylogging.WARNING or not record.pathname.startswith(self._ORBAX)


def _is_closed_loop_error(exc) -> bool:
  """A read that finished after orbax closed its event loop (tensorstore's callback fails)."""
  return isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'


def _drop_closed_loop_reports() -> None:
  """Installs, once per process, hooks that drop the 'Event loop is closed' reports of the
  reads of a checkpoint that failed; everything else reaches the previous hooks. They stay
  installed: reads still in flight when a restore gave up report from tensorstore's threads
  later, through `sys.unraisablehook` or `sys.excepthook`."""
  if getattr(sys.unraisablehook, '_drops_closed_loop_reports', False):
    return
  previous_unraisable, previous_except = sys.unraisablehook, sys.excepthook

  def unraisable_hook(unraisable):
    if not _is_closed_loop_error(unraisable.exc_value):
      previous_unraisable(unraisable)

  def except_hook(kind, value, traceback):
    if not _is_closed_loop_error(value):
      previous_except(kind, value, traceback)

  unraisable_hook._drops_closed_loop_reports = True
  sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook


@contextlib.contextmanager
def quiet_restore(collect: bool = True) -> Iterator[None]:
  """Keeps orbax's own reports of a failed restore off the console.

  When one array of a checkpoint cannot be read, orbax logs errors and closes its
  event loop while the other arrays are still being read; each of those reads
  then reports a 'RuntimeError: Event loop is closed' traceback
  (`_drop_closed_loop_reports` drops those), asyncio logs the failures nobody awaited when their
  futures are collected, and Python warns about the coroutines of reads that
  never started. Inside this context orbax's warnings and errors and
  those reports are dropped (everything else passes); with `collect` it collects
  garbage before it ends if a read failed (an exception left the context, or the
  caller set `.failed` on the yielded object after catching one), so that the
  futures of failed reads are gone by then. The caller's one line per damaged
  checkpoint is then all a person sees. (A successful read leaves nothing to collect;
  a full collection in a large process costs ~0.2 s.)
  """
  log_filter = _DropLibraryReports()
  loggers = (pylogging.getLogger('absl'), pylogging.getLogger(),
             pylogging.getLogger('asyncio'))
  for logger in loggers:
    logger.addFilter(log_filter)
  _drop_closed_loop_reports()
  try:
    with warnings.catch_warnings():
      # Coroutines of the reads that never started, collected unawaited.
      warnings.filterwarnings('ignore', "coroutine '.*' was never awaited", RuntimeWarning)
      outcome = types.SimpleNamespace(failed=False)
      try:
        yield outcome
      except BaseException:
        outcome.failed = True
        raise
      finally:
        if collect and outcome.failed:
          gc.collect()
  finally:
    for logger in loggers:
      logger.removeFilter(log_filter)
