"""The config boundary: an ml_collections config -> typed objects -> data, model, loop, report.

Every `experiments/*.py` main is a few lines around `run` (train, then evaluate the best
checkpoint) or `evaluate_workdir` (evaluate a finished run). Below this module nothing sees a
ConfigDict: it is read here once, field by field, into the frozen dataclasses of the library.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging as pylogging
import math
import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from vae_jax import (della_metrics, dialogue_evaluation, errors, evaluation, fileio, losses,
                     probe, run_data)
from vae_jax import workdir as workdir_lib
# The config readers live in `configs`, the data readers in `run_data`; their names are kept
# here for research scripts.
from vae_jax.configs import (LM_KINDS, PATH_FIELDS, aggressive_config,  # noqa: F401
                             build_model, check_config, cvae_config, della_config, flow_config,
                             kl_schedule, kl_term_config, model_config, optimizer_config,
                             resolve_paths, train_config, transformer_config)
from vae_jax.data import bpe, pipeline
from vae_jax.data.vocab import Vocab, VocabMismatchError
from vae_jax.models.cvae import CVAE
from vae_jax.models.vae import encoder_param_mask
from vae_jax.nn import gpt2
from vae_jax.run_data import (encoder, eval_iterator, is_dialogue,  # noqa: F401
                              load_examples, load_pairs, load_split_examples,
                              load_train_examples)
from vae_jax.training import checkpoint as checkpoint_lib
from vae_jax.training import loop, mesh as mesh_lib, steps
from vae_jax.workdir import resolve_path, resolve_workdir  # noqa: F401

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"


# ---------------------------------------------------------------------------------------------
# The task the loop trains.
# ---------------------------------------------------------------------------------------------


def build_task(cfg, model, vocab: Vocab, total_steps: int, steps_per_epoch: int) -> steps.Task:
  is_vae = cfg.model.kind not in LM_KINDS
  max_len = cfg.eval.max_decode_length

  def init_fn(rng, batch):
    params_rng, latent_rng = jax.random.split(rng)
    return model.init({"params": params_rng, "latent": latent_rng},
                      *losses.model_inputs(model, batch), deterministic=True)

  def warm_start(params):  # GPT-2 weights for the Transformer (METHODS.md §4)
    _, pretrained = gpt2.load_gpt2_params(cfg.model.pretrained_dir)
    return gpt2.merge_pretrained(params, pretrained, at="transformer")[0]

  def sample_fn(params, model_state, rng):
    variables = {"params": params, **model_state}
    n = max(cfg.eval.num_print, 1)
    if is_vae:
      ids = evaluation.sample_prior(model, variables, rng, n, evaluation.code_dim(model),
                                    max_len)
    else:
      ids = evaluation.generate(model, variables, None, rng, max_length=max_len, greedy=False,
                                batch_size=n)
    return [" ".join(vocab.decode(row)) for row in np.asarray(ids)]

  if is_vae:
    loss_fn = losses.make_vae_loss(model, kl_schedule(cfg, total_steps, steps_per_epoch),
                                   kl_term_config(cfg), bow_weight=cfg.kl.get("bow_weight", 0.0))
    eval_fn = losses.make_vae_eval(model)
  else:
    loss_fn, eval_fn = losses.make_lm_loss(model), losses.make_lm_eval(model)
  # Dialogue responses need contexts: evaluation prints them (`evaluate_workdir`).
  return steps.Task(init_fn=init_fn, loss_fn=loss_fn, eval_fn=eval_fn,
                   summarize=losses.summarize,
                   sample_fn=None if is_dialogue(cfg) else sample_fn,
                   warm_start=warm_start if cfg.model.get("pretrained_dir") else None)


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------


def _check_resumable(cfg: ml_collections.ConfigDict, workdir: str, vocab: Vocab) -> None:
  """A resumed run must keep the model and data settings and the vocabulary of the run its
  checkpoints come from (`config.json`, `vocab.json`). Paths are compared resolved."""
  path = os.path.join(workdir, CONFIG_FILE)
  if os.path.exists(path):
    saved = resolve_paths(ml_collections.ConfigDict(
        workdir_lib.read_json(path, "the config of the run in this workdir")))
    current = json.loads(cfg.to_json_best_effort())
    saved = json.loads(saved.to_json_best_effort())
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


def _write_run_files(cfg: ml_collections.ConfigDict, workdir: str, inputs, fresh: bool) -> None:
  """`config.json`, `vocab.json` (and `data_filter.json`), written atomically by process 0
  once everything was checked; a resumed run keeps the files it was trained with."""
  if jax.process_index() != 0:
    return
  config_path, vocab_path = (os.path.join(workdir, f) for f in (CONFIG_FILE, VOCAB_FILE))
  if fresh or not os.path.exists(config_path):
    fileio.write_json_atomic(config_path, json.loads(cfg.to_json_best_effort()),
                             sort_keys=True)
  if fresh or not os.path.exists(vocab_path):
    inputs.vocab.save(vocab_path)
  if cfg.data.exclude:
    fileio.write_json_atomic(os.path.join(workdir, "data_filter.json"),
                             {"exclude": cfg.data.exclude, "removed": inputs.excluded,
                              "kept": len(inputs.train)})


class _DropLibraryInfo(pylogging.Filter):
  """Keeps checkpointing libraries' INFO chatter out of the experiment's log."""

  def filter(self, record: pylogging.LogRecord) -> bool:
    return record.levelno >= pylogging.WARNING or "/orbax/" not in record.pathname


def quiet_library_logs() -> None:
  logger = pylogging.getLogger("absl")
  if not any(isinstance(f, _DropLibraryInfo) for f in logger.filters):
    logger.addFilter(_DropLibraryInfo())


def run(cfg: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the configured model in `workdir` (resuming if possible), then evaluates the best
  checkpoint on `cfg.eval.splits`, writing `eval_<split>.json`; returns those metrics.

  Before anything is written, the config is checked (`check_config`), every split the run
  reads is loaded and checked (`run_data.load_inputs`), and a workdir that resumes is checked
  to hold the same model, data and vocabulary (`_check_resumable`). A workdir resumes when it
  holds a committed checkpoint; otherwise it is fresh, whatever an earlier failed start left.
  Relative paths (`workdir`, `PATH_FIELDS`) are resolved against the current directory.
  """
  quiet_library_logs()
  workdir = workdir_lib.resolve_workdir(workdir)
  resolve_paths(cfg)
  check_config(cfg)
  fresh = workdir_lib.is_fresh(workdir)
  inputs = run_data.load_inputs(cfg)
  vocab = inputs.vocab
  if not fresh:
    _check_resumable(cfg, workdir, vocab)
  encode = encoder(cfg, vocab)
  train = encode(inputs.train)
  valid = encode(inputs.valid)
  if len(train) == 0:
    raise errors.DataError(f"no training example fits --config.data.max_length="
                           f"{cfg.data.max_length} with --config.data.overlong=drop; raise "
                           "max_length or use overlong=truncate.")
  logging.info("vocabulary %d; train %s; valid %s", len(vocab), train.summary(),
               valid.summary())
  # Everything is checked: from here on the run writes.
  workdir_lib.prepare(workdir)
  if fresh and jax.process_index() == 0:
    workdir_lib.discard_stale_checkpoints(workdir)
  _write_run_files(cfg, workdir, inputs, fresh)

  train_iter = pipeline.TrainIterator(
      train, cfg.data.batch_size, seed=cfg.train.seed, bucket_window=cfg.data.bucket_window,
      pad_multiple=cfg.data.pad_multiple, process_index=jax.process_index(),
      process_count=jax.process_count())
  rows = pipeline.process_rows(cfg.data.batch_size, jax.process_index(), jax.process_count())
  logging.info("process %d of %d reads rows [%d, %d) of every global batch of %d",
               jax.process_index(), jax.process_count(), rows.start, rows.stop,
               cfg.data.batch_size)
  steps_per_epoch = train_iter.steps_per_epoch
  total_steps = cfg.train.num_steps or int(math.ceil(cfg.train.num_epochs * steps_per_epoch))
  model = build_model(cfg, len(vocab))
  task = build_task(cfg, model, vocab, total_steps, steps_per_epoch)
  mesh = mesh_lib.make_mesh()
  if cfg.get("pretrain") and cfg.pretrain.steps:
    pre_steps = total_steps if cfg.pretrain.steps < 0 else cfg.pretrain.steps
    pretrained = _pretrain_autoencoder(cfg, workdir, vocab, mesh, train_iter, pre_steps)
    task = dataclasses.replace(task, init_fn=_with_encoder(task.init_fn, pretrained))
  aggressive = aggressive_config(cfg)
  encoder_iter = None
  if aggressive is not None:
    # The inner steps' batches: the same data in an independent order (He et al. draw them at
    # random from the training set).
    encoder_iter = pipeline.TrainIterator(
        train, cfg.data.batch_size, seed=cfg.train.seed + 1,
        bucket_window=cfg.data.bucket_window, pad_multiple=cfg.data.pad_multiple,
        process_index=jax.process_index(), process_count=jax.process_count())
  train_cfg = train_config(cfg, total_steps, steps_per_epoch)
  logging.info("training %s for %d steps (%d per epoch) on %d devices", cfg.model.kind,
               total_steps, steps_per_epoch, mesh.size)
  loop.train_and_evaluate(
      task, train_iter,
      {"valid": lambda: eval_iterator(cfg, valid, cfg.data.eval_batch_size)},
      train_cfg, workdir, vocab.fingerprint, mesh=mesh, encoder_iter=encoder_iter)
  return evaluate_workdir(cfg, workdir, splits=_splits(cfg), vocab=vocab, model=model,
                          task=task, examples=inputs.evaluation)


