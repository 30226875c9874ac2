"""Flags shared by the experiment mains (kept out of the library: configs stop here)."""

import os

from absl import app, flags
from ml_collections import config_flags

from vae_jax.training import distributed

FLAGS = flags.FLAGS


def define_flags(default_config: str) -> None:
  config_flags.DEFINE_config_file("config", default_config, "Experiment config file[:variants].",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results.",
                      required=True)
  flags.DEFINE_string("coordinator_address", None,
                      "host:port of process 0, for multi-process runs.")
  flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.")
  flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.")
  flags.DEFINE_bool("distributed_auto", False,
                    "Let jax.distributed detect the cluster (Cloud TPU pod slices).")


def initialize_distributed() -> None:
  """Joins a multi-process run when asked (must precede any other JAX call)."""
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         auto_detect=FLAGS.distributed_auto)


def _train_main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  initialize_distributed()
  from vae_jax import experiment  # after jax.distributed is initialised
  experiment.run(FLAGS.config, FLAGS.workdir)


def run_training(config_name: str) -> None:
  """The whole main of a training experiment: flags, distributed set-up, train, evaluate.

  `config_name` (e.g. 'vae.py') is the default --config, found in experiments/configs/.
  """
  define_flags(os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_name))
  app.run(_train_main)
