"""What every experiment main shares (kept out of the library: configs stop here).

A main is a module with `define_flags(flag_values)` and `main(argv)`, run by `run`:

  define_flags = main_lib.training_flags("vae.py")
  if __name__ == "__main__":
    main_lib.run(define_flags, main_lib.train)

Flags are defined on a `FlagValues` passed in, so a test can parse any documented command
line against a fresh one without running it (tests/test_docs.py). `run` turns every expected
failure (`vae_jax.errors.UserError`: a bad config value, a missing or malformed corpus file, an
unusable workdir, a vocabulary mismatch, no restorable checkpoint) into one line on stderr,
`error: ...`, and exit status 2; the traceback is logged with `--verbosity=1`.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from vae_jax import errors

FLAGS = flags.FLAGS
CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs")

# The exit status of an expected failure (absl uses 1 for usage errors).
USER_ERROR_STATUS = 2


def training_flags(config_name: str) -> Callable[[flags.FlagValues], None]:
  """The flags of a training main whose default `--config` is `configs/<config_name>`."""

  def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    config_flags.DEFINE_config_file("config", os.path.join(CONFIG_DIR, config_name),
                                    "Experiment config file[:variants].", lock_config=True,
                                    flag_values=flag_values)
    flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and results "
                        "(relative paths are relative to the current directory).",
                        required=True, flag_values=flag_values)
    flags.DEFINE_string("coordinator_address", None,
                        "host:port of process 0, for multi-process runs.",
                        flag_values=flag_values)
    flags.DEFINE_integer("num_processes", None, "Number of processes of a multi-process run.",
                         flag_values=flag_values)
    flags.DEFINE_integer("process_id", None, "This process's index in a multi-process run.",
                         flag_values=flag_values)
    flags.DEFINE_bool("distributed_auto", False,
                      "Let jax.distributed detect the cluster (Cloud TPU pod slices).",
                      flag_values=flag_values)

  return define_flags


def initialize_distributed() -> None:
  """Joins a multi-process run when asked (must precede any other JAX call)."""
  from vae_jax.training import distributed
  distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                         auto_detect=FLAGS.distributed_auto)


def no_arguments(argv) -> None:
  if len(argv) > 1:
    raise errors.ConfigError(f"unexpected arguments {argv[1:]}: every setting is a --flag "
                             "(e.g. --workdir=DIR, --config.model.latent_dim=16).")


def train(argv) -> None:
  """The main of a training experiment: train, then evaluate the best checkpoint."""
  no_arguments(argv)
  initialize_distributed()
  from vae_jax import experiment  # after jax.distributed is initialised
  experiment.run(FLAGS.config, FLAGS.workdir)


def with_clear_errors(main: Callable) -> Callable:
  """`main` with every `UserError` reported as one line and exit status 2."""

  def wrapped(argv):
    try:
      return main(argv)
    except errors.UserError as e:
      if FLAGS.verbosity >= 1:
        logging.error("%s", traceback.format_exc())
      sys.stderr.flush()
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(USER_ERROR_STATUS)

  return wrapped


def run(define_flags: Callable[[flags.FlagValues], None], main: Callable) -> None:
  """Defines the flags and runs `main` under absl with clear errors."""
  define_flags(FLAGS)
  app.run(with_clear_errors(main))