PRETRAIN_DIR = "pretrain"


def _pretrain_autoencoder(cfg, workdir: str, vocab: Vocab, mesh, train_iter, steps: int):
  """Autoencoder pretraining (Li et al. 2019): the same model trained `steps` steps
  with beta = 0 (reconstruction only, no KL term), in `<workdir>/pretrain` (resumable like any
  run). Returns the variables of its best checkpoint (lowest validation reconstruction)."""
  pre = copy.deepcopy(cfg)
  with pre.unlocked():
    pre.pretrain.steps = 0
    pre.kl.kind = "kl"
    pre.kl.schedule, pre.kl.value, pre.kl.start = "constant", 0.0, 0.0
    pre.kl.free_bits = 0.0
    pre.train.num_steps, pre.train.num_epochs = steps, 0.0
    pre.train.aggressive = False
    pre.train.best_metric = "rec"
    pre.eval.splits = ""
  pre_dir = os.path.join(workdir, PRETRAIN_DIR)
  logging.info("autoencoder pretraining for %d steps in %s", steps, pre_dir)
  run(pre, pre_dir)
  pre_model = build_model(pre, len(vocab))
  pre_task = build_task(pre, pre_model, vocab, 1, 1)
  position = train_iter.state()
  example = next(train_iter)
  train_iter.restore(position)
  variables, _ = restore_variables(pre, pre_dir, pre_task, example, vocab, mesh, "best")
  return jax.device_get(variables)


