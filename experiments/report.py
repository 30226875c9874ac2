"""Figures of trained (or still training) runs.

  python experiments/report.py --workdir=runs/flow_vrae
  python experiments/report.py --workdir=runs/vae --workdir=runs/flow_vrae --split=test

For every workdir, PNGs in <workdir>/figures/ (`vae_jax.plots` says what each shows):

  curves.png               training and validation curves of metrics.jsonl, one panel per
                           logged quantity (loss, -ELBO, rec, KL, beta, MI, AU, learning rate)
  latent_dims_<split>.png  per-dimension KL of the split's posteriors, sorted, beside
                           Var_x E_q[z_d|x] with the AU threshold 0.01
  pca_<split>.png          the posterior means on their first two principal components,
                           coloured by the corpus's labels (embedded corpus: its four factors;
                           Yelp: sentiment; DailyDialog: dialogue act)

With several workdirs, one comparison figure with every run on shared axes (curves, sorted
per-dimension KL and AU statistic): --out, by default report_compare.png in the workdirs'
closest common parent folder (runs/report_compare.png for the commands above); --out also
asks for it with one workdir.

The posterior figures restore the best checkpoint (--checkpoint=latest: the latest), falling
back to the latest while a run has no best one yet, and encode a seeded random subset of
--max_examples sentences of --split. A run without any checkpoint gets its curves only, as do
language models (no latent) and the seq2seq dialogue baseline; each skip is one logged line.
For a flow posterior the per-dimension KL has no closed form: the panel shows its base
Gaussian's, labelled so (DELLA: u's Gaussian along the chain of posterior means); the AU
statistic is the evaluation's own (`vae_jax.evaluation.dimension_statistics`).
"""

from __future__ import annotations

import dataclasses
import json
import os

from absl import flags, logging
import jax
import numpy as np

import main_lib
from vae_jax import (errors, evaluation, fileio, plots, probe, run_data,
                     run_evaluation)
from vae_jax import workdir as workdir_lib
from vae_jax.data import corpora, readers, synthetic
from vae_jax.training import checkpoint as checkpoint_lib, writers

