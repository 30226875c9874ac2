"""Metric writers: JSON lines and TensorBoard event files (process 0 only), a progress bar.

`<workdir>/metrics.jsonl` holds one object per line,
`{"step": 100, "split": "train", "metrics": {"loss": 4.2, ...}}`, and
`<workdir>/tensorboard/` the same scalars as `<split>/<name>` plus text samples.
tensorboardX writes event files without TensorFlow.
"""

import json
import math
import os
import sys
from collections.abc import Iterable, Mapping

from absl import logging
import jax
import numpy as np
import tqdm

from vae_jax import errors
from vae_jax import fileio


def _to_float(value) -> float | None:
  value = float(np.asarray(value))
  return value if math.isfinite(value) else None


def read_metrics(workdir: str) -> list[dict]:
  """Reads `<workdir>/metrics.jsonl` (non-finite values are stored as null).

  A last line that is not a complete record was cut off mid-write (the run was
  killed, or the disk filled up): it is dropped with a warning. An invalid line
  before the last means the file is damaged: `errors.WorkdirError` names it.
  """
  path = os.path.join(os.fspath(workdir), 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  try:
    with open(path, encoding='utf-8', errors='replace') as f:
      lines = [(number, line) for number, line in enumerate(f, 1) if line.strip()]
  except OSError as e:
    raise errors.WorkdirError(
        f'Cannot read {path}: {e.strerror or e}. Check its permissions.') from e
  records = []
  for i, (number, line) in enumerate(lines):
    record, problem = _parse_record(line)
    if problem is None:
      records.append(record)
    elif i == len(lines) - 1:
      logging.warning('Dropped line %d of %s, its last (%s): it was cut off mid-write '
                      '(a killed run or a full disk).', number, path, problem)
    else:
      raise errors.WorkdirError(
          f'{path} line {number} is not a metrics record ({problem}): the file is damaged. '
          'Delete that line (or the whole file, losing the metrics written so far) and '
          'run again.')
  return records


def _parse_record(line: str) -> tuple[dict | None, str | None]:
  """(record, None) for a JSON object with an integer 'step'; else (None, what is wrong)."""
  try:
    record = json.loads(line.rstrip('\r\n'))
  except json.JSONDecodeError as e:
    return None, f'not valid JSON at column {e.colno}: {e.msg}'
  if not isinstance(record, dict) or not isinstance(record.get('step'), int):
    return None, 'not a JSON object with an integer "step"'
  return record, None


class MetricWriter:
  """Writes scalars and texts to metrics.jsonl and TensorBoard.

  Args:
    workdir: the run's directory.
    resume_step: when resuming from the checkpoint of this step, records of
      later steps (written by the interrupted run after its last checkpoint)
      are dropped from metrics.jsonl and TensorBoard, so the files read as if
      the run had never stopped.
    enabled: write anything at all; defaults to process 0 only.
    tensorboard: also write TensorBoard event files.
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None,
               enabled: bool | None = None, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self.path = os.path.join(os.fspath(workdir), 'metrics.jsonl')
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(os.fspath(workdir), exist_ok=True)
    if resume_step is not None:
      self._truncate_after(resume_step)
    elif os.path.exists(self.path):
      os.remove(self.path)  # A fresh run in an old workdir starts a fresh log.
    self._file = open(self.path, 'a')
    if tensorboard:
      import tensorboardX  # Imported lazily: it is slow to import.
      self._tb = tensorboardX.SummaryWriter(
          logdir=os.path.join(os.fspath(workdir), 'tensorboard'),
          purge_step=None if resume_step is None else resume_step + 1)

  def _truncate_after(self, step: int) -> None:
    """Rewrites metrics.jsonl with the records up to `step` only (atomically), which
    also drops a torn last line, so that appending starts on a line of its own."""
    if not os.path.exists(self.path):
      return
    kept = [r for r in read_metrics(os.path.dirname(self.path)) if r['step'] <= step]
    fileio.write_text_atomic(self.path, ''.join(json.dumps(r) + '\n' for r in kept))

  def write_scalars(self, step: int, split: str, metrics: Mapping[str, float]) -> None:
    """Writes one record of scalar metrics of `split` at `step`."""
    if not self.enabled:
      return
    values = {k: _to_float(v) for k, v in metrics.items()}
    self._file.write(json.dumps({'step': int(step), 'split': split, 'metrics': values}) + '\n')
    self._file.flush()
    if self._tb is not None:
      for name, value in values.items():
        self._tb.add_scalar(f'{split}/{name}', math.nan if value is None else value, step)

  def write_texts(self, step: int, split: str, texts: Iterable[str]) -> None:
    """Writes text samples (TensorBoard text tab; JSONL record with key 'texts')."""
    if not self.enabled:
      return
    texts = [str(t) for t in texts]
    self._file.write(json.dumps({'step': int(step), 'split': split, 'texts': texts}) + '\n')
    self._file.flush()
    if self._tb is not None:
      # Markdown: two trailing spaces keep one sample per line.
      self._tb.add_text(f'{split}/samples', '  \n'.join(texts), step)

  def flush(self) -> None:
    if self.enabled and self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def format_metrics(metrics: Mapping[str, float]) -> str:
  """`name=value` pairs for log lines."""
  return ', '.join(f'{k}={float(v):.4g}' for k, v in sorted(metrics.items()))


def log_metrics(step: int, split: str, metrics: Mapping[str, float]) -> None:
  logging.info('[%d] %s: %s', step, split, format_metrics(metrics))


def progress_bar(total: int, initial: int = 0, enabled: bool | None = None,
                 desc: str = 'train') -> tqdm.tqdm:
  """A tqdm bar over steps; off when `enabled` is False, and by default off

  unless this is process 0 writing to a terminal.
  """
  if enabled is None:
    enabled = jax.process_index() == 0 and sys.stderr.isatty()
  elif jax.process_index() != 0:
    enabled = False
  return tqdm.tqdm(total=total, initial=initial, disable=not enabled, desc=desc,
                   dynamic_ncols=True, leave=False)
