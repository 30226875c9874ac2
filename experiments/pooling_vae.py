"""Trains and evaluates the pooling-encoder VAE; see experiments/configs/pooling_vae.py for variants.

  python experiments/pooling_vae.py --workdir=runs/pooling_vae
"""

import main_lib

define_flags = main_lib.training_flags("pooling_vae.py")

if __name__ == "__main__":
  main_lib.run(define_flags, main_lib.train)