def _with_encoder(init_fn, pretrained):
  """`init_fn` whose inference network (`encoder_param_mask`) and non-parameter collections
  come from `pretrained`; the decoder is freshly initialised (Li et al. 2019 reset it)."""

  def init(rng, batch):
    variables = dict(init_fn(rng, batch))
    mask = encoder_param_mask(variables["params"])
    variables["params"] = jax.tree.map(lambda enc, new, old: old if enc else new, mask,
                                       variables["params"], pretrained["params"])
    for name in variables:
      if name != "params":
        variables[name] = pretrained[name]
    return variables

  return init


def generation_kwargs(cfg) -> dict[str, int]:
  """The hole and generation settings of `evaluation.evaluate_vae` (defaults for runs saved
  before these fields existed)."""
  e = cfg.eval
  return dict(hole_samples=e.get("hole_samples", 10_000),
              num_prior_samples=e.get("num_prior_samples", 1000),
              num_interpolations=e.get("num_interpolations", 100),
              interpolation_steps=e.get("interpolation_steps", 10),
              max_decode_length=e.max_decode_length)


def _splits(cfg) -> list[str]:
  return run_data.split_names(cfg.eval.splits)


def restore_variables(cfg, workdir: str, task: loop.Task, example_batch, vocab: Vocab,
                      mesh, which: str = "best"):
  """Model variables of the best (or latest) checkpoint of a run, and its metadata; `meta`
  gains 'checkpoint', the one restored ('best/1200'): a damaged or missing best falls back to
  the newest intact best, then latest, one (`checkpoint.restore_for_evaluation`)."""
  target = steps.abstract_train_state(task, optimizer_config(cfg), example_batch, mesh)
  state, meta, used = checkpoint_lib.restore_for_evaluation(
      workdir, target, vocab_fingerprint=vocab.fingerprint, which=which)
  return {"params": state.params, **state.model_state}, {**meta, "checkpoint": used}


