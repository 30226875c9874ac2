"""Running an experiment: checks, data, workdir files, iterators, the loop, final evaluation.

`run` trains a typed config (`configs.read`) in a workdir, resuming when the workdir holds a
committed checkpoint, and then evaluates the best checkpoint on `eval.splits`. Autoencoder
pretraining, when the config asks for it, is a first phase of the same loop in
`<workdir>/pretrain` (`vae_jax.pretraining`), whose best encoder the run starts from.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
from absl import logging

from vae_jax import build, configs, errors, fileio, pretraining, run_data
from vae_jax import workdir as workdir_lib
from vae_jax.data import pipeline
from vae_jax.data.vocab import Vocab, VocabMismatchError
from vae_jax.run_config import ExperimentConfig, loop_config, total_steps
from vae_jax.run_evaluation import (CONFIG_FILE, VOCAB_FILE, evaluate_workdir, restore_variables,
                                    saved_vocabulary)
from vae_jax.training import checkpoint as checkpoint_lib
from vae_jax.training import loop, mesh as mesh_lib

TRAINING_FILE = "training.json"   # the training phase's summary (`training_summary`)


def run(cfg: ExperimentConfig, workdir: str) -> dict[str, Any]:
  """Trains the configured model in `workdir` (resuming if possible), then evaluates the best
  checkpoint on `cfg.eval.splits`, writing `eval_<split>.json`; returns those metrics.

  `cfg` is checked already (`configs.read`). Before anything is written, every split the run
  reads is loaded and checked (`run_data.load_inputs`), and a workdir that resumes is checked
  to hold the same model, data and vocabulary (`_check_resumable`). A workdir resumes when it
  holds a committed checkpoint; otherwise it is fresh, whatever an earlier failed start left.
  A relative `workdir` is resolved against the current directory.
  """
  checkpoint_lib.quiet_library_logs()
  workdir = workdir_lib.resolve_workdir(workdir)
  fresh = workdir_lib.is_fresh(workdir)
  inputs = run_data.load_inputs(cfg)
  vocab = inputs.vocab
  if not fresh:
    _check_resumable(cfg, workdir, vocab)
  encode = run_data.encoder(cfg.data, vocab)
  train = encode(inputs.train)
  valid = encode(inputs.valid)
  if len(train) == 0:
    raise errors.DataError(f"no training example fits --config.data.max_length="
                           f"{cfg.data.max_length} with --config.data.overlong=drop; raise "
                           "max_length or use overlong=truncate.")
  logging.info("vocabulary %d; train %s; valid %s", len(vocab), train.summary(),
               valid.summary())
  # Everything is checked: from here on the run writes.
  _write_run_files(cfg, workdir, inputs, fresh)
  train_iter = _train_iterator(cfg, train, cfg.train.seed)
  rows = pipeline.process_rows(cfg.data.batch_size, jax.process_index(), jax.process_count())
  logging.info("process %d of %d reads rows [%d, %d) of every global batch of %d",
               jax.process_index(), jax.process_count(), rows.start, rows.stop,
               cfg.data.batch_size)
  steps_per_epoch = train_iter.steps_per_epoch
  num_steps = total_steps(cfg.train, steps_per_epoch)
  model = build.build_model(cfg.model, len(vocab))
  task = build.build_task(cfg, model, vocab, num_steps, steps_per_epoch)
  mesh = mesh_lib.make_mesh()
  if cfg.pretrain.steps:
    pre = pretraining.pretraining_config(cfg, pretraining.phase_steps(cfg.pretrain, num_steps))
    pretrained = _pretrain(pre, os.path.join(workdir, pretraining.PRETRAIN_DIR), inputs,
                           (train, valid), train_iter, mesh)
    task = dataclasses.replace(task, init_fn=pretraining.with_encoder(task.init_fn, pretrained))
  _train(cfg, task, workdir, vocab, (train, valid), train_iter, mesh, num_steps)
  return evaluate_workdir(cfg, workdir, splits=list(cfg.eval.splits), vocab=vocab, model=model,
                          task=task, examples=inputs.evaluation)


def _train_iterator(cfg: ExperimentConfig, train, seed: int) -> pipeline.TrainIterator:
  """This process's resumable stream of training batches, shuffled by `seed`."""
  return pipeline.TrainIterator(
      train, cfg.data.batch_size, seed=seed, bucket_window=cfg.data.bucket_window,
      pad_multiple=cfg.data.pad_multiple, process_index=jax.process_index(),
      process_count=jax.process_count())


def _train(cfg: ExperimentConfig, task, workdir: str, vocab: Vocab, data, train_iter, mesh,
           num_steps: int) -> None:
  """The loop on `data` = (train, valid), in `workdir`, to `num_steps`."""
  train, valid = data
  encoder_iter = None
  if cfg.train.aggressive is not None:
    # The inner steps' batches: the same data in an independent order (He et al. draw them at
    # random from the training set).
    encoder_iter = _train_iterator(cfg, train, cfg.train.seed + 1)
  steps_per_epoch = train_iter.steps_per_epoch
  logging.info("training %s for %d steps (%d per epoch) on %d devices", cfg.model.kind,
               num_steps, steps_per_epoch, mesh.size)
  results = loop.train_and_evaluate(
      task, train_iter,
      {"valid": lambda: run_data.eval_iterator(cfg.data, valid, cfg.data.eval_batch_size)},
      loop_config(cfg.train, cfg.optimizer, num_steps, steps_per_epoch), workdir,
      vocab.fingerprint, mesh=mesh, encoder_iter=encoder_iter)
  if jax.process_index() == 0:
    fileio.write_json_atomic(os.path.join(workdir, TRAINING_FILE),
                             training_summary(results, steps_per_epoch, num_steps, workdir))


