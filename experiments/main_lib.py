"""Flags shared by the experiment mains (kept out of the library: configs stop here)."""

from absl import flags
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
