"""Trains and evaluates the configured model; see experiments/configs/vae.py for variants.

  python experiments/vae.py --config=experiments/configs/vae.py --workdir=runs/vae
"""

import main_lib

define_flags = main_lib.training_flags("vae.py")

if __name__ == "__main__":
  main_lib.run(define_flags, main_lib.train)
