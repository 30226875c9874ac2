"""Sentiment (or factor) classification from the codes of trained runs (Li et al. 2019).

  python experiments/classify.py --workdir=runs/yelp_vae --workdir=runs/yelp_flow \
      --data_dir=../shared/data --corpus=short_yelp \
      --train_splits=train_100,train_500,train_1000,train_2000,train_10000 \
      --test_split=test --out=runs/classify_yelp.json

For every workdir the best checkpoint is loaded, every labelled sentence of the training
subsets and of the test split is mapped to its features (`generation.features`: the posterior
mean of a VAE, the final hidden state of a language model), and for every training subset an
L2-penalised logistic regression is fitted, its penalty chosen by 5-fold cross-validation on
that subset (`vae_jax.probe`). Training sentences that also occur in the test split are removed
first (`--remove_overlap`; short Yelp repeats 6.5% of train_10000 in test). Sentences are
encoded with the run's vocabulary and max_length (longer ones truncated, never dropped, so every
test sentence is scored). Prints test accuracies (%) as a table, rows = workdirs, columns =
training subsets, and writes {workdir: {split: {accuracy, l2, n_train, n_test, n_removed}}} to
--out.

On the embedded corpus (`--corpus=synthetic --train_splits=train_100,train_1000
--test_split=test`), 'train_N' is the first N training sentences and each of the four known
factors (topic, sentiment, tense, number) is probed separately.
"""

from __future__ import annotations

import os

from absl import flags, logging
import jax
import numpy as np

import main_lib
from vae_jax import errors, fileio, generation, probe, run_evaluation
from vae_jax import workdir as workdir_lib
from vae_jax.data import corpora, encoding, synthetic
from vae_jax.training import checkpoint as checkpoint_lib

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_multi_string("workdir", None, "A trained run's directory (repeat for several).",
                            required=True, **fv)
  flags.DEFINE_string("data_dir", None, "Corpus directory (default: each run's data.dir).",
                      **fv)
  flags.DEFINE_string("corpus", "short_yelp", "Labelled corpus.", **fv)
  flags.DEFINE_list("train_splits", ["train_100", "train_500", "train_1000", "train_2000",
                                     "train_10000"], "Labelled training subsets.", **fv)
  flags.DEFINE_string("test_split", "test", "Split the accuracy is reported on.", **fv)
  flags.DEFINE_bool("remove_overlap", True,
                    "Drop training sentences that also occur in the test split.", **fv)
  flags.DEFINE_string("out", None, "JSON file for the results.", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the cross-validation folds and feature rng.", **fv)


def encoded_features(cfg, model, variables, vocab, examples, rng: jax.Array) -> np.ndarray:
  """float32 [N, F] features of `examples` (row i = examples[i]) under a trained model."""
  data = encoding.encode(examples, vocab, cfg.data.max_length, "truncate")
  logging.info("%d sentences: %s", len(examples), data.summary())

  def feature_fn(tokens: np.ndarray, index: int) -> np.ndarray:
    return np.asarray(generation.features(model, variables, (tokens,),
                                          jax.random.fold_in(rng, index)))

  return probe.feature_matrix(data, feature_fn, cfg.eval.batch_size, cfg.data.pad_multiple)


def load_labelled(corpus: str, split: str, data_dir: str | None):
  """Examples of a labelled split; for the embedded corpus 'train_N' is its first N sentences."""
  if corpus != "synthetic":
    return corpora.load_split(corpus, split, data_dir)
  name, _, size = split.partition("_")
  examples = synthetic.generate(name)
  return examples[:int(size)] if size else examples


def classify_run(workdir: str, corpus: str, train_splits: list[str], test_split: str,
                 data_dir: str | None, remove_overlap: bool, seed: int) -> dict[str, dict]:
  """Test accuracy of a linear probe on the run's features, for every training subset (and,
  on the embedded corpus, every factor: keys 'factor/split')."""
  cfg, model, variables, vocab = run_evaluation.load_run(workdir, which="best")
  data_dir = data_dir or cfg.data.dir or None
  rng = jax.random.PRNGKey(seed)
  test = load_labelled(corpus, test_split, data_dir)
  test_x = encoded_features(cfg, model, variables, vocab, test, jax.random.fold_in(rng, 0))
  test_labels = probe.label_sets(corpus, test)
  results = {}
  for i, split in enumerate(train_splits, start=1):
    train = load_labelled(corpus, split, data_dir)
    removed = 0
    if remove_overlap:
      train, removed = probe.remove_overlap(train, test)
    if not train:
      raise errors.DataError(f"{corpus}/{split} has no sentences left after removing the "
                       f"{removed} that also occur in {test_split}.")
    train_x = encoded_features(cfg, model, variables, vocab, train, jax.random.fold_in(rng, i))
    for target, train_y in probe.label_sets(corpus, train).items():
      test_y = test_labels[target]
      num_classes = int(max(train_y.max(), test_y.max())) + 1
      out = probe.probe_accuracy(train_x, train_y, test_x, test_y, num_classes, seed=seed)
      key = split if target == "label" else f"{target}/{split}"
      results[key] = {**out, "n_removed": removed}
      logging.info("%s %s: %s", workdir, key, results[key])
  return results


def accuracy_table(results: dict[str, dict[str, dict]], splits: list[str]) -> str:
  """Plain-text table of test accuracies in %: one row per workdir, one column per split."""
  header = ["workdir", *splits]
  rows = [[w] + [f"{100 * r[s]['accuracy']:.1f}" if s in r else "-" for s in splits]
          for w, r in results.items()]
  widths = [max([len(h)] + [len(row[i]) for row in rows]) for i, h in enumerate(header)]
  line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))
  return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def main(argv):
  main_lib.no_arguments(argv)
  checkpoint_lib.quiet_library_logs()
  splits = [s.strip() for s in FLAGS.train_splits if s.strip()]
  try:
    if FLAGS.corpus != "synthetic":
      if corpora.get_corpus(FLAGS.corpus).num_classes is None:
        raise errors.ConfigError(f"--corpus={FLAGS.corpus} has no labels; choose a labelled "
                                 "corpus (e.g. short_yelp).")
      for split in [*splits, FLAGS.test_split]:
        corpora.canonical_split(FLAGS.corpus, split)
  except errors.UserError:
    raise
  except ValueError as e:
    raise errors.ConfigError(f"--corpus/--train_splits/--test_split: {e}") from e
  data_dir = workdir_lib.resolve_path(FLAGS.data_dir) if FLAGS.data_dir else None
  out = workdir_lib.resolve_path(FLAGS.out) if FLAGS.out else None
  # Every run is checked before the first is evaluated.
  workdirs = [workdir_lib.resolve_workdir(w, must_exist=True) for w in FLAGS.workdir]
  for workdir in workdirs:
    run_evaluation.saved_config(workdir)
  results = {}
  for given, workdir in zip(FLAGS.workdir, workdirs):
    results[given] = classify_run(workdir, FLAGS.corpus, splits, FLAGS.test_split, data_dir,
                                  FLAGS.remove_overlap, FLAGS.seed)
    if out:
      os.makedirs(os.path.dirname(out), exist_ok=True)
      fileio.write_json_atomic(out, results)
  print(f"{FLAGS.corpus} {FLAGS.test_split} accuracy (%) of a linear probe:")
  columns = splits
  if FLAGS.corpus == "synthetic":
    columns = [f"{f}/{s}" for f in synthetic.FACTOR_NAMES for s in splits]
  print(accuracy_table(results, columns))


if __name__ == "__main__":
  main_lib.run(define_flags, main)