def evaluate_workdir(cfg, workdir: str, splits: list[str], *, vocab: Vocab | None = None,
                     model=None, task=None, which: str = "best", seed: int = 0,
                     examples: dict[str, list] | None = None) -> dict[str, Any]:
  """Evaluates a run's best checkpoint on `splits`; writes `<workdir>/eval_<split>.json`.

  `examples` (split -> examples, already capped at `eval.max_examples`) saves reading splits
  that were loaded and checked before training.
  """
  quiet_library_logs()
  examples = dict(examples or {})
  for split in splits:  # Every split is read and checked before the first is evaluated.
    if split not in examples:
      examples[split] = run_data.load_eval_split(cfg, split)
  if vocab is None:
    vocab = saved_vocabulary(workdir)
  if model is None:
    model = build_model(cfg, len(vocab))
  if task is None:
    task = build_task(cfg, model, vocab, 1, 1)
  encode = encoder(cfg, vocab)
  results = {}
  variables = None
  mesh = mesh_lib.make_mesh()
  for split in splits:
    data = encode(examples[split])
    batches = eval_iterator(cfg, data, cfg.eval.batch_size)
    if variables is None:
      variables, meta = restore_variables(cfg, workdir, task, next(iter(batches)), vocab,
                                          mesh, which)
      step, used = int(meta.get("step", -1)), meta["checkpoint"]
      logging.info("Evaluating checkpoint %s of %s.", used, workdir)
    global_batches = (mesh_lib.to_global(b, mesh) for b in batches)
    rng = jax.random.PRNGKey(seed)
    if is_dialogue(cfg):
      out, shown = _evaluate_dialogue(cfg, model, variables, vocab, data, global_batches, rng)
    elif cfg.model.kind in LM_KINDS:
      out = evaluation.evaluate_lm(model, variables, global_batches, rng)
    else:
      out = evaluation.evaluate_vae(model, variables, global_batches, rng,
                                    k_samples=cfg.eval.k_samples,
                                    chunk_size=cfg.eval.chunk_size,
                                    mi_max_examples=cfg.eval.mi_max_examples,
                                    **generation_kwargs(cfg))
      if cfg.model.kind == "della":  # the official estimators beside the correct ones
        out.update(della_metrics.paper_metrics(
            model, variables, (mesh_lib.to_global(b, mesh) for b in batches),
            jax.random.split(rng, 4)[0], k_samples=cfg.eval.k_samples,
            chunk_size=cfg.eval.chunk_size))
    reconstructions = None
    if cfg.model.kind not in LM_KINDS and not is_dialogue(cfg):
      scores, reconstructions = evaluation.reconstruction_metrics(
          model, variables, reconstruction_batches(cfg, data), rng)
      out.update(scores)
    out.update(split=split, checkpoint=used, step=step)
    results[split] = out
    if not is_dialogue(cfg):
      shown = _show_examples(cfg, model, variables, vocab, data, rng, reconstructions)
    if jax.process_index() == 0:
      fileio.write_json_atomic(os.path.join(workdir, f"eval_{split}.json"),
                               {**out, "examples": shown})
      print(examples_text(split, shown))
  if results and jax.process_index() == 0:
    print(metrics_table(results))
  return results


def _evaluate_dialogue(cfg, model, variables, vocab: Vocab, data, batches, rng):
  """`dialogue_evaluation.evaluate_cvae` on a split, the act/emotion probes, and the first
  `eval.num_print` contexts with their reference, sampled, greedy and beam responses."""
  e = cfg.eval
  eval_rng, probe_rng = jax.random.split(rng)
  out, responses = dialogue_evaluation.evaluate_cvae(
      model, variables, batches, eval_rng, k_samples=e.k_samples, chunk_size=e.chunk_size,
      mi_max_examples=e.mi_max_examples, hole_samples=e.get("hole_samples", 0),
      num_response_samples=e.num_response_samples, max_decode_length=e.max_decode_length,
      beam_size=e.beam_size)
  if e.probe_train_examples:
    out.update(_dialogue_probe(cfg, model, variables, vocab, data, probe_rng))
  text = lambda ids: " ".join(vocab.decode(ids))
  order = eval_iterator(cfg, data, e.batch_size).order
  order = order[order >= 0]  # responses come in the iterator's order
  rows = np.argsort(order)[:e.num_print]  # the first pairs of the split
  examples = []
  for r in rows:
    i = int(order[r])
    context = [text(data.contexts[j]) for j in range(
        data.context_start[i], data.context_start[i] + data.context_count[i])]
    examples.append({
        "context": context, "reference": text(responses["references"][r]),
        "samples": [text(h) for h in responses["samples"][r]],
        "greedy": text(responses["greedy"][r]),
        **({"beam": text(responses["beam"][r])} if responses["beam"] else {})})
  return out, {"dialogue": examples}


