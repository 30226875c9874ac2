"""Evaluates a finished (or interrupted) run's best checkpoint on a split.

  python experiments/evaluate.py --workdir=runs/ptb_vae --split=test

Reads the run's config.json and vocab.json from the workdir, writes
<workdir>/eval_<split>.json (nll, ppl, elbo, kl, mi, au, k_samples, n_sentences, n_tokens,
examples) and prints the metrics table, reconstructions and prior samples.
"""

from absl import app, flags

from vae_jax import experiment
from vae_jax.training import distributed

flags.DEFINE_string("workdir", None, "The run's directory.", required=True)
flags.DEFINE_string("split", "test", "Split to evaluate.")
flags.DEFINE_enum("checkpoint", "best", ["best", "latest"], "Which checkpoint.")
flags.DEFINE_integer("k_samples", None, "Importance samples (default: the run's config).")
flags.DEFINE_integer("max_examples", None, "Evaluate only the first N sentences.")
flags.DEFINE_string("data_dir", None, "Corpus directory, if it moved since training.")
flags.DEFINE_integer("probe_train_examples", None,
                     "Dialogue runs: training pairs of the act/emotion probes (0: no probes).")
flags.DEFINE_integer("seed", 0, "Seed of the importance samples.")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed.initialize()
  try:
    cfg = experiment.saved_config(FLAGS.workdir)
  except FileNotFoundError as e:
    raise app.UsageError(str(e)) from None
  if FLAGS.k_samples is not None:
    cfg.eval.k_samples = FLAGS.k_samples
  if FLAGS.max_examples is not None:
    cfg.eval.max_examples = FLAGS.max_examples
  if FLAGS.data_dir is not None:
    cfg.data.dir = FLAGS.data_dir
  if FLAGS.probe_train_examples is not None:
    cfg.eval.probe_train_examples = FLAGS.probe_train_examples
  experiment.evaluate_workdir(cfg, FLAGS.workdir, [FLAGS.split], which=FLAGS.checkpoint,
                              seed=FLAGS.seed)


if __name__ == "__main__":
  app.run(main)
