"""Trains and evaluates the configured model; see experiments/configs/lm.py for variants.

  python experiments/lm.py --config=experiments/configs/lm.py --workdir=runs/lm
"""

import main_lib

define_flags = main_lib.training_flags("lm.py")

if __name__ == "__main__":
  main_lib.run(define_flags, main_lib.train)