def _dialogue_features(cfg, model, variables, data, rng) -> np.ndarray:
  """`dialogue_evaluation.probe_features` of every pair of `data`, row i = pair i."""
  feature_fn = lambda tokens, context, speakers, i: dialogue_evaluation.probe_features(
      model, variables, tokens, context, speakers, jax.random.fold_in(rng, i))
  return probe.feature_matrix(data, feature_fn, cfg.eval.batch_size, cfg.data.pad_multiple,
                              keys=CVAE.input_keys)


def _dialogue_probe(cfg, model, variables, vocab: Vocab, test, rng) -> dict[str, float]:
  """Linear probes of the response's dialogue act and emotion from E_q[z|x,c] (the context
  vector for seq2seq): fitted on the first `eval.probe_train_examples` training pairs, scored
  on `test`; with the majority-class accuracy of the test set for reference."""
  train_pairs = load_pairs(cfg, cfg.data.train_split)[:cfg.eval.probe_train_examples]
  train = encoder(cfg, vocab)(train_pairs)
  train_rng, test_rng = jax.random.split(rng)
  train_x = _dialogue_features(cfg, model, variables, train, train_rng)
  test_x = _dialogue_features(cfg, model, variables, test, test_rng)
  out = {}
  for name, k in (("act", 4), ("emotion", 7)):
    train_y, test_y = getattr(train, name + "s"), getattr(test, name + "s")
    scores = probe.probe_accuracy(train_x, train_y, test_x, test_y, k)
    out[f"{name}_accuracy"] = scores["accuracy"]
    out[f"{name}_majority"] = float(np.bincount(test_y, minlength=k).max() / len(test_y))
  return out


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (its `config.json`); a clear error if there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise errors.WorkdirError(f"{path} not found: the workdir must be a directory written by "
                              "an experiments/*.py run (check --workdir).")
  return ml_collections.ConfigDict(workdir_lib.read_json(path, "the run's config"))


def saved_vocabulary(workdir: str) -> Vocab:
  """The vocabulary a run was trained with (its `vocab.json`); a clear error if it is missing
  or damaged."""
  path = os.path.join(workdir, VOCAB_FILE)
  if not os.path.exists(path):
    raise errors.WorkdirError(f"{path} not found: the workdir must be a directory written by "
                              "an experiments/*.py run (check --workdir).")
  try:
    return bpe.load_vocabulary(path)
  except (ValueError, KeyError, TypeError) as e:
    raise errors.WorkdirError(f"{path} is damaged ({e}); restore it from a copy, or retrain "
                              "in a fresh --workdir.") from e


def load_run(workdir: str, which: str = "best", *, with_meta: bool = False):
  """A finished run, for downstream use: (config, model, variables, vocab).

  The config is the run's saved `config.json`; the variables those of its best (or latest)
  checkpoint, restored on this process's devices (a damaged or missing best checkpoint falls
  back to the newest intact one, `restore_variables`). With `with_meta`, the checkpoint's
  metadata follows, its 'checkpoint' naming the one restored (e.g. 'latest/1250').
  """
  workdir = workdir_lib.resolve_workdir(workdir, must_exist=True)
  cfg = resolve_paths(saved_config(workdir))
  vocab = saved_vocabulary(workdir)
  model = build_model(cfg, len(vocab))
  task = build_task(cfg, model, vocab, 1, 1)
  b = cfg.data.eval_batch_size
  example = {"tokens": np.full((b, cfg.data.pad_multiple), 4, np.int32),
             "weights": np.ones((b,), np.float32)}
  if is_dialogue(cfg):
    example["context"] = np.full((b, cfg.data.context_window, cfg.data.pad_multiple), 4,
                                 np.int32)
    example["context_speakers"] = np.zeros((b, cfg.data.context_window), np.int32)
  variables, meta = restore_variables(cfg, workdir, task, example, vocab,
                                      mesh_lib.make_mesh(), which)
  return (cfg, model, variables, vocab, meta) if with_meta else (cfg, model, variables, vocab)


