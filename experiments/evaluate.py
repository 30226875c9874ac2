"""Evaluates a finished (or interrupted) run's best checkpoint.

  python experiments/evaluate.py --workdir=runs/ptb_vae --config.eval.splits=test
  python experiments/evaluate.py --workdir=runs/ptb_vae --config.eval.splits=test \
      --config.eval.k_samples=50 --config.eval.max_examples=1000

Reads the run's config.json and vocab.json from the workdir and evaluates the splits of its
`eval.splits` with its evaluation settings; `--config.eval.<field>=value` overrides one of them
(any field of the saved config's `eval` section: splits, k_samples, max_examples,
probe_train_examples, ...; other sections stay those the run was trained with). Writes
<workdir>/eval_<split>.json (nll, ppl, elbo, kl, mi, au, k_samples, n_sentences, n_tokens,
examples) and prints the metrics table, reconstructions and prior samples.
"""

from absl import flags
import ml_collections
from ml_collections import config_flags

import main_lib

FLAGS = flags.FLAGS
# The sections of an experiment config: an override of any field parses, and `main` rejects
# the ones outside `eval` with one line.
SECTIONS = ("data", "model", "kl", "optimizer", "train", "pretrain", "eval")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The run's directory.", required=True, **fv)
  config_flags.DEFINE_config_dict(
      "config", ml_collections.ConfigDict({s: ml_collections.ConfigDict() for s in SECTIONS}),
      "Overrides of the run's saved eval settings: --config.eval.<field>=value.",
      lock_config=False, accept_new_attributes=True, **fv)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                    "Which checkpoint (best falls back to latest when none is intact).", **fv)
  flags.DEFINE_string("data_dir", None, "Corpus directory, if it moved since training.", **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the importance samples.", **fv)


def check_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  """One line for an override outside `eval` (`configs.eval_overrides`), before any run is
  read (tests/test_docs.py checks documented commands with it)."""
  from vae_jax import configs
  configs.eval_overrides(config_flags.get_override_values(flag_values["config"]))


def main(argv):
  main_lib.no_arguments(argv)
  check_flags()
  from vae_jax import configs, errors, run_evaluation
  from vae_jax import workdir as workdir_lib
  from vae_jax.training import distributed
  distributed.initialize()
  workdir = workdir_lib.resolve_workdir(FLAGS.workdir, must_exist=True)
  saved = configs.with_eval_overrides(run_evaluation.saved_config(workdir),
                                      config_flags.get_override_values(FLAGS["config"]),
                                      FLAGS.data_dir)
  cfg = configs.read(saved)
  if not cfg.eval.splits:
    raise errors.ConfigError("the run's config evaluates no split (its eval.splits is empty): "
                             "name one, e.g. --config.eval.splits=test.")
  run_evaluation.evaluate_workdir(cfg, workdir, list(cfg.eval.splits), which=FLAGS.checkpoint,
                                  seed=FLAGS.seed)


if __name__ == "__main__":
  main_lib.run(define_flags, main)
