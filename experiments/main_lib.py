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
import re
import sys
import traceback
from collections.abc import Callable

from absl import app, flags, logging
from ml_collections import config_flags

from vae_jax import errors
from vae_jax.training import host_memory

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
  cfg = loaded_config()
  from vae_jax import configs, runner, workdir  # after jax.distributed is initialised
  path = workdir.resolve_workdir(FLAGS.workdir)  # a bad --workdir is the first error
  runner.run(configs.read(cfg), path)


def loaded_config():
  """`FLAGS.config`; a config file that failed to load is a `ConfigError` (config_flags keeps
  the failure until the config is first used)."""
  try:
    FLAGS.config.keys()
  except OSError as e:
    cause = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
    raise errors.ConfigError(f"--config={FLAGS['config'].config_filename}: cannot load the "
                             f"config file ({cause}).") from None
  return FLAGS.config


def with_clear_errors(main: Callable) -> Callable:
  """`main` with every `UserError` reported as one line and exit status 2."""

  def wrapped(argv):
    try:
      return main(argv)
    except errors.UserError as e:
      if FLAGS.verbosity >= 1:
        logging.error("%s", traceback.format_exc())
      fail(str(e))

  return wrapped


def fail(message: str) -> None:
  """Ends the program with `error: <message>` (one line) and exit status 2.

  It exits at once (`os._exit`), after flushing the output: by then the run has finished
  writing (the loop waits for checkpoint saves before an error leaves it), and what library
  threads and the interpreter's shutdown would add after the line is noise, such as the
  tracebacks of tensorstore futures left behind by a checkpoint that could not be read
  ("Event loop is closed").
  """
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  # Library threads may still be printing: from here on their output goes nowhere, and the
  # error line is the last the user sees.
  stderr = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 1)
  os.dup2(devnull, 2)
  os.write(stderr, f"error: {errors.one_line(message)}\n".encode())
  os._exit(USER_ERROR_STATUS)


def flag_error(error: Exception, argv: list[str]) -> str:
  """One line for a flag that could not be parsed.

  absl wraps errors of the config file (an unknown `:variant`, a config that does not load) in
  a message holding the config's traceback: its last line is the cause. ml_collections raises
  KeyError / AttributeError for an override of a field the config does not have, naming only
  the last part of the field; the `--config.*` argument that ends with it is the one meant.
  """
  if isinstance(error, (KeyError, AttributeError)):
    text = str(error)
    key = (re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text) or ["?"])[0]
    given = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    named = [a for a in given if a.split(".")[-1] == key] or [f"--config.*.{key}"]
    hint = re.search(r'Did you mean "([^"]+)"', text)
    hint = f' (did you mean "{hint.group(1)}"?)' if hint else ""
    return (f"{named[0]}: the config has no such field{hint}; check the spelling against the "
            "config file (experiments/configs/) or --helpfull.")
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  message = lines[0] if lines else repr(error)
  if len(lines) > 1 and any(line.startswith("Traceback") for line in lines):
    cause = lines[-1]
    message = f"{message.split(': Error whilst')[0]}: {cause.split(': ', 1)[-1]}"
  return message.removeprefix("flag ")


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with every failure reported by `fail`."""
  try:
    return FLAGS(argv)
  except (flags.Error, KeyError, AttributeError, ValueError) as e:
    fail(flag_error(e, argv))


def run(define_flags: Callable[[flags.FlagValues], None], main: Callable) -> None:
  """Defines the flags and runs `main` under absl with clear errors.

  First of all, before any computation starts XLA's threads, malloc is set to keep freed
  memory (`host_memory.retain_freed_memory`: without it XLA:CPU's per-step buffers are mapped
  and zero-filled afresh at every step).
  """
  host_memory.retain_freed_memory()
  try:
    define_flags(FLAGS)  # parses the default config, with the `--config.*` overrides in argv
  except (flags.Error, KeyError, AttributeError, ValueError) as e:
    fail(flag_error(e, sys.argv))
  app.run(with_clear_errors(main), flags_parser=parse_flags)
