"""Metric writers and the progress bar."""

import math

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
