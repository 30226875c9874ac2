"""Evaluates a finished (or interrupted) run's best checkpoint on a split.

  python experiments/evaluate.py --workdir=runs/ptb_vae --split=test

Reads the run's config.json and vocab.json from the workdir, writes
<workdir>/eval_<split>.json (nll, ppl, elbo, kl, mi, au, k_samples, n_sentences, n_tokens,
examples) and prints the metrics table, reconstructions and prior samples.
"""

from absl import flags

import main_lib

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
  fv = dict(flag_values=flag_values)
  flags.DEFINE_string("workdir", None, "The run's directory.", required=True, **fv)
  flags.DEFINE_string("split", "test", "Split to evaluate.", **fv)
  flags.DEFINE_enum("checkpoint", "best", ["best", "latest"],
                    "Which checkpoint (best falls back to latest when none is intact).", **fv)
  flags.DEFINE_integer("k_samples", None, "Importance samples (default: the run's config).",
                       **fv)
  flags.DEFINE_integer("max_examples", None, "Evaluate only the first N sentences.", **fv)
  flags.DEFINE_string("data_dir", None, "Corpus directory, if it moved since training.", **fv)
  flags.DEFINE_integer("probe_train_examples", None,
                       "Dialogue runs: training pairs of the act/emotion probes (0: no probes).",
                       **fv)
  flags.DEFINE_integer("seed", 0, "Seed of the importance samples.", **fv)


def main(argv):
  main_lib.no_arguments(argv)
  from vae_jax import experiment
  from vae_jax.training import distributed
  distributed.initialize()
  workdir = experiment.resolve_workdir(FLAGS.workdir, must_exist=True)
  cfg = experiment.saved_config(workdir)
  with cfg.unlocked():
    if FLAGS.k_samples is not None:
      cfg.eval.k_samples = FLAGS.k_samples
    if FLAGS.max_examples is not None:
      cfg.eval.max_examples = FLAGS.max_examples
    if FLAGS.data_dir is not None:
      cfg.data.dir = FLAGS.data_dir
    if FLAGS.probe_train_examples is not None:
      cfg.eval.probe_train_examples = FLAGS.probe_train_examples
  experiment.resolve_paths(cfg)
  experiment.check_config(cfg)
  experiment.evaluate_workdir(cfg, workdir, [FLAGS.split], which=FLAGS.checkpoint,
                              seed=FLAGS.seed)


if __name__ == "__main__":
  main_lib.run(define_flags, main)
