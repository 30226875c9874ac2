"""Trains and evaluates the configured model; see experiments/configs/lm.py for variants.

  python experiments/lm.py --config=experiments/configs/lm.py --workdir=runs/lm
"""

import main_lib

if __name__ == "__main__":
  main_lib.run_training("lm.py")