def training_summary(results, steps_per_epoch: int, num_steps: int, workdir: str):
  """What the training phase did, for tables: the steps trained and their epochs, whether the
  plateau controller stopped it before `num_steps`, and the best checkpoint's step, epoch and
  selection metric (`checkpoints/best.json`)."""
  step = int(results["step"])
  best = {}
  path = os.path.join(checkpoint_lib.checkpoint_dir(workdir), "best.json")
  if os.path.exists(path):
    best = workdir_lib.read_json(path, "the best checkpoint's record")
  best_step = best.get("step")
  return {"steps": step, "steps_per_epoch": steps_per_epoch, "epochs": step / steps_per_epoch,
          "max_steps": num_steps, "stopped_early": bool(results["stopped_early"]),
          "best_step": best_step,
          "best_epoch": None if best_step is None else best_step / steps_per_epoch,
          "best_metric": best.get("metric"), "best_value": best.get("value")}


def _pretrain(pre: ExperimentConfig, pre_dir: str, inputs, data, train_iter, mesh):
  """Runs the pretraining phase `pre` (`pretraining.pretraining_config`) in `pre_dir`, a run
  directory of its own (resumable like any run), on the run's checked `inputs` and encoded
  `data`; returns the variables of its best checkpoint (lowest validation reconstruction)."""
  logging.info("autoencoder pretraining for %d steps in %s", pre.train.num_steps, pre_dir)
  fresh = workdir_lib.is_fresh(pre_dir)
  if not fresh:
    _check_resumable(pre, pre_dir, inputs.vocab)
  _write_run_files(pre, pre_dir, inputs, fresh)
  pre_iter = _train_iterator(pre, data[0], pre.train.seed)
  model = build.build_model(pre.model, len(inputs.vocab))
  task = build.build_task(pre, model, inputs.vocab, pre.train.num_steps,
                          pre_iter.steps_per_epoch)
  _train(pre, task, pre_dir, inputs.vocab, data, pre_iter, mesh, pre.train.num_steps)
  position = train_iter.state()
  example = next(train_iter)
  train_iter.restore(position)
  variables, _ = restore_variables(pre, pre_dir, task, example, inputs.vocab, mesh, "best")
  return jax.device_get(variables)


def _check_resumable(cfg: ExperimentConfig, workdir: str, vocab: Vocab) -> None:
  """A resumed run must keep the model and data settings and the vocabulary of the run its
  checkpoints come from (`config.json`, `vocab.json`). Paths are compared resolved."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    saved = configs.resolve_paths(configs.from_json(
        workdir_lib.read_json(path, "the config of the run in this workdir")))
    saved = json.loads(saved.to_json_best_effort())
    current = json.loads(cfg.record)
    changed = [d for section in ("model", "data")
               for d in workdir_lib.differences(saved.get(section, {}),
                                                current.get(section, {}), section + ".")]
    if changed:
      listed = "; ".join(f"--config.{name}={now} (trained with {before})"
                         for name, before, now in changed[:4])
      raise errors.ConfigError(
          f"{listed}: the model and data settings must stay those of the run in {workdir} "
          f"({path}) to resume it; drop these overrides, or start a fresh --workdir.")
  path = os.path.join(workdir, VOCAB_FILE)
  if os.path.exists(path):
    saved_vocab = saved_vocabulary(workdir)
    try:
      saved_vocab.assert_compatible(vocab)
    except VocabMismatchError as e:
      raise VocabMismatchError(
          f"the vocabulary built from the training data differs from {path}, which the "
          f"checkpoints in this workdir were trained with ({e}); use the same data and "
          "vocabulary settings, or a fresh --workdir.") from None


def _write_run_files(cfg: ExperimentConfig, workdir: str, inputs, fresh: bool) -> None:
  """Creates the workdir (a fresh one without stale checkpoints) and writes `config.json`,
  `vocab.json` (and `data_filter.json`) atomically from process 0, once everything was
  checked; a resumed run keeps the files it was trained with."""
  workdir_lib.prepare(workdir)
  if jax.process_index() != 0:
    return
  if fresh:
    workdir_lib.discard_stale_checkpoints(workdir)
  config_path, vocab_path = (os.path.join(workdir, f) for f in (CONFIG_FILE, VOCAB_FILE))
  if fresh or not os.path.exists(config_path):
    fileio.write_json_atomic(config_path, json.loads(cfg.record), sort_keys=True)
  if fresh or not os.path.exists(vocab_path):
    inputs.vocab.save(vocab_path)
  if cfg.data.exclude:
    fileio.write_json_atomic(os.path.join(workdir, "data_filter.json"),
                             {"exclude": cfg.data.exclude, "removed": inputs.excluded,
                              "kept": len(inputs.train)})
