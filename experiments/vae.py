"""Trains and evaluates the configured model; see experiments/configs/vae.py for variants.

  python experiments/vae.py --config=experiments/configs/vae.py --workdir=runs/vae
"""

import main_lib

if __name__ == "__main__":
  main_lib.run_training("vae.py")