def reconstruction_batches(cfg, data) -> Iterator[np.ndarray]:
  """Token batches of the first `eval.num_reconstructions` sentences of `data` (0: none), in
  order, all padded to one width (one compiled decoding program for every full batch)."""
  n = min(cfg.eval.get("num_reconstructions", 1000), len(data))
  if n == 0:
    return
  width = pipeline.round_up(int(data.lengths[:n].max()), cfg.data.pad_multiple)
  b = cfg.eval.batch_size
  for start in range(0, n, b):
    yield pipeline.make_batch(data, np.arange(start, min(start + b, n)), width)["tokens"]


def _show_examples(cfg, model, variables, vocab: Vocab, data, rng,
                   reconstructions: list[list[int]] | None = None) -> dict[str, list]:
  """A few reconstructions (greedy from the posterior mean; the first of `reconstructions`
  when they are given, as `reconstruction_batches` orders them) and prior samples."""
  n = min(cfg.eval.num_print, len(data))
  if n == 0:
    return {}
  max_len = cfg.eval.max_decode_length
  rows = pipeline.make_batch(data, np.arange(n), pipeline.round_up(
      int(data.lengths[:n].max()), cfg.data.pad_multiple))["tokens"]
  text = lambda ids: [" ".join(vocab.decode(r))
                      for r in (ids if isinstance(ids, list) else np.asarray(ids))]
  if cfg.model.kind in LM_KINDS:
    return {"samples": text(evaluation.generate(model, variables, None, rng,
                                                max_length=max_len, greedy=False,
                                                batch_size=n))}
  if reconstructions is not None and len(reconstructions) >= n:
    recon = reconstructions[:n]
  else:
    recon = evaluation.reconstruct(model, variables, rows, rng, max_len)
  samples = evaluation.sample_prior(model, variables, rng, n, evaluation.code_dim(model),
                                    max_len)
  return {"inputs": text(rows), "reconstructions": text(recon), "samples": text(samples)}


def examples_text(split: str, examples: dict[str, list]) -> str:
  lines = []
  for ex in examples.get("dialogue", []):
    lines.append(f"[{split}] context:")
    lines += [f"    | {turn}" for turn in ex["context"]]
    lines.append(f"  reference: {ex['reference']}")
    lines += [f"  sample:    {h}" for h in ex["samples"][:3]]
    lines.append(f"  greedy:    {ex['greedy']}")
    if "beam" in ex:
      lines.append(f"  beam:      {ex['beam']}")
  if "inputs" in examples:
    lines.append(f"[{split}] reconstructions (greedy from the posterior mean):")
    for x, r in zip(examples["inputs"], examples["reconstructions"]):
      lines += [f"  x: {x}", f"  r: {r}"]
  if examples.get("samples"):
    lines.append(f"[{split}] samples:")
    lines += [f"  - {s}" for s in examples["samples"]]
  return "\n".join(lines)


COLUMNS = ("nll", "ppl", "elbo", "kl", "mi_per_batch", "mi_set", "au", "dispersion", "hole_kl",
           "hole_kl_null", "hole_kl_excess", "prior_matched_dims", "prior_self_bleu",
           "prior_distinct_2", "recon_bleu", "k_samples", "n_sentences", "n_tokens")


DIALOGUE_COLUMNS = ("nll", "ppl", "kl", "mi_per_batch", "mi_set", "au", "bow", "bleu1_precision", "bleu1_recall",
                    "bleu2_precision", "bleu2_recall", "bleu4_precision", "bleu4_recall",
                    "distinct_1", "distinct_2", "intra_distinct_1", "intra_distinct_2", "length",
                    "act_accuracy", "emotion_accuracy")


def metrics_table(results: dict[str, dict]) -> str:
  """A plain-text table: one row per split. A value with a standard error (`<key>_se`) is
  shown as `value±se`, and as `≈0` when it lies within two standard errors of zero."""
  dialogue_run = any("bleu1_precision" in r for r in results.values())
  columns = DIALOGUE_COLUMNS if dialogue_run else COLUMNS
  header = ["split", *columns]
  rows = [[split] + [_fmt(r.get(c), r.get(f"{c}_se", r.get(f"{c}_stderr"))) for c in columns]
          for split, r in results.items()]
  widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
  line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def _fmt(v, se=None) -> str:
  if v is None:
    return "-"
  if se is not None and isinstance(v, float) and se > 0:
    return "≈0" if abs(v) < 2 * se else f"{_fmt(v)}±{_fmt(float(se))}"
  if isinstance(v, float):
    return f"{v:.3f}" if abs(v) < 1e5 else f"{v:.4g}"
  return str(v)
