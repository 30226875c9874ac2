"""Trains and evaluates the configured model; see experiments/configs/vae.py for variants.

  python experiments/vae.py --config=experiments/configs/vae.py --workdir=runs/vae
"""

from absl import app

import main_lib
from vae_jax import experiment

main_lib.define_flags("experiments/configs/vae.py")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  main_lib.initialize_distributed()
  experiment.run(main_lib.FLAGS.config, main_lib.FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
