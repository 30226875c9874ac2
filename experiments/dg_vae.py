"""Trains and evaluates DG-VAE; see experiments/configs/dg_vae.py for variants.

  python experiments/dg_vae.py --workdir=runs/dg_vae
"""

import main_lib

define_flags = main_lib.training_flags("dg_vae.py")

if __name__ == "__main__":
  main_lib.run(define_flags, main_lib.train)
