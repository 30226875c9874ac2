"""Evaluating a run: its checkpoint restored, every split evaluated, the results written.

`evaluate_workdir` evaluates the best (or latest) checkpoint of a workdir on splits and writes
`<workdir>/eval_<split>.json` (and, for sentence models, `eval_<split>_sentences.json`: every
sentence's IW-NLL, for paired comparisons); the runner calls it after training,
`experiments/evaluate.py` on any finished or interrupted run. `evaluate_split` is the one
function that calls the evaluation suites (`vae_jax.evaluation`, `dialogue_evaluation`,
`della_metrics`). `load_run` gives a finished run (config, model, variables, vocabulary) for
downstream use.
"""

from __future__ import annotations

import os
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
from absl import logging

from vae_jax import (build, configs, della_metrics, dialogue_evaluation, errors, evaluation,
                     fileio, generation, probe, reporting, run_data)
from vae_jax import workdir as workdir_lib
from vae_jax.data import bpe, pipeline
from vae_jax.data.vocab import Vocab
from vae_jax.models.cvae import CVAE
from vae_jax.run_config import ExperimentConfig
from vae_jax.training import checkpoint as checkpoint_lib
from vae_jax.training import mesh as mesh_lib, steps

CONFIG_FILE = "config.json"
VOCAB_FILE = "vocab.json"


def restore_variables(cfg: ExperimentConfig, workdir: str, task: steps.Task, example_batch,
                      vocab: Vocab, mesh, which: str = "best"):
  """Model variables of the best (or latest) checkpoint of a run, and its metadata; `meta`
  gains 'checkpoint', the one restored ('best/1200'): a damaged or missing best falls back to
  the newest intact best, then latest, one (`checkpoint.restore_for_evaluation`)."""
  target = steps.abstract_train_state(task, cfg.optimizer, example_batch, mesh)
  state, meta, used = checkpoint_lib.restore_for_evaluation(
      workdir, target, vocab_fingerprint=vocab.fingerprint, which=which)
  return {"params": state.params, **state.model_state}, {**meta, "checkpoint": used}


def evaluate_workdir(cfg: ExperimentConfig, workdir: str, splits: list[str], *,
                     vocab: Vocab | None = None, model=None, task=None, which: str = "best",
                     seed: int = 0, examples: dict[str, list] | None = None) -> dict[str, Any]:
  """Evaluates a run's best checkpoint on `splits`; writes `<workdir>/eval_<split>.json` and,
  except for dialogue runs, `<workdir>/eval_<split>_sentences.json` (`sentence_values`).

  `examples` (split -> examples, already capped at `eval.max_examples`) saves reading splits
  that were loaded and checked before training.
  """
  checkpoint_lib.quiet_library_logs()
  examples = dict(examples or {})
  for split in splits:  # Every split is read and checked before the first is evaluated.
    if split not in examples:
      examples[split] = run_data.load_eval_split(cfg.data, split, cfg.eval.max_examples)
  if vocab is None:
    vocab = saved_vocabulary(workdir)
  if model is None:
    model = build.build_model(cfg.model, len(vocab))
  if task is None:
    task = build.build_task(cfg, model, vocab, 1, 1)
  encode = run_data.encoder(cfg.data, vocab)
  results = {}
  variables = None
  mesh = mesh_lib.make_mesh()
  for split in splits:
    data = encode(examples[split])
    batches = run_data.eval_iterator(cfg.data, data, cfg.eval.batch_size)
    if variables is None:
      variables, meta = restore_variables(cfg, workdir, task, next(iter(batches)), vocab,
                                          mesh, which)
      step, used = int(meta.get("step", -1)), meta["checkpoint"]
      logging.info("Evaluating checkpoint %s of %s.", used, workdir)
    out, shown, sentences = evaluate_split(cfg, model, variables, vocab, data, batches,
                                           jax.random.PRNGKey(seed), mesh)
    out.update(split=split, checkpoint=used, step=step)
    results[split] = out
    if jax.process_index() == 0:
      fileio.write_json_atomic(os.path.join(workdir, f"eval_{split}.json"),
                               {**out, "examples": shown})
      if sentences is not None:
        fileio.write_json_atomic(
            os.path.join(workdir, f"eval_{split}_sentences.json"),
            {"split": split, "checkpoint": used, "step": step,
             "k_samples": out["k_samples"], **sentences})
      print(reporting.examples_text(split, shown))
  if results and jax.process_index() == 0:
    print(reporting.metrics_table(results))
  return results


