"""Trains and evaluates DG-VAE; see experiments/configs/dg_vae.py for variants.

  python experiments/dg_vae.py --workdir=runs/dg_vae
"""

import main_lib

if __name__ == "__main__":
  main_lib.run_training("dg_vae.py")