FLAGS = flags.FLAGS
FIGURES = "figures"
COMPARE_FILE = "report_compare.png"


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_multi_string("workdir", None, "A run's directory (repeat for several; relative "
                            "paths are relative to the current directory).", required=True,
                            **fv)
  flags.DEFINE_string("split", "test", "Split of the posterior figures.", **fv)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                    "Checkpoint of the posterior figures (best falls back to latest while a "
                    "run has none).", **fv)
  flags.DEFINE_integer("max_examples", 2000, "Sentences of --split encoded (a seeded random "
                       "subset when the split is larger).", lower_bound=1, **fv)
  flags.DEFINE_string("data_dir", None, "Corpus directory, if it moved since training.", **fv)
  flags.DEFINE_string("out", None, "The comparison figure (PNG); default: report_compare.png "
                      "in the workdirs' common parent, written when several are given.", **fv)
  flags.DEFINE_bool("posterior", True, "Draw the posterior figures (restores a checkpoint); "
                    "--noposterior: curves only.", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the subset and of sampled posterior means.", **fv)


def scalar_records(workdir: str) -> list[dict]:
  """The records of `<workdir>/metrics.jsonl`; a `WorkdirError` if it is missing, damaged or
  holds no scalar metrics yet."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise errors.WorkdirError(f"{path} not found: the workdir holds no training log; give the "
                              "directory of a run written by an experiments/*.py command.")
  try:
    records = writers.read_metrics(workdir)
  except json.JSONDecodeError as e:
    raise errors.WorkdirError(f"{path} is damaged ({e}); restore it from a copy.") from e
  if not any("metrics" in r for r in records):
    raise errors.WorkdirError(f"{path} holds no metrics yet: wait until the run has logged "
                              "its first steps.")
  return records


def write_figure(fig, path: str) -> None:
  fileio.write_bytes_atomic(path, plots.png_bytes(fig))
  print(f"wrote {path}")


def restore(workdir: str, which: str):
  """`run_evaluation.load_run` of the `which` checkpoint (the newest intact one; a run without a
  best checkpoint yet gives its latest), or None (logged) when the run has no checkpoint.
  Returns (run, the kind of checkpoint used: 'best' or 'latest')."""
  try:
    *run, meta = run_evaluation.load_run(workdir, which, with_meta=True)
  except errors.CheckpointNotFoundError:
    logging.warning("%s: no checkpoint yet, so no posterior figures (curves only).", workdir)
    return None, None
  return tuple(run), meta["checkpoint"].split("/")[0]


def kl_description(model) -> tuple[str, bool]:
  """The per-dimension KL panel's title for `model`'s posterior family (in latent coordinates:
  the prior's for the dialogue CVAE), and whether those KLs sum to the posterior's exact KL."""
  family = model.posterior_family
  return family.kl_label, family.closed_form


def colourings(cfg, data, examples) -> list[plots.Colouring]:
  """What to colour the PCA by: the responses' dialogue acts for dialogue runs, the embedded
  corpus's four factors, else the corpus's label where it has one (none for PTB, Yahoo, ...).
  Row i of `data` is `examples[data.source_indices[i]]`."""
  if hasattr(data, "acts"):  # dialogue pairs
    return [plots.Colouring("dialogue act", data.acts, readers.DAILYDIALOG_ACTS)]
  corpus = corpora.CORPORA.get(cfg.data.corpus)
  kept = [examples[i] for i in data.source_indices]
  if corpus is None or not kept:
    return []
  if corpus.name == "synthetic":
    return [plots.Colouring(name, labels, synthetic.FACTOR_VALUES[name])
            for name, labels in probe.label_sets(corpus.name, kept).items()]
  if corpus.label_names is None or any(ex.label is None for ex in kept):
    return []
  return [plots.Colouring("label", probe.label_sets(corpus.name, kept)["label"],
                          corpus.label_names)]


def subset(examples: list, max_examples: int, seed: int) -> list:
  """`examples`, or a seeded random subset of `max_examples` of them in their order (a split
  stored by label, as some are, is not cut to one class)."""
  if len(examples) <= max_examples:
    return examples
  rows = np.sort(np.random.default_rng(seed).choice(len(examples), max_examples, replace=False))
  return [examples[i] for i in rows]


def posterior_report(workdir: str, name: str, *, split: str, which: str, max_examples: int,
                     data_dir: str | None, seed: int) -> dict | None:
  """What the posterior figures of a run show, or None (logged) where they do not apply.

  Restores the run (`restore`), encodes at most `max_examples` sentences of `split` and runs
  the evaluation's per-batch function over them (`evaluation.posterior_summaries`). Returns
  `evaluation.dimension_statistics` plus 'kl_label' and 'kl_exact' (`kl_description`),
  'codes' (the posterior means E_q[z|x], for sampled ones the average of the two independent
  estimates), 'colourings' and 'title'.
  """
  run, which = restore(workdir, which)
  if run is None:
    return None
  cfg, model, variables, vocab = run
  if not model.code_dim:
    logging.warning("%s: the %s model has no latent code, so no posterior figures (curves "
                    "only).", workdir, cfg.model.kind)
    return None
  data_cfg = cfg.data if data_dir is None else dataclasses.replace(cfg.data, dir=data_dir)
  examples = subset(run_data.load_split_examples(data_cfg, split), max_examples, seed)
  data = run_data.encoder(data_cfg, vocab)(examples)
  batch_eval, keys = evaluation.make_batch_eval(model, 1, 1), model.input_keys
  summary = evaluation.posterior_summaries(
      batch_eval, variables, data, jax.random.PRNGKey(seed), batch_size=cfg.eval.batch_size,
      pad_multiple=cfg.data.pad_multiple, keys=keys)
  out = evaluation.dimension_statistics(summary)
  out["kl_label"], out["kl_exact"] = kl_description(model)
  out["codes"] = 0.5 * (summary["code_mean"] + summary["code_mean_b"])
  out["colourings"] = colourings(cfg, data, examples)
  out["title"] = f"{name}: {split} split, {len(data)} examples, {which} checkpoint"
  return out


def posterior_figures(report: dict, split: str) -> dict[str, object]:
  """File name -> figure of a `posterior_report`."""
  return {
      f"latent_dims_{split}.png": plots.latent_dimensions_figure(
          report["kl_dims"], report["au_variance"], kl_label=report["kl_label"],
          au_threshold=report["au_threshold"], title=report["title"]),
      f"pca_{split}.png": plots.pca_figure(report["codes"], report["colourings"],
                                           code_label="E_q[z|x]", title=report["title"]),
  }


def comparison_path(workdirs: list[str], out: str | None) -> str | None:
  """--out as an absolute path; by default report_compare.png in the closest folder holding
  every workdir, when there are several (None: no comparison figure)."""
  if out:
    return os.path.abspath(out)
  if len(workdirs) < 2:
    return None
  return os.path.join(os.path.commonpath([os.path.dirname(w) for w in workdirs]), COMPARE_FILE)


def main(argv):
  main_lib.no_arguments(argv)
  checkpoint_lib.quiet_library_logs()
  workdirs = list(dict.fromkeys(workdir_lib.resolve_workdir(w, must_exist=True)
                                for w in FLAGS.workdir))
  # Every run is checked before the first figure is written.
  records = {w: scalar_records(w) for w in workdirs}
  out = comparison_path(workdirs, FLAGS.out)
  data_dir = os.path.abspath(FLAGS.data_dir) if FLAGS.data_dir else None
  parent = os.path.commonpath([os.path.dirname(w) for w in workdirs])
  names = {w: os.path.relpath(w, parent) for w in workdirs}
  dimensions = {}
  for workdir in workdirs:
    figures = os.path.join(workdir, FIGURES)
    workdir_lib.prepare(figures)
    write_figure(plots.curves_figure(records[workdir], title=names[workdir]),
                 os.path.join(figures, "curves.png"))
    report = None
    if FLAGS.posterior:
      report = posterior_report(workdir, names[workdir], split=FLAGS.split,
                                which=FLAGS.checkpoint, max_examples=FLAGS.max_examples,
                                data_dir=data_dir, seed=FLAGS.seed)
    if report is not None:
      dimensions[names[workdir]] = report
      for filename, fig in posterior_figures(report, FLAGS.split).items():
        write_figure(fig, os.path.join(figures, filename))
  if out:
    workdir_lib.prepare(os.path.dirname(out))
    write_figure(plots.comparison_figure({names[w]: records[w] for w in workdirs}, dimensions,
                                         title=f"per-dimension panels: {FLAGS.split} split"
                                         if dimensions else ""),
                 out)


if __name__ == "__main__":
  main_lib.run(define_flags, main)