def evaluate_split(cfg: ExperimentConfig, model, variables, vocab: Vocab, data, batches,
                   rng: jax.Array, mesh):
  """(metrics, shown, sentences) of one split (`batches`, the `run_data.eval_iterator` of
  `data`): the suite of the run's kind (the dialogue CVAE's with its act/emotion probes, a
  language model's, or a VAE's with DELLA's official estimators and the BLEU of
  reconstructions), the first `eval.num_print` examples decoded, and the per-sentence values
  of `sentence_values` (None for dialogue)."""
  e = cfg.eval
  global_batches = (mesh_lib.to_global(b, mesh) for b in batches)
  n = min(e.num_print, len(data))
  max_len = e.max_decode_length
  if cfg.data.dialogue:
    eval_rng, probe_rng = jax.random.split(rng)
    out, responses = dialogue_evaluation.evaluate_cvae(
        model, variables, global_batches, eval_rng, k_samples=e.k_samples,
        chunk_size=e.chunk_size, mi_max_examples=e.mi_max_examples,
        hole_samples=e.hole_samples, num_response_samples=e.num_response_samples,
        max_decode_length=e.max_decode_length, beam_size=e.beam_size)
    if e.probe_train_examples:
      out.update(_dialogue_probe(cfg, model, variables, vocab, data, probe_rng))
    order = run_data.eval_iterator(cfg.data, data, e.batch_size).order
    return out, reporting.dialogue_examples(vocab, data, responses, order, e.num_print), None
  out, per_row = evaluation.evaluate(
      model, variables, global_batches, rng, k_samples=e.k_samples, chunk_size=e.chunk_size,
      mi_max_examples=e.mi_max_examples, per_sentence=True, **generation_kwargs(cfg))
  sentences = sentence_values(per_row, batches.order, data.source_indices)
  if cfg.model.kind == "della":  # the official estimators beside the correct ones
    out.update(della_metrics.paper_metrics(
        model, variables, (mesh_lib.to_global(b, mesh) for b in batches),
        jax.random.split(rng, 4)[0], k_samples=e.k_samples, chunk_size=e.chunk_size))
  if not model.code_dim:  # a language model: its samples
    if n == 0:
      return out, {}, sentences
    return out, reporting.shown_examples(vocab, generation.generate(
        model, variables, None, rng, max_length=max_len, greedy=False, batch_size=n)), sentences
  scores, reconstructions = generation.reconstruction_metrics(
      model, variables, reconstruction_batches(cfg, data), rng)
  out.update(scores)
  if n == 0:
    return out, {}, sentences
  rows = reporting.first_rows(data, n, cfg.data.pad_multiple)
  if reconstructions is not None and len(reconstructions) >= n:
    recon = reconstructions[:n]
  else:
    recon = generation.reconstruct(model, variables, rows, rng, max_len)
  samples = generation.sample_prior(model, variables, rng, n, model.code_dim, max_len)
  return (out, reporting.shown_examples(vocab, samples, inputs=rows, reconstructions=recon),
          sentences)


def sentence_values(per_row: dict[str, np.ndarray], order: np.ndarray,
                    source_indices: np.ndarray) -> dict[str, list]:
  """Per-sentence values of an evaluation, in the split's order.

  `per_row` holds arrays over the real rows of the evaluation batches, in batch order
  (`evaluation.evaluate(..., per_sentence=True)`); `order` is the batches' global row ->
  sentence map (`pipeline.EvalIterator.order`, -1 for padding) and `source_indices` each
  encoded sentence's index among the split's examples. Returns 'sentence' (those indices,
  ascending: a sentence dropped as over-long is absent), and each array of `per_row` in the
  same order (integers as they are, real values rounded to 1e-5).
  """
  rows = order[order >= 0]
  evaluated = {len(v) for v in per_row.values()}
  if evaluated != {len(rows)}:
    raise ValueError(f"{len(rows)} sentences in the batches' order but {sorted(evaluated)} "
                     "evaluated rows")
  by_sentence = np.argsort(rows, kind="stable")
  out = {"sentence": [int(i) for i in np.asarray(source_indices)[rows[by_sentence]]]}
  for key, values in per_row.items():
    values = np.asarray(values)[by_sentence]
    out[key] = (values.tolist() if np.issubdtype(values.dtype, np.integer)
                else [round(float(v), 5) for v in values])
  return out


