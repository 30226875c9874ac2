"""Metric writers and the progress bar."""

import logging
import math

import pytest

from vae_jax import errors
from vae_jax.training import writers


def test_jsonl_records_and_tensorboard_files(tmp_path):
  writer = writers.MetricWriter(str(tmp_path))
  writer.write_scalars(1, 'train', {'loss': 2.5, 'bad': math.nan})
  writer.write_scalars(2, 'valid', {'nll': 1.5})
  writer.write_texts(2, 'samples', ['a b c', 'd e'])
  writer.close()
  records = writers.read_metrics(str(tmp_path))
  assert records == [
      {'step': 1, 'split': 'train', 'metrics': {'loss': 2.5, 'bad': None}},
      {'step': 2, 'split': 'valid', 'metrics': {'nll': 1.5}},
      {'step': 2, 'split': 'samples', 'texts': ['a b c', 'd e']},
  ]
  assert any(p.name.startswith('events.out.tfevents')
             for p in (tmp_path / 'tensorboard').iterdir())


def test_resume_drops_records_after_the_checkpoint(tmp_path):
  writer = writers.MetricWriter(str(tmp_path), tensorboard=False)
  for step in (1, 2, 3, 4):
    writer.write_scalars(step, 'train', {'loss': float(step)})
  writer.close()
  writer = writers.MetricWriter(str(tmp_path), resume_step=2, tensorboard=False)
  writer.write_scalars(3, 'train', {'loss': 30.0})
  writer.close()
  assert [(r['step'], r['metrics']['loss']) for r in writers.read_metrics(str(tmp_path))
          ] == [(1, 1.0), (2, 2.0), (3, 30.0)]
  # A fresh run (no checkpoint) starts a fresh log.
  writers.MetricWriter(str(tmp_path), tensorboard=False).close()
  assert writers.read_metrics(str(tmp_path)) == []


def _write_log(tmp_path, steps):
  writer = writers.MetricWriter(str(tmp_path), tensorboard=False)
  for step in steps:
    writer.write_scalars(step, 'train', {'loss': float(step)})
  writer.close()
  return tmp_path / 'metrics.jsonl'


def test_torn_last_line_is_dropped_and_resume_rewrites_the_log(tmp_path, caplog):
  path = _write_log(tmp_path, (1, 2, 3))
  with open(path, 'a') as f:
    f.write('{"step": 4, "split": "train", "metr')  # Killed mid-write: no newline.
  caplog.set_level(logging.WARNING)
  assert [r['step'] for r in writers.read_metrics(str(tmp_path))] == [1, 2, 3]
  [warning] = [r.getMessage() for r in caplog.records]
  assert warning.startswith(f'Dropped line 4 of {path}, its last (not valid JSON at column ')
  assert warning.endswith('): it was cut off mid-write (a killed run or a full disk).')
  # Resuming rewrites the file without it, so the next record gets a line of its own.
  writer = writers.MetricWriter(str(tmp_path), resume_step=3, tensorboard=False)
  writer.write_scalars(4, 'train', {'loss': 40.0})
  writer.close()
  caplog.clear()
  assert [(r['step'], r['metrics']['loss']) for r in writers.read_metrics(str(tmp_path))
          ] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
  assert not caplog.records
  # A zero-filled tail (a full disk) is torn too.
  with open(path, 'ab') as f:
    f.write(bytes(16))
  assert len(writers.read_metrics(str(tmp_path))) == 4


def test_invalid_line_before_the_last_is_a_clear_error(tmp_path):
  path = _write_log(tmp_path, (1, 2, 3))
  lines = path.read_text().splitlines(keepends=True)
  lines[1] = lines[1][:20] + '\n'
  path.write_text(''.join(lines))
  message = f'{path} line 2 is not a metrics record (not valid JSON at column '
  with pytest.raises(errors.WorkdirError, match='Delete that line') as info:
    writers.read_metrics(str(tmp_path))
  assert str(info.value).startswith(message)
  with pytest.raises(errors.WorkdirError, match='line 2'):
    writers.MetricWriter(str(tmp_path), resume_step=3, tensorboard=False)


def test_disabled_writer_writes_nothing(tmp_path):
  writer = writers.MetricWriter(str(tmp_path / 'run'), enabled=False)
  writer.write_scalars(1, 'train', {'loss': 1.0})
  writer.write_texts(1, 'samples', ['x'])
  writer.close()
  assert not (tmp_path / 'run').exists()


def test_progress_bar_is_off_when_asked_and_when_not_a_terminal():
  assert writers.progress_bar(10, enabled=False).disable
  assert writers.progress_bar(10).disable  # pytest captures stderr: not a TTY.
  bar = writers.progress_bar(10, initial=3, enabled=True)
  assert not bar.disable and bar.n == 3
  bar.close()
