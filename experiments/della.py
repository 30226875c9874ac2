"""Trains and evaluates DELLA or one of the Transformer models it is compared with; see
experiments/configs/della.py for the variants.

  python experiments/della.py --workdir=runs/ptb_della
  python experiments/della.py --config=experiments/configs/della.py:ptb,single --workdir=...
"""

import main_lib

define_flags = main_lib.training_flags("della.py")

if __name__ == "__main__":
  main_lib.run(define_flags, main_lib.train)