def generation_kwargs(cfg: ExperimentConfig) -> dict[str, int]:
  """The hole and generation settings of `evaluation.evaluate`."""
  e = cfg.eval
  return dict(hole_samples=e.hole_samples, num_prior_samples=e.num_prior_samples,
              num_interpolations=e.num_interpolations,
              interpolation_steps=e.interpolation_steps, max_decode_length=e.max_decode_length)


def reconstruction_batches(cfg: ExperimentConfig, data) -> Iterator[np.ndarray]:
  """Token batches of the first `eval.num_reconstructions` sentences of `data` (0: none), in
  order, all padded to one width (one compiled decoding program for every full batch)."""
  n = min(cfg.eval.num_reconstructions, len(data))
  if n == 0:
    return
  width = pipeline.round_up(int(data.lengths[:n].max()), cfg.data.pad_multiple)
  b = cfg.eval.batch_size
  for start in range(0, n, b):
    yield pipeline.make_batch(data, np.arange(start, min(start + b, n)), width)["tokens"]


def _dialogue_features(cfg, model, variables, data, rng) -> np.ndarray:
  """`generation.features` of every pair of `data`, row i = pair i."""
  feature_fn = lambda tokens, context, speakers, i: generation.features(
      model, variables, (tokens, context, speakers), jax.random.fold_in(rng, i))
  return probe.feature_matrix(data, feature_fn, cfg.eval.batch_size, cfg.data.pad_multiple,
                              keys=CVAE.input_keys)


def _dialogue_probe(cfg, model, variables, vocab: Vocab, test, rng) -> dict[str, float]:
  """Linear probes of the response's dialogue act and emotion from E_q[z|x,c] (the context
  vector for seq2seq): fitted on the first `eval.probe_train_examples` training pairs, scored
  on `test`; with the majority-class accuracy of the test set for reference."""
  train_pairs = run_data.load_pairs(cfg.data, cfg.data.train_split)[
      :cfg.eval.probe_train_examples]
  train = run_data.encoder(cfg.data, vocab)(train_pairs)
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


def _missing(path: str) -> errors.WorkdirError:
  return errors.WorkdirError(f"{path} not found: the workdir must be a directory written by "
                             "an experiments/*.py run (check --workdir).")


def saved_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run was trained with (its `config.json`); a clear error if there is none."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    raise _missing(path)
  return configs.from_json(workdir_lib.read_json(path, "the run's config"))


def saved_vocabulary(workdir: str) -> Vocab:
  """The vocabulary a run was trained with (its `vocab.json`); a clear error if it is missing
  or damaged."""
  path = os.path.join(workdir, VOCAB_FILE)
  if not os.path.exists(path):
    raise _missing(path)
  try:
    return bpe.load_vocabulary(path)
  except (ValueError, KeyError, TypeError) as e:
    raise errors.WorkdirError(f"{path} is damaged ({e}); restore it from a copy, or retrain "
                              "in a fresh --workdir.") from e


def example_batch(cfg: ExperimentConfig) -> dict[str, np.ndarray]:
  """A batch of the run's shapes (for a restore target) without reading its data."""
  b, d = cfg.data.eval_batch_size, cfg.data
  example = {"tokens": np.full((b, d.pad_multiple), 4, np.int32),
             "weights": np.ones((b,), np.float32)}
  if d.dialogue:
    example["context"] = np.full((b, d.context_window, d.pad_multiple), 4, np.int32)
    example["context_speakers"] = np.zeros((b, d.context_window), np.int32)
  return example


def load_run(workdir: str, which: str = "best", *, with_meta: bool = False):
  """A finished run, for downstream use: (config, model, variables, vocab).

  The config is the run's saved `config.json`, read (`configs.read`); the variables those of
  its best (or latest) checkpoint, restored on this process's devices (a damaged or missing
  best checkpoint falls back to the newest intact one, `restore_variables`). With
  `with_meta`, the checkpoint's metadata follows, its 'checkpoint' naming the one restored
  (e.g. 'latest/1250').
  """
  workdir = workdir_lib.resolve_workdir(workdir, must_exist=True)
  cfg = configs.read(saved_config(workdir))
  vocab = saved_vocabulary(workdir)
  model = build.build_model(cfg.model, len(vocab))
  task = build.build_task(cfg, model, vocab, 1, 1)
  variables, meta = restore_variables(cfg, workdir, task, example_batch(cfg), vocab,
                                      mesh_lib.make_mesh(), which)
  return (cfg, model, variables, vocab, meta) if with_meta else (cfg, model, variables, vocab)
